"""tasks/sft_sets.py, the entries of issue 14 (DeepMind mathematics, AdaptLLM finance tasks, financial-qa-10K,
GSM8K socratic, the refused vision set) and SFTSetTask (a scored set as a Task for grpo.py): each entry renders
from rows written here as the hub gives them, its scoring takes a right and a wrong reply apart, local copies load
through load_split, and the prompts of SFTSetTask are the ones sft.py trains."""
import json
import os

import pytest

import common
import engine as engine_lib
import grpo
import sft
import tasks
from tasks import rewards as rewards_lib
from tasks import sft_sets

# one row per new entry, in the hub schema of its dataset (the DeepMind strings as the hub's copy holds them:
# the repr of the bytes of a line, b'...\n')
HUB_ROWS = {
    "gsm8k_socratic": {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?",
        "answer": "How many clips did Natalia sell in May? ** Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "How many clips did Natalia sell altogether in April and May? ** Natalia sold 48+24 = <<48+24=72>>72 "
                  "clips altogether in April and May.\n#### 72"},
    "deepmind_math": {"question": "b'Solve -42*r + 27*c = -1167 and 130*r + 4*c = 372 for r.\\n'",
                      "answer": "b'4\\n'"},
    "financial_qa_10k": {
        "question": "What area did NVIDIA initially focus on before expanding into other computationally intensive "
                    "fields?",
        "answer": "NVIDIA initially focused on PC graphics.",
        "context": "Since our original focus on PC graphics, we have expanded into several other large and important "
                   "computationally intensive fields.",
        "ticker": "NVDA", "filing": "2023_10K"},
    "adaptllm_convfinqa": {
        "id": 0,
        "input": "net revenue was $ 5,735 million in 2014 and $ 5,524 million in 2013.\n"
                 "Question: what was the change in net revenue from 2013 to 2014?\nAnswer: 211\n"
                 "Question: what is the percentage change?\nAnswer:",
        "label": "3.8%"},
    "adaptllm_fpb": {
        "id": 0,
        "input": "Operating profit totalled EUR 21.1 mn, up from EUR 18.6 mn in 2007.\nQuestion: what is the "
                 "sentiment?\nAnswer: positive\n\nPharmaceuticals group Orion Corp reported a fall in its third-quarter "
                 "earnings that were hit by larger expenditures on R&D and marketing.\nQuestion: what is the "
                 "sentiment?\nAnswer:",
        "options": ["negative", "neutral", "positive"], "gold_index": 0, "class_id": 0},
    "adaptllm_fiqa_sa": {
        "id": 0,
        "input": "$AAPL short-term bearish, the chart looks weak into earnings.\nQuestion: what is the sentiment on "
                 "AAPL?\nAnswer:",
        "options": ["negative", "neutral", "positive"], "gold_index": 0, "class_id": 0},
    "adaptllm_headline": {
        "id": 0,
        "input": "Headline: \"gold futures edge up after weak US jobs data\" Now answer this question: Does the news "
                 "headline talk about price going up?",
        "options": ["No", "Yes"], "gold_index": 1, "class_id": 0},
    "adaptllm_ner": {
        "id": 0,
        "input": "Given a sentence, extract the named entities and their types (person, location, organization).\n"
                 "Sentence: This Loan Agreement is made between Sanofi and the Borrower in Paris.\nEntities:",
        "label": "Sanofi (organization) Paris (location)"},
}


def first_user(example):
    return [m["content"] for m in example["messages"] if m["role"] == "user"][-1]


def test_new_entries_render_from_their_hub_rows():
    got = {name: sft_sets.to_example(sft_sets.get_set(name), row) for name, row in HUB_ROWS.items()}
    # DeepMind: the byte-literal wrapper and its \n are gone, the answer is the plain '4'
    dm = got["deepmind_math"]
    assert first_user(dm) == "Solve -42*r + 27*c = -1167 and 130*r + 4*c = 372 for r."
    assert dm["messages"][-1]["content"] == "4" and dm["gold"] == "4"
    assert got["gsm8k_socratic"]["gold"] == "72"
    assert got["adaptllm_fpb"]["gold"] == "negative" == got["adaptllm_fpb"]["messages"][-1]["content"]
    assert got["adaptllm_fiqa_sa"]["gold"] == "negative"
    assert got["adaptllm_headline"]["gold"] == "Yes"
    assert first_user(got["adaptllm_fpb"]) == HUB_ROWS["adaptllm_fpb"]["input"]  # AdaptLLM's prompt as written
    assert got["adaptllm_convfinqa"]["gold"] == "3.8%"
    assert got["adaptllm_ner"]["gold"] is None  # entity lists: eval loss only
    assert got["adaptllm_ner"]["messages"][-1]["content"] == "Sanofi (organization) Paris (location)"
    fq = first_user(got["financial_qa_10k"])
    assert fq.startswith("Context: Since our original focus") and fq.endswith("Question: What area did NVIDIA "
                                                                              "initially focus on before expanding "
                                                                              "into other computationally intensive "
                                                                              "fields?")
    assert got["financial_qa_10k"]["gold"] is None
    # the rows the hub may also give: other escapes in the bytes repr, an option in another case, a list label
    row = {"question": "b\"What is the value of 'x' in x + 2 = 3?\\n\"", "answer": "b'1\\n'"}
    assert first_user(sft_sets.to_example(sft_sets.get_set("deepmind_math"), row)) == \
        "What is the value of 'x' in x + 2 = 3?"
    plain = {"question": "Calculate 2 + 2.", "answer": "4"}  # an already clean copy passes unchanged
    assert sft_sets.to_example(sft_sets.get_set("deepmind_math"), plain)["gold"] == "4"
    upper = dict(HUB_ROWS["adaptllm_fpb"], options=["Negative", "Neutral", "Positive"], gold_index=2)
    assert sft_sets.to_example(sft_sets.get_set("adaptllm_fpb"), upper)["gold"] == "positive"
    listed = dict(HUB_ROWS["adaptllm_convfinqa"], label=["3.8%"])
    assert sft_sets.to_example(sft_sets.get_set("adaptllm_convfinqa"), listed)["gold"] == "3.8%"
    with pytest.raises(common.ConfigError, match="option 'bullish' outside the label words"):
        sft_sets.to_example(sft_sets.get_set("adaptllm_fpb"), dict(upper, options=["bearish", "bullish"],
                                                                   gold_index=1))


def test_the_json_fixture_of_the_registry_wide_test_holds_these_rows():
    """tests/test_sft.py renders every registry entry from tests/fixtures/sft_sets.json: the rows there are these."""
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "sft_sets.json")) as f:
        rows = json.load(f)
    for name, row in HUB_ROWS.items():
        assert rows[name] == row, name


@pytest.mark.parametrize("name, right, wrong", [
    ("deepmind_math", " 4\n", " 5"),
    ("deepmind_math", "4.0.", "-4"),
    ("gsm8k_socratic", "... 48+24 = 72\n#### 72", "#### 73"),
    ("adaptllm_fpb", " negative", " positive"),
    ("adaptllm_fiqa_sa", "Negative, the chart is weak", " neutral"),
    ("adaptllm_headline", " Yes", " No"),
    ("adaptllm_convfinqa", " 3.8%", " 3.9%"),
])
def test_scoring_takes_a_right_and_a_wrong_reply_apart(name, right, wrong):
    entry = sft_sets.get_set(name)
    example = sft_sets.to_example(entry, HUB_ROWS[name])
    assert sft_sets.score_generation(entry, example, right)["correct"] is True
    scored = sft_sets.score_generation(entry, example, wrong)
    assert scored["correct"] is False and scored["parsed"] is True


def test_answer_scoring_numbers_as_numbers_else_text():
    """deepmind_math / adaptllm_convfinqa ('answer'): equal as numbers when both are numbers, else as text."""
    same = sft_sets.same_answer
    assert same("0.50", "1/2") and same("-841469015.544", "-841469015.544") and same("$1,204", "1204")
    assert not same("1/110", "1/111") and not same("0.3333", "1/3")
    assert same("54*a-30", "54*a - 30") and same("false", "False") and not same("54*a + 30", "54*a - 30")
    assert same("-2, 1", "-2, 1") and not same("1, -2", "-2, 1")  # lists (polynomial roots) in their order
    assert sft_sets.answer_value("1e999999999") is None and sft_sets.answer_value("1/0") is None
    entry = sft_sets.get_set("deepmind_math")
    assert sft_sets.score_generation(entry, {"gold": "True"}, " True\nbecause") == {
        "pred": "True", "correct": True, "parsed": True}
    assert sft_sets.score_generation(entry, {"gold": "4"}, "   \n") == {"pred": None, "correct": False, "parsed": False}


def test_local_copies_load_through_load_split(tmp_path):
    # an AdaptLLM set (one split on the hub: a seeded holdout of it is the eval part)
    rows = [dict(HUB_ROWS["adaptllm_fpb"], id=i, gold_index=i % 3) for i in range(30)]
    path = tmp_path / "fpb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = sft_sets.load_split("adaptllm_fpb", "train", str(path))
    held = sft_sets.load_split("adaptllm_fpb", "eval", str(path))
    assert len(train) == 27 and len(held) == 3
    assert {e["gold"] for e in train + held} == {"negative", "neutral", "positive"}
    # DeepMind: a module's .txt of the pre-generated archive (question and answer on alternate lines)
    txt = tmp_path / "algebra__linear_1d.txt"
    txt.write_text("Solve 0 = 4*b + b + 15 for b.\n-3\nSolve -3*x = 12 for x.\n-4\n")
    got = sft_sets.load_split("deepmind_math", "train", str(txt), options={"module": "algebra__linear_1d"})
    assert [(first_user(e), e["gold"]) for e in got] == [("Solve 0 = 4*b + b + 15 for b.", "-3"),
                                                          ("Solve -3*x = 12 for x.", "-4")]
    hub_copy = tmp_path / "dm.jsonl"  # a local copy of hub rows, byte-literal artifacts and all
    hub_copy.write_text(json.dumps(HUB_ROWS["deepmind_math"]) + "\n")
    assert sft_sets.load_split("deepmind_math", "eval", str(hub_copy))[0]["gold"] == "4"
    with pytest.raises(common.ConfigError, match="unknown module \\['algebra_linear'\\].*algebra__linear_1d"):
        sft_sets.load_split("deepmind_math", "train", str(txt), options={"module": "algebra_linear"})


def test_vision_sets_are_refused_by_name_with_the_reason():
    for name in ("sujet_finance_vision", "sujet-ai/Sujet-Finance-QA-Vision-100k"):
        with pytest.raises(common.ConfigError, match=f"dataset '{name}' is a vision set.*image-text model"):
            sft_sets.get_set(name)
    with pytest.raises(common.ConfigError, match="vision set"):
        sft.check_config(sft.Config(model="x", datasets=["imdb", "sujet_finance_vision"]))


# -----------------------------------------------------------------------------
# SFTSetTask: a scored set as a Task (grpo.py task=sft:NAME)


def sst2_rows(n):
    """sst2 in its hub schema (sentence, label, idx): the label is the adjective's."""
    words = [("great", 1), ("awful", 0), ("lovely", 1), ("dull", 0)]
    return [{"sentence": f"a {words[i % 4][0]} film", "label": words[i % 4][1], "idx": i} for i in range(n)]


def test_sft_set_task_prompts_scores_and_rewards(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(40)))
    test.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(8)))
    task = tasks.get_task("sft:sst2", train_path=str(train), test_path=str(test))
    examples = task.examples("train")
    assert len(examples) == 40 and len(task.examples("test")) == 8
    ex = examples[1]
    assert ex["gold"] == ex["label"] == "negative" and ex["set"] == "sst2"
    # the prompt is the text sft.py's user_assistant format puts before the reply
    entry = sft_sets.get_set("sst2")
    messages = sft_sets.to_example(entry, sst2_rows(2)[1])["messages"]
    tok = engine_lib.NativeTokenizer(common.Tokenizer("byte"), False)
    assert tok.tok.decode(sft.prompt_ids(messages, "user_assistant", tok)) == task.prompt(ex)
    assert task.prompt(ex).endswith("Sentence: a awful film\nSentiment:\nAssistant:") and "User:" in task.stop()
    completions = [" negative", " positive", "Negative.", " banana"]
    assert [task.reward(ex, c) for c in completions] == [1.0, 0.0, 1.0, 0.0]
    assert task.evaluate(ex, " negative") == {"extracted": "negative", "correct": True}
    assert rewards_lib.get_reward("sft_set")([ex] * 4, None, completions) == [1.0, 0.0, 1.0, 0.0]
    assert rewards_lib.get_reward("label")([ex] * 4, None, completions) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="reward 'sft_set' needs the examples of an SFT registry set"):
        rewards_lib.get_reward("sft_set")([{"gold": "1"}], None, ["1"])
    # a number set and an answer set score through the same task
    (tmp_path / "dm.txt").write_text("Solve -3*x = 12 for x.\n-4\n" * 20)
    dm = tasks.get_task("sft:deepmind_math", train_path=str(tmp_path / "dm.txt"), test_path=str(tmp_path / "dm.txt"))
    dm_ex = dm.examples("test")[0]
    assert [dm.reward(dm_ex, c) for c in (" -4", " 4")] == [1.0, 0.0]
    with pytest.raises(common.ConfigError, match="free-form answers"):
        tasks.get_task("sft:fiqa_qa")
    with pytest.raises(common.ConfigError, match="vision set"):
        tasks.check_task("sft:sujet_finance_vision")


@pytest.mark.parametrize("stage, path", [("sft", "configs/sft_deepmind_math.yaml"),
                                         ("sft", "configs/sft_finance_tasks.yaml"),
                                         ("grpo", "configs/grpo_labels_demo.yaml")])
def test_the_configs_of_these_sets_pass_their_stage_checks(stage, path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module = sft if stage == "sft" else grpo
    cfg = common.load_config(module.Config, [os.path.join(root, path), "model=gpt2"])
    module.check_config(cfg)


def test_dataset_names_as_the_seed_types_them_map_to_the_registry():
    import sft
    from tasks import sft_sets
    assert sft_sets.registry_name("stanfordnlp/imdb") == "imdb"
    assert sft_sets.registry_name("glue", "sst2") == "sst2" and sft_sets.registry_name("glue", "mrpc") == "mrpc"
    assert sft_sets.registry_name("openai/gsm8k", "main") == "gsm8k"
    assert sft_sets.registry_name("openai/gsm8k", "socratic") == "gsm8k_socratic"
    assert sft_sets.registry_name("virattt/financial-qa-10K") == "financial_qa_10k"
    with pytest.raises(common.ConfigError, match="several configs"):
        sft_sets.registry_name("glue")
    # another Financial PhraseBank config: an entry of its own, reading that config from the hub
    name = sft_sets.registry_name("takala/financial_phrasebank", "sentences_50agree")
    assert name == "financial_phrasebank_sentences_50agree"
    assert sft_sets.get_set(name).config == "sentences_50agree"
    assert name not in sft_sets.REGISTRY  # a derived entry never changes what the registry lists (test_sft.py)
    assert sft_sets.get_set("financial_phrasebank").config == "sentences_allagree"  # the default is untouched
    cfg = common.load_config(sft.Config, ["model=gpt2", "datasets=[stanfordnlp/imdb,glue]",
                                          "dataset_configs=[None,sst2]", "mixture_rates=[0.7,0.3]"])
    sft.check_config(cfg)
    assert cfg.datasets == ["imdb", "sst2"]

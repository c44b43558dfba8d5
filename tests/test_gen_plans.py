"""gen_plans.py: prompt, parsing, validity, retries, resume, the analysis on a hand-written fixture, and an
end-to-end run of the transformers backend with a tiny random model (format only; content is not asserted)."""
import json
import os
import re

import pytest

import common
import gen_plans
from conftest import shared_path
from tasks import gsm8k, synthetic

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "plans_small.json")


def answer(plan, steps, final):
    return f"PLAN: {plan}\nEXECUTION: {steps}\n#### {final}"


# -----------------------------------------------------------------------------
# prompt


def test_prompt_holds_the_rules_the_example_and_the_question():
    q = "Tom has 12 apples and buys 8 more. How many apples does he have now?"
    msgs = gen_plans.build_messages("  " + q + "\n")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    system = msgs[0]["content"]
    for rule in ("logical steps", "Do NOT write any specific numbers", "initial quantity", "given amount",
                 "2-4 sentences", "structure", "PLAN:", "EXECUTION:", "#### <number>"):
        assert rule in system, rule
    assert msgs[-1]["content"] == f"Problem: {q}"
    # the worked example must itself obey the format and the rules it teaches
    example = gen_plans.parse_output(msgs[2]["content"])
    assert example is not None
    assert example["answer"] == "7" and gsm8k.same_number(example["answer"], 48 - 48 * 3 // 4 - 5)
    assert gen_plans.count_numbers(example["plan"]) == 0
    assert 2 <= example["plan"].count(". ") + 1 <= 4
    assert gen_plans.EXAMPLE_QUESTION in msgs[1]["content"]


# -----------------------------------------------------------------------------
# parsing and the validity check


def test_parse_well_formed_outputs():
    p = gen_plans.parse_output(answer("Add the given amount to the initial quantity.", "12 + 8 = 20.", "20"))
    assert p == {"plan": "Add the given amount to the initial quantity.", "execution": "12 + 8 = 20.\n#### 20",
                 "answer": "20"}
    # markdown headers, lower case, a comma in the answer, a dollar sign, and chatter after the answer
    text = ("Sure! Here is the solution.\n\n**Plan:** Multiply the monthly amount by the number of months.\n\n"
            "**Execution:**\n100 * 12 = 1,200 dollars.\n#### $1,200\n\nI hope this helps!")
    p = gen_plans.parse_output(text)
    assert p["plan"] == "Multiply the monthly amount by the number of months."
    assert p["execution"] == "100 * 12 = 1,200 dollars.\n#### 1200"
    assert p["answer"] == "1200"
    p = gen_plans.parse_output("plan: Halve the total.\nexecution: 9 / 2 = 4.5\n####4.5")
    assert p["answer"] == "4.5" and p["plan"] == "Halve the total."
    p = gen_plans.parse_output("PLAN: Find the loss.\nEXECUTION: 3 - 5 = -2\n#### -2")
    assert p["answer"] == "-2"


@pytest.mark.parametrize("text", [
    None, "", "The answer is 20.",
    "EXECUTION: 12 + 8 = 20\n#### 20",                           # no plan
    "PLAN: Add the amounts.\n#### 20",                            # no execution
    "PLAN: Add the amounts.\nEXECUTION: 12 + 8 = 20",             # no final '#### N' (e.g. cut by max_tokens)
    "EXECUTION: 12 + 8 = 20\nPLAN: Add the amounts.\n#### 20",   # execution before the plan
    "PLAN:\nEXECUTION: 12 + 8 = 20\n#### 20",                     # empty plan
    "PLAN: Add the amounts.\nEXECUTION:\n#### 20",                # empty execution
    "PLAN: Add the amounts.\nEXECUTION: 12 + 8\n#### twenty",     # final answer not a number
])
def test_parse_malformed_outputs_return_none(text):
    assert gen_plans.parse_output(text) is None


def test_gold_answer_and_validity_check():
    assert gsm8k.gold_number("Janet sells 16 - 3 - 4 = 9 duck eggs.\n#### 18") == 18
    assert gsm8k.gold_number("... = 70,000\n#### 70,000") == 70000
    assert gsm8k.gold_number("#### 2.5") == 2.5
    with pytest.raises(ValueError):
        gsm8k.gold_number("no final answer here")
    assert gsm8k.same_number("18", 18)
    assert gsm8k.same_number("18.00", 18)
    assert gsm8k.same_number("1,200", 1200)
    assert gsm8k.same_number("$5", 5.0)
    assert not gsm8k.same_number("17", 18)
    assert not gsm8k.same_number("-18", 18)
    assert not gsm8k.same_number(None, 18)
    assert not gsm8k.same_number("eighteen", 18)


# -----------------------------------------------------------------------------
# retries and resume, with a scripted backend (this tests the bookkeeping, not a model)


class ScriptedBackend:
    """Answers each problem from a script: script[question] is a list of answers, one per attempt (the last one
    repeats). Records every call; can raise once `fail_after` examples have been generated."""

    def __init__(self, script, fail_after=None):
        self.script, self.fail_after = script, fail_after
        self.asked, self.calls = {}, []

    def generate(self, conversations, temperature, seeds):
        questions = [c[-1]["content"][len("Problem: "):] for c in conversations]
        generated = sum(len(q) for q, _, _ in self.calls)
        if self.fail_after is not None and generated + len(questions) > self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append((questions, temperature, list(seeds)))
        out = []
        for q in questions:
            n = self.asked.get(q, 0)
            self.asked[q] = n + 1
            answers = self.script[q]
            out.append(answers[min(n, len(answers) - 1)])
        return out


def problems_of(n, split="train"):
    return [{"index": i, "id": f"gsm8k_{split}_{i}", "question": f"Problem number {i}?", "answer_numerical": i + 10}
            for i in range(n)]


def correct(i):
    return answer("Add the given amount to the initial quantity.", f"{i} + 10 = {i + 10}", str(i + 10))


def test_solve_batch_retries_wrong_and_unparseable_answers():
    probs = problems_of(5)
    q = [p["question"] for p in probs]
    garbage = "I am not sure how to answer that."
    wrong = answer("Guess.", "1 + 1 = 2", "2")
    script = {q[0]: [correct(0)],                # right at once
              q[1]: [wrong, correct(1)],         # right on the first retry
              q[2]: [wrong],                     # always wrong
              q[3]: [garbage],                   # never parseable
              q[4]: [wrong, garbage, garbage]}   # a parsed wrong answer beats later garbage
    backend = ScriptedBackend(script)
    cfg = gen_plans.Config(max_retries=2, temperature=0.0, retry_temperature=0.8, seed=3)
    recs = gen_plans.solve_batch(probs, backend, cfg)
    assert [r["id"] for r in recs] == [p["id"] for p in probs]
    assert [r["valid"] for r in recs] == [True, True, False, False, False]
    assert [r["attempts"] for r in recs] == [1, 2, 3, 3, 3]
    assert recs[0]["plan"] == "Add the given amount to the initial quantity."
    assert recs[0]["execution"] == "0 + 10 = 10\n#### 10" and recs[0]["answer_numerical"] == 10
    assert recs[2]["error"] == "wrong_answer" and recs[2]["predicted"] == "2" and recs[2]["plan"] == "Guess."
    assert recs[3]["error"] == "unparseable" and recs[3]["plan"] == "" and recs[3]["raw"] == garbage
    assert recs[4]["error"] == "wrong_answer"
    # only the failures are asked again; greedy first, then sampling; a fresh seed per attempt
    assert [len(qs) for qs, _, _ in backend.calls] == [5, 4, 3]
    assert [t for _, t, _ in backend.calls] == [0.0, 0.8, 0.8]
    seeds_q2 = [seeds[qs.index(q[2])] for qs, _, seeds in backend.calls]
    assert len(set(seeds_q2)) == 3


def write_gsm8k_jsonl(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"Problem number {i}?", "answer": f"steps\n#### {i + 10}"}) + "\n")


def test_resume_after_interruption_skips_done_ids_without_duplicates(tmp_path):
    data, out = tmp_path / "gsm8k.jsonl", tmp_path / "plans" / "plans.json"
    write_gsm8k_jsonl(data, 7)
    script = {f"Problem number {i}?": [correct(i)] for i in range(7)}
    script["Problem number 5?"] = ["no format at all"]
    argv = ["--data_path", str(data), "--output_path", str(out), "--batch_size", "2", "--max_retries", "1",
            "--model", "no/such-model"]

    crashing = ScriptedBackend(script, fail_after=5)  # two batches of 2 finish, the third crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        gen_plans.main(argv, backend=crashing)
    side = gen_plans.partial_path(str(out))
    assert not out.exists()
    assert [r["id"] for r in common.read_jsonl(side)] == [f"gsm8k_train_{i}" for i in range(4)]
    with open(side, "a") as f:  # a kill in the middle of writing a line
        f.write('{"id": "gsm8k_train_4", "quest')

    resumed = ScriptedBackend(script)
    results = gen_plans.main(argv, backend=resumed)
    assert sorted(resumed.asked) == [f"Problem number {i}?" for i in (4, 5, 6)]  # nothing done twice
    with open(out) as f:
        saved = json.load(f)
    assert saved == results
    assert [r["id"] for r in saved] == [f"gsm8k_train_{i}" for i in range(7)]
    assert [r["answer_numerical"] for r in saved] == [i + 10 for i in range(7)]
    assert [r["valid"] for r in saved] == [True] * 5 + [False] + [True]
    assert not os.path.exists(side)
    with open(gen_plans.meta_path(str(out))) as f:
        meta = json.load(f)
    assert (meta["n"], meta["n_valid"], meta["n_unparseable"], meta["n_generated_this_run"]) == (7, 6, 1, 3)

    # everything done: a third run loads no model (the model name does not even exist) and keeps the data
    assert gen_plans.main(argv + ["--backend", "transformers"]) == saved


# -----------------------------------------------------------------------------
# analysis


def test_count_numbers_definition():
    count = gen_plans.count_numbers
    assert count("Take the given amount and add it to the initial quantity.") == 0
    assert count("add the two amounts, then take half of it, twice") == 0  # spelled-out numbers do not count
    assert count("1,200 dollars") == 1
    assert count("$25 at 20% off") == 2
    assert count("3.5 hours") == 1
    assert count("3/4 of them") == 2
    assert count("on the 2nd day") == 1
    assert count("Days: 2 * 7 = 14.\n#### 14") == 4
    assert count("1,2,3") == 3  # a comma not followed by exactly three digits separates numbers


def test_count_operations_symbols_and_words():
    ops = gen_plans.count_operations("12 + 8 = 20, 20 - 5 = 15, 3 * 4 = 12, 12 / 4 = 3, 10% of it")
    assert ops == {"add": 1, "subtract": 1, "multiply": 1, "divide": 1, "percent": 1}
    ops = gen_plans.count_operations("Add the amounts, subtract the cost, multiply by the rate, divide by the "
                                     "count and take the percentage. A well-known three-step plan.")
    assert ops == {"add": 1, "subtract": 1, "multiply": 1, "divide": 1, "percent": 1}


def test_plan_categories_and_recommended_lengths():
    assert [gen_plans.plan_category(n) for n in (0, 1, 2, 3, 5, 6, 40)] == [
        "perfect", "mostly_abstract", "mostly_abstract", "somewhat_concrete", "somewhat_concrete",
        "too_concrete", "too_concrete"]
    # the seed's 95th percentiles of question/plan/execution/total and the lengths it configured
    assert [gen_plans.recommend_length(p) for p in (105, 75, 165, 345)] == [128, 128, 256, 512]
    assert [gen_plans.recommend_length(p) for p in (10, 64, 64.5)] == [64, 64, 128]


def test_analysis_on_the_fixture(tmp_path, capsys):
    tok_file = shared_path("tokenizers", "gpt2.tiktoken")
    with open(FIXTURE) as f:
        records = json.load(f)
    tok = common.Tokenizer("gpt2", tokenizer_file=tok_file)
    s = gen_plans.analyze_records(records, tok)
    # 8 records, one flagged valid=false is left out; counts worked out by hand (see the fixture)
    assert (s["n_records"], s["n_analyzed"], s["n_invalid_skipped"]) == (8, 7, 1)
    assert s["_per_record"]["plan_numbers"] == [0, 0, 2, 1, 3, 8, 0]
    assert s["_per_record"]["exec_numbers"] == [4, 8, 7, 4, 7, 10, 10]
    assert s["numbers"]["plan_mean"] == pytest.approx(2.0)
    assert s["numbers"]["execution_mean"] == pytest.approx(50 / 7)
    assert s["numbers"]["exec_plan_ratio"] == pytest.approx(25 / 7)
    assert s["numbers"]["ratio_met"] is True
    cats = s["categories"]
    assert {k: v["count"] for k, v in cats.items()} == {
        "perfect": 3, "mostly_abstract": 2, "somewhat_concrete": 1, "too_concrete": 1}
    assert cats["perfect"]["share"] == pytest.approx(3 / 7) and cats["perfect"]["target"] == [0.45, 0.55]
    assert {k: v["met"] for k, v in cats.items()} == {
        "perfect": False, "mostly_abstract": False, "somewhat_concrete": True, "too_concrete": False}
    assert s["operations"]["plan"] == {"add": 4, "subtract": 1, "multiply": 5, "divide": 1, "percent": 2}
    assert s["operations"]["execution"] == {"add": 3, "subtract": 1, "multiply": 9, "divide": 2, "percent": 0}
    # lengths: GPT-2 tokens per segment; total is the sum of the three
    L = s["_per_record"]["lengths"]
    assert L["plan"][0] == len(tok.encode(records[0]["plan"]))
    assert all(t == q + p + e for q, p, e, t in zip(L["question"], L["plan"], L["execution"], L["total"]))
    assert s["lengths"]["total"]["mean"] == pytest.approx(sum(s["lengths"][k]["mean"]
                                                              for k in ("question", "plan", "execution")))
    for seg, st in s["lengths"].items():
        assert st["recommended"] == gen_plans.recommend_length(st["p95"]) and st["p95"] <= st["max"]

    # the command line: report, plot and summary
    plot = tmp_path / "figs" / "plans.png"
    gen_plans.main(["--analyze", "--input_path", FIXTURE, "--output_plot", str(plot), "--num_samples", "2",
                    "--tokenizer_file", tok_file])
    printed = capsys.readouterr().out
    assert "exec/plan ratio 3.57x" in printed and printed.count("\n--- gsm8k_train_") == 2
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(gen_plans.summary_path(str(plot))) as f:
        summary = json.load(f)
    assert summary["categories"]["too_concrete"]["count"] == 1 and "_per_record" not in summary
    # the summary must never overwrite the data it describes
    data = tmp_path / "x_summary.json"
    with open(FIXTURE) as f:
        data.write_text(f.read())
    with pytest.raises(ValueError, match="overwrite"):
        gen_plans.main(["--analyze", "--input_path", str(data), "--output_plot", str(tmp_path / "x.png"),
                        "--tokenizer_file", tok_file])


def test_unknown_config_key_is_refused():
    with pytest.raises(common.ConfigError, match="no_such_key"):
        gen_plans.main(["--no_such_key", "1"])


# -----------------------------------------------------------------------------
# end to end: the transformers backend with a tiny random Llama and a byte-level tokenizer with a chat template


def make_tiny_chat_model(path):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols: any text encodes
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_end_to_end_transformers_backend_writes_schema_valid_json(tmp_path):
    gsm8k_test = shared_path("gsm8k", "test.jsonl")
    model_dir, out = tmp_path / "model", tmp_path / "out" / "plans.json"
    make_tiny_chat_model(model_dir)
    results = gen_plans.main(["--model", str(model_dir), "--backend", "transformers", "--data_path", gsm8k_test,
                              "--split", "test", "--num_examples", "3", "--max_tokens", "16", "--batch_size", "2",
                              "--max_retries", "1", "--output_path", str(out)])
    with open(out) as f:
        saved = json.load(f)
    assert saved == results
    gold = [gsm8k.gold_number(r["answer"]) for r in common.read_jsonl(gsm8k_test)[:3]]
    assert [r["id"] for r in saved] == ["gsm8k_test_0", "gsm8k_test_1", "gsm8k_test_2"]
    assert [r["answer_numerical"] for r in saved] == gold == [18, 3, 70000]
    for r in saved:
        assert {"id", "question", "plan", "execution", "answer_numerical", "valid", "attempts"} <= set(r)
        assert isinstance(r["question"], str) and isinstance(r["plan"], str) and isinstance(r["execution"], str)
        assert isinstance(r["valid"], bool) and 1 <= r["attempts"] <= 2
        if not r["valid"]:
            assert r["error"] in ("unparseable", "wrong_answer")
            if r["error"] == "unparseable":
                assert isinstance(r["raw"], str)  # what the model really said (16 tokens at most)
    assert not os.path.exists(gen_plans.partial_path(str(out)))


# -----------------------------------------------------------------------------
# SVAMP input (the transfer experiment's target)


def test_svamp_json_is_read_split_and_solved_end_to_end(tmp_path):
    path = shared_path("svamp", "SVAMP.json")
    with open(path) as f:
        raw = json.load(f)
    train = gen_plans.load_problems(gen_plans.Config(data_path=path, split="train"))
    test = gen_plans.load_problems(gen_plans.Config(data_path=path, split="test"))
    assert (len(train), len(test)) == (700, 300) and not {p["id"] for p in train} & {p["id"] for p in test}
    first = raw[gen_plans.SVAMP_TRAIN]
    assert test[0]["id"] == f"svamp_{first['ID']}" and test[0]["answer_numerical"] == first["Answer"]
    assert test[0]["question"].startswith(first["Body"].strip()) and test[0]["question"].endswith(first["Question"])

    # gen_plans.py itself on SVAMP (dataset inferred from the .json path): the scripted model answers with the
    # value of SVAMP's own Equation, so a record is valid exactly when the Answer is read right
    script = {}
    for p, r in zip(test[:3], raw[gen_plans.SVAMP_TRAIN:]):
        value = float(synthetic.exact_value(re.sub(r"(\d+)\.0\b", r"\1", r["Equation"])))  # "( 76.0 - 25.0 )"
        script[p["question"]] = [answer("Combine the given amounts.", f"{r['Equation']} = {value:g}", f"{value:g}")]
    out = tmp_path / "svamp_plans.json"
    saved = gen_plans.main(["--data_path", path, "--split", "test", "--num_examples", "3", "--output_path",
                            str(out), "--max_retries", "0"], backend=ScriptedBackend(script))
    assert [r["id"] for r in saved] == [p["id"] for p in test[:3]]
    assert all(r["valid"] for r in saved) and saved[0]["plan"] == "Combine the given amounts."


def test_svamp_bad_input_is_refused(tmp_path):
    bad = tmp_path / "svamp.json"
    bad.write_text(json.dumps([{"Body": "Tom has 3 apples.", "Question": "How many?"}]))
    with pytest.raises(common.ConfigError, match="no Answer field"):
        gen_plans.load_problems(gen_plans.Config(data_path=str(bad), split="test"))
    with pytest.raises(common.ConfigError, match="splits train and test"):
        gen_plans.load_problems(gen_plans.Config(data_path=str(bad), split="validation", dataset="svamp"))
    with pytest.raises(common.ConfigError, match="dataset"):
        gen_plans.load_problems(gen_plans.Config(data_path=str(bad), dataset="svamp2"))


def test_no_problems_to_solve_is_refused_and_writes_nothing(tmp_path):
    """SVAMP.json's test split is the problems after the first 700: a shorter file has none. An empty plans file
    with exit 0 would look like a finished run; it is refused, and nothing is written."""
    short = tmp_path / "svamp.json"
    short.write_text(json.dumps([{"ID": "a", "Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3}]))
    out = tmp_path / "plans" / "plans.json"
    with pytest.raises(ValueError, match="no SVAMP test problems in .*svamp.json to make plans for"):
        gen_plans.main(["--data_path", str(short), "--split", "test", "--output_path", str(out)],
                       backend=ScriptedBackend({}))
    assert not (tmp_path / "plans").exists()

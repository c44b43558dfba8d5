"""Evaluation protocols (issue 9, items 1, 7, 8): few-shot prompts that fit with whole exemplars, the
lm-evaluation-harness GSM8K protocol beside the project's, HellaSwag's three rules, batched in-loop HellaSwag."""
import json
import random

import pytest
import torch

import common
import eval_gsm8k as ev
import model as model_lib
import train_gpt
from conftest import shared_path
from tasks import gsm8k, hellaswag
from test_export_hf import make_run
from test_train_gpt import records, tiny_args, write_arithmetic_data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny GPT-2-tokenizer model with 320 positions: 8-shot GSM8K prompts (~1,500 tokens) do not fit."""
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    root = tmp_path_factory.mktemp("protocols")
    make_run(str(root / "run"), "gpt2", (1, 12), steps=2, block_size=320, tokenizer_file=ranks)
    return {"run": str(root / "run"), "ranks": ranks, "tok": common.Tokenizer("gpt2", tokenizer_file=ranks)}


# -----------------------------------------------------------------------------
# item 1: few-shot prompts keep whole exemplars, as many as fit


def test_fewshot_prompts_keep_whole_exemplars_and_record_k(run, tmp_path, capsys):
    test_path, train_path = shared_path("gsm8k", "test.jsonl"), shared_path("gsm8k", "train.jsonl")
    res = ev.main(["task=gsm8k", f"model={run['run']}", f"data_path={test_path}", "limit=4", "fewshot=8",
                   "max_new_tokens=16", f"out_dir={tmp_path}", f"tokenizer_file={run['ranks']}"])
    room = 320 - 16
    exemplars = gsm8k.fewshot_exemplars(8, 1234, train_path)
    questions = gsm8k.load_gsm8k(test_path)[:4]
    preds = common.read_jsonl(str(tmp_path / "predictions.jsonl"))
    n_tokens = lambda text: len(run["tok"].encode(text))  # noqa: E731
    for rec, q in zip(preds, questions):
        k = rec["fewshot_k"]
        assert rec["prompt"] == gsm8k.fewshot_prompt(q["question"], exemplars[:k])  # whole exemplars, in order
        assert n_tokens(rec["prompt"]) <= room
        assert n_tokens(gsm8k.fewshot_prompt(q["question"], exemplars[:k + 1])) > room  # as many as fit
        assert k < 8
    counts = res["counts"]
    assert counts["truncated_prompts"] == 0 and counts["fewshot_requested"] == 8
    assert counts["fewshot_used_min"] == min(r["fewshot_k"] for r in preds)
    assert counts["fewshot_below_requested"] == 4
    assert json.load(open(tmp_path / "results.json"))["counts"]["fewshot_used_mean"] == pytest.approx(
        sum(r["fewshot_k"] for r in preds) / 4)
    assert "4 of 4 gsm8k prompts hold fewer than the 8 requested exemplars" in capsys.readouterr().err


def test_fit_fewshot_without_a_limit_keeps_every_exemplar():
    shots = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(3)]
    prompt, k = gsm8k.fit_fewshot("Q?", shots, len, None)
    assert k == 3 and prompt == gsm8k.fewshot_prompt("Q?", shots)
    prompt, k = gsm8k.fit_fewshot("Q?", shots, len, len(gsm8k.fewshot_prompt("Q?", shots[:2])))
    assert k == 2 and prompt.endswith("Question: Q?\nAnswer:") and "q2" not in prompt


# -----------------------------------------------------------------------------
# item 8: protocol=lm_eval, lm-evaluation-harness's gsm8k task


GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 1,210+24 = <<1210+24=1234>>1234.\n#### 1234"


@pytest.mark.parametrize("completion, strict_match, flexible_extract, project_strict", [
    (" So 1,234 in total.\n#### 1,234", True, True, True),
    (" #### 1234.", True, True, True),             # the trailing full stop is in regexes_to_ignore
    (" #### $1234", False, True, True),            # strict-match wants a digit right after '#### '
    (" ####1234", False, True, True),              # ... and exactly one space
    (" #### 01234", False, False, True),           # leading zeros are not normalised by the harness
    (" #### 1234.00", False, False, True),         # nor trailing zeros
    (" The answer is 1234.", False, True, False),  # no '####': only the last number
    (" #### 1234\n#### 99", True, False, True),    # strict takes the first match, flexible the last
    (" I do not know", False, False, False),
])
def test_lm_eval_strict_match_and_flexible_extract(completion, strict_match, flexible_extract, project_strict):
    s = gsm8k.score_lm_eval(completion, GOLD)
    assert s["correct"] == {"strict_match": strict_match, "flexible_extract": flexible_extract}
    assert gsm8k.score_completion(completion, "1234")["correct"]["strict"] == project_strict
    if "####" not in completion:
        assert s["extracted"]["strict_match"] == gsm8k.LM_EVAL_INVALID


def test_lm_eval_exemplars_are_drawn_per_question_from_one_seeded_generator():
    train = gsm8k.load_gsm8k(shared_path("gsm8k", "train.jsonl"))
    questions = gsm8k.load_gsm8k(shared_path("gsm8k", "test.jsonl"))[:3] + [train[5]]  # the last is in train
    per_q = gsm8k.lm_eval_exemplars(train, questions, 5, 1234)
    rnd = random.Random(1234)  # the harness's sampler: rnd.sample(docs, k) per document, in order
    draws = [rnd.sample(train, 5) for _ in questions]
    assert per_q[:3] == draws[:3] and len({tuple(e["id"] for e in shots) for shots in per_q}) == 4
    assert per_q[3] == [e for e in draws[3] if e is not train[5]][:5]


def test_protocol_lm_eval_end_to_end(run, tmp_path):
    test_path = shared_path("gsm8k", "test.jsonl")
    res = ev.main(["task=gsm8k", "protocol=lm_eval", f"model={run['run']}", f"data_path={test_path}", "limit=3",
                   "max_new_tokens=8", f"out_dir={tmp_path}", f"tokenizer_file={run['ranks']}"])
    train = gsm8k.load_gsm8k(shared_path("gsm8k", "train.jsonl"))
    questions = gsm8k.load_gsm8k(test_path)[:3]
    preds = common.read_jsonl(str(tmp_path / "predictions.jsonl"))
    for rec, q, shots in zip(preds, questions, gsm8k.lm_eval_exemplars(train, questions)):
        assert rec["prompt"] == gsm8k.fewshot_prompt(q["question"], shots) and rec["fewshot_k"] == 5
        assert rec["lm_eval"] == gsm8k.score_lm_eval(rec["completion"], q["answer"])
    assert set(res["metrics"]) == {"gsm8k_strict", "gsm8k_flexible", "gsm8k_lm_eval_strict_match",
                                   "gsm8k_lm_eval_flexible_extract"}
    assert res["protocol"] == "lm_eval" and res["counts"]["fewshot_requested"] == 5
    assert res["metric_protocols"]["gsm8k_lm_eval_strict_match"].startswith("lm_eval")
    assert res["metric_protocols"]["gsm8k_strict"].startswith("project")
    assert res["counts"]["truncated_prompts"] == 3  # 5-shot prompts cut from the left, as the harness does
    with pytest.raises(common.ConfigError, match="protocol=lm_eval"):
        ev.main(["task=svamp", "protocol=lm_eval", f"model={run['run']}", f"out_dir={tmp_path}",
                 f"data_path={shared_path('svamp', 'SVAMP.json')}", f"tokenizer_file={run['ranks']}"])


# -----------------------------------------------------------------------------
# item 7: HellaSwag tokenized once, batched, sharded; equal to one item at a time


def test_batched_hellaswag_equals_one_item_at_a_time():
    torch.manual_seed(0)
    tok = common.Tokenizer("byte")
    gpt = model_lib.GPT(model_lib.model_config("tiny", common.padded_vocab_size(tok.vocab_size), 64)).eval()
    items = hellaswag.load_hellaswag(shared_path("hellaswag", "hellaswag_val_full.txt"), limit=10)

    def logits_fn(idx):
        return gpt(idx)[0]

    want = {"correct": 0, "correct_norm": 0, "correct_norm_char": 0, "n": 0}
    encoded = hellaswag.encode_items(tok, items, max_len=64)
    batched, n_tokens = hellaswag.score_encoded(logits_fn, encoded, "cpu")  # all 10 items in one forward
    for i, item in enumerate(items):
        summed, mean = hellaswag.hellaswag_scores(logits_fn, tok, item, "cpu", max_len=64)
        assert torch.allclose(batched[i], summed, atol=1e-5) and torch.allclose(batched[i] / n_tokens[i], mean,
                                                                               atol=1e-5)
        chars = torch.tensor([len(x) for x in item["endings"]], dtype=torch.float)
        want["correct"] += int(summed.argmin()) == item["label"]
        want["correct_norm"] += int(mean.argmin()) == item["label"]
        want["correct_norm_char"] += int((summed / chars).argmin()) == item["label"]
        want["n"] += 1
    assert hellaswag.hellaswag_eval(logits_fn, encoded, "cpu", batch_items=4) == want
    shards = [hellaswag.hellaswag_eval(logits_fn, encoded, "cpu", rank=r, world_size=3, batch_items=2)
              for r in range(3)]
    assert {k: sum(s[k] for s in shards) for k in want} == want


def test_in_loop_hellaswag_defaults_to_checkpoint_steps(tmp_path):
    data_dir = write_arithmetic_data(str(tmp_path / "data"), train_tokens=8_000, val_tokens=2_000)
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data_dir, out, max_steps=5, val_interval=0, ckpt_interval=2,
                             hellaswag_file=shared_path("hellaswag", "hellaswag_val_full.txt"), hellaswag_limit=5))
    hs = records(out, "hellaswag")
    assert [r["step"] for r in hs] == [1, 3, 4]  # the checkpoints at steps 1, 3 and the end
    assert all(r["n"] == 5 and 0 <= r["acc_norm_char"] <= 1 for r in hs)


# -----------------------------------------------------------------------------
# item 6: a sweep can give each checkpoint its own process (what vLLM needs); the numbers do not change


def test_sweep_in_subprocesses_equals_the_sweep_in_process(run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(run["run"], run_dir)
    (step, first), = common.list_checkpoints(str(run_dir))
    ckpt = common.load_checkpoint(first)
    with torch.no_grad():
        for p in ckpt["model"].values():
            p.mul_(0.5)  # a second checkpoint with other weights
    ckpt.pop("path")
    common.save_checkpoint(str(run_dir / "ckpt_000005.pt"), ckpt)
    args = [f"model={run_dir}", "task=sweep", "sweep_tasks=[probes,hellaswag]", "limit=2", "probe_n=5",
            "probe_max_new_tokens=4", f"hellaswag_path={shared_path('hellaswag', 'hellaswag_val_full.txt')}",
            f"tokenizer_file={run['ranks']}"]
    plain = ev.main(args + [f"out_dir={tmp_path / 'plain'}"])  # engine auto on CPU: in process
    isolated = ev.main(args + [f"out_dir={tmp_path / 'isolated'}", "sweep_isolate=true"])
    assert plain["isolated"] is False and isolated["isolated"] is True
    assert [r["step"] for r in isolated["checkpoints"]] == [step, 5] == [r["step"] for r in plain["checkpoints"]]
    for a, b in zip(plain["checkpoints"], isolated["checkpoints"]):
        assert a["metrics"] == pytest.approx(b["metrics"]) and "hellaswag_acc_norm_char" in a["metrics"]
    saved = json.load(open(tmp_path / "isolated" / "checkpoint_results.json"))
    assert [r["step"] for r in saved["checkpoints"]] == [step, 5]  # the parent's report, not a child's
    assert ev.sweep_isolated(ev.Config(engine="vllm"), ["gsm8k"]) is True  # vLLM: a process per checkpoint
    assert ev.sweep_isolated(ev.Config(engine="vllm"), ["hellaswag"]) is False  # no generation, no vLLM

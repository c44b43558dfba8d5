"""eval_gsm8k.py: answer scoring, probes, the KV-cache generator, HellaSwag, end-to-end GSM8K on real test
questions, checkpoint sweeps and comparisons, all on tiny models."""
import json
import os
import re
import types

import pytest
import torch

import common
import engine as engine_lib
import eval_gsm8k as ev
import export_hf
from conftest import shared_path
from tasks import cut_at_stop, gsm8k, hellaswag, probes
from test_export_hf import greedy_uncached, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny GPT-2-tokenizer run with multiplication tokens, and its verified HF export."""
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    root = tmp_path_factory.mktemp("evalrun")
    gpt, tok = make_run(str(root / "run"), "gpt2", (1, 12), steps=10, block_size=256, tokenizer_file=ranks)
    export_hf.export(str(root / "run"), str(root / "hf"), ranks)
    return {"gpt": gpt, "tok": tok, "run": str(root / "run"), "hf": str(root / "hf"), "ranks": ranks, "root": root}


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("completion, gold, strict, flexible", [
    (" She has 5+3=<<5+3=8>>8 apples.\n#### 8", "8", True, True),
    (" The answer is 8 dollars.", "8", False, True),            # no ####: only flexible finds it
    (" #### 8\nWait, maybe 9", "8", True, False),               # flexible takes the last number
    (" It costs $1,234.00 in total.\n#### $1,234.00", "1234", True, True),
    (" The temperature drops to -7 degrees.\n#### -7", "-7", True, True),
    (" Each one is 2.50 so\n#### 2.50", "2.5", True, True),
    (" Half of 5 is 2.5.", "2.5", False, True),                 # a sentence's full stop is not a decimal
    (" #### 18.0 dollars", "18", True, True),
    (" So 3*4=12", "12", False, True),                          # a decoded multiplication token
    (" I do not know.", "5", False, False),                     # no number at all
    (" #### 7", "-7", False, False),
])
def test_strict_and_flexible_scoring(completion, gold, strict, flexible):
    s = gsm8k.score_completion(completion, gold)
    assert s["correct"] == {"strict": strict, "flexible": flexible}
    if "####" not in completion:
        assert s["extracted"]["strict"] is None


def test_number_normalisation():
    assert gsm8k.normalize_number("$1,234.50") == "1234.5"
    assert gsm8k.normalize_number("18.0") == "18"
    assert gsm8k.normalize_number(" -3 ") == "-3"
    assert gsm8k.normalize_number("72.") == "72"
    assert gsm8k.normalize_number("5 apples") == "5"
    assert gsm8k.normalize_number(51.0) == "51"
    assert gsm8k.normalize_number("none") is None
    assert gsm8k.extract_flexible("from 1,000 to 12,500, then") == "12500"
    assert cut_at_stop("a\n#### 3\n\nQuestion: next", gsm8k.FEWSHOT_STOP) == "a\n#### 3"


def test_local_data_and_golds():
    gsm = gsm8k.load_gsm8k(shared_path("gsm8k", "test.jsonl"))
    assert len(gsm) == 1319 and gsm[0]["gold"] == "18"  # Janet's ducks
    assert all(g["gold"] is not None for g in gsm)
    svamp = gsm8k.load_svamp(shared_path("svamp", "SVAMP.json"))
    assert len(svamp) == 1000 and svamp[0]["gold"] == "51"
    assert svamp[0]["question"].endswith("How much do you have to pay to buy each pack?")
    items = hellaswag.load_hellaswag(shared_path("hellaswag", "hellaswag_val_full.txt"), limit=5)
    assert len(items) == 5 and all(len(it["endings"]) == 4 for it in items)


# -----------------------------------------------------------------------------
# probes


class ScriptedEngine:
    """Answers each probe with fixed token ids (right or wrong), decoded and cut at the stop strings as the
    engine does, then scored through eval's real path."""
    name = "scripted"
    batch_size = 7

    def __init__(self, tok, by_prompt):
        self.tok, self.by_prompt = tok, by_prompt

    def generate(self, prompts, max_new_tokens, stop=()):
        return [[engine_lib.Completion(ids, text=cut_at_stop(self.tok.decode(ids), stop))]
                for ids in (self.by_prompt[tuple(p)] for p in prompts)]


def test_probes_are_deterministic_and_mul_tokens_count_as_their_text(run, tmp_path):
    a, b = probes.probe_items(), probes.probe_items()
    assert a == b
    suites = {s: [it for it in a if it["suite"] == s] for s in probes.PROBE_OPS}
    assert len(suites["mul_table"]) == 144 and all(len(v) == 100 for k, v in suites.items() if k != "mul_table")
    for it in a:
        x, op, y = [int(t) if t.isdigit() else t for t in re.split(r"([*+-])", it["question"])]
        assert int(it["gold"]) == probes.probe_answer(x, op, y)
        assert it["prompt"].endswith(f"Q: {x} {op} {y}\nA:") and it["prompt"].count(f"Q: {x} {op} {y}\n") == 1
    assert probes.probe_items(limit=3) == [it for s in probes.PROBE_OPS for it in suites[s][:3]]

    tok = run["tok"]
    lm = engine_lib.LoadedModel(model=None, tok=engine_lib.NativeTokenizer(tok), name="scripted", kind="native",
                                max_positions=256, info={})
    items = probes.probe_items(limit=4)
    right = {tuple(lm.tok.encode_prompt(it["prompt"])): tok.encode(f" {it['question']}={it['gold']}\nQ: junk")
             for it in items}
    ids = right[tuple(lm.tok.encode_prompt(items[0]["prompt"]))]  # mul_table 1*1: a single mul token
    assert ids[0] == tok.mul_space_ids[(1, 1)]  # the answer's digits live in a mul token (' 1*1=1')
    cfg = ev.Config(task="probes", limit=4)
    metrics, counts, records, _ = ev.task_probes(cfg, lm, ScriptedEngine(tok, right))
    assert metrics == {**{f"probe_{s}": 1.0 for s in probes.PROBE_OPS}, "probes_mean": 1.0}
    assert records[0]["completion"] == " 1*1=1"  # cut at the newline, the mul token decoded to its text
    wrong = {k: tok.encode(" 7") for k in right}
    metrics, _, _, _ = ev.task_probes(cfg, lm, ScriptedEngine(tok, wrong))
    assert metrics["probes_mean"] == 0.0


def test_probe_results_name_their_data_generated(run, tmp_path):
    tok = run["tok"]
    lm = engine_lib.LoadedModel(model=None, tok=engine_lib.NativeTokenizer(tok), name="scripted", kind="native",
                                max_positions=256, info={})
    answers = {tuple(lm.tok.encode_prompt(it["prompt"])): tok.encode(" 7") for it in probes.probe_items(limit=1)}
    ev.evaluate(ev.Config(task="probes", limit=1), lm, "probes", str(tmp_path), ScriptedEngine(tok, answers))
    assert json.load(open(tmp_path / "results.json"))["data"] == "generated"  # not "hub": nothing was downloaded


class CharTokenizer:
    """One id per character: enough for eval's prompt/decode/score path without a model."""

    def encode_prompt(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_synthetic_task_through_eval_with_scripted_answers():
    tok = CharTokenizer()
    lm = types.SimpleNamespace(tok=tok, max_positions=None)
    cfg = ev.Config(task="synthetic", limit=6, fewshot=2)
    problems, exemplars = ev.math_task(cfg, "synthetic")
    assert len(exemplars) == 2 and exemplars[0] in problems.examples("train")  # shots from the synthetic train split
    data = problems.examples("test")[:6]
    # the first four answered with their worked solutions, the last two with a wrong number
    answers = {tuple(tok.encode_prompt(problems.prompt(e, exemplars))):
               tok.encode_prompt(" " + (e["answer"] if i < 4 else f"#### {int(e['gold']) + 1}") + "\n\nQuestion: x")
               for i, e in enumerate(data)}
    metrics, counts, records, _ = ev.task_math(cfg, lm, ScriptedEngine(tok, answers), "synthetic")
    assert metrics == {"synthetic_strict": 4 / 6, "synthetic_flexible": 4 / 6}
    assert counts["prompt_format"] == "fewshot" and [r["gold"] for r in records] == [e["gold"] for e in data]
    assert records[0]["completion"] == " " + data[0]["answer"]  # cut at the few-shot stop string


def test_the_bar_shows_accuracy_without_a_line_per_batch(capsys):
    """In a log that is not a terminal (SLURM's) the bar is a plain line every 30 s: its figures must not force
    a refresh each batch (set_postfix's default), which made one line per batch (~628 for HellaSwag)."""
    tok = CharTokenizer()
    lm = types.SimpleNamespace(tok=tok, max_positions=None)
    cfg = ev.Config(task="synthetic", limit=12, fewshot=0)
    problems, _ = ev.math_task(cfg, "synthetic")
    answers = {tuple(tok.encode_prompt(problems.prompt(e, ()))): tok.encode_prompt(" #### 1")
               for e in problems.examples("test")[:12]}
    engine = ScriptedEngine(tok, answers)
    engine.batch_size = 1  # twelve batches
    capsys.readouterr()
    ev.task_math(cfg, lm, engine, "synthetic")
    bar_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("synthetic:")]
    assert 1 <= len(bar_lines) <= 2, bar_lines  # the start and the end, not one per batch
    assert "acc=" in bar_lines[-1]


# -----------------------------------------------------------------------------
# generation


def test_kv_cache_generator_equals_uncached_greedy(run):
    lm = engine_lib.load_model(run["run"], run["ranks"])
    tok, gpt = run["tok"], run["gpt"]
    prompts = [tok.encode(t, allow_special=True) for t in
               ["<|user|> What is 7*8? <|assistant|>", "Hi", "So 3 x 4 = 12 and 5*5=25, then", "6*6 is"]]
    assert len({len(p) for p in prompts}) == 4  # different lengths: left padding is exercised
    lm.tok.eos_ids = set()
    got = [out[0].ids for out in engine_lib.Engine(lm).generate(prompts, 10)]
    for p, g in zip(prompts, got):
        assert g == greedy_uncached(gpt, p, 10)[len(p):]
    # through eval's engine choice and the HF export of the same run: the same tokens
    hf = engine_lib.load_model(run["hf"])
    hf.tok.eos_ids = set()
    assert [out[0].ids for out in ev.make_engine(ev.Config(engine="hf"), hf, torch.float32).generate(prompts, 10)] == got


def test_vllm_path_is_guarded(run):
    if not torch.cuda.is_available():
        assert common.vllm_available() is False  # never imported, never used without CUDA
        lm = engine_lib.load_model(run["run"], run["ranks"])
        with pytest.raises(common.ConfigError, match="engine=vllm needs"):
            ev.make_engine(ev.Config(engine="vllm"), lm, torch.float32)
        assert isinstance(ev.make_engine(ev.Config(engine="auto"), lm, torch.float32), engine_lib.Engine)
    with pytest.raises(common.ConfigError, match="unknown task"):
        ev.main(["task=mmlu", "model=x"])


# -----------------------------------------------------------------------------
# tasks end to end


def test_hellaswag_equals_direct_computation(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = shared_path("hellaswag", "hellaswag_val_full.txt")
    res = ev.main(["task=hellaswag", f"model={run['run']}", f"data_path={path}", "limit=12",
                   f"out_dir={tmp_path}", f"tokenizer_file={run['ranks']}"])
    preds = common.read_jsonl(str(tmp_path / "predictions.jsonl"))
    # independently: the exported HF model and tokenizer, per-token losses of each ending
    hf = AutoModelForCausalLM.from_pretrained(run["hf"], dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(run["hf"])
    correct = correct_norm = correct_char = 0
    for item, rec in zip(hellaswag.load_hellaswag(path, 12), preds):
        sums, means = [], []
        ctx = hf_tok(item["ctx"], add_special_tokens=False)["input_ids"]
        for ending in item["endings"]:
            end = hf_tok(" " + ending, add_special_tokens=False)["input_ids"]
            seq = torch.tensor([ctx + end])
            with torch.no_grad():
                logp = torch.log_softmax(hf(input_ids=seq).logits[0, :-1].float(), -1)
            nll = -logp[torch.arange(seq.size(1) - 1), seq[0, 1:]][len(ctx) - 1:]
            sums.append(nll.sum().item())
            means.append(nll.mean().item())
        per_char = [s / len(ending) for s, ending in zip(sums, item["endings"])]  # the harness's acc_norm
        pred, pred_norm = min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)
        pred_char = min(range(4), key=per_char.__getitem__)
        assert (rec["pred"], rec["pred_norm"], rec["pred_norm_char"]) == (pred, pred_norm, pred_char)
        assert rec["mean_loss"] == pytest.approx(means, abs=1e-4)
        correct += pred == item["label"]
        correct_norm += pred_norm == item["label"]
        correct_char += pred_char == item["label"]
    assert res["metrics"] == {"hellaswag_acc": correct / 12, "hellaswag_acc_norm": correct_norm / 12,
                              "hellaswag_acc_norm_char": correct_char / 12}
    assert res["metric_protocols"]["hellaswag_acc_norm_char"].startswith("lm_eval")
    assert res["n"] == 12


def test_gsm8k_end_to_end_on_exported_model(run, tmp_path):
    data = shared_path("gsm8k", "test.jsonl")
    out = tmp_path / "gsm8k"
    res = ev.main(["task=gsm8k", f"model={run['hf']}", f"out_dir={out}", "limit=20", "fewshot=1",
                   "batch_size=8", "max_new_tokens=12", f"data_path={data}"])
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["metrics"] == res["metrics"] and set(saved["metrics"]) == {"gsm8k_strict", "gsm8k_flexible"}
    for key in ("model", "model_kind", "engine", "counts", "n", "seconds", "samples_per_s", "config"):
        assert key in saved, key
    assert saved["n"] == 20 and saved["engine"] == "hf" and saved["model_kind"] == "hf" and saved["samples_per_s"] > 0
    assert saved["step"] == 9  # export_info.json carries the checkpoint's step
    assert os.path.isfile(out / "config.json") and os.path.isfile(out / "log.jsonl")
    preds = common.read_jsonl(str(out / "predictions.jsonl"))
    golds = [gsm8k.final_answer(json.loads(line)["answer"]) for line in open(data).readlines()[:20]]
    assert [p["gold"] for p in preds] == golds
    train_q = [json.loads(line)["question"] for line in open(shared_path("gsm8k", "train.jsonl"))]
    for p in preds:
        assert set(p) >= {"prompt", "completion", "extracted", "gold", "correct"}
        assert p["prompt"].startswith("Question: ") and p["prompt"].endswith("\nAnswer:")
        if p["fewshot_k"] == 1:  # the exemplar (a whole one, or none where it does not fit) is from train
            assert p["prompt"].split("\nAnswer:")[0][len("Question: "):] in train_q
        assert p["new_tokens"] <= 12 and "\n\n" not in p["completion"]
        assert gsm8k.score_completion(p["completion"], p["gold"])["correct"] == p["correct"]
    n_flex = sum(p["correct"]["flexible"] for p in preds)
    assert saved["metrics"]["gsm8k_flexible"] == n_flex / 20 and saved["counts"]["flexible_correct"] == n_flex


def test_svamp_zero_shot_chat_format_on_native_checkpoint(run, tmp_path):
    res = ev.main(["task=svamp", f"model={run['run']}/latest", f"out_dir={tmp_path}", "limit=4", "fewshot=0",
                   "max_new_tokens=6", f"data_path={shared_path('svamp', 'SVAMP.json')}",
                   f"tokenizer_file={run['ranks']}"])
    preds = common.read_jsonl(str(tmp_path / "predictions.jsonl"))
    assert res["counts"]["prompt_format"] == "chat" and res["model_kind"] == "native" and res["n"] == 4
    assert all(p["prompt"].startswith("User: ") and p["prompt"].endswith("\nAssistant:") for p in preds)
    assert [p["gold"] for p in preds] == [s["gold"] for s in gsm8k.load_svamp(shared_path("svamp", "SVAMP.json"))[:4]]


@pytest.fixture(scope="module")
def sweep(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for steps in (1, 2, 3):  # ckpt_000000 .. ckpt_000002 in one run folder
        make_run(str(root / "run"), "gpt2", (1, 12), steps=steps, seed=steps, tokenizer_file=run["ranks"])
    report = ev.main(["task=sweep", f"model={root / 'run'}", f"out_dir={root / 'sweep'}", "sweep_tasks=[probes,gsm8k]",
                      f"gsm8k_path={shared_path('gsm8k', 'test.jsonl')}", "limit=2", "fewshot=0",
                      "max_new_tokens=4", "probe_max_new_tokens=4", f"tokenizer_file={run['ranks']}"])
    return root, report


def test_sweep_writes_checkpoint_results_and_curves(sweep):
    root, report = sweep
    with open(root / "sweep" / "checkpoint_results.json") as f:
        saved = json.load(f)
    assert [r["step"] for r in saved["checkpoints"]] == [0, 1, 2] == [r["step"] for r in report["checkpoints"]]
    metrics = set(saved["checkpoints"][0]["metrics"])
    assert metrics == ({"val_loss", "gsm8k_strict", "gsm8k_flexible", "probes_mean"}
                       | {f"probe_{s}" for s in probes.PROBE_OPS})
    for r in saved["checkpoints"]:
        with open(root / "sweep" / f"step_{r['step']:06d}" / "probes" / "results.json") as f:
            assert json.load(f)["metrics"]["probes_mean"] == r["metrics"]["probes_mean"]
        assert r["metrics"]["val_loss"] == torch.load(r["checkpoint"], weights_only=False)["val_loss"]
    for m in metrics:
        png = root / "sweep" / f"curve_{m}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", m


def test_compare_writes_report_and_chart(sweep, tmp_path):
    root, report = sweep
    runs = [str(root / "sweep" / "step_000000"), str(root / "sweep" / "step_000002")]
    out = tmp_path / "cmp"
    ev.main(["task=compare", f"runs=[{runs[0]},{runs[1]}]", "labels=[baseline,mul_tokens]", f"out_dir={out}"])
    with open(out / "comparison_report.json") as f:
        rep = json.load(f)
    first, last = report["checkpoints"][0]["metrics"], report["checkpoints"][2]["metrics"]
    assert rep["baseline"] == "baseline"
    for m in ("gsm8k_flexible", "probe_mul_table", "probes_mean"):
        assert rep["metrics"][m] == {"baseline": first[m], "mul_tokens": last[m]}
        assert rep["delta_vs_baseline"][m]["mul_tokens"] == pytest.approx(last[m] - first[m])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(common.ConfigError, match="two or more"):
        ev.main(["task=compare", f"runs=[{runs[0]}]", f"out_dir={out}"])

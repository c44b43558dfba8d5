"""The experiment's report (eval_gsm8k.py task=compare over two conditions: Wilson intervals, McNemar's exact
test on hand-made predictions, tokens per answer, curves) and slurm/pipeline.sh's skip flags and
skip-when-complete logic."""
import json
import math
import os

import pytest

import common
import eval_gsm8k as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # k = 0: the interval is [0, z^2 / (n + z^2)] (the normal approximation would give [0, 0])
    z2 = ev.Z95 ** 2
    assert ev.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert ev.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    lo, hi = ev.wilson_interval(50, 100)  # symmetric around 1/2, narrower than +-0.1
    assert lo == pytest.approx(1 - hi) and 0.40 < lo < 0.41
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_by_hand():
    # 1 vs 6 discordant pairs: P = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    assert ev.mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert ev.mcnemar_exact(6, 1) == pytest.approx(0.125)
    assert ev.mcnemar_exact(0, 0) == 1.0
    assert ev.mcnemar_exact(3, 3) == 1.0
    assert ev.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_statistics_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed (the by-hand tests above still run)")
    for k, n in ((0, 7), (3, 7), (41, 100), (1319, 1319), (250, 1319)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert ev.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    for b, c in ((0, 1), (2, 9), (14, 15), (30, 12), (100, 70)):
        assert ev.mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


# ---------------------------------------------------------------------------- the report on two tiny conditions


def write_task(folder, task, records, metrics):
    os.makedirs(folder, exist_ok=True)
    common.atomic_write_json(os.path.join(folder, "results.json"), {"task": task, "metrics": metrics,
                                                                    "n": len(records)})
    with open(os.path.join(folder, "predictions.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_condition(root, gsm8k_right, probe_right, tokens, hella_right, train_curve):
    """A condition's eval tree (pretrain/ and sft/ stages with gsm8k, probes, hellaswag) and its pretraining
    run (log.jsonl, results.json), made by hand."""
    for stage in ("pretrain", "sft"):
        recs = [{"id": i, "correct": {"strict": ok and i % 2 == 0, "flexible": ok}, "new_tokens": t}
                for i, (ok, t) in enumerate(zip(gsm8k_right[stage], tokens))]
        write_task(os.path.join(root, "eval", stage, "gsm8k"), "gsm8k", recs,
                   {"gsm8k_flexible": sum(gsm8k_right[stage]) / len(recs)})
        recs = [{"id": f"mul_table-{i}", "suite": "mul_table", "correct": ok, "new_tokens": 2}
                for i, ok in enumerate(probe_right)]
        write_task(os.path.join(root, "eval", stage, "probes"), "probes", recs,
                   {"probe_mul_table": sum(probe_right) / len(recs)})
    recs = [{"id": i, "correct": ok, "correct_norm": ok} for i, ok in enumerate(hella_right)]
    write_task(os.path.join(root, "eval", "pretrain", "hellaswag"), "hellaswag", recs,
               {"hellaswag_acc_norm": sum(hella_right) / len(recs)})
    run = os.path.join(root, "pretrain")
    os.makedirs(run)
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        for step, bpb in train_curve:
            f.write(json.dumps({"type": "val", "step": step, "val_loss": bpb * 2, "val_bpb": bpb}) + "\n")
            f.write(json.dumps({"type": "hellaswag", "step": step, "acc_norm": 0.25 + step / 1000}) + "\n")
    common.atomic_write_json(os.path.join(run, "results.json"), {"steps": 100, "final_val_loss": train_curve[-1][1] * 2,
                                                                 "final_val_bpb": train_curve[-1][1]})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    n = 20
    # GSM8K after SFT: baseline right on 0..7, mul_tokens right on 2..14: b = 2 (ids 0, 1), c = 7 (ids 8..14)
    base_sft = [i < 8 for i in range(n)]
    mul_sft = [2 <= i < 15 for i in range(n)]
    write_condition(root / "baseline", {"pretrain": [i < 2 for i in range(n)], "sft": base_sft},
                    [i < 5 for i in range(12)], [10] * n, [i % 3 == 0 for i in range(30)], [(0, 3.0), (50, 2.0)])
    write_condition(root / "mul_tokens", {"pretrain": [i < 2 for i in range(n)], "sft": mul_sft},
                    [i < 9 for i in range(12)], [7] * (n // 2) + [9] * (n // 2), [i % 2 == 0 for i in range(30)],
                    [(0, 2.9), (50, 1.9)])
    out = root / "cmp"
    rep = ev.main(["task=compare", f"runs=[{root}/baseline/eval,{root}/mul_tokens/eval]",
                   "labels=[baseline,mul_tokens]", f"train_runs=[{root}/baseline/pretrain,{root}/mul_tokens/pretrain]",
                   f"out_dir={out}"])
    with open(out / "comparison_report.json") as f:
        assert json.load(f) == json.loads(json.dumps(rep))  # what was returned is what was written
    return rep, out


def test_report_accuracies_have_wilson_intervals_and_counts(report):
    rep, _ = report
    assert rep["stages"] == ["pretrain", "sft"]
    a = rep["accuracy"]["sft"]["mul_tokens"]["gsm8k_flexible"]
    assert (a["correct"], a["n"], a["accuracy"]) == (13, 20, 0.65)
    # the Wilson interval, computed here from its formula
    z, p, n = 1.959963984540054, 0.65, 20
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert a["ci95"] == pytest.approx([center - half, center + half])
    assert rep["accuracy"]["sft"]["baseline"]["gsm8k_strict"]["correct"] == 4  # ids 0, 2, 4, 6
    assert rep["accuracy"]["pretrain"]["baseline"]["probe_mul_table"]["n"] == 12
    assert rep["accuracy"]["pretrain"]["mul_tokens"]["hellaswag_acc_norm"]["correct"] == 15
    assert rep["metrics"]["sft/gsm8k_flexible"] == {"baseline": 0.4, "mul_tokens": 0.65}
    assert rep["delta_vs_baseline"]["sft/gsm8k_flexible"]["mul_tokens"] == pytest.approx(0.25)


def test_report_mcnemar_on_the_same_questions(report):
    rep, _ = report
    t = rep["mcnemar"]["sft"]["mul_tokens"]["gsm8k_flexible"]
    assert (t["n_paired"], t["only_baseline_correct"], t["only_other_correct"]) == (20, 2, 7)
    # direct: two-sided binomial tail of 2 successes in 9 fair trials
    assert t["p_value"] == pytest.approx(2 * sum(math.comb(9, i) for i in range(3)) / 2 ** 9)
    same = rep["mcnemar"]["pretrain"]["mul_tokens"]["gsm8k_flexible"]  # identical answers: no evidence
    assert (same["only_baseline_correct"], same["only_other_correct"], same["p_value"]) == (0, 0, 1.0)
    probe = rep["mcnemar"]["pretrain"]["mul_tokens"]["probe_mul_table"]
    assert (probe["only_baseline_correct"], probe["only_other_correct"]) == (0, 4)
    hella = rep["mcnemar"]["pretrain"]["mul_tokens"]["hellaswag_acc_norm"]
    assert hella["n_paired"] == 30


def test_report_tokens_curves_and_page(report):
    rep, out = report
    assert rep["tokens_per_answer"]["sft"]["baseline"]["gsm8k"] == 10
    assert rep["tokens_per_answer"]["sft"]["mul_tokens"]["gsm8k"] == 8
    mul = rep["pretraining"]["mul_tokens"]
    assert mul["curves"]["val_bpb"] == [[0, 2.9], [50, 1.9]]
    assert mul["curves"]["hellaswag_acc_norm"] == [[0, 0.25], [50, 0.3]]
    assert mul["final"]["final_val_bpb"] == 1.9
    png = (out / rep["chart"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # one page with six panels, not an empty figure


def test_compare_refuses_mismatched_train_runs(tmp_path):
    with pytest.raises(common.ConfigError, match="train_runs"):
        ev.main(["task=compare", "runs=[a,b]", "train_runs=[a]", f"out_dir={tmp_path}"])

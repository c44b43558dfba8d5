"""The experiment's report (eval_gsm8k.py task=compare over two conditions: Wilson intervals, McNemar's exact
test on hand-made predictions, tokens per answer, curves) and slurm/pipeline.sh's skip flags and
skip-when-complete logic."""
import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest

import common
import eval_gsm8k as ev
from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # k = 0: the interval is [0, z^2 / (n + z^2)] (the normal approximation would give [0, 0])
    from scipy.stats import norm
    z2 = norm.ppf(0.975) ** 2
    assert ev.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert ev.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    lo, hi = ev.wilson_interval(50, 100)  # symmetric around 1/2, narrower than +-0.1
    assert lo == pytest.approx(1 - hi) and 0.40 < lo < 0.41
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    # never above (below) the point estimate at k = 0 (n): matplotlib refuses negative error bars
    for n in (50, 64, 100, 1319):
        assert ev.wilson_interval(0, n)[0] == 0.0 and ev.wilson_interval(n, n)[1] == 1.0


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
    recs = [{"id": i, "correct": ok, "correct_norm": ok, "correct_norm_char": not ok} for i, ok in enumerate(hella_right)]
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
    assert rep["accuracy"]["pretrain"]["baseline"]["hellaswag_acc_norm_char"]["correct"] == 20  # every flag kept


def test_report_tokens_curves_and_page(report):
    rep, out = report
    assert rep["tokens_per_answer"]["sft"]["baseline"]["gsm8k"] == 10
    assert rep["tokens_per_answer"]["sft"]["mul_tokens"]["gsm8k"] == 8
    mul = rep["pretraining"]["mul_tokens"][0]
    assert mul["curves"]["val_bpb"] == [[0, 2.9], [50, 1.9]]
    assert mul["curves"]["hellaswag_acc_norm"] == [[0, 0.25], [50, 0.3]]
    assert mul["final"]["final_val_bpb"] == 1.9
    png = (out / rep["chart"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # one page with six panels, not an empty figure


def test_report_pools_seeds_of_a_condition(tmp_path):
    """Runs sharing a label are seeds: counts add up, McNemar pairs seed s with seed s, metrics are averaged."""
    n = 10
    curve = [(0, 3.0), (50, 2.0)]
    for cond, seed, right in (("baseline", 0, 3), ("baseline", 1, 5), ("mul_tokens", 0, 6), ("mul_tokens", 1, 5)):
        # seed s of each condition gets the first `right` questions right: only_other = 3 (seed 0), 0 (seed 1)
        write_condition(tmp_path / f"{cond}{seed}", {"pretrain": [i < right for i in range(n)],
                                                      "sft": [i < right for i in range(n)]},
                        [True] * 12, [10] * n, [True] * 3, curve)
    runs = ",".join(str(tmp_path / x / "eval") for x in ("baseline0", "baseline1", "mul_tokens0", "mul_tokens1"))
    rep = ev.main(["task=compare", f"runs=[{runs}]", "labels=[baseline,baseline,mul_tokens,mul_tokens]",
                   f"out_dir={tmp_path / 'cmp'}"])
    assert rep["conditions"] == ["baseline", "mul_tokens"] and rep["seeds"] == {"baseline": 2, "mul_tokens": 2}
    a = rep["accuracy"]["sft"]["baseline"]["gsm8k_flexible"]
    assert (a["correct"], a["n"], a["per_seed"]) == (8, 20, [0.3, 0.5])
    assert a["ci95"] == pytest.approx(list(ev.wilson_interval(8, 20)))
    t = rep["mcnemar"]["sft"]["mul_tokens"]["gsm8k_flexible"]
    assert (t["n_paired"], t["only_baseline_correct"], t["only_other_correct"]) == (20, 0, 3)
    assert t["p_value"] == pytest.approx(0.25)  # 2 * (1/2)^3
    assert rep["metrics"]["sft/gsm8k_flexible"] == {"baseline": pytest.approx(0.4), "mul_tokens": pytest.approx(0.55)}
    with pytest.raises(common.ConfigError, match="different labels"):
        ev.main(["task=compare", f"runs=[{runs}]", "labels=[a,a,a,a]", f"out_dir={tmp_path / 'cmp'}"])


def test_compare_refuses_mismatched_train_runs(tmp_path):
    with pytest.raises(common.ConfigError, match="train_runs"):
        ev.main(["task=compare", "runs=[a,b]", "train_runs=[a]", f"out_dir={tmp_path}"])


# ---------------------------------------------------------------------------- slurm/pipeline.sh

PIPELINE = os.path.join(ROOT, "slurm", "pipeline.sh")

TINY_CONFIGS = {
    "data.yaml": "source: synthetic_math\ntokenizer: byte\ncondition: baseline\ntarget_tokens: 40000\n"
                 "val_tokens: 8000\nshard_size: 40000\nnum_proc: 1\n",
    "pretrain.yaml": "tokenizer: byte\nmodel: tiny\nblock_size: 64\nmicro_batch_size: 4\ntotal_batch_size: 256\n"
                     "max_steps: 40\nwarmup_steps: 1\nmax_lr: 3.0e-3\ndtype: fp32\ndevice: cpu\nlog_interval: 2\n"
                     "val_interval: 20\nval_steps: 1\nckpt_interval: 20\n",
    "eval_base.yaml": "limit: 2\nprobe_n: 5\nprobe_max_new_tokens: 4\nbatch_size: 8\ndevice: cpu\n",
    "eval_sweep.yaml": "task: sweep\nlimit: 2\nprobe_n: 5\nprobe_max_new_tokens: 4\nbatch_size: 8\ndevice: cpu\n",
}


def tiny_experiment(folder, sft_configs="", rl=0):
    """An experiment folder for slurm/pipeline.sh with a few seconds' worth of every stage."""
    os.makedirs(folder, exist_ok=True)
    for name, text in TINY_CONFIGS.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "pipeline.env"), "w") as f:
        f.write(f'CONDITIONS="baseline mul_tokens"\nDATA_baseline={folder}/data.yaml\n'
                f'DATA_mul_tokens={folder}/data.yaml\nPRETRAIN={folder}/pretrain.yaml\nSFT_CONFIGS="{sft_configs}"\n'
                f'SFT_ARGS_mul_tokens="inject_mul_tokens=true"\nRL={rl}\nGRPO_CONFIG=configs/grpo_x.yaml\n'
                f'EVAL_BASE={folder}/eval_base.yaml\nBASE_TASKS="probes"\nEVAL_CHAT={folder}/eval_base.yaml\n'
                f'CHAT_TASKS="gsm8k probes"\nEVAL_SWEEP={folder}/eval_sweep.yaml\nSWEEP_TASKS="probes"\n')
    return folder


def pipeline(*args, script=PIPELINE, env=None):
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr


def commands(output):
    """The commands a run printed (and ran, unless --dry-run)."""
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


def test_a_stopped_run_continues_and_a_second_run_does_no_stage_twice(tmp_path):
    exp = tiny_experiment(str(tmp_path / "exp"))
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    args = ["bash", PIPELINE, exp, "--conditions", "baseline", "--out", out, "--data", data]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 1. USR1 (SLURM's warning before the time limit) while training: the stage checkpoints, the pipeline stops
    with open(tmp_path / "run1.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.time()
            while not os.path.exists(f"{out}/baseline/pretrain/log.jsonl") and time.time() - t0 < 120:
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=120) == 0, (tmp_path / "run1.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    first = (tmp_path / "run1.log").read_text()
    assert "USR1: asking the running stage to checkpoint and exit" in first
    assert "stopped; run the same command again to continue" in first
    assert not os.path.exists(f"{out}/baseline/eval/sweep/checkpoint_results.json")
    # 2. the same command again: the stages not finished yet, and only those
    rc, second = pipeline(exp, "--conditions", "baseline", "--out", out, "--data", data)
    assert rc == 0, second[-3000:]
    a, b = commands(first), commands(second)
    if a[-1] == b[0]:  # the stage the signal stopped runs again ...
        b = b[1:]
    # ... and every other stage runs once, in order
    assert [c.split()[1] for c in a + b] == ["prepare_data.py", "train_gpt.py", "export_hf.py", "eval_gsm8k.py",
                                             "eval_gsm8k.py"], first + second
    assert json.load(open(f"{out}/baseline/pretrain/results.json"))["status"] == "done"
    assert os.path.isfile(f"{out}/baseline/hf/config.json")
    probes = json.load(open(f"{out}/baseline/eval/pretrain/probes/results.json"))
    assert probes["task"] == "probes" and probes["model"].endswith("baseline/hf")
    sweep = json.load(open(f"{out}/baseline/eval/sweep/checkpoint_results.json"))
    assert [c["step"] for c in sweep["checkpoints"]][-2:] == [19, 39]  # (and where the signal stopped it)
    # 3. once more: nothing to do
    rc, third = pipeline(exp, "--conditions", "baseline", "--out", out, "--data", data)
    assert rc == 0, third[-3000:]
    assert commands(third) == []
    for name in ("prepare_data", "train_gpt", "export_hf", "eval pretrain/probes", "sweep"):
        assert f"== {name} baseline: complete (" in third


def test_preempted_training_is_not_complete(tmp_path):
    """results.json of a run stopped by a signal says so: the stage runs again (and resumes)."""
    exp = tiny_experiment(str(tmp_path / "exp"))
    out = str(tmp_path / "out")
    os.makedirs(f"{out}/baseline/pretrain")
    common.atomic_write_json(f"{out}/baseline/pretrain/results.json", {"status": "preempted", "steps": 2})
    rc, text = pipeline(exp, "--dry-run", "--skip-data", "--conditions", "baseline", "--out", out)
    assert rc == 0, text
    assert any(c.startswith("python train_gpt.py") and "resume=latest" in c for c in commands(text))
    common.atomic_write_json(f"{out}/baseline/pretrain/results.json", {"status": "done", "steps": 4})
    rc, text = pipeline(exp, "--dry-run", "--skip-data", "--conditions", "baseline", "--out", out)
    assert "== train_gpt baseline: complete (" in text
    assert not any("train_gpt.py" in c for c in commands(text))


@pytest.fixture()
def checkout_with_every_stage(tmp_path):
    """A copy of the pipeline beside empty sft.py / grpo.py / eval_gsm8k.py: a dry run shows the wiring of all
    stages whether or not this checkout has them yet."""
    root = tmp_path / "repo"
    (root / "slurm").mkdir(parents=True)
    (root / "slurm" / "pipeline.sh").write_text(open(PIPELINE).read())
    for name in ("sft.py", "grpo.py", "prepare_data.py", "train_gpt.py", "export_hf.py"):
        (root / name).write_text("")
    (root / "eval_gsm8k.py").write_text('TASKS = ("gsm8k", "probes", "hellaswag", "sweep", "compare")\n')
    exp = tiny_experiment(str(tmp_path / "exp"), sft_configs="configs/sft_a.yaml configs/sft_b.yaml", rl=1)
    return str(root / "slurm" / "pipeline.sh"), exp


def test_every_stage_in_order_with_the_model_of_the_stage_before(checkout_with_every_stage):
    script, exp = checkout_with_every_stage
    rc, text = pipeline(exp, "--dry-run", "--out", "o", "--data", "d", script=script, env={"NPROC": "4"})
    assert rc == 0, text
    cmds = commands(text)
    mul = [c for c in cmds if "mul_tokens" in c and "task=compare" not in c]
    assert [c.split()[0] for c in mul][:2] == ["python", "torchrun"]  # prepare_data, then pretraining
    assert "--nproc_per_node=4 train_gpt.py" in mul[1]  # the GPU count from the environment
    sft_a, sft_b, grpo = (c for c in mul if " sft.py " in c or " grpo.py " in c)
    assert "model=o/mul_tokens/hf " in sft_a and "inject_mul_tokens=true" in sft_a
    assert "model=o/mul_tokens/sft_a/hf " in sft_b and "out_dir=o/mul_tokens/sft_b" in sft_b
    assert "model=o/mul_tokens/sft_b/hf " in grpo
    evals = [c for c in mul if "eval_gsm8k.py" in c]
    assert [c.split("out_dir=")[1].split()[0] for c in evals] == [
        "o/mul_tokens/eval/pretrain/probes", "o/mul_tokens/eval/sweep", "o/mul_tokens/eval/sft/gsm8k",
        "o/mul_tokens/eval/sft/probes", "o/mul_tokens/eval/grpo/gsm8k", "o/mul_tokens/eval/grpo/probes"]
    assert "model=o/mul_tokens/grpo/hf" in evals[-1] and "sweep_tasks=[probes]" in evals[1]
    assert not any("inject_mul_tokens" in c for c in cmds if "baseline" in c)
    assert cmds[-1].startswith("python eval_gsm8k.py task=compare runs=[o/baseline/eval,o/mul_tokens/eval] "
                               "labels=[baseline,mul_tokens] train_runs=[o/baseline/pretrain,o/mul_tokens/pretrain]")


def test_skip_flags_and_conditions(checkout_with_every_stage):
    script, exp = checkout_with_every_stage

    def stages(*flags):
        rc, text = pipeline(exp, "--dry-run", "--out", "o", *flags, script=script)
        assert rc == 0, text
        return {c.split()[1] if c.startswith("python") else "torchrun" for c in commands(text)}, commands(text)

    names, _ = stages("--skip-data")
    assert "prepare_data.py" not in names and {"train_gpt.py", "sft.py", "grpo.py", "eval_gsm8k.py"} <= names
    names, _ = stages("--skip-pretrain")
    assert not names & {"train_gpt.py", "export_hf.py"} and "sft.py" in names
    names, _ = stages("--skip-sft")
    assert not names & {"sft.py", "grpo.py"}  # GRPO starts from an SFT model: none, no GRPO
    names, _ = stages("--skip-rl")
    assert "sft.py" in names and "grpo.py" not in names
    names, cmds = stages("--skip-eval")
    assert "eval_gsm8k.py" not in names and "grpo.py" in names
    _, cmds = stages("--conditions", "mul_tokens", "--skip-data")
    assert cmds and all("mul_tokens" in c for c in cmds) and not any("compare" in c for c in cmds)
    rc, text = pipeline(exp, "--conditions", "baseline,oops", "--dry-run", script=script)
    assert rc == 1 and "error: unknown condition 'oops'" in text
    rc, text = pipeline(exp, "--skip-everything", script=script)
    assert rc == 1 and "error: unknown option --skip-everything" in text
    rc, text = pipeline(exp, "--jobs", "0", "--dry-run", script=script)
    assert rc == 1 and "error: --jobs needs a whole number of at least 1, got '0'" in text


def test_seeds_each_get_their_run_and_the_report_pools_them(checkout_with_every_stage):
    script, exp = checkout_with_every_stage
    rc, text = pipeline(exp, "--dry-run", "--out", "o", "--seeds", "7,8", "--skip-rl", script=script)
    assert rc == 0, text
    cmds = commands(text)
    assert [c.split()[1] for c in cmds].count("prepare_data.py") == 2  # the data once per condition
    train = [c for c in cmds if " train_gpt.py " in c]
    assert [(c.split("out_dir=")[1].split()[0], c.split("seed=")[1].split()[0]) for c in train] == [
        ("o/baseline/seed7/pretrain", "7"), ("o/baseline/seed8/pretrain", "8"),
        ("o/mul_tokens/seed7/pretrain", "7"), ("o/mul_tokens/seed8/pretrain", "8")]
    assert any("model=o/mul_tokens/seed8/sft_a/hf " in c and " sft.py " in c for c in cmds)
    assert ("labels=[baseline,baseline,mul_tokens,mul_tokens] train_runs=[o/baseline/seed7/pretrain,"
            "o/baseline/seed8/pretrain,o/mul_tokens/seed7/pretrain,o/mul_tokens/seed8/pretrain]") in cmds[-1]


def test_stages_missing_from_the_checkout_are_skipped_with_a_message(tmp_path):
    exp = tiny_experiment(str(tmp_path / "exp"), sft_configs="configs/sft_a.yaml", rl=1)
    rc, text = pipeline(exp, "--dry-run", "--out", str(tmp_path / "o"))
    assert rc == 0, text
    has_sft, has_grpo = (os.path.exists(os.path.join(ROOT, name)) for name in ("sft.py", "grpo.py"))
    ran = " ".join(commands(text))
    assert (" sft.py " in ran) == has_sft and (" grpo.py " in ran) == (has_sft and has_grpo)
    if not has_sft:
        assert "sft.py is not in this checkout yet" in text
    if not has_grpo:
        assert "grpo.py is not in this checkout yet" in text
    elif not has_sft:  # GRPO starts from the SFT model
        assert "== grpo baseline: no SFT stage before it" in text


# ---------------------------------------------------------------------------- the preflight (slurm/preflight.py)

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: no request leaves the machine


def offline_env(tmp_path):
    """A machine without the internet and with empty caches: the HF hub switched off (and, through a dead proxy,
    tiktoken's downloads too), no datasets, hub or tiktoken cache to fall back on."""
    caches = tmp_path / "empty_caches"
    caches.mkdir(exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(caches / "hf"),
            "HF_DATASETS_CACHE": str(caches / "datasets"), "TIKTOKEN_CACHE_DIR": str(caches / "tiktoken"),
            "HTTPS_PROXY": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY, "https_proxy": DEAD_PROXY,
            "http_proxy": DEAD_PROXY, "NO_PROXY": "", "no_proxy": ""}


@pytest.fixture(scope="module")
def user_clone(tmp_path_factory):
    """The repository as a user's clone holds it (git's tracked files and the new ones not ignored), in a folder
    with no ../shared beside it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the repository's files")
    root = tmp_path_factory.mktemp("clone") / "repo"
    for name in filter(None, listed.stdout.split("\0")):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(root, name))
    assert not os.path.exists(os.path.join(os.path.dirname(root), "shared"))
    return str(root)


def test_a_launch_without_its_inputs_stops_in_seconds_naming_every_one(user_clone, tmp_path):
    """`sbatch slurm/pipeline.sh configs/gpt2_124m_10b` on a clone without ../shared, offline: before the first
    stage, one message names each missing input (data, tokenizer, every hub set) with the local file to pass."""
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    t0 = time.time()
    rc, text = pipeline("configs/gpt2_124m_10b", "--out", out, "--data", data,
                        script=os.path.join(user_clone, "slurm", "pipeline.sh"), env=offline_env(tmp_path))
    seconds = time.time() - t0
    assert rc == 1, text
    assert seconds < 60, seconds  # ~3 s on a quiet machine: imports, no data read
    assert commands(text) == [] and "== prepare_data" not in text and not os.path.exists(out), text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 5 inputs of this launch are missing"), text
    assert "the HF hub is unreachable: offline: HF_HUB_OFFLINE=1" in errors[0]
    items = [line[4:] for line in text.splitlines() if line.startswith("  - ")]
    assert len(items) == 5, text

    def item(name):
        found = [i for i in items if i.startswith(name)]
        assert len(found) == 1, (name, items)
        return found[0]

    assert "Pass data_path=FILE|DIR|GLOB in configs/data_fineweb_edu_10b.yaml, configs/data_fineweb_edu_10b_mul.yaml" \
        in item("HuggingFaceFW/fineweb-edu (sample-10BT) on the HF hub: the HF hub is unreachable")
    ranks = item("the GPT-2 BPE ranks (tokenizer gpt2): not in tiktoken's cache")
    assert "tokenizer_file=FILE in configs/data_fineweb_edu_10b.yaml, configs/data_fineweb_edu_10b_mul.yaml, " \
           "configs/gpt2_124m_10b.yaml" in ranks  # the run's file serves the export and the sweep
    hella = item("Rowan/hellaswag on the HF hub")
    assert "hellaswag_file=FILE in configs/gpt2_124m_10b.yaml; hellaswag_path=FILE in configs/eval_base.yaml, " \
           "configs/eval_sweep.yaml" in hella
    assert "data_paths=[FILE] in configs/sft_tulu.yaml" in item("allenai/tulu-3-sft-mixture on the HF hub")
    gsm8k = item("openai/gsm8k (main) on the HF hub")
    for hint in ("data_paths=[FILE] in configs/sft_gsm8k.yaml", "eval_data_paths=[FILE] in configs/sft_gsm8k.yaml",
                 "gsm8k_path=FILE in configs/eval_base.yaml, configs/eval_sweep.yaml, configs/eval_chat.yaml",
                 "fewshot_path=FILE in configs/eval_base.yaml, configs/eval_sweep.yaml"):
        assert hint in gsm8k, (hint, gsm8k)


def test_the_demo_passes_the_preflight_on_a_clone_offline(user_clone, tmp_path):
    rc, text = pipeline("configs/demo", "--check", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
                        script=os.path.join(user_clone, "slurm", "pipeline.sh"), env=offline_env(tmp_path))
    assert rc == 0, text
    assert "== preflight: the inputs of 25 stage(s) are there" in text and commands(text) == []
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "d")


def gpt2_experiment(folder, ranks, hellaswag, gsm8k_test):
    """tiny_experiment with GPT-2 tokens and the local files a user passes offline."""
    tiny_experiment(folder)
    for name, extra in (("data.yaml", ""), ("pretrain.yaml", f"hellaswag_file: {hellaswag}\n")):
        path = os.path.join(folder, name)
        text = open(path).read().replace("tokenizer: byte\n", f"tokenizer: gpt2\ntokenizer_file: {ranks}\n")
        with open(path, "w") as f:
            f.write(text + extra)
    for name in ("eval_base.yaml", "eval_sweep.yaml"):
        with open(os.path.join(folder, name), "a") as f:
            f.write(f"gsm8k_path: {gsm8k_test}\nhellaswag_path: {hellaswag}\nfewshot: 1\n")
    text = open(os.path.join(folder, "pipeline.env")).read()
    with open(os.path.join(folder, "pipeline.env"), "w") as f:
        f.write(text.replace('BASE_TASKS="probes"', 'BASE_TASKS="gsm8k hellaswag"')
                .replace('SWEEP_TASKS="probes"', 'SWEEP_TASKS="gsm8k hellaswag"'))
    return folder


def test_the_preflight_takes_local_files_and_names_a_missing_one(tmp_path):
    """Offline, the local copies stand for the hub (GSM8K's exemplars from train.jsonl beside the test file); a
    file that is not there, and a stage's input that no stage makes (--skip-data without data), are named."""
    shared = shared_path()
    exp = gpt2_experiment(str(tmp_path / "exp"), os.path.join(shared, "tokenizers", "gpt2.tiktoken"),
                          os.path.join(shared, "hellaswag", "hellaswag_val_full.txt"),
                          os.path.join(shared, "gsm8k", "test.jsonl"))
    args = [exp, "--check", "--conditions", "baseline", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d")]
    rc, text = pipeline(*args, env=offline_env(tmp_path))
    assert rc == 0, text
    assert "== preflight: the inputs of 6 stage(s) are there" in text
    rc, text = pipeline(*args, "--skip-data", env=dict(offline_env(tmp_path), EVAL_ARGS="gsm8k_path=nope.jsonl"))
    assert rc == 1, text
    items = [line[4:] for line in text.splitlines() if line.startswith("  - ")]
    assert items[0] == (f"data_dir={tmp_path}/d/baseline (train_gpt baseline): not there, and no stage of this "
                        f"launch before it makes it (is the stage that makes it skipped by a --skip-* option?)")
    assert items[1] == f"gsm8k_path=nope.jsonl in {exp}/eval_base.yaml, {exp}/eval_sweep.yaml: no such file"
    assert items[2].startswith("openai/gsm8k (main) on the HF hub: the HF hub is unreachable") and \
        f"fewshot_path=FILE in {exp}/eval_base.yaml, {exp}/eval_sweep.yaml" in items[2]  # nothing beside nope.jsonl
    assert len(items) == 3, items


def test_no_check_skips_the_preflight_and_dry_runs_do_not_run_it(user_clone, tmp_path):
    script = os.path.join(user_clone, "slurm", "pipeline.sh")
    rc, text = pipeline("configs/gpt2_124m_10b", "--dry-run", "--out", "o", script=script, env=offline_env(tmp_path))
    assert rc == 0 and "preflight" not in text and commands(text), text
    rc, text = pipeline("configs/gpt2_124m_10b", "--no-check", "--skip-data", "--skip-pretrain", "--skip-sft",
                        "--skip-eval", "--out", str(tmp_path / "o"), script=script, env=offline_env(tmp_path))
    assert rc == 0 and "preflight" not in text and "pipeline done" in text, text


# ---------------------------------------------------------------------------- configs name the hub, files override


def shipped_configs():
    for folder, _, names in os.walk(os.path.join(ROOT, "configs")):
        for name in sorted(names):
            if name.endswith(".yaml"):
                yield os.path.join(folder, name)


def test_no_shipped_config_reads_the_shared_test_data():
    """A user's clone has no ../shared: the configs name hub sources (or files a stage before makes); the local
    copies of the project's tests are passed explicitly."""
    import yaml

    def strings(value):
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for path in shipped_configs():
        with open(path) as f:
            values = strings(yaml.safe_load(f) or {})
        assert not [v for v in values if "shared" in v.split("/")], path


def fake_hub(calls, rows):
    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows
    return load_dataset


def test_loaders_take_the_hub_source_a_config_names(monkeypatch):
    import datasets
    from tasks import gsm8k, hellaswag
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", fake_hub(calls, [{"question": "q", "answer": "a\n#### 3",
                                                                    "ctx": "c", "endings": list("abcd"), "label": 1,
                                                                    "Body": "b", "Question": "q?", "Answer": 4}]))
    assert gsm8k.read_gsm8k("test", "openai/gsm8k")[0]["answer"].endswith("#### 3")
    assert gsm8k.load_svamp("ChilleD/SVAMP")[0]["gold"] == "4"
    assert hellaswag.load_hellaswag("Rowan/hellaswag")[0]["label"] == 1
    assert gsm8k.fewshot_pool("", near=("openai/gsm8k",))[0]["gold"] == "3"  # nothing "beside" a hub id: the hub
    assert [c[0][0] for c in calls] == ["openai/gsm8k", "ChilleD/SVAMP", "Rowan/hellaswag", "openai/gsm8k"]
    assert calls[0] == (("openai/gsm8k", "main"), {"split": "test"}) and calls[-1][1] == {"split": "train"}
    assert calls[2][1] == {"split": "validation"}
    with pytest.raises(FileNotFoundError, match="GSM8K file not found: openai/gsm8k.jsonl"):
        gsm8k.read_gsm8k("test", "openai/gsm8k.jsonl")  # only the hub id itself means the hub
    import gen_plans  # its SVAMP: the hub's split as it is (a local SVAMP.json is cut into train and test)
    cfg = gen_plans.Config(data_path="ChilleD/SVAMP", split="test")
    assert gen_plans.dataset_of(cfg) == "svamp" and len(gen_plans.load_problems(cfg)) == 1


def test_an_offline_hub_source_names_the_key_that_takes_a_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = common.load_config(ev.Config, [os.path.join(ROOT, "configs", "eval_base.yaml")])
    from tasks import gsm8k
    with pytest.raises(common.ConfigError) as e:
        ev.local_or_hub(cfg.gsm8k_path, lambda: gsm8k.load_gsm8k(cfg.gsm8k_path), ev.task_data_key(cfg, "gsm8k"))
    assert str(e.value).startswith("gsm8k_path names the hub (openai/gsm8k), and the HF hub did not answer "
                                   "(openai/gsm8k (test)") and "pass a local file, e.g. gsm8k_path=" in str(e.value)


def test_the_bd3lm_config_trains_and_validates_on_the_hub_copy(monkeypatch):
    """configs/gsm8k_bd3lm.yaml as shipped: train rows from openai/gsm8k's train split, validation on its test
    split (the job used to stop at once without ../shared)."""
    import datasets
    import train_bd3lm as bd
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", fake_hub(calls, [{"question": f"q{i}", "answer": "a\n#### 1"}
                                                                   for i in range(40)]))
    cfg = common.load_config(bd.Config, [os.path.join(ROOT, "configs", "gsm8k_bd3lm.yaml"), "tokenizer=byte",
                                         "seq_len=64"])
    assert (cfg.data_path, cfg.val_data_path, cfg.tokenizer_file) == ("openai/gsm8k", "openai/gsm8k", None)
    tok = common.Tokenizer("byte")
    for split in ("train", "val"):
        assert len(bd.build_rows(cfg, tok, split)[0]) > 0
    assert [c[1]["split"] for c in calls] == ["train", "test"]


# ---------------------------------------------------------------------------- the README's main job itself


def slurm_cluster_up():
    """Whether tests/slurm_cluster.sh's one-node cluster answers (CI starts it before pytest)."""
    if shutil.which("sbatch") is None:
        return False
    proc = subprocess.run(["bash", os.path.join(ROOT, "tests", "slurm_cluster.sh"), "--no-install"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0


def run_demo(out, data, log):
    """`slurm/pipeline.sh configs/demo` into out/data: as a batch job where the SLURM cluster is up (sbatch --wait,
    the node's 2 CPUs instead of the header's GPUs), else with bash. Returns (exit status, its output)."""
    args = ["slurm/pipeline.sh", "configs/demo", "--out", out, "--data", data]
    if slurm_cluster_up():
        cmd = ["sbatch", "--wait", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=4G",
               "--time=60", f"--output={log}", *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        return proc.returncode, f"sbatch: {proc.stdout}{proc.stderr}\n{text}"
    proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_demo_pipeline_end_to_end(tmp_path):
    """The README's main job, the real configs/demo experiment: both conditions, pretrain -> SFT -> GRPO,
    evaluated after each on the same 200 synthetic test problems, the checkpoint sweep and the report. Where the
    SLURM cluster is up (CI) it runs as `sbatch slurm/pipeline.sh configs/demo`, the issue's "demo pipeline under
    sbatch", so CI runs the demo once; elsewhere as `bash slurm/pipeline.sh`. Everything is seeded, so the
    accuracies are the same on every run of one machine; the margins asserted (SFT's, GRPO's) are well below
    those measured (docs/pipeline.md), so that float differences between CPUs do not flip them. No time is
    asserted: a loaded machine is only slower (~8 min on 2 quiet cores)."""
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    rc, text = run_demo(out, data, str(tmp_path / "demo.out"))
    assert rc == 0, text[-5000:]
    assert "pipeline done" in text, text[-5000:]
    with open(os.path.join(out, "compare", "comparison_report.json")) as f:
        rep = json.load(f)
    assert os.path.getsize(os.path.join(out, "compare", "comparison.png")) > 10_000
    assert rep["conditions"] == ["baseline", "mul_tokens"] and rep["stages"] == ["pretrain", "sft", "grpo"]
    for cond in rep["conditions"]:
        acc = {stage: rep["accuracy"][stage][cond]["synthetic_strict"] for stage in rep["stages"]}
        assert all(a["n"] == 200 for a in acc.values()), acc
        # SFT teaches the one-step problems: its interval lies above the pretrained model's
        assert acc["sft"]["accuracy"] >= acc["pretrain"]["accuracy"] + 0.10, (cond, acc)
        assert acc["sft"]["ci95"][0] > acc["pretrain"]["ci95"][1], (cond, acc)
        # GRPO does not lose what SFT taught (measured: it gains 0.15 and 0.055, docs/pipeline.md)
        assert acc["grpo"]["correct"] >= acc["sft"]["correct"], (cond, acc)
        for stage in rep["stages"]:  # the probes after every stage too
            assert rep["accuracy"][stage][cond]["probe_mul_table"]["n"] == 144
        # bits per byte per checkpoint, from the sweep, and the same curve as the training log's
        sweep = json.load(open(os.path.join(out, cond, "eval", "sweep", "checkpoint_results.json")))
        steps = [row["step"] for row in sweep["checkpoints"]]
        assert len(steps) >= 2 and all(row["metrics"]["val_bpb"] > 0 for row in sweep["checkpoints"])
        curve = dict(map(tuple, rep["pretraining"][cond][0]["curves"]["val_bpb"]))
        assert [curve[s] for s in steps] == [row["metrics"]["val_bpb"] for row in sweep["checkpoints"]]
    # ... and raises it: over both conditions' 400 answers by at least 20 (measured 41)
    gained = sum(rep["accuracy"][stage][cond]["synthetic_strict"]["correct"] * sign
                 for cond in rep["conditions"] for stage, sign in (("grpo", 1), ("sft", -1)))
    assert gained >= 20, rep["accuracy"]
    for stage in rep["stages"]:  # the conditions tested against each other on the same 200 questions
        assert rep["mcnemar"][stage]["mul_tokens"]["synthetic_strict"]["n_paired"] == 200

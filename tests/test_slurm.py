"""slurm/torchrun.sbatch, the one launcher of every training stage, and the stage wrappers over it, on a real
one-node SLURM cluster (tests/slurm_cluster.sh starts it): sbatch -> srun -> torchrun -> 2 CPU workers to
completion; a USR1 before the time limit, a SIGTERM to the batch shell and a preemption-like `scontrol
requeue`, each of which makes the trainer checkpoint, the job requeue and resume to the same final loss as the
uninterrupted run; a rendezvous port of each job's own and PYTHONUNBUFFERED in the workers. Skipped, with the
reason, where SLURM is not installed or cannot be started (no root); CI installs it first."""
import json
import os
import shutil
import subprocess
import time

import pytest

from test_train_gpt import write_arithmetic_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "tests", "slurm_cluster.sh")
LAUNCHER = os.path.join("slurm", "torchrun.sbatch")
WRAPPERS = ["train_gpt", "sft", "grpo", "train_gsm8k_bd3lm", "sigmagpt_quick", "sigmagpt_fair", "sigmagpt_full"]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (as root: bash tests/slurm_cluster.sh installs and starts it)")
    proc = subprocess.run(["bash", CLUSTER, "--no-install"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"no SLURM cluster: {(proc.stdout + proc.stderr).strip().splitlines()[-1]}")


def job_info(job_id):
    """scontrol's fields of a job (pending, running or recently ended) as a dict."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(condition, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ended(job_id):
    return job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def sbatch(args, log_path, env=None):
    """Submit from the repository root, on this node's CPUs instead of GPUs; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                           f"--output={log_path}"] + args, cwd=ROOT, env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def submit(script, out_dir, log_path, data_dir, max_steps):
    """A tiny train_gpt run: 2 torchrun workers on CPU, one thread each. `script` is the README's command
    (slurm/train_gpt.sbatch CONFIG) or the launcher itself (slurm/torchrun.sbatch train_gpt.py CONFIG)."""
    args = dict(data_dir=data_dir, out_dir=out_dir, tokenizer="byte", model="tiny", block_size=32,
                micro_batch_size=2, total_batch_size=128, max_steps=max_steps, warmup_steps=2, max_lr=3e-3,
                dtype="fp32", device="cpu", log_interval=2, val_interval=0, val_steps=2, ckpt_interval=0, seed=3)
    return sbatch(script + ["configs/demo.yaml"] + [f"{k}={v}" for k, v in args.items()], log_path,
                  env=dict(GPUS_PER_NODE="2", OMP_NUM_THREADS="1"))


# how each job is stopped once it has trained a step (None: left alone)
STOPS = {
    "plain": None,
    # what SLURM does before the time limit with --signal=B:USR1@120: signal the batch shell only
    "usr1": ["scancel", "--signal=USR1", "--batch"],
    # a SIGTERM to the batch shell alone (--signal=B:TERM@..., or by hand)
    "term": ["scancel", "--signal=TERM", "--batch"],
    # SLURM ending and requeueing the job itself, as a preemption with PreemptMode=REQUEUE does: SIGTERM to
    # every process of the job (the workers, torchrun, srun, the batch shell), SIGKILL after KillWait
    "requeue": ["scontrol", "requeue"],
}


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Identical runs side by side: one left alone (through the launcher itself), the others (through the
    train_gpt.sbatch wrapper) stopped by a signal once they have trained a step."""
    tmp = tmp_path_factory.mktemp("slurm")
    data_dir = write_arithmetic_data(str(tmp / "data"))
    max_steps = 100
    runs = {name: dict(out=str(tmp / name), log=str(tmp / f"{name}.out")) for name in STOPS}
    try:
        for name, job in runs.items():
            script = [LAUNCHER, "train_gpt.py"] if name == "plain" else [os.path.join("slurm", "train_gpt.sbatch")]
            job["id"] = submit(script, job["out"], job["log"], data_dir, max_steps)
        for name, job in runs.items():
            if STOPS[name] is None:
                continue
            log = os.path.join(job["out"], "log.jsonl")
            wait_until(lambda: os.path.exists(log) and '"train"' in open(log).read(), 90, f"{name}'s first step")
            subprocess.run(STOPS[name] + [job["id"]], check=True)
        for name, job in runs.items():
            if STOPS[name] is None:
                continue
            wait_until(lambda: job_info(job["id"]).get("Restarts") == "1", 60, f"{name} to requeue")
            # a requeued job waits for its old credential to expire before it starts again (10 s in
            # tests/slurm_cluster.sh's cluster; releasing it sooner gets it killed as "Job credential revoked"),
            # and until it does SLURM may show the first start's end state (seen: FAILED): await the second start
            wait_until(lambda: "(restart 1)" in open(job["log"], errors="replace").read(), 120,
                       f"{name} to start again")
        for job in runs.values():
            wait_until(lambda: ended(job["id"]), 120, f"job {job['id']} to end")
            job["state"] = job_info(job["id"])
            job["output"] = open(job["log"], errors="replace").read()  # two ranks' bars interleave
            results = os.path.join(job["out"], "results.json")
            job["results"] = json.load(open(results)) if os.path.exists(results) else {}
        yield runs, max_steps
    finally:
        for job in runs.values():  # nothing left running after a failure
            if "id" in job and job_info(job["id"]).get("JobState") in ("PENDING", "RUNNING"):
                subprocess.run(["scancel", job["id"]])


def test_launcher_runs_srun_torchrun_with_two_workers_to_completion(jobs):
    runs, max_steps = jobs
    plain = runs["plain"]
    assert plain["state"]["JobState"] == "COMPLETED", plain["output"][-3000:]
    assert plain["state"]["ExitCode"] == "0:0" and plain["state"]["Restarts"] == "0"
    assert "x 2 processes" in plain["output"] and "x 2 ranks" in plain["output"]  # torchrun started two workers
    assert "train_gpt.py configs/demo.yaml data_dir=" in plain["output"]
    assert plain["results"]["status"] == "done"
    assert plain["results"]["steps"] == max_steps
    assert plain["results"]["world_size"] == 2
    assert plain["results"]["resumed_from_step"] is None


@pytest.mark.parametrize("stop", ["usr1", "term", "requeue"])
def test_a_stop_signal_checkpoints_requeues_and_resumes_to_the_same_loss(jobs, stop):
    runs, max_steps = jobs
    plain, job = runs["plain"], runs[stop]
    out = job["output"]
    assert job["state"]["JobState"] == "COMPLETED", out[-3000:]
    assert job["state"]["Restarts"] == "1", out[-3000:]  # requeued once: by the launcher or by SLURM, not both
    if stop == "usr1":
        assert "USR1: asking the workers to checkpoint and exit" in out
    if stop == "term":
        assert "TERM: asking the workers to checkpoint and exit" in out
    if stop == "requeue":
        assert "DUE TO JOB REQUEUE" in out  # SLURM's own words: it ended and requeued the job
    assert "requeueing job" in out if stop != "requeue" else "requeueing job" not in out
    assert "saved" in out and "at step" in out  # "received SIGUSR1|SIGTERM: saved ... at step N"
    resumed = job["results"]["resumed_from_step"]
    assert resumed is not None and 0 <= resumed < max_steps - 1  # continued from the checkpoint of the stop
    assert f"resumed from {job['out']}/ckpt_{resumed:06d}.pt" in out
    assert job["results"]["steps"] == max_steps and job["results"]["status"] == "done"
    # resume is exact: the same final losses as the job that was never interrupted
    assert job["results"]["final_train_loss"] == pytest.approx(plain["results"]["final_train_loss"], abs=1e-6)
    assert job["results"]["final_val_loss"] == pytest.approx(plain["results"]["final_val_loss"], abs=1e-6)


PROBE = """import json, os, sys, time
t0 = time.time()
time.sleep(float(os.environ.get("PROBE_SECONDS", "4")))
with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:  # the worker's parent: torchrun
    parent = f.read().decode().split("\\0")
record = dict(argv=sys.argv[1:], parent=parent, start=t0, end=time.time(),
              **{k: os.environ.get(k) for k in ("PYTHONUNBUFFERED", "RANK", "WORLD_SIZE", "OMP_NUM_THREADS")})
with open(sys.argv[1] + ".rank" + os.environ["RANK"] + ".json", "w") as f:
    json.dump(record, f)
"""


def test_each_job_has_its_own_rendezvous_port_and_unbuffered_workers(cluster, tmp_path):
    """Two jobs of the launcher at once on one node: each torchrun meets its workers at a port of its own job,
    and the workers' output is unbuffered (their lines reach the log when printed)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    ids = {}
    try:
        for name in ("a", "b"):
            ids[name] = sbatch([LAUNCHER, str(probe), str(tmp_path / name), "extra=1"], tmp_path / f"{name}.out",
                               env=dict(GPUS_PER_NODE="2"))
        for job_id in ids.values():
            wait_until(lambda: ended(job_id), 120, f"job {job_id} to end")
    finally:
        for job_id in ids.values():
            if job_info(job_id).get("JobState") in ("PENDING", "RUNNING"):
                subprocess.run(["scancel", job_id])
    ports, windows = {}, []
    for name, job_id in ids.items():
        log = (tmp_path / f"{name}.out").read_text()
        assert job_info(job_id)["JobState"] == "COMPLETED", log[-3000:]
        ranks = [json.load(open(tmp_path / f"{name}.rank{r}.json")) for r in (0, 1)]
        for rec in ranks:
            assert rec["PYTHONUNBUFFERED"] == "1" and rec["WORLD_SIZE"] == "2"
            assert rec["argv"] == [str(tmp_path / name), "resume=latest", "extra=1"]
            endpoint = [a for a in rec["parent"] if a.startswith("--rdzv_endpoint=")]
            assert len(endpoint) == 1, rec["parent"]
            ports.setdefault(name, set()).add(int(endpoint[0].rsplit(":", 1)[1]))
            windows.append((rec["start"], rec["end"]))
        assert ports[name] == {20000 + int(job_id) % 12000}, ports
        assert "rendezvous " in log and f":{20000 + int(job_id) % 12000}: " in log
    assert ports["a"] != ports["b"]
    assert max(start for start, _ in windows) < min(end for _, end in windows)  # the two jobs ran at once


@pytest.mark.parametrize("name", WRAPPERS)
def test_each_stage_wrapper_is_the_launcher_with_its_defaults(name):
    """Every stage's sbatch file keeps its #SBATCH defaults and hands its stage to slurm/torchrun.sbatch, which
    alone holds the trap, the srun/torchrun line and the requeue."""
    path = os.path.join(ROOT, "slurm", f"{name}.sbatch")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("exec bash slurm/torchrun.sbatch ") for line in code), code
    assert len(code) <= 10, code  # a few lines over the launcher
    for duplicated in ("trap ", "srun ", "scontrol requeue", "rdzv", "29500"):
        assert not any(duplicated in line for line in code), (name, duplicated)


def test_pipeline_sbatch_header_and_dry_run_in_a_job(cluster, tmp_path):
    """slurm/pipeline.sh as a batch job: SLURM accepts its #SBATCH lines (resources overridden to fit this
    node), the job finds the experiment from the submit directory and prints every stage's command."""
    log = tmp_path / "pipeline.out"
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=500M",
                           f"--output={log}", "slurm/pipeline.sh", "configs/demo", "--dry-run",
                           "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    wait_until(lambda: job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 60, "the job")
    text = log.read_text()
    assert job_info(job_id)["JobState"] == "COMPLETED", text
    assert f"job {job_id} (restart 0)" in text
    assert "+ python train_gpt.py configs/demo/pretrain.yaml" in text and "task=compare" in text
    requeue = [line for line in open(os.path.join(ROOT, "slurm", "pipeline.sh")) if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue\n" in requeue and any("--signal=B:USR1@" in line for line in requeue)


def test_prepare_data_sbatch_writes_shards(cluster, tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("source: synthetic_math\ntokenizer: byte\ntarget_tokens: 20000\nval_tokens: 4000\n"
                      "shard_size: 20000\n")
    out, log = tmp_path / "shards", tmp_path / "prepare.out"
    proc = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=1G", f"--output={log}",
                           "slurm/prepare_data.sbatch", str(config), f"out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    wait_until(lambda: job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 90, "the job")
    assert job_info(job_id)["JobState"] == "COMPLETED", log.read_text()[-3000:]
    meta = json.load(open(out / "meta.json"))
    assert meta["train_tokens"] == 16000 and meta["val_tokens"] == 4000
    assert json.load(open(out / "config.json"))["num_proc"] == 1  # one tokenizer process per CPU of the job

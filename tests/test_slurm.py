"""slurm/train_gpt.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.sh starts it): sbatch ->
srun -> torchrun -> 2 CPU workers to completion, and a USR1 preemption that checkpoints, requeues and
resumes to the same final loss as the uninterrupted run. Skipped, with the reason, where SLURM is not
installed or cannot be started (no root); CI installs it first."""
import json
import os
import shutil
import subprocess
import time

import pytest

from test_train_gpt import write_arithmetic_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "tests", "slurm_cluster.sh")
SBATCH = os.path.join(ROOT, "slurm", "train_gpt.sbatch")


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


def submit(out_dir, log_path, data_dir, max_steps):
    """The README's command, with the node's CPUs instead of GPUs: 2 torchrun workers on CPU, one thread each."""
    args = dict(data_dir=data_dir, out_dir=out_dir, tokenizer="byte", model="tiny", block_size=32,
                micro_batch_size=2, total_batch_size=128, max_steps=max_steps, warmup_steps=2, max_lr=3e-3,
                dtype="fp32", device="cpu", log_interval=2, val_interval=0, val_steps=2, ckpt_interval=0, seed=3)
    env = dict(os.environ, GPUS_PER_NODE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                           f"--output={log_path}", SBATCH, "configs/demo.yaml"] + [f"{k}={v}" for k, v in args.items()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Two identical jobs side by side: one left alone, one preempted with USR1 once it has trained a step."""
    tmp = tmp_path_factory.mktemp("slurm")
    data_dir = write_arithmetic_data(str(tmp / "data"))
    max_steps = 60
    plain = dict(out=str(tmp / "plain"), log=str(tmp / "plain.out"))
    preempted = dict(out=str(tmp / "preempted"), log=str(tmp / "preempted.out"))
    ids = []
    try:
        for job in (plain, preempted):
            job["id"] = submit(job["out"], job["log"], data_dir, max_steps)
            ids.append(job["id"])
        log = os.path.join(preempted["out"], "log.jsonl")
        wait_until(lambda: os.path.exists(log) and '"train"' in open(log).read(), 90, "the first train record")
        # what SLURM does before the time limit with --signal=B:USR1@120: signal the batch shell only
        subprocess.run(["scancel", "--signal=USR1", "--batch", preempted["id"]], check=True)
        wait_until(lambda: job_info(preempted["id"]).get("Restarts") == "1", 60, "the job to requeue itself")
        # a requeued job waits for its old credential to expire before it starts again (10 s in
        # tests/slurm_cluster.sh's cluster; releasing it sooner gets it killed as "Job credential revoked"), and
        # until it does SLURM may show the first start's end state (seen: FAILED): await the second start first
        wait_until(lambda: "(restart 1)" in open(preempted["log"], errors="replace").read(), 120,
                   "the requeued job to start again")
        for job in (plain, preempted):
            wait_until(lambda: job_info(job["id"]).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                       120, f"job {job['id']} to end")
            job["state"] = job_info(job["id"])
            job["results"] = json.load(open(os.path.join(job["out"], "results.json")))
            job["output"] = open(job["log"], errors="replace").read()  # two ranks' bars interleave
        yield plain, preempted, max_steps
    finally:
        for job_id in ids:  # nothing left running after a failure
            if job_info(job_id).get("JobState") in ("PENDING", "RUNNING"):
                subprocess.run(["scancel", job_id])


def test_sbatch_runs_srun_torchrun_with_two_workers_to_completion(jobs):
    plain, _, max_steps = jobs
    assert plain["state"]["JobState"] == "COMPLETED", plain["output"][-3000:]
    assert plain["state"]["ExitCode"] == "0:0"
    assert "x 2 ranks" in plain["output"]  # torchrun started two workers
    assert plain["results"]["status"] == "done"
    assert plain["results"]["steps"] == max_steps
    assert plain["results"]["world_size"] == 2


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(jobs):
    plain, preempted, max_steps = jobs
    out = preempted["output"]
    assert preempted["state"]["JobState"] == "COMPLETED", out[-3000:]
    assert preempted["state"]["Restarts"] == "1"
    assert "USR1: time limit near" in out and "received SIGUSR1: saved" in out
    assert "(restart 1)" in out  # the requeued start of the same job ...
    resumed = preempted["results"]["resumed_from_step"]
    assert resumed is not None and 0 <= resumed < max_steps - 1  # ... continued from the preemption checkpoint
    assert f"resumed from {preempted['out']}/ckpt_{resumed:06d}.pt" in out
    assert preempted["results"]["steps"] == max_steps
    # resume is exact: the same final losses as the job that was never interrupted
    assert preempted["results"]["final_train_loss"] == pytest.approx(plain["results"]["final_train_loss"], abs=1e-6)
    assert preempted["results"]["final_val_loss"] == pytest.approx(plain["results"]["final_val_loss"], abs=1e-6)


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

"""FSDP2 (common.shard_model) and sharded checkpoints (torch.distributed.checkpoint) on CPU with gloo:
2 processes train as 1 does, a sharded checkpoint resumes bit-exact, and on another world size."""
import json
import os
import subprocess
import sys

import pytest

import common
from conftest import ROOT, free_port

WORKER = os.path.join(ROOT, "tests", "fsdp_worker.py")


def run(tmp_path, name, arch, steps, *opts, nproc=1):
    out = str(tmp_path / f"{name}.json")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(launcher + [WORKER, arch, str(steps), out, *opts], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("W1203"))[-6000:]
    return {int(k): v for k, v in json.load(open(out)).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_sharded_processes_train_as_one_and_resume_anywhere(arch, tmp_path):
    one = run(tmp_path, "one", arch, 10)
    two = run(tmp_path, "two", arch, 10, "save=4", nproc=2)
    assert max(abs(one[s] - two[s]) for s in range(10)) < 1e-5, (one, two)
    assert one[9] < one[0]
    ckpt = os.path.join(tmp_path, "ckpt_000004.dcp")
    assert common.list_checkpoints(str(tmp_path)) == [(4, ckpt)] and common.load_checkpoint(ckpt)["world_size"] == 2
    again = run(tmp_path, "again", arch, 10, f"resume={ckpt}", nproc=2)
    assert again == {s: two[s] for s in range(5, 10)}  # bit for bit
    alone = run(tmp_path, "alone", arch, 10, f"resume={ckpt}")  # 2 shards read back by one process
    assert max(abs(alone[s] - one[s]) for s in range(5, 10)) < 1e-5


def test_a_tiny_moe_trains_sharded(tmp_path):
    losses = run(tmp_path, "moe", "mixtral", 10, nproc=2)
    assert losses[9] < losses[0] - 0.1, losses


def test_sharding_needs_torchrun():
    import torch
    with pytest.raises(common.ConfigError, match="launch with torchrun"):
        common.shard_model(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)])),
                           common.Dist(False, 0, 0, 1, "cpu"))


def test_memory_estimate_of_the_issue_figures():
    """Full fine-tuning with AdamW: a 4B model needs ~64 GB of weights, gradients and optimizer state per GPU
    under DDP (16 bytes a weight), a quarter of that sharded over 4 GPUs; a 7B run cannot start on one 80 GB H100."""
    four_b = dict(n_params=4e9, n_trainable=4e9, n_layer=36, d_model=2560, vocab_size=151936, micro_batch_size=1,
                  seq_len=2048, world_size=4)
    ddp = common.estimate_memory(**four_b)
    fsdp = common.estimate_memory(**four_b, fsdp=True)
    assert abs(ddp["weights"] + ddp["grads"] + ddp["optimizer"] - 64) < 1e-6
    assert fsdp["weights"] + fsdp["grads"] + fsdp["optimizer"] < 64 / 4 + 1
    assert fsdp["activations"] == ddp["activations"]
    lora = common.estimate_memory(**{**four_b, "n_trainable": 2e7})
    assert lora["optimizer"] < 0.2 and lora["weights"] == ddp["weights"]
    seven_b = dict(n_params=7e9, n_trainable=7e9, n_layer=28, d_model=3584, vocab_size=152064, micro_batch_size=2,
                   seq_len=2048, world_size=1)
    with pytest.raises(common.ConfigError, match="needs ~1.. GB per GPU"):
        common.check_memory_fits(common.estimate_memory(**seven_b), "cuda", capacity_gb=80)
    common.check_memory_fits(common.estimate_memory(**{**seven_b, "world_size": 8}, fsdp=True), "cuda", capacity_gb=80)

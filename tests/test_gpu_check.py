"""bench/gpu_check: the GPU machine's first run. Here (no GPU) the shell script refuses in one line, and the
script's every part runs tiny on CPU (smoke=true), so the prepared check does not first break on the GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_check_parts_run_tiny_on_cpu_and_write_one_json(tmp_path):
    out = str(tmp_path / "check")
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "smoke=true", f"out_dir={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.load(open(os.path.join(out, "gpu_check.json")))
    for part in ("train_gpt_124m_compile", "train_gpt_124m_eager"):
        assert report[part]["tokens_per_sec"] > 0, report[part]
    assert report["attention"]["sdpa_ms"] > 0 and report["bd3lm"]["report"]
    assert not [k for k, v in report.items() if isinstance(v, dict) and "error" in v], report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gpu_check_sh_refuses_without_a_gpu(tmp_path):
    run = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "check")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and run.stderr.strip().startswith("error: bench/gpu_check.sh needs a CUDA GPU")

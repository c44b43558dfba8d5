"""SIGTERM / SIGUSR1 at any moment from process start to exit end train_gpt.py with exit code 0 and leave a
loadable checkpoint whenever there was progress to save (issue 9, item 13). The middle of the loop is covered
in test_train_gpt.py; these are the windows around it: start-up (imports, set-up) and after the last save."""
import os
import signal
import subprocess
import sys
import time

import pytest

import common
from conftest import ROOT
from test_train_gpt import tiny_args, write_arithmetic_data

SCRIPT = os.path.join(ROOT, "train_gpt.py")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status (Linux)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic_data(str(tmp_path_factory.mktemp("arith_sig")), train_tokens=8_000, val_tokens=2_000)


def start(args, tmp_path):
    log = open(tmp_path / "stderr", "w")
    return subprocess.Popen([sys.executable, SCRIPT] + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def caught_signals(pid):
    """The signals a process has handlers for (the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return {s for s in (signal.SIGTERM, signal.SIGUSR1) if mask >> (s - 1) & 1}


def wait_for(condition, proc, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"train_gpt.py exited with {proc.returncode} before the moment to signal")
        time.sleep(0.01)
    raise AssertionError("the moment to signal never came")


def finish(proc, tmp_path):
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]


def test_signal_during_start_up_exits_0_and_keeps_the_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    args = tiny_args(data_dir, out, max_steps=50, val_interval=0)
    finish(start(args + ["stop_after_step=0"], tmp_path), tmp_path)  # a run with progress: step 0 saved
    proc = start(args + ["resume=latest"], tmp_path)
    # as early as a handler can exist: the first lines of the script, before torch is imported
    wait_for(lambda: caught_signals(proc.pid) == {signal.SIGTERM, signal.SIGUSR1}, proc)
    proc.send_signal(signal.SIGUSR1)  # SLURM's time-limit signal (SIGTERM: the test below)
    finish(proc, tmp_path)
    ckpt = common.load_checkpoint(out, expected_kind="gpt")
    assert ckpt["step"] == 0 and len(common.list_checkpoints(out)) == 1  # no step taken, nothing new saved
    assert "before the first step" in open(os.path.join(out, "log.txt")).read()


def test_signal_after_the_last_checkpoint_exits_0(data_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = start(tiny_args(data_dir, out, max_steps=3, val_interval=0), tmp_path)
    wait_for(lambda: common.list_checkpoints(out), proc)  # the final checkpoint: results and plot still to come
    proc.send_signal(signal.SIGTERM)
    finish(proc, tmp_path)
    assert common.load_checkpoint(out)["step"] == 2
    proc = start(tiny_args(data_dir, out, max_steps=3, val_interval=0, resume="latest"), tmp_path)
    wait_for(lambda: caught_signals(proc.pid), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)  # somewhere in start-up or after "already finished": still a clean exit
    finish(proc, tmp_path)
    assert common.load_checkpoint(out)["step"] == 2

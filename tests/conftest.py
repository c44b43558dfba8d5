import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
GPT2_RANKS = os.path.join(SHARED, "tokenizers", "gpt2.tiktoken")


def shared_path(*parts):
    """A file under ../shared/data; tests that need it skip (with the reason) only where ../shared is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing in CI, where ../shared must be present")
        pytest.skip(f"{path} not present (../shared/data is absent in this clone)")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test's models are tiny: they run fastest on one thread (their matmuls are too small to split, and
    more threads only spin on a small or shared CPU). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line_error(main, argv, capsys, expected=(), preemptible=False):
    """Run main(argv) as a stage's entry point does (common.run_main): exit 1 and exactly one `error: ...` line on
    stderr, no traceback. Returns that line."""
    import common
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: main(argv), expected, preemptible)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, argv, nproc=2, timeout=600):
    """`torchrun --nproc_per_node=N SCRIPT ARGV` on CPU (gloo) on a free port; asserts exit 0 (stderr shown)."""
    import subprocess
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                          f"--master_port={free_port()}", os.path.join(ROOT, script), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, "\n".join(l for l in run.stderr.splitlines() if not l.startswith("W1203"))[-4000:]
    return run

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

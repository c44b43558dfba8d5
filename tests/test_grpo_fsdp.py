"""grpo.py fsdp=true on CPU with gloo under torchrun: the sharded policy (and sharded reference, beta > 0) trains
as DDP does on the same 2 ranks (so the same prompts and, from the gathered rollout copy, the same completions),
a sharded checkpoint resumes exactly (on 2 ranks, and whole on 1 process), the gathered HF folder holds the same
weights, and the settings that cannot work are one-line errors."""
import os

import pytest

import common
import grpo
import conftest
from test_grpo import run_args, sft_warm


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return sft_warm(str(tmp_path_factory.mktemp("grpo_fsdp") / "sft"))


# 4 completions a micro batch, 2 micro batches a step per rank, 2 optimizer steps per batch, the KL term on
EXTRA = ["max_steps=3", "num_generations=4", "micro_batch_size=4", "gradient_accumulation_steps=2",
         "num_iterations=2", "beta=0.04", "eval_steps=0", "eval_examples=4", "ckpt_interval=0", "tensorboard=false",
         "device=cpu"]


def torchrun(argv, nproc=2):
    return conftest.torchrun("grpo.py", argv, nproc)


def records(out):
    return {r["step"]: r for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r.get("type") == "train"}


def hf_weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def two_rank_runs(warm, tmp_path_factory):
    """The same 3 steps on 2 ranks under DDP and sharded, each ending with its checkpoint of step 2
    (ckpt_000002.pt, ckpt_000002.dcp): run once for the tests that compare them and those that continue them."""
    root = tmp_path_factory.mktemp("two_ranks")
    ddp, fsdp = str(root / "ddp"), str(root / "fsdp")
    torchrun(run_args(warm, ddp, *EXTRA))
    torchrun(run_args(warm, fsdp, *EXTRA, "fsdp=true"))
    return ddp, fsdp


def test_sharded_grpo_trains_as_ddp_and_resumes(warm, two_rank_runs, tmp_path):
    ddp, fsdp = two_rank_runs
    parts = str(tmp_path / "parts")
    a, b = records(ddp), records(fsdp)
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for key in ("loss", "reward", "kl", "grad_norm", "completion_length"):
        assert max(abs(a[s][key] - b[s][key]) for s in a) < 1e-5, (key, a, b)
    assert a[2]["kl"] > 0 and a[0]["loss"] != a[2]["loss"]  # the policy moved away from the reference
    wa, wb = hf_weights(os.path.join(ddp, "hf")), hf_weights(os.path.join(fsdp, "hf"))  # gathered on rank 0
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4

    torchrun(run_args(warm, parts, *EXTRA, "fsdp=true", "stop_after_step=0"))
    assert [os.path.basename(p) for _, p in common.list_checkpoints(parts)] == ["ckpt_000000.dcp"]
    torchrun(run_args(warm, parts, *EXTRA, "fsdp=true", "resume=latest"))
    c = records(parts)
    assert sorted(c) == [0, 1, 2]
    for key in ("loss", "reward", "kl", "grad_norm"):
        assert [c[s][key] for s in c] == [b[s][key] for s in c], key  # bit for bit
    wc = hf_weights(os.path.join(parts, "hf"))
    assert all(wc[k].equal(wb[k]) for k in wb)


def test_one_process_continues_the_two_rank_sharded_checkpoint(warm, two_rank_runs, tmp_path):
    """fsdp=false without torchrun reads the 2 ranks' ckpt_000002.dcp whole and takes step 3 as one process
    continuing the DDP run's ckpt_000002.pt does (its prompts and samples are one process's, so the reference is
    a 1-process continuation too): the same policy and AdamW state, hence the same rollouts, loss and weights. A
    policy left at the start shows in the KL, AdamW state left empty in mu = 2's second step and the weights."""
    ddp, fsdp = two_rank_runs
    shards, single = str(tmp_path / "from_shards"), str(tmp_path / "from_ddp")
    more = [*EXTRA, "max_steps=4"]  # one more step than the 2-rank runs took
    got = grpo.main(run_args(warm, shards, *more, f"resume={os.path.join(fsdp, 'ckpt_000002.dcp')}"))
    want = grpo.main(run_args(warm, single, *more, f"resume={os.path.join(ddp, 'ckpt_000002.pt')}"))
    assert got["resumed_from_step"] == want["resumed_from_step"] == 2 and got["world_size"] == 1
    assert "ckpt_000002.dcp at step 3" in open(os.path.join(shards, "log.txt")).read()
    a, b = records(shards), records(single)
    assert sorted(a) == sorted(b) == [3]
    for key in ("loss", "reward", "kl", "grad_norm", "completion_length"):
        assert abs(a[3][key] - b[3][key]) < 1e-5, (key, a, b)
    assert a[3]["kl"] > 1e-4  # the policy of step 2, well away from the reference
    wa = common.load_checkpoint(common.checkpoint_path(shards, 3))["model"]  # a 1-process run: one file
    wb = common.load_checkpoint(common.checkpoint_path(single, 3))["model"]
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_an_hf_policy_shards_as_it_trains_under_ddp(warm, tmp_path):
    """A transformers model (GPT2LMHeadModel, tied embeddings) through the same path: gathered rollout copy,
    sharded reference, the HF folder from the shards."""
    import engine as engine_lib
    import model as model_lib
    native = engine_lib.load_model(warm)
    folder = str(tmp_path / "hf_in")
    model_lib.save_hf_folder(native.model, native.tok.tok, folder, {})
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    torchrun(run_args(folder, ddp, *EXTRA, "max_steps=2"))
    torchrun(run_args(folder, fsdp, *EXTRA, "max_steps=2", "fsdp=true"))
    a, b = records(ddp), records(fsdp)
    assert sorted(a) == sorted(b) == [0, 1]
    for key in ("loss", "reward", "kl", "grad_norm"):
        assert max(abs(a[s][key] - b[s][key]) for s in a) < 1e-5, (key, a, b)
    wa, wb = hf_weights(os.path.join(ddp, "hf")), hf_weights(os.path.join(fsdp, "hf"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.parametrize("extra, words", [(["fsdp=true"], "launch with torchrun"),
                                          (["cpu_offload=true"], "set fsdp=true too")])
def test_fsdp_settings_that_cannot_work_are_refused(warm, tmp_path, extra, words):
    with pytest.raises(common.ConfigError, match=words):
        grpo.main(run_args(warm, str(tmp_path / "bad"), *EXTRA, *extra))

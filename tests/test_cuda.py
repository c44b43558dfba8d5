"""The CUDA fast paths: flash-attn, bf16 autocast + torch.compile + fused AdamW in train_gpt.py, NCCL DDP,
vLLM generation, and 4/8-bit (bitsandbytes) MoE models trained through LoRA in sft.py. They run only where a GPU
(and the package) is present; on a CPU machine each test is reported as skipped with the reason, and the plain
PyTorch paths they mirror are tested elsewhere."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import common
import model as model_lib
import train_gpt
from test_train_gpt import records, tiny_args, write_arithmetic_data

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@cuda
@pytest.mark.skipif(model_lib.flash_attn_func is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa_under_bf16_autocast():
    torch.manual_seed(0)
    m = model_lib.GPT(model_lib.model_config("small", 512, 256)).cuda().eval()
    x = torch.randint(0, 512, (4, 256), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        flash, _ = m(x)  # no mask: the flash-attn path
        sdpa, _ = m(x, attn_mask=torch.tril(torch.ones(256, 256, dtype=torch.bool, device="cuda")))
    calls = []
    original = model_lib.flash_attn_func
    model_lib.flash_attn_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            m(x)
    finally:
        model_lib.flash_attn_func = original
    assert len(calls) == m.config.n_layer  # the fast path really ran, once per layer
    assert (flash.float() - sdpa.float()).abs().max().item() < 5e-2  # bf16 rounding only



@cuda
@pytest.mark.skipif(model_lib.flash_attn_varlen_func is None, reason="flash-attn is not installed")
def test_varlen_flash_attention_matches_the_dense_packed_mask(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64], device="cuda")
    calls = []
    original = model_lib.flash_attn_varlen_func
    monkeypatch.setattr(model_lib, "flash_attn_varlen_func", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = model_lib.attention(q, k, v, doc_ids=doc_ids)
    dense = model_lib.attention(q, k, v, attn_mask=model_lib.packed_causal_mask(doc_ids))
    assert calls == [1]  # the varlen kernel really ran
    assert (fast.float() - dense.float()).abs().max().item() < 2e-2  # bf16 rounding only

@cuda
def test_compiled_bf16_training_learns_and_checkpoints(tmp_path):
    data = write_arithmetic_data(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data, out, device="cuda", dtype="bf16", compile="true", max_steps=40,
                             max_lr=1e-2, ckpt_interval=20))
    losses = [r["loss"] for r in records(out, "train")]
    assert losses[-1] < 0.6 * losses[0]
    ckpt = common.load_checkpoint(out, expected_kind="gpt")
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # the plain module, not the compiled one


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL DDP")
def test_two_gpu_nccl_ddp_matches_one_gpu(tmp_path):
    data = write_arithmetic_data(str(tmp_path / "data"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = dict(device="cuda", dtype="fp32", compile="false", max_steps=6)
    train_gpt.main(tiny_args(data, one, **args))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train_gpt.py"), *tiny_args(data, two, **args)], check=True, cwd=ROOT)
    a, b = [r["loss"] for r in records(one, "train")], [r["loss"] for r in records(two, "train")]
    assert a == pytest.approx(b, abs=1e-4)


@cuda
@pytest.mark.skipif(not common.vllm_available(), reason="vLLM is not installed")
def test_vllm_matches_the_plain_engine_and_loads_new_weights(tmp_path):
    import engine as engine_lib
    from test_export_hf import make_run
    gpt, tok = make_run(str(tmp_path / "run"), "byte", None, steps=10, block_size=256)
    model_lib.save_hf_folder(gpt, tok, str(tmp_path / "hf"), {})
    lm = engine_lib.load_model(str(tmp_path / "hf"), device="cuda", dtype=torch.float32)
    prompts = [lm.tok.encode_prompt(t) for t in ["Question: 2+2?\nAnswer:", "7 x 8 =", "Hello"]]
    plain = engine_lib.Engine(lm).generate(prompts, 12, logprobs=True)
    engine = engine_lib.VLLMEngine(lm, torch.float32, gpu_memory_utilization=0.3)
    try:
        fast = engine.generate(prompts, 12, logprobs=True)
        assert [o[0].ids for o in fast] == [o[0].ids for o in plain]
        for f, p in zip(fast, plain):
            assert f[0].finish_reason == p[0].finish_reason
            assert f[0].logprobs == pytest.approx(p[0].logprobs, abs=1e-3)
        # new weights: a re-initialised model's greedy tokens, as the plain engine gives them
        torch.manual_seed(1)
        other = model_lib.GPT(gpt.config).eval()
        engine.load_weights(other)
        lm_other = engine_lib.LoadedModel(other, engine_lib.NativeTokenizer(tok), "other", "native", 256, {})
        want = engine_lib.Engine(lm_other).generate(prompts, 12)
        assert [o[0].ids for o in engine.generate(prompts, 12)] == [o[0].ids for o in want]
    finally:
        engine.close()


@cuda
@pytest.mark.skipif(not common.vllm_available(), reason="vLLM is not installed")
def test_vllm_sweep_runs_each_checkpoint_in_its_own_process(tmp_path):
    """vLLM keeps its GPU memory until its process ends: a sweep with vLLM evaluates each checkpoint in a
    subprocess (so three checkpoints at 0.6 of the GPU each fit one after another), with the plain numbers."""
    import shutil

    import eval_gsm8k as ev
    from test_export_hf import make_run
    make_run(str(tmp_path / "run"), "byte", None, steps=3, block_size=256)
    for step in (7, 9):
        shutil.copy(tmp_path / "run" / "ckpt_000002.pt", tmp_path / "run" / f"ckpt_{step:06d}.pt")
    args = ["task=sweep", f"model={tmp_path / 'run'}", "sweep_tasks=[probes]", "probe_n=5", "limit=3",
            "probe_max_new_tokens=6", "gpu_memory_utilization=0.6"]
    fast = ev.main(args + ["engine=vllm", f"out_dir={tmp_path / 'vllm'}"])
    plain = ev.main(args + ["engine=hf", f"out_dir={tmp_path / 'hf'}"])
    assert fast["isolated"] is True and plain["isolated"] is False
    assert [r["step"] for r in fast["checkpoints"]] == [2, 7, 9]
    for f, p in zip(fast["checkpoints"], plain["checkpoints"]):
        assert f["metrics"] == pytest.approx(p["metrics"])


@cuda
@pytest.mark.skipif(model_lib.flex_attention is None, reason="this torch has no FlexAttention")
def test_flex_block_diffusion_mask_matches_the_dense_sdpa_mask():
    import train_bd3lm as bd
    torch.manual_seed(0)
    m = model_lib.GPT(model_lib.GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=128,
                                          tie_embeddings=False)).cuda().eval()
    for segments, block_size in (([256], 16), ([96, 64, 96], 16), ([256], 4)):
        ids = bd.make_block_ids(segments, block_size).cuda()
        x = torch.randint(0, 512, (2, 512), device="cuda")
        pos = torch.cat([torch.arange(256), torch.arange(256)]).cuda()
        with torch.no_grad():
            dense, _ = m(x, position_ids=pos, attn_mask=model_lib.block_diffusion_mask(ids))
            flex, _ = m(x, position_ids=pos, attn_mask=model_lib.flex_block_diffusion_mask(ids))
        assert (dense - flex).abs().max().item() < 1e-3


@cuda
def test_bd3lm_compiled_bf16_training_learns(tmp_path):
    import train_bd3lm as bd
    from test_bd3lm import plans_args
    out = str(tmp_path / "run")
    bd.main(plans_args(out, device="cuda", dtype="bf16", compile="true", max_steps=30, val_interval=0,
                       ckpt_interval=0, max_lr=1e-2))
    losses = [r["loss"] for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r["type"] == "train"]
    assert losses[-1] < 0.8 * losses[0]


def tiny_qwen2_moe(folder):
    """A tiny Qwen2-MoE from config: routed experts (one fused parameter each, left unquantised) beside a shared
    expert of nn.Linear layers (quantised, and LoRA targets), saved with a byte-level tokenizer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from test_sft import hf_byte_tok
    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=260, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=256, num_experts=4, num_experts_per_tok=2,
                            bos_token_id=256, eos_token_id=256)
    Qwen2MoeForCausalLM(config).save_pretrained(folder)
    hf_byte_tok().tok.save_pretrained(folder)
    return folder


@cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
# adapted: the lora_B matrices, per layer Mixtral's 4 attention projections, Qwen2-MoE's also 3 shared-expert ones
@pytest.mark.parametrize("arch, bits, adapted", [("mixtral", 4, 2 * 4), ("qwen2_moe", 4, 2 * 7),
                                                 ("qwen2_moe", 8, 2 * 7)])
def test_a_quantised_moe_trains_its_lora_adapters(tmp_path, arch, bits, adapted):
    """sft.py load_in_4bit / load_in_8bit on a tiny MoE: the base loads through bitsandbytes, the LoRA adapters on
    its linear layers (attention; Qwen2-MoE's shared expert too) train and the loss falls (12 steps at lr 1e-2 take
    it from ~5.58 to ~5.40-5.45 on CPU unquantised; the untrained model's loss wobbles by ~0.015 a step)."""
    from safetensors.torch import load_file
    import sft
    from test_sft_fsdp import args, losses, tiny_mixtral
    model = (tiny_mixtral if arch == "mixtral" else tiny_qwen2_moe)(str(tmp_path / arch))
    out = str(tmp_path / "run")
    sft.main(args(model, out, "device=cuda", f"load_in_{bits}bit=true", "lora=true", "lora_r=8", "lora_alpha=16",
                  "lora_dropout=0", "learning_rate=1e-2", "micro_batch_size=4", "max_steps=12"))
    trained = losses(out)
    assert sorted(trained) == list(range(12))
    assert sum(trained[s] for s in range(8, 12)) / 4 < trained[0] - 0.06, trained
    folder = os.path.join(out, "hf")  # a quantised base is not merged: the folder holds the adapter only
    assert os.path.isfile(os.path.join(folder, "adapter_config.json"))
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == adapted and any("q_proj" in k for k in lora_b)
    assert arch != "qwen2_moe" or any("shared_expert.gate_proj" in k for k in lora_b)
    assert all(v.abs().max() > 0 for v in lora_b.values())  # peft starts every lora_B at zero: each one trained

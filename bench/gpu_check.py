"""
The first thing to run on a new GPU machine (bench/gpu_check.sh runs it after tests/test_cuda.py): every CUDA
fast path once, with its figure, in one JSON. Under 8 minutes on one H100/H200.

    python bench/gpu_check.py                       # out/gpu_check/gpu_check.json
    python bench/gpu_check.py smoke=true            # the same steps, tiny and on CPU (checks the script itself)

Parts (each timed out on its own; a part that fails records its error and the rest still run):
  - train_gpt.py bench, GPT-2 124M, bf16, torch.compile on and off: tokens/s, MFU;
  - attention: flash-attn vs SDPA, forward + backward, (16, 1024, 12 heads, 64) bf16: ms per call;
  - BD3-LM: bench/bench_bd3lm.py on the GPU (FlexAttention's block mask there);
  - sft.py fsdp=true on one GPU under torchrun (a tiny Llama from config): runs, peak memory;
  - vLLM: GSM8K-style generation samples/s with a random GPT-2 124M (only where vllm imports).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

import torch  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out/gpu_check"  # gpu_check.json and each part's log
    smoke: bool = False  # tiny models on CPU: checks the script, measures nothing
    micro_batch_size: int = 32  # train_gpt bench: sequences per forward pass (124M, T=1024)
    bench_steps: int = 20  # timed train_gpt steps per variant
    part_timeout: int = 240  # seconds a part may take


def run_part(cfg, name, args, env=None):
    """A subprocess part: its log in out_dir/NAME.log; (return code, seconds)."""
    t0 = time.time()
    with open(os.path.join(cfg.out_dir, f"{name}.log"), "w") as log:
        try:
            rc = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=cfg.part_timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        raise RuntimeError(f"{name} ended with {rc}; see {os.path.join(cfg.out_dir, name + '.log')}")
    return time.time() - t0


def random_shards(folder, vocab_size, n_tokens):
    """Token shards of random GPT-2 ids: throughput does not depend on what the tokens say."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", 200_000)):
        common.write_shard(os.path.join(folder, f"{split}_000000.bin"), rng.integers(0, vocab_size, n), vocab_size)
    common.atomic_write_json(os.path.join(folder, "meta.json"), {
        "source": "random", "tokenizer": {"kind": "gpt2", "extra_tokens": [], "mul_range": None},
        "vocab_size": vocab_size})
    return folder


def train_gpt_bench(cfg, data_dir, compile):
    out = os.path.join(cfg.out_dir, f"train_gpt_compile_{compile}")
    shape = (["model=tiny", "block_size=64", "micro_batch_size=4", "total_batch_size=512", "device=cpu",
              "bench_steps=2", "bench_warmup=1"] if cfg.smoke else
             ["model=gpt2", "block_size=1024", f"micro_batch_size={cfg.micro_batch_size}",
              "total_batch_size=524288", f"bench_steps={cfg.bench_steps}", "bench_warmup=5"])
    seconds = run_part(cfg, f"train_gpt_compile_{compile}", [sys.executable, "train_gpt.py", f"data_dir={data_dir}",
                                                             f"out_dir={out}", "bench=true", f"compile={compile}"]
                       + shape)
    r = json.load(open(os.path.join(out, "results.json")))
    return {"tokens_per_sec": r["tokens_per_sec"], "mfu": r["mfu"], "step_ms": r["step_ms"],
            "micro_batch_size": r["micro_batch_size"], "device": r["device"], "seconds": seconds}


def attention_bench(cfg):
    """flash-attn (when installed) vs SDPA, forward + backward of causal attention, ms per call."""
    import model as model_lib
    device = "cpu" if cfg.smoke else "cuda"
    B, T, H, D = (2, 64, 2, 16) if cfg.smoke else (16, 1024, 12, 64)
    dtype = torch.float32 if cfg.smoke else torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)

    def flash():
        return model_lib.flash_attn_func(q, k, v, causal=True)

    figures = {}
    for name, fn in (("sdpa", sdpa), ("flash_attn", flash if model_lib.flash_attn_func is not None else None)):
        if fn is None:
            figures[name] = "flash-attn is not installed"
            continue
        for _ in range(3):
            fn().sum().backward()
        common.synchronize(device)
        t0 = time.time()
        for _ in range(20):
            fn().sum().backward()
        common.synchronize(device)
        figures[name + "_ms"] = 1000 * (time.time() - t0) / 20
    return figures


def bd3lm_bench(cfg):
    args = ([sys.executable, "bench/bench_bd3lm.py", "model=tiny", "seq_len=64", "batch=2", "repeats=1", "steps=1",
             "warmup=1", "sample=false"] if cfg.smoke else
            [sys.executable, "bench/bench_bd3lm.py", "device=cuda", "model=gpt2", "seq_len=1024", "batch=16",
             "repeats=2", "steps=3"])
    seconds = run_part(cfg, "bd3lm", args)
    lines = open(os.path.join(cfg.out_dir, "bd3lm.log")).read().splitlines()
    return {"seconds": seconds, "report": [line for line in lines if "tokens/s" in line or "NFE" in line][-12:]}


def tiny_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(folder)
    common.hf_tokenizer(common.Tokenizer("byte"), 256).save_pretrained(folder)
    return folder


def sft_fsdp(cfg, work):
    import dataclasses
    import sft
    if "fsdp" not in {f.name for f in dataclasses.fields(sft.Config)}:
        return "sft.py has no fsdp setting yet"
    model = tiny_llama(os.path.join(work, "llama"))
    out = os.path.join(cfg.out_dir, "sft_fsdp")
    seconds = run_part(cfg, "sft_fsdp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                                         f"--master_port={29500 + os.getpid() % 1000}", "sft.py", f"model={model}",
                                         "datasets=[synthetic]", "dataset_options={max_steps: 1, max_value: 10}",
                                         "max_samples=200", "max_steps=5", "micro_batch_size=4", "max_length=128",
                                         "prompt_format=user_assistant", "gen_eval=false", "eval_interval=0",
                                         "tensorboard=false", "fsdp=true",
                                         f"out_dir={out}", f"device={'cpu' if cfg.smoke else 'cuda'}"])
    r = json.load(open(os.path.join(out, "results.json")))
    return {"seconds": seconds, "peak_mem_gb": r.get("peak_mem_gb"), "final_train_loss": r.get("final_train_loss")}


def vllm_bench(cfg, work):
    """Sampled completions per second through engine.VLLMEngine, a random GPT-2 124M (native checkpoint)."""
    import dataclasses
    import importlib.util
    if cfg.smoke or importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (or smoke run)"
    import engine as engine_lib
    import model as model_lib
    ranks = os.path.join(os.path.dirname(ROOT), "shared", "data", "tokenizers", "gpt2.tiktoken")
    tok = common.Tokenizer("gpt2", tokenizer_file=ranks if os.path.isfile(ranks) else None)
    shape = model_lib.model_config("gpt2", common.padded_vocab_size(tok.vocab_size), 1024)
    folder = os.path.join(work, "gpt2_random")
    common.save_checkpoint(os.path.join(folder, "ckpt_000000.pt"), {
        "kind": "gpt", "model": model_lib.GPT(shape).state_dict(), "model_config": dataclasses.asdict(shape),
        "tokenizer": tok.spec, "config": {}, "step": 0})
    lm = engine_lib.load_model(folder, tokenizer_file=ranks if os.path.isfile(ranks) else "", device="cuda")
    eng = engine_lib.VLLMEngine(lm, torch.bfloat16)
    prompts = [lm.tok.encode_prompt(f"Question: Tom has {i} apples and buys {i + 3} more. How many now?\nAnswer:")
               for i in range(256)]
    eng.generate(prompts[:8], max_new_tokens=16, temperature=1.0)  # warm-up (CUDA graphs)
    t0 = time.time()
    eng.generate(prompts, max_new_tokens=128, temperature=1.0, num_samples=4)
    return {"samples_per_sec": 4 * len(prompts) / (time.time() - t0), "prompts": len(prompts), "num_samples": 4,
            "max_new_tokens": 128}


def main(argv=None):
    cfg = common.load_config(Config, argv)
    if not cfg.smoke and not torch.cuda.is_available():
        raise common.ConfigError("gpu_check needs a CUDA GPU (smoke=true runs its steps tiny on CPU)")
    os.makedirs(cfg.out_dir, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "smoke": cfg.smoke}
    with tempfile.TemporaryDirectory() as work:
        data = random_shards(os.path.join(work, "shards"), 50257, 20_000 if cfg.smoke else 4_000_000)
        parts = [("train_gpt_124m_compile", lambda: train_gpt_bench(cfg, data, True)),
                 ("train_gpt_124m_eager", lambda: train_gpt_bench(cfg, data, False)),
                 ("attention", lambda: attention_bench(cfg)),
                 ("bd3lm", lambda: bd3lm_bench(cfg)),
                 ("sft_fsdp_1gpu", lambda: sft_fsdp(cfg, work)),
                 ("vllm_generation", lambda: vllm_bench(cfg, work))]
        for name, part in parts:
            t0 = time.time()
            try:
                report[name] = part()
            except Exception as e:  # one broken part must not hide the others' figures
                report[name] = {"error": " ".join(str(e).split())[:500]}
            print(f"{name} ({time.time() - t0:.0f} s): {json.dumps(report[name])[:300]}", flush=True)
            common.atomic_write_json(os.path.join(cfg.out_dir, "gpu_check.json"), report)
    print(f"wrote {os.path.join(cfg.out_dir, 'gpu_check.json')}")
    return report


if __name__ == "__main__":
    common.run_main(main)

"""
BD3-LM speed, measured in one process so every variant runs the same network on the same data (not run in CI: a
few minutes, and it measures the machine).

    python bench/bench_bd3lm.py                                   # CPU defaults: model=small, L=256, 8 rows
    python bench/bench_bd3lm.py device=cuda model=gpt2 seq_len=1024 batch=16 repeats=5

Training (forward, backward and an AdamW step; tokens = rows x L, the data tokens, for every variant):
  - AR: the same GPT with causal attention and the next-token cross-entropy, what train_gpt.py runs per step;
  - BD3-LM, one 2L pass: [x_t | x_0] under the block-diffusion mask (train_bd3lm.nelbo_terms), block sizes 4/8/16;
  - BD3-LM, two passes: the clean copy first (block-causal, keys/values kept), then x_t reading them
    (nelbo_terms(..., two_pass=True)), the form the vectorized pass replaces.
Each variant starts from the same weights, runs `warmup` untimed steps, then `steps` timed ones; a round runs
every variant once, in a rotated order, and there are `repeats` rounds. Reported: the median tokens/s over the
rounds with the lowest and highest, tokens per CPU-second (process CPU time, the figure that holds on a machine
busy with other work), and the median over rounds of the ratio to AR in the same round (slow drift cancels).

Sampling (engine.block_diffusion_generate, first-hitting and ancestral): the same samples with and without the KV cache of
clean blocks (same seed, same tokens: the script checks it), network calls (NFE) and generated tokens/s, medians
over `repeats`. A checkpoint= samples a trained model; by default a fresh one (NFE and speed do not need a
trained model, only the tokens do).
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import engine  # noqa: E402
import train_bd3lm as bd  # noqa: E402
from model import GPT, model_config  # noqa: E402


@dataclass
class Config:
    device: str = "cpu"
    model: str = "small"  # model.MODEL_SIZES
    seq_len: int = 256
    batch: int = 8
    block_sizes: List[int] = field(default_factory=lambda: [4, 8, 16])
    steps: int = 5
    warmup: int = 2
    repeats: int = 5
    threads: int = 0  # torch CPU threads (0: torch's default)
    # sampling
    sample: bool = True
    checkpoint: str = ""
    num_samples: int = 4
    sample_len: int = 256
    sample_block: int = 16
    sample_steps: int = 4  # ancestral T
    seed: int = 0


VOCAB = 257  # a byte-level vocabulary (256 bytes + end of text); [MASK] = 257


def training_variants(cfg):
    variants = [("AR (train_gpt.py's step)", None, False)]
    variants += [(f"BD3-LM block {b}, one 2L pass", b, False) for b in cfg.block_sizes]
    variants += [(f"BD3-LM block {b}, two passes", b, True) for b in cfg.block_sizes]
    return variants


def make_step(model, optimizer, x0, block_size, two_pass):
    """One training step of a variant, as a closure over its model, optimizer and data."""
    L = x0.size(1)
    if block_size is not None:
        block_ids = (torch.arange(L) // block_size).to(x0.device)
        mask = bd.block_diffusion_mask(block_ids)
    g = torch.Generator(device=x0.device).manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if block_size is None:  # AR: predict token i+1 from tokens <= i
            _, loss = model(x0[:, :-1], targets=x0[:, 1:])
        else:
            terms = bd.nelbo_terms(model, x0, block_ids, mask, VOCAB, VOCAB, 1e-3, 1.0, True, g, two_pass=two_pass)
            loss = terms.sum() / terms.numel()
        loss.backward()
        optimizer.step()
    return step


def bench_training(cfg, device):
    torch.manual_seed(cfg.seed)
    config = model_config(cfg.model, common.padded_vocab_size(VOCAB + 1), cfg.seq_len)
    config.tie_embeddings = False
    base = GPT(config).to(device)
    x0 = torch.randint(0, VOCAB, (cfg.batch, cfg.seq_len), device=device)
    variants = training_variants(cfg)
    steps = []
    for _, block_size, two_pass in variants:  # every variant from the same weights
        model = GPT(config).to(device)
        model.load_state_dict(base.state_dict())
        optimizer = model.configure_optimizer(0.0, 1e-4, (0.9, 0.999), device.type)
        steps.append(make_step(model, optimizer, x0, block_size, two_pass))
    wall = {name: [] for name, _, _ in variants}
    cpu = {name: [] for name, _, _ in variants}
    for r in range(cfg.repeats):
        order = list(range(len(variants)))
        order = order[r % len(order):] + order[:r % len(order)]  # rotate: no variant always runs first
        for i in order:
            for _ in range(cfg.warmup):
                steps[i]()
            common.synchronize(device.type)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(cfg.steps):
                steps[i]()
            common.synchronize(device.type)
            tokens = cfg.steps * cfg.batch * cfg.seq_len
            wall[variants[i][0]].append(tokens / (time.perf_counter() - t0))
            cpu[variants[i][0]].append(tokens / (time.process_time() - c0))
        print(f"round {r + 1}/{cfg.repeats} done", file=sys.stderr)
    ar = variants[0][0]
    rows = []
    for name, _, _ in variants:
        ratio = statistics.median(w / a for w, a in zip(wall[name], wall[ar]))
        rows.append((name, statistics.median(wall[name]), min(wall[name]), max(wall[name]),
                     statistics.median(cpu[name]), ratio))
    return rows


@torch.no_grad()
def bench_sampling(cfg, device):
    if cfg.checkpoint:
        model, ckpt = bd.load_for_eval(bd.Config(checkpoint=cfg.checkpoint), device)
        info = ckpt["bd3lm"]
        L, block, mask_id, n_vocab = info["seq_len"], info["block_size"], info["mask_id"], info["n_vocab"]
        eos = common.Tokenizer.from_spec(ckpt["tokenizer"]).eot_id
    else:
        torch.manual_seed(cfg.seed)
        config = model_config("tiny", common.padded_vocab_size(VOCAB + 1), cfg.sample_len)
        config.tie_embeddings = False
        model = GPT(config).to(device).eval()
        L, block, mask_id, n_vocab, eos = cfg.sample_len, cfg.sample_block, VOCAB, VOCAB, VOCAB - 1
    block_ids = torch.arange(L) // block
    x = torch.full((cfg.num_samples, L), mask_id, dtype=torch.long, device=device)
    fixed = torch.zeros_like(x, dtype=torch.bool)
    rows = []
    for sampler in ("first_hitting", "ancestral"):
        scfg = bd.Config(sampler=sampler, sample_steps=cfg.sample_steps, top_p=0.9)
        results = {}
        for use_cache in (True, False):
            speeds = []
            for r in range(cfg.repeats):
                g = torch.Generator(device=device).manual_seed(cfg.seed)
                common.synchronize(device.type)
                t0 = time.perf_counter()
                out, nfe = engine.block_diffusion_generate(model, x.clone(), fixed.clone(), block_ids, [L], mask_id,
                                                           n_vocab, eos, scfg, g, use_cache)
                common.synchronize(device.type)
                speeds.append(int((~fixed).sum()) / (time.perf_counter() - t0))
            results[use_cache] = (out, nfe, speeds)
        if not torch.equal(results[True][0], results[False][0]):
            raise RuntimeError(f"{sampler}: cached and uncached sampling gave different tokens")
        label = "first-hitting" if sampler == "first_hitting" else f"ancestral T={cfg.sample_steps}"
        for use_cache in (True, False):
            _, nfe, speeds = results[use_cache]
            rows.append((f"{label}, {'KV cache' if use_cache else 'no cache'}", nfe, statistics.median(speeds),
                         min(speeds), max(speeds)))
    return rows, L, block


def main(argv=None):
    cfg = common.load_config(Config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = bench_training(cfg, device)
    print(f"\ntraining, model {cfg.model}, L = {cfg.seq_len}, {cfg.batch} rows; median of {cfg.repeats} rounds "
          f"x {cfg.steps} steps (after {cfg.warmup} warm-up steps)")
    print("| variant | tokens/s (median) | lowest - highest | tokens per CPU-second | vs AR (median ratio) |")
    print("|---|---|---|---|---|")
    for name, med, lo, hi, cpu, ratio in rows:
        print(f"| {name} | {med:,.0f} | {lo:,.0f} - {hi:,.0f} | {cpu:,.0f} | {ratio:.2f}x |")
    by_name = {r[0]: r for r in rows}
    for b in cfg.block_sizes:
        one, two = by_name[f"BD3-LM block {b}, one 2L pass"], by_name[f"BD3-LM block {b}, two passes"]
        print(f"block {b}: one 2L pass / two passes = {one[1] / two[1]:.2f}x (median tokens/s), "
              f"{one[4] / two[4]:.2f}x (per CPU-second)")
    if cfg.sample:
        srows, L, block = bench_sampling(cfg, device)
        print(f"\nsampling, {cfg.num_samples} samples x {L} tokens, blocks of {block}, "
              f"{'checkpoint ' + cfg.checkpoint if cfg.checkpoint else 'fresh tiny model'}; median of {cfg.repeats}")
        print("| sampler | NFE | generated tokens/s (median) | lowest - highest |")
        print("|---|---|---|---|")
        for name, nfe, med, lo, hi in srows:
            print(f"| {name} | {nfe} | {med:,.0f} | {lo:,.0f} - {hi:,.0f} |")
    return rows


if __name__ == "__main__":
    common.run_main(main)

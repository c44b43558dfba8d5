"""
Block diffusion language models (BD3-LM; Arriola et al., "Block Diffusion", ICLR 2025) in one file.

    python train_bd3lm.py configs/bd3lm_demo.yaml                              # tiny, CPU, synthetic plans
    python train_bd3lm.py configs/gsm8k_bd3lm.yaml block_size=4                # GSM8K, flat
    torchrun --nproc_per_node=4 train_bd3lm.py configs/gsm8k_hierarchical.yaml # [question | plan | execution]
    python train_bd3lm.py configs/gsm8k_bd3lm.yaml mode=ppl_eval checkpoint=out/gsm8k_bd3lm/latest
    python train_bd3lm.py configs/gsm8k_bd3lm.yaml mode=sample checkpoint=out/gsm8k_bd3lm/latest num_samples=8
    python eval_gsm8k.py model=out/gsm8k_bd3lm/latest task=gsm8k out_dir=out/gsm8k_bd3lm/gsm8k limit=200   # accuracy

The idea. A sequence of L tokens is cut into blocks. Across blocks the model is autoregressive; inside a
block it is a masked diffusion model: each token of a block is replaced by [MASK] with probability t (one t
per block), and the network, which sees the clean copy of all earlier blocks, predicts the masked tokens.
The training loss is the negative ELBO: for the log-linear schedule (alpha_t = 1 - t) each masked token
costs (1/t) x its cross-entropy, unmasked tokens cost nothing (SUBS: they are carried over, and [MASK] is
never predicted). Block size 1 with t = 1 is exactly autoregression; block size L is a plain masked
diffusion model. A clipped schedule draws t in [beta, omega] and, as the reference, redraws a block whose masked
share falls outside the range (resample); docs/bd3lm.md lists where this file differs from kuleshov-group/bd3lms,
and every run's results.json carries the differences that apply to it (reference_differences).

Vectorized training: the network reads [x_t | x_0] (2L tokens, positions 0..L-1 twice) in one pass under
model.block_diffusion_mask: noisy tokens see their own noisy block and the clean copy of earlier blocks,
clean tokens see clean tokens of their own and earlier blocks. Only the noisy half goes through the head.

Sampling (engine.block_diffusion_generate) generates block by block: a block starts all [MASK] and is denoised
(first-hitting: one token per network call; or T ancestral steps), then its clean tokens are pushed once through
the network into a KV cache that every later block reads. mode=sample and eval_gsm8k.py both sample through
engine.BlockDiffusionEngine; eval_gsm8k.py scores these models with the prompts, scoring, results.json and compare
of every other model.

Hierarchical data (data=hierarchical) lays a problem out as [question | plan | execution] segments of fixed
lengths; blocks restart at every segment boundary, so the segments are causal by segment with block
diffusion inside, and the loss of each segment is logged apart.
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tasks import gsm8k as gsm8k_task, synthetic
from engine import BlockDiffusionEngine, BlockKVCache, BlockSampling, load_block_diffusion_model
from model import (GPT, GPTConfig, MODEL_SIZES, block_diffusion_mask, exec_positions_of, flex_block_diffusion_mask,
                   is_published_bd3lm, make_block_ids, model_config, published_bd3lm)

KIND = "bd3lm"
SEGMENTS = ("question", "plan", "execution")
PLAN_FIELDS = ("question", "plan", "execution")


@dataclass
class Config:
    mode: str = "train"  # train | ppl_eval | sample (GSM8K accuracy and comparisons: eval_gsm8k.py)
    # data: gsm8k (flat Question/Answer rows) | hierarchical (plans JSON) | shards (prepare_data.py)
    data: str = "gsm8k"  # gsm8k | hierarchical | shards
    data_path: str = ""  # GSM8K train jsonl (empty: the HF hub)
    val_data_path: str = ""  # GSM8K test jsonl, for validation and ppl_eval
    plans_path: str = ""  # hierarchical: gen_plans.py JSON (train)
    val_plans_path: str = ""  # hierarchical: JSON for validation / evaluation
    data_dir: str = ""  # shards: prepare_data.py output folder
    wrap: bool = False  # gsm8k: wrap the Q/A text into seq_len rows instead of one padded problem per row
    tokenizer: str = "gpt2"  # gpt2 | byte (shards: taken from meta.json)
    tokenizer_file: Optional[str] = None  # GPT-2 ranks for offline use
    seq_len: int = 512  # L, tokens per row
    block_size: int = 16  # diffusion block size; 1 = autoregressive, seq_len = one diffusion block
    question_len: int = 128  # hierarchical segment lengths; they must sum to seq_len
    plan_len: int = 128  # hierarchical: tokens of the plan segment
    exec_len: int = 256  # hierarchical: tokens of the execution segment
    flat_plans: bool = False  # hierarchical JSON laid out flat as [question | execution] (the flat baseline)
    synthetic_plans: int = 0  # hierarchical offline: N synthetic problems with abstract plans (tasks/synthetic.py)
    synthetic_max_steps: int = 4  # their most solution steps (1..synthetic_max_steps)
    # (names in tasks/synthetic.py TEMPLATES): the transfer demo trains on some families, fine-tunes on held-out ones
    synthetic_templates: List[str] = field(default_factory=list)  # their word-problem families (empty = all)
    # model
    model: str = "gpt2"  # a size from model.MODEL_SIZES
    n_layer: int = 0  # 0 = the size's default
    n_head: int = 0  # 0 = the size's default
    n_embd: int = 0  # 0 = the size's default
    dropout: Optional[float] = None  # dropout probability (None: 0 from scratch, else the init_from checkpoint's)
    tie_embeddings: bool = False  # share the input embedding and the output head
    init_from: str = "scratch"  # scratch | a train_gpt.py or train_bd3lm.py checkpoint (file, run folder, RUN/latest)
    # transfer (hierarchical): the top exec_layers get a second copy, the execution module, which computes the
    # execution positions; the shared lower layers and the first copy are the plan module (question and plan)
    exec_layers: int = 0  # top layers with a second copy for the execution positions (0 = none)
    freeze: str = "none"  # none | plan: train only the execution module (fine-tuning on a new task)
    # noise schedule: log-linear; a mask rate per block, stratified over batch x blocks, clipped to [beta, omega]
    noise_beta: float = 1e-3  # lowest mask rate
    noise_omega: float = 1.0  # highest mask rate
    antithetic: bool = True  # stratified mask rates over batch x blocks (lower loss variance)
    # under a clipped range, redraw a block's mask while its masked share falls outside [beta, omega] (the
    # reference's training.resample); a bound at its unclipped value (beta <= 1e-3, omega = 1) is not enforced
    resample: bool = True  # resample out-of-range blocks when the range is clipped (false: only t is clipped)
    # clipped-schedule search: every clip_search_interval steps, the [beta, omega] of lowest NELBO variance on
    # validation batches among ranges of these widths (the paper's data-driven schedule); 0 = fixed by config
    clip_search_interval: int = 0  # steps between clip-range searches (0 = the configured range throughout)
    clip_search_widths: List[float] = field(default_factory=lambda: [0.5, 0.7, 1.0])  # widths of the searched ranges
    clip_search_batches: int = 4  # validation batches per search
    # sequence: variance of the per-sequence NELBO | block: the reference's, the variance of the per-block mean
    # losses of each validation batch, summed over the batches
    clip_search_statistic: str = "sequence"  # what the search minimises: sequence | block (the reference's)
    clip_search_delta: float = 0.1  # grid step of the searched betas (the reference's: 0.05); beta >= 1e-3
    # optimisation
    batch_size: int = 128  # sequences per optimizer step over all ranks
    micro_batch_size: int = 32  # sequences per forward pass per rank
    max_steps: int = 50000  # optimizer steps of the run (a larger value continues a finished run)
    warmup_steps: int = 2500  # linear lr warmup
    max_lr: float = 3e-4  # peak learning rate
    lr_schedule: str = "constant"  # constant | cosine (to max_lr * min_lr_ratio)
    min_lr_ratio: float = 0.1  # cosine: the final lr as a fraction of max_lr
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip
    ema: float = 0.9999  # EMA decay of the weights used for evaluation and sampling (0 = off)
    seed: int = 1337  # weights, data order and noise (and the synthetic problems, unless data_seed)
    data_seed: Optional[int] = None  # synthetic_plans: the problems' seed (None: seed; eval modes: the trained run's)
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on cuda, else fp32) | float32 | bfloat16 | float16 (or fp32 | bf16 | fp16)
    compile: bool = True  # torch.compile on cuda
    flex_attention: bool = True  # FlexAttention block mask on cuda; the dense SDPA mask elsewhere
    # output
    out_dir: str = "out/bd3lm"  # the run folder (checkpoints, log.jsonl, results.json)
    log_interval: int = 10  # steps between train-loss records (the only per-step host syncs)
    val_interval: int = 500  # steps between validation NELBOs (0 = only at the end)
    val_batches: int = 8  # micro batches per validation
    ckpt_interval: int = 2000  # steps between checkpoints (0 = only at the end)
    keep_last_k: int = 0  # keep only the newest k checkpoints (0 = keep all)
    resume: Optional[str] = None  # latest (newest in out_dir, or a fresh start if none) | a checkpoint path
    stop_after_step: int = -1  # end this invocation after this step with a checkpoint, as if preempted
    tensorboard: bool = False  # also log to out_dir/tensorboard (tags <record type>/<key>)
    wandb_project: Optional[str] = None  # also log to this W&B project (wandb imported only when set)
    # evaluation and sampling (modes ppl_eval, sample)
    checkpoint: str = ""  # ppl_eval / sample: a checkpoint file, run folder or RUN/latest
    use_ema: bool = True  # evaluate the EMA weights
    eval_batch_size: int = 16  # rows per evaluation / generation batch
    eval_batches: int = 0  # ppl_eval: 0 = the whole evaluation set
    eval_noise_beta: float = 1e-3  # ppl_eval draws t ~ U[eval_noise_beta, 1]
    sampler: str = "first_hitting"  # first_hitting | ancestral
    sample_steps: int = 16  # ancestral: T steps per block
    top_p: float = 0.9  # nucleus sampling
    top_p_rule: str = "hf"  # hf: keep the token whose probability crosses top_p | reference: drop it (bd3lms)
    kv_cache: bool = True  # cache the clean blocks while sampling
    num_samples: int = 4  # sample: how many
    # benchmark: time bench_steps steps, write results.json, exit
    bench: bool = False  # time bench_steps training steps, write results.json, exit (no checkpoints)
    bench_steps: int = 10  # timed steps
    bench_warmup: int = 3  # untimed steps first
    two_pass: bool = False  # noisy and clean halves in two passes (what the vectorized pass replaces; same loss)


MODES = ("train", "ppl_eval", "sample")
# the modes eval_gsm8k.py took over, and the command that replaces each
RETIRED_MODES = {
    "gsm8k_eval": "python eval_gsm8k.py model=RUN/latest task=gsm8k out_dir=RUN/gsm8k (task=synthetic "
                  "synthetic_options={max_steps: N, templates: [...]} for a synthetic_plans run)",
    "compare": "python eval_gsm8k.py task=compare runs=[RUN_A,RUN_B,...] labels=[...] (each run folder with its "
               "ppl/ and gsm8k/ results)"}
TOP_P_RULES = ("hf", "reference")
NOISE_FLOOR = 1e-3  # the reference's sampling_eps: the lowest mask rate a searched range starts at


def refuse_retired_mode(mode):
    if mode in RETIRED_MODES:
        raise common.ConfigError(f"mode={mode} moved to eval_gsm8k.py: {RETIRED_MODES[mode]}")


def check_config(cfg):
    """Mistakes that need no data or devices: refuse them before anything starts."""
    refuse_retired_mode(cfg.mode)
    choices = {"mode": MODES, "data": ("gsm8k", "hierarchical", "shards"), "tokenizer": ("gpt2", "byte"),
               "model": tuple(MODEL_SIZES),
               "lr_schedule": ("constant", "cosine"), "sampler": ("first_hitting", "ancestral"),
               "top_p_rule": TOP_P_RULES, "clip_search_statistic": ("sequence", "block")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise common.ConfigError(f"{key} '{getattr(cfg, key)}' is not one of {', '.join(allowed)}")
    common.resolve_dtype(cfg.dtype, "cpu")  # an unknown dtype name stops here
    positive = ("seq_len", "block_size", "batch_size", "micro_batch_size", "max_steps", "log_interval",
                "eval_batch_size") + (("num_samples",) if cfg.mode == "sample" else ())
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise common.ConfigError(f"config key '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.data == "hierarchical":
        lens = segment_lengths(cfg)
        if sum(lens) != cfg.seq_len:
            names = "exec_len" if cfg.flat_plans else "plan_len + exec_len"
            raise common.ConfigError(f"segment lengths question_len + {names} = {' + '.join(map(str, lens))} = "
                                     f"{sum(lens)} do not sum to seq_len {cfg.seq_len}")
    elif cfg.seq_len % cfg.block_size:
        raise common.ConfigError(f"seq_len {cfg.seq_len} is not divisible by block_size {cfg.block_size}")
    if not 0.0 < cfg.noise_beta <= cfg.noise_omega <= 1.0:
        raise common.ConfigError(f"noise clip range [{cfg.noise_beta}, {cfg.noise_omega}] must satisfy "
                                 "0 < beta <= omega <= 1 (t = 0 masks nothing and its 1/t weight divides by zero; "
                                 "the reference's floor is 1e-3)")
    if not 0.0 < cfg.eval_noise_beta <= 1.0:
        raise common.ConfigError(f"eval_noise_beta must be in (0, 1], got {cfg.eval_noise_beta}")
    if not 0.0 < cfg.clip_search_delta <= 1.0:
        raise common.ConfigError(f"clip_search_delta must be in (0, 1], got {cfg.clip_search_delta}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise common.ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise common.ConfigError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.freeze not in ("none", "plan"):
        raise common.ConfigError(f"freeze '{cfg.freeze}' is not one of none, plan")
    if (cfg.exec_layers or cfg.freeze == "plan") and (cfg.data != "hierarchical" or cfg.flat_plans):
        raise common.ConfigError("exec_layers and freeze=plan need data=hierarchical with a plan segment")
    if cfg.freeze == "plan" and not cfg.exec_layers:
        raise common.ConfigError("freeze=plan needs exec_layers > 0 (the execution module that stays trainable)")
    unknown = [t for t in cfg.synthetic_templates if t not in synthetic.TEMPLATES]
    if unknown:
        raise common.ConfigError(f"synthetic_templates {unknown} are not among {', '.join(synthetic.TEMPLATES)}")
    if cfg.mode != "train" and not cfg.checkpoint:
        raise common.ConfigError(f"mode={cfg.mode} needs checkpoint=PATH (a file, run folder or RUN/latest)")


# what defines a run: a resumed run cannot change these (max_steps, the lr, the intervals it may). The weights and
# what of them trains; the loss, by its configured clip range (a clip search moves the range during the run, and
# the checkpoint carries the moved one); the data by its layout and the files' contents, not their paths' spelling
MODEL_KEYS = ("model", "n_layer", "n_head", "n_embd", "tie_embeddings", "exec_layers", "init_from", "freeze")
LOSS_KEYS = ("noise_beta", "noise_omega", "antithetic", "resample", "two_pass", "clip_search_interval")
CLIP_SEARCH_KEYS = ("clip_search_widths", "clip_search_batches", "clip_search_statistic",
                    "clip_search_delta")  # only while a search runs


def identity(cfg):
    keys = list(MODEL_KEYS + LOSS_KEYS) + (list(CLIP_SEARCH_KEYS) if cfg.clip_search_interval > 0 else [])
    keys += ["data", "seq_len", "block_size"]
    files = {}
    if cfg.data == "gsm8k":
        keys += ["tokenizer", "wrap"]
        files = {"train_data": cfg.data_path, "val_data": cfg.val_data_path}
    elif cfg.data == "hierarchical":
        keys += ["tokenizer", "flat_plans", "question_len", "exec_len"] + ([] if cfg.flat_plans else ["plan_len"])
        if cfg.synthetic_plans:  # the problems are drawn from the seed
            keys += ["synthetic_plans", "synthetic_max_steps", "synthetic_templates", "seed", "data_seed"]
        else:
            files = {"train_data": cfg.plans_path, "val_data": cfg.val_plans_path or cfg.plans_path}
    else:  # shards: meta.json (the tokenizer) and the shards
        files = {"train_data": cfg.data_dir}
    return common.run_identity(cfg, keys, **{k: common.fingerprint(p) for k, p in files.items()})


REFERENCE_WIDTHS = [0.5, 0.6, 0.7, 0.8, 0.9]  # bd3lms' clip_search_widths (with (1e-3, 1) always a candidate)


def reference_differences(cfg, mode, noise=None):
    """{name: what differs} between this run, as configured, and kuleshov-group/bd3lms: written into the run's
    results.json (docs/bd3lm.md lists them all). Only the differences that apply to these settings."""
    out = {"backbone": "our GPT (learned positions, LayerNorm, GELU) unless init_from a published BD3-LM, whose "
                       "DiT folds into it exactly; no time conditioning, as the reference's BD3-LM",
           "first_token": "no BOS: position 0 is masked and scored like any other (the reference's ignore_bos keeps "
                          "x_0[0] and does not score it)"}
    if cfg.antithetic and mode in ("train", "ppl_eval"):
        out["strata_order"] = ("the batch x blocks strata go to (row, block) in random order; the reference gives "
                               "stratum i to the i-th (row, block), which ties a block's rate to its place")
    if cfg.data == "hierarchical" or (cfg.data == "gsm8k" and not cfg.wrap):
        out["padding"] = "padding is not scored (the loss is per real token); the reference scores every position"
    if cfg.data == "hierarchical":
        out["segments"] = "blocks restart at every segment boundary (a segment may end with a shorter block)"
    if mode == "train":
        beta, omega = noise or (cfg.noise_beta, cfg.noise_omega)
        if not cfg.resample and any(clipped_bounds(beta, omega)):
            out["resample"] = ("resample=false: blocks whose masked share falls outside [beta, omega] are kept "
                               "(the reference resamples them)")
        if max(beta, cfg.noise_beta) > 0.5:
            out["loss_weight"] = "the loss keeps its 1/t weight for beta > 0.5 (the reference weighs it by 1 there)"
        if cfg.clip_search_interval > 0:
            grid = [] if cfg.clip_search_statistic == "block" else [
                "the variance of the per-sequence NELBO (the reference's: of the per-block mean losses)"]
            if cfg.clip_search_delta != 0.05 or sorted(set(cfg.clip_search_widths) - {1.0}) != REFERENCE_WIDTHS:
                grid.append(f"{len(clip_candidates(cfg.clip_search_widths, cfg.clip_search_delta, NOISE_FLOOR))} "
                            f"ranges at {cfg.clip_search_delta} (the reference's: 36 at 0.05)")
            grid.append(f"every {cfg.clip_search_interval} steps on {cfg.clip_search_batches} validation batches with "
                        "the same noise for every candidate (the reference: at each validation, up to 100 batches, "
                        "new noise per candidate)")
            if cfg.clip_search_statistic == "block" and "padding" in out:
                grid.append("a block's mean is over its scored tokens, blocks of padding only left out")
            out["clip_search"] = "; ".join(grid)
    if mode == "sample":
        if cfg.top_p < 1.0 and cfg.top_p_rule == "hf":
            out["top_p_rule"] = ("nucleus keeps the token that crosses top_p (transformers' rule); the reference "
                                 "drops it: top_p_rule=reference")
        out["rejection"] = ("no sample is rejected and redrawn (the reference redraws a sample whose last 256 "
                            "tokens have entropy < 4)")
    return out


def segment_lengths(cfg):
    if cfg.data != "hierarchical":
        return [cfg.seq_len]
    if cfg.flat_plans:
        return [cfg.question_len, cfg.exec_len]
    return [cfg.question_len, cfg.plan_len, cfg.exec_len]


def segment_names(cfg):
    return ["question", "execution"] if cfg.flat_plans else list(SEGMENTS)


# -----------------------------------------------------------------------------
# data: every source becomes rows of L token ids, a `valid` mask (tokens that count in the loss) and a
# segment id per position; the rows are shuffled per epoch with a seeded RNG, so the position is a checkpoint


def load_tokenizer(cfg, spec=None):
    if spec is not None:
        return common.Tokenizer.from_spec(spec, cfg.tokenizer_file)
    return common.Tokenizer(cfg.tokenizer, tokenizer_file=cfg.tokenizer_file)


def pad_to(ids, n, pad_id):
    """ids cut or padded to n tokens; returns (row, number of real tokens, truncated?)."""
    kept = ids[:n]
    return kept + [pad_id] * (n - len(kept)), len(kept), len(ids) > n


def gsm8k_rows(rows, tok, L, wrap):
    """Flat GSM8K: `Question: ...\\nAnswer: ...` + end of text, one padded problem per row, or wrapped."""
    docs = [tok.encode(gsm8k_task.format_qa(r["question"], r["answer"])) + [tok.eot_id] for r in rows]
    if wrap:
        stream = [t for d in docs for t in d]
        n = len(stream) // L
        if n == 0:
            raise common.ConfigError(f"the GSM8K text holds {len(stream)} tokens, less than one row of {L}")
        x = torch.from_numpy(np.array(stream[:n * L], dtype=np.int64)).view(n, L)
        return x, torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x), 0
    x, valid, truncated = [], [], 0
    for d in docs:
        row, n_real, cut = pad_to(d, L, tok.eot_id)
        x.append(row)
        valid.append([i < n_real for i in range(L)])
        truncated += cut
    x = torch.tensor(x)
    return x, torch.tensor(valid), torch.zeros_like(x), truncated


def load_plans(path):
    """gen_plans.py's JSON: a list of {id, question, plan, execution, answer_numerical}; fields checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plans file not found: {path}")
    with open(path) as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise common.ConfigError(f"{path} is not valid JSON: {e}") from e
    if isinstance(items, dict):  # {"examples": [...]} as well as a bare list
        items = items.get("examples", items.get("data", []))
    if not isinstance(items, list) or not items:
        raise common.ConfigError(f"{path} holds no list of plan records")
    for i, item in enumerate(items):
        missing = [k for k in PLAN_FIELDS if not isinstance(item, dict) or not isinstance(item.get(k), str)]
        if missing:
            raise common.ConfigError(f"{path}: record {i} lacks the field(s) {', '.join(missing)}")
    return [it for it in items if it.get("valid", True)]


def segment_texts(item, flat):
    """The text of each segment; every segment ends with end-of-text, which is also its padding."""
    question = f"Question: {item['question']}\n"
    if flat:
        return [question, f"Answer: {item['execution']}"]
    return [question, f"Plan: {item['plan']}\n", f"Answer: {item['execution']}"]


def hierarchical_rows(items, tok, lens, flat):
    x, valid, seg, truncated = [], [], [], {name: 0 for name in range(len(lens))}
    for item in items:
        row, ok, sid = [], [], []
        for s, (text, n) in enumerate(zip(segment_texts(item, flat), lens)):
            ids, n_real, cut = pad_to(tok.encode(text) + [tok.eot_id], n, tok.eot_id)
            row += ids
            ok += [i < n_real for i in range(n)]
            sid += [s] * n
            truncated[s] += cut
        x.append(row)
        valid.append(ok)
        seg.append(sid)
    return torch.tensor(x), torch.tensor(valid), torch.tensor(seg), truncated


class RowLoader:
    """Batches of rows, reshuffled every epoch with a seeded generator; rank r takes the r-th slice of
    each global batch. state() / set_state() make the position part of a checkpoint."""

    def __init__(self, x, valid, seg, batch, rank=0, world_size=1, seed=0, shuffle=True):
        self.x, self.valid, self.seg = x, valid, seg
        self.batch, self.rank, self.world_size, self.seed, self.shuffle = batch, rank, world_size, seed, shuffle
        if len(x) < batch * world_size:
            raise common.ConfigError(f"{len(x)} rows are fewer than one global batch of {batch * world_size}")
        self.reset()

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def reset(self):
        self.set_state({"epoch": 0, "pos": 0})

    def set_state(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.order = torch.randperm(len(self.x), generator=g) if self.shuffle else torch.arange(len(self.x))

    def next_batch(self):
        start = self.pos + self.rank * self.batch
        idx = self.order[start:start + self.batch]
        self.pos += self.batch * self.world_size
        if self.pos + self.batch * self.world_size > len(self.x):
            self.set_state({"epoch": self.epoch + 1, "pos": 0})
        return self.x[idx], self.valid[idx], self.seg[idx]


class ShardRows:
    """prepare_data.py shards as rows of L tokens (every token counts)."""

    def __init__(self, data_dir, split, batch, L, rank, world_size):
        self.loader = common.ShardLoader(data_dir, split, batch, L, rank, world_size)

    def state(self):
        return self.loader.state()

    def reset(self):
        self.loader.reset()

    def set_state(self, state):
        self.loader.set_state(state)

    def next_batch(self):
        x, _ = self.loader.next_batch()
        return x, torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x)


def build_rows(cfg, tok, split):
    """(x, valid, seg, truncated) for gsm8k / hierarchical data of a split ('train' or 'val')."""
    if cfg.data == "gsm8k":
        path = cfg.data_path if split == "train" else cfg.val_data_path
        rows = gsm8k_task.read_gsm8k("train" if split == "train" else "test", path)
        return gsm8k_rows(rows, tok, cfg.seq_len, cfg.wrap and split == "train")
    return hierarchical_rows(plan_items(cfg, split), tok, segment_lengths(cfg), cfg.flat_plans)


def plan_items(cfg, split):
    """Plan records of a split: gen_plans.py's JSON, or the synthetic stand-in (synthetic_plans=N, offline)."""
    if cfg.synthetic_plans:
        n = cfg.synthetic_plans if split == "train" else max(cfg.synthetic_plans // 10, 1)
        return synthetic.synthetic_plans(n, seed=f"{split}:{data_seed(cfg)}", max_steps=cfg.synthetic_max_steps,
                                         templates=cfg.synthetic_templates or None)
    path = cfg.plans_path if split == "train" else (cfg.val_plans_path or cfg.plans_path)
    if not path:
        raise common.ConfigError("data=hierarchical needs plans_path=FILE.json (gen_plans.py output) or "
                                 "synthetic_plans=N")
    return load_plans(path)


def data_seed(cfg):
    """The seed of the synthetic problems: data_seed, else seed (eval modes set data_seed to the trained run's, so
    the evaluated problems do not depend on the evaluation's seed)."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def make_loader(cfg, tok, split, batch, d, shuffle=True):
    if cfg.data == "shards":
        return ShardRows(cfg.data_dir, split, batch, cfg.seq_len, d.rank, d.world_size), None
    x, valid, seg, truncated = build_rows(cfg, tok, split)
    return RowLoader(x, valid, seg, batch, d.rank, d.world_size, cfg.seed, shuffle), truncated


# -----------------------------------------------------------------------------
# the objective


def sample_mask_rates(batch, n_blocks, beta, omega, antithetic, device, generator=None):
    """One mask rate per (row, block). Antithetic: the batch x blocks draws are stratified, one in each of
    batch*n_blocks equal slices of [0, 1] (in random order), which lowers the loss variance; then the rates
    are mapped linearly into the clip range [beta, omega]."""
    if beta <= 0:  # t = 0 masks nothing and weighs it by 1/0 (a NaN gradient through torch.where)
        raise ValueError(f"the lowest mask rate must be > 0, got beta = {beta}")
    n = batch * n_blocks
    u = torch.rand(n, device=device, generator=generator)
    if antithetic:
        slices = torch.randperm(n, device=device, generator=generator)
        u = (slices + u) / n
    return (beta + (omega - beta) * u).view(batch, n_blocks)


def clipped_bounds(beta, omega):
    """Which bounds of the range resampling enforces: a bound at its unclipped value (beta at or below the
    reference's 1e-3 floor, omega = 1) is not enforced, as in the reference."""
    return beta > NOISE_FLOOR + 1e-9, omega < 1.0 - 1e-9


def draw_masks(t, block_ids, beta, omega, resample, generator=None, max_rounds=1000):
    """Which tokens are masked (B, L): each with probability t (its block's rate). With resample and a clipped
    range, the mask of a block whose masked share falls outside [beta, omega] is drawn again (the whole block,
    at the same t) until it falls inside: the reference's training.resample. A block too short for any share in
    the range (e.g. one token against [0.45, 0.95]) is kept as drawn. One host sync per round."""
    B, L = t.shape
    masked = torch.rand(B, L, device=t.device, generator=generator) < t
    lower, upper = clipped_bounds(beta, omega)
    if not resample or not (lower or upper):
        return masked
    n_blocks = int(block_ids[-1]) + 1
    sizes = torch.bincount(block_ids, minlength=n_blocks).to(t.device)  # blocks may be shorter at segment ends
    lo = torch.ceil(beta * sizes - 1e-6).long() if lower else torch.zeros_like(sizes)
    hi = torch.floor(omega * sizes + 1e-6).long() if upper else sizes
    reachable = lo <= hi
    for _ in range(max_rounds):
        counts = torch.zeros(B, n_blocks, dtype=torch.long, device=t.device).index_add_(1, block_ids, masked.long())
        bad = ((counts < lo) | (counts > hi)) & reachable
        if not bad.any():
            break
        fresh = torch.rand(B, L, device=t.device, generator=generator) < t
        masked = torch.where(bad[:, block_ids], fresh, masked)
    return masked


def nelbo_terms(model, x0, block_ids, attn_mask, mask_id, n_vocab, beta, omega, antithetic, generator=None,
                two_pass=False, exec_positions=None, resample=False):
    """Per-token NELBO terms (B, L): (1/t) x cross-entropy at masked tokens, 0 elsewhere (SUBS)."""
    B, L = x0.shape
    rates = sample_mask_rates(B, int(block_ids[-1]) + 1, beta, omega, antithetic, x0.device, generator)
    t = rates[:, block_ids]  # (B, L): every token carries its block's rate
    masked = draw_masks(t, block_ids, beta, omega, resample, generator)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    positions = torch.arange(L, device=x0.device)
    if two_pass:  # what the vectorized pass replaces: clean keys/values first, then the noisy half reads them
        logits = two_pass_logits(model, xt, x0, positions, block_ids)
    else:
        both = None if exec_positions is None else torch.cat([exec_positions, exec_positions])[None]
        logits, _ = model(torch.cat([xt, x0], dim=1), position_ids=torch.cat([positions, positions]),
                          attn_mask=attn_mask, logits_len=L, exec_positions=both)
    # SUBS: only real tokens can be predicted ([MASK] and the vocabulary padding are cut from the softmax)
    ce = F.cross_entropy(logits[..., :n_vocab].float().transpose(1, 2), x0, reduction="none")
    return torch.where(masked, ce / t, torch.zeros_like(ce))


def two_pass_logits(model, xt, x0, positions, block_ids):
    """The two-pass reference: a block-causal pass caches the clean keys/values, then the noisy tokens
    attend to them. Used for the benchmark, which shows what the one 2L pass saves."""
    L = x0.size(1)
    cache = BlockKVCache(store=True)
    cache.mask = block_ids[None, :] <= block_ids[:, None]  # block-causal over the clean copy
    model(x0, position_ids=positions, kv_cache=cache, logits_len=0)
    cache.store = False
    full = block_diffusion_mask(block_ids)[:L]  # the noisy rows: [x_t keys | x_0 keys]
    cache.mask = torch.cat([full[:, L:], full[:, :L]], dim=1)  # the cache puts the x_0 keys first
    logits, _ = model(xt, position_ids=positions, kv_cache=cache)
    return logits


def clip_candidates(widths, grid=0.1, floor=0.0):
    """Ranges [beta, beta + w] for each width, beta on a grid from 0 to 1 - w, raised to `floor` (the search
    uses the reference's 1e-3: a range never draws t = 0). With grid 0.05, widths 0.5 ... 0.9 and 1.0 these are
    the reference's 36 ranges, (1e-3, 1) among them."""
    ranges = set()
    for w in widths:
        for i in range(int(round((1.0 - w) / grid)) + 1):
            ranges.add((round(max(i * grid, floor), 4), round(min(i * grid + w, 1.0), 4)))
    return sorted(ranges)


def block_means(terms, valid, block_ids):
    """(B, n_blocks) mean loss over each block's scored tokens, and which blocks hold any."""
    n_blocks = int(block_ids[-1]) + 1
    sums = torch.zeros(terms.size(0), n_blocks, dtype=torch.float64, device=terms.device)
    sums.index_add_(1, block_ids, (terms * valid).double())
    counts = torch.zeros_like(sums).index_add_(1, block_ids, valid.double())
    return sums / counts.clamp(min=1), counts > 0


@torch.no_grad()
def search_noise_range(net, batches, block_ids, attn_mask, mask_id, n_vocab, widths, seed, autocast, d,
                       exec_positions=None, statistic="sequence", grid=0.1, resample=False):
    """The clip range of lowest loss variance on these batches (the same noise for every candidate), among
    clip_candidates(widths, grid, 1e-3). statistic=sequence: the variance of the per-sequence NELBO over all
    batches; block (the reference's): per batch the (unbiased) variance of the per-block mean losses over all
    ranks, summed over the batches. Returns (beta, omega, {range: statistic})."""
    scores = {}
    for beta, omega in clip_candidates(widths, grid, NOISE_FLOOR):
        g = torch.Generator(device=d.device).manual_seed(seed)
        moments = torch.zeros(len(batches), 3, device=d.device, dtype=torch.float64)
        for i, (x0, valid, _) in enumerate(batches):
            x0, valid = x0.to(d.device), valid.to(d.device)
            with autocast:
                terms = nelbo_terms(net, x0, block_ids, attn_mask, mask_id, n_vocab, beta, omega, True, g,
                                    exec_positions=exec_positions, resample=resample) * valid
            if statistic == "block":
                means, scored = block_means(terms.float(), valid, block_ids)
                values = means[scored]
            else:
                values = terms.sum(1).double() / valid.sum(1).clamp(min=1)
            moments[i] = torch.stack([values.sum(), (values ** 2).sum(), values.new_tensor(values.numel())])
        moments = common.all_reduce(moments, "sum", d)
        if statistic == "block":
            s, s2, n = moments.unbind(1)
            scores[(beta, omega)] = float(((s2 - s * s / n) / (n - 1).clamp(min=1)).sum())
        else:
            s, s2, n = moments.sum(0).tolist()
            scores[(beta, omega)] = s2 / n - (s / n) ** 2
    beta, omega = min(scores, key=scores.get)
    return beta, omega, scores


def attention_mask_for(block_ids, device, use_flex):
    block_ids = block_ids.to(device)
    if use_flex:
        return flex_block_diffusion_mask(block_ids)
    return block_diffusion_mask(block_ids)


# -----------------------------------------------------------------------------
# model and checkpoints


def build_model(cfg, vocab_size, d, mask_id=None):
    """A fresh model, or weights from a train_gpt.py / train_bd3lm.py checkpoint or a published BD3-LM (an HF hub
    id or folder: published_bd3lm). The vocabulary holds the tokenizer's ids, then [MASK] (padded to a multiple
    of 64)."""
    if cfg.init_from == "scratch":
        config = model_config(cfg.model, vocab_size, cfg.seq_len, cfg.dropout or 0.0, cfg.n_layer or None,
                              cfg.n_head or None, cfg.n_embd or None)
        config.tie_embeddings, config.exec_layers = cfg.tie_embeddings, cfg.exec_layers
        return GPT(config)
    if is_published_bd3lm(cfg.init_from):
        base, state, label = published_bd3lm(cfg.init_from, vocab_size, mask_id, cfg.block_size)
    else:
        ckpt = load_any_checkpoint(cfg.init_from, ("gpt", KIND))
        base = ckpt["model_config"]
        state = dict(ckpt.get("ema") if ckpt.get("kind") == KIND and ckpt.get("ema") else ckpt["model"])
        label = f"{ckpt['path']} ({ckpt.get('kind', 'gpt')})"
    dropout = base.get("dropout", 0.0) if cfg.dropout is None else cfg.dropout  # the checkpoint's, unless set
    config = GPTConfig(**{**base, "tie_embeddings": cfg.tie_embeddings, "dropout": dropout,
                          "exec_layers": cfg.exec_layers})
    if config.block_size < cfg.seq_len:
        raise common.ConfigError(f"{label} has {config.block_size} positions, fewer than seq_len {cfg.seq_len}")
    if config.vocab_size < vocab_size:
        raise common.ConfigError(f"{label} has a vocabulary of {config.vocab_size}, the data and [MASK] "
                                 f"need {vocab_size}")
    model = GPT(config)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    if "transformer.wte.weight" not in state:
        state["transformer.wte.weight"] = state["lm_head.weight"]
    first_exec = config.n_layer - config.exec_layers
    for k, v in list(state.items()):  # a new execution module starts as a copy of the top layers
        parts = k.split(".")
        if k.startswith("transformer.h.") and int(parts[2]) >= first_exec:
            exec_key = ".".join(["transformer", "h_exec", str(int(parts[2]) - first_exec)] + parts[3:])
            state.setdefault(exec_key, v)
    if not config.exec_layers:
        state = {k: v for k, v in state.items() if not k.startswith("transformer.h_exec.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise common.ConfigError(f"{label}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if d.master:
        print(f"initialised from {label}")
    return model


def load_any_checkpoint(path, kinds):
    try:
        ckpt = common.load_checkpoint(path)
    except ValueError as e:
        raise common.ConfigError(str(e)) from e
    if ckpt.get("kind", "gpt") not in kinds:
        raise common.ConfigError(f"{ckpt['path']} holds a '{ckpt.get('kind')}' model; expected "
                                 f"{' or '.join(repr(k) for k in kinds)}")
    return ckpt


def load_for_eval(cfg, device):
    """(model with the EMA weights unless use_ema=false, checkpoint dict) from a train_bd3lm.py checkpoint."""
    ckpt = load_any_checkpoint(cfg.checkpoint, (KIND,))
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"] if cfg.use_ema and ckpt.get("ema") else ckpt["model"])
    return model.to(device).eval(), ckpt


class EMA:
    """Exponential moving average of the weights, with the reference's warm-up: the n-th update (n = 1, 2, ...)
    uses decay min(decay, (1 + n) / (10 + n)), so the first one 2/11 (bd3lms' models/ema.py counts n from 1)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        n = step + 1  # updates so far, this one included (optimizer step `step` counts from 0)
        d = min(self.decay, (1 + n) / (10 + n))
        ema = [p for p in self.model.parameters()]
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - d)


# -----------------------------------------------------------------------------


def main(argv=None):
    for arg in argv if argv is not None else sys.argv[1:]:  # before load_config refuses their keys (runs=, limit=)
        if arg.startswith("mode="):
            refuse_retired_mode(arg[len("mode="):])
    cfg = common.load_config(Config, argv)
    check_config(cfg)
    d = common.setup_dist(cfg.device)
    try:
        if cfg.mode == "train":
            with common.preemption_handlers() as stop:
                return train(cfg, d, stop)
        if cfg.mode == "ppl_eval":
            return ppl_eval(cfg, d)
        return sample(cfg, d)
    finally:
        common.cleanup_dist(d)


def data_setup(cfg, spec=None):
    """(tokenizer, tokenizer spec, number of real token ids, [MASK] id) for the configured data."""
    if cfg.data == "shards":
        meta = common.load_meta(cfg.data_dir)
        spec = spec or meta["tokenizer"]
    tok = load_tokenizer(cfg, spec)
    return tok, tok.spec, tok.vocab_size, tok.vocab_size  # [MASK] is the first id after the vocabulary


def flops_per_token(model, L):
    """Training FLOPs per data token of the vectorized pass: the network reads 2L tokens (x_t and x_0, the
    attention over 2L keys), the head only the noisy half."""
    return 2 * model.flops_per_token(2 * L) - 6 * model.lm_head.weight.numel()


@dataclass
class Objective:
    """What the loss needs beside the weights: the block layout (on the device), its attention mask, the
    [MASK] id and the real ids, the execution positions, the segment names and the autocast context."""
    block_ids: torch.Tensor
    attn_mask: object
    mask_id: int
    n_vocab: int
    exec_positions: Optional[torch.Tensor]
    seg_names: List[str]
    autocast: object

    def terms(self, net, x0, beta, omega, antithetic, generator, two_pass=False, resample=False):
        return nelbo_terms(net, x0, self.block_ids, self.attn_mask, self.mask_id, self.n_vocab, beta, omega,
                           antithetic, generator, two_pass, self.exec_positions, resample)


@dataclass
class Training:
    """The trained objects: the (wrapped) model, its plain module, the optimizer, the EMA and the loaders."""
    model: torch.nn.Module
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    ema: Optional["EMA"]
    train_loader: object
    val_loader: object


def train_step(cfg, d, run, obj, noise, accum, step):
    """One optimizer step; device tensors only (no host sync): [loss sum, tokens, per-segment sums and
    tokens], the gradient norm, the learning rate."""
    run.optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(2 + 2 * len(obj.seg_names), device=d.device)
    batches = [run.train_loader.next_batch() for _ in range(accum)]
    # the noise of a step depends only on (seed, step, rank): a resumed run, on any number of ranks, draws
    # exactly what the uninterrupted one drew, with no per-rank RNG state in the checkpoint
    noise_rng = torch.Generator(device=d.device).manual_seed((cfg.seed * 1_000_003 + step) * 1024 + d.rank)
    # the loss is the NELBO per token of the whole step (all micro batches, all ranks)
    n_tokens = common.all_reduce(sum(v.sum() for _, v, _ in batches).float().to(d.device), "sum", d)
    for micro, (x0, valid, seg) in enumerate(batches):
        x0, valid, seg = x0.to(d.device), valid.to(d.device), seg.to(d.device)
        with run.model.no_sync() if d.ddp and micro < accum - 1 else contextlib.nullcontext():
            with obj.autocast:
                terms = obj.terms(run.model, x0, noise[0], noise[1], cfg.antithetic, noise_rng, cfg.two_pass,
                                  cfg.resample) * valid
            loss_sum = terms.sum()
            (loss_sum * d.world_size / n_tokens).backward()  # DDP averages the ranks' gradients
        stats[0] += loss_sum.detach()
        stats[1] += valid.sum()
        for s in range(len(obj.seg_names)):
            in_seg = valid & (seg == s)
            stats[2 + 2 * s] += (terms.detach() * in_seg).sum()
            stats[3 + 2 * s] += in_seg.sum()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = common.lr_at(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps,
                      cfg.lr_schedule)
    common.set_lr(run.optimizer, lr)
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.raw_model, step)
    return stats, grad_norm, lr


def save_run(cfg, d, run, obj, spec, run_identity, step, val_loss, noise):
    raw = run.raw_model
    return common.save_training_checkpoint(cfg.out_dir, step, {
        "kind": KIND, "model": raw.state_dict(), "model_config": dataclasses.asdict(raw.config),
        "ema": run.ema.model.state_dict() if run.ema is not None else None, "tokenizer": spec,
        "bd3lm": {"mask_id": obj.mask_id, "n_vocab": obj.n_vocab, "block_size": cfg.block_size,
                  "seq_len": cfg.seq_len, "segment_lens": segment_lengths(cfg), "segment_names": obj.seg_names,
                  "data": cfg.data},
        "config": common.config_dict(cfg), "identity": run_identity, "step": step,
        "optimizer": run.optimizer.state_dict(), "loader": run.train_loader.state(), "rng": common.rng_state(),
        "val_loss": val_loss, "noise_range": noise}, d, cfg.keep_last_k)


def validation_nelbo(cfg, d, run, obj):
    """The validation NELBO per token with the EMA weights: the same batches and the same noise every time.
    Always over t in [eval_noise_beta, 1], as the reference's validation: under a clipped (or searched) training
    range the training loss is no bound, the validation NELBO stays one."""
    net = run.ema.model if run.ema is not None else run.raw_model
    run.val_loader.reset()
    g = torch.Generator(device=d.device).manual_seed(cfg.seed + 17 + d.rank)
    totals = torch.zeros(2, device=d.device)
    net.eval()
    with torch.no_grad():
        for _ in range(cfg.val_batches):
            x0, valid, _ = run.val_loader.next_batch()
            x0, valid = x0.to(d.device), valid.to(d.device)
            with obj.autocast:
                terms = obj.terms(net, x0, cfg.eval_noise_beta, 1.0, cfg.antithetic, g, resample=cfg.resample) * valid
            totals += torch.stack([terms.sum(), valid.sum().float()])
    run.raw_model.train()
    totals = common.all_reduce(totals, "sum", d)
    return (totals[0] / totals[1]).item()


def search_clip_range(cfg, d, run, obj, noise, step, logger):
    """The clip range of lowest loss variance on the first validation batches; the loss uses it from now (noise
    is updated in place)."""
    run.val_loader.reset()
    batches = [run.val_loader.next_batch() for _ in range(cfg.clip_search_batches)]
    noise[0], noise[1], variances = search_noise_range(
        run.ema.model if run.ema is not None else run.raw_model, batches, obj.block_ids, obj.attn_mask, obj.mask_id,
        obj.n_vocab, cfg.clip_search_widths, cfg.seed + 29, obj.autocast, d, obj.exec_positions,
        cfg.clip_search_statistic, cfg.clip_search_delta, cfg.resample)
    logger.log({"type": "clip_search", "step": step, "beta": noise[0], "omega": noise[1],
                "variance": variances[tuple(noise)], "candidates": len(variances),
                "statistic": cfg.clip_search_statistic})


def train(cfg, d, stop):
    per_step = cfg.micro_batch_size * d.world_size
    if cfg.batch_size % per_step:
        raise common.ConfigError(f"batch_size {cfg.batch_size} is not divisible by micro_batch_size * world_size "
                                 f"= {cfg.micro_batch_size} * {d.world_size}")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise NotADirectoryError(f"out_dir {cfg.out_dir} is a file; a run needs a folder")
    accum = cfg.batch_size // per_step

    # ---- where to start: fresh (or from pretrained weights), or from a checkpoint of this run
    run_identity = identity(cfg)
    ckpt = None if cfg.bench else common.restore(cfg.out_dir, cfg.resume, KIND, run_identity, d.master)
    start_step = ckpt["step"] + 1 if ckpt else 0
    finished = common.already_finished(ckpt, cfg.max_steps, d)
    if finished:
        return finished
    tok, spec, n_vocab, mask_id = data_setup(cfg)
    vocab_size = common.padded_vocab_size(n_vocab + 1)
    block_ids = make_block_ids(segment_lengths(cfg), cfg.block_size)
    seg_names = segment_names(cfg) if cfg.data == "hierarchical" else ["all"]
    dtype = common.resolve_dtype(cfg.dtype, d.device)
    autocast = common.autocast(d.device_type, dtype)
    common.seed_everything(cfg.seed, d.device_type)
    if ckpt:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = build_model(cfg, vocab_size, d, mask_id)
    model.to(d.device)
    raw_model = model  # plain module: checkpoints, EMA, evaluation
    if cfg.freeze == "plan":  # transfer: only the execution module learns
        for name, p in raw_model.named_parameters():
            p.requires_grad_(name.startswith("transformer.h_exec."))
    exec_pos = exec_positions_of(segment_lengths(cfg), raw_model.config.exec_layers)
    exec_pos = exec_pos.to(d.device) if exec_pos is not None else None
    ema = EMA(raw_model, cfg.ema) if cfg.ema > 0 else None
    use_flex = cfg.flex_attention and d.device_type == "cuda" and flex_block_diffusion_mask is not None
    model = common.wrap_model(model, d, cfg.compile)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), d.device_type)
    train_loader, truncated = make_loader(cfg, tok, "train", cfg.micro_batch_size, d)
    has_val = cfg.data == "shards" or (cfg.data == "gsm8k" and cfg.val_data_path) or \
        (cfg.data == "hierarchical" and (cfg.val_plans_path or cfg.synthetic_plans))
    val_loader = make_loader(cfg, tok, "val", cfg.micro_batch_size, d, shuffle=False)[0] if has_val else None
    attn_mask = attention_mask_for(block_ids, d.device, use_flex)
    block_ids = block_ids.to(d.device)
    val_loss = None
    noise = [cfg.noise_beta, cfg.noise_omega]  # the clip range the loss uses now; a clip search moves it
    if ckpt:
        noise = list(ckpt.get("noise_range", noise))
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.set_state(ckpt["loader"])
        common.set_rng_state(ckpt["rng"])
        if ema is not None and ckpt.get("ema"):
            ema.model.load_state_dict(ckpt["ema"])
        val_loss = ckpt.get("val_loss")

    logger = common.Logger(cfg.out_dir, d.master, resume=ckpt is not None, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=common.config_dict(cfg))
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    peak, device_name = common.peak_flops(d.device_type)
    logger.info(f"bd3lm {cfg.model}: {raw_model.num_params() / 1e6:.2f}M non-embedding params, vocab "
                f"{raw_model.config.vocab_size} ([MASK] = {mask_id}) | L {cfg.seq_len}, block {cfg.block_size}, "
                f"{int(block_ids[-1]) + 1} blocks | device {d.device} x{d.world_size} ({device_name}), {dtype}, "
                f"{'flex' if use_flex else 'dense'} mask | {cfg.batch_size} rows/step = {cfg.micro_batch_size} x "
                f"{d.world_size} ranks x {accum} accum")
    if ckpt:
        logger.info(f"resumed from {ckpt['path']} at step {start_step}")
    if truncated:
        logger.info(f"rows truncated (per segment): {truncated}")

    obj = Objective(block_ids, attn_mask, mask_id, n_vocab, exec_pos, seg_names, autocast)
    run = Training(model, raw_model, optimizer, ema, train_loader, val_loader)
    if cfg.bench:
        return bench(cfg, d, lambda step: train_step(cfg, d, run, obj, noise, accum, step), logger, tokens_per_step)

    stopped = common.stopped_before_start(stop, d, logger, start_step)
    if stopped:
        return stopped

    # ---- the loop
    watch = common.NonFiniteWatch(d.device)  # NaN/Inf in loss or gradients, remembered without a host sync
    timer = common.StepTimer(d.device_type, flops_per_token(raw_model, cfg.seq_len), peak, d.world_size)
    run_t0 = time.time()
    interval_stats, train_loss, status, step, seg_losses = None, None, "done", start_step - 1, {}
    logger.progress(total=cfg.max_steps, initial=start_step)
    for step in range(start_step, cfg.max_steps):
        stats, grad_norm, lr = train_step(cfg, d, run, obj, noise, accum, step)
        timer.step(tokens_per_step)
        watch.update(step, stats[0], grad_norm)
        interval_stats = stats if interval_stats is None else interval_stats + stats
        logger.bar.update(1)
        due = common.due(step, cfg.max_steps, cfg.log_interval, cfg.ckpt_interval, cfg.val_interval,
                         cfg.stop_after_step, first_step=start_step)
        val_now = due.eval and val_loader is not None and cfg.val_batches > 0
        clip_now = val_loader is not None and cfg.clip_search_interval > 0 and \
            (step + 1) % cfg.clip_search_interval == 0
        # a signal stops the run at a step boundary; under DDP the ranks agree on it at log points
        signal_stop = stop.check(d, sync=due.log or clip_now)
        if not (due.log or clip_now or signal_stop):
            continue

        # the NELBO per token since the last record, over all ranks (one host sync per interval)
        s = common.all_reduce(interval_stats, "sum", d).tolist()
        interval_stats = None
        common.stop_if_diverged(watch, d, logger, cfg.out_dir)
        train_loss = s[0] / max(s[1], 1)
        speed = timer.lap()
        if len(seg_names) > 1:
            seg_losses = {f"loss_{n}": s[2 + 2 * i] / max(s[3 + 2 * i], 1) for i, n in enumerate(seg_names)}
        logger.log({"type": "train", "step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                    **seg_losses, **speed, "tokens": (step + 1) * tokens_per_step})
        logger.postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed.get('tokens_per_sec', 0):,.0f}")
        if val_now:
            val_loss = validation_nelbo(cfg, d, run, obj)
            logger.log({"type": "val", "step": step, "val_loss": val_loss})
        if clip_now:
            search_clip_range(cfg, d, run, obj, noise, step, logger)
        # a signal or stop_after_step ends the run here, after its checkpoint (the last step ends it anyway)
        save = lambda s: save_run(cfg, d, run, obj, spec, run_identity, s, val_loss, noise)  # noqa: E731
        status = common.save_or_exit(due, signal_stop, stop, step, save, logger) or status
        if status != "done":
            break
        timer.restart()  # evaluation and saving are not training time

    speed = timer.summary()
    results = {"status": status, "steps": step + 1, "noise_range": noise, "final_train_loss": train_loss,
               "final_val_loss": val_loss,
               "final_val_ppl_bound": math.exp(val_loss) if val_loss is not None else None, **seg_losses,
               "tokens_seen": (step + 1) * tokens_per_step, "tokens_per_sec": speed["tokens_per_sec"],
               "mfu": speed["mfu"], "peak_mem_gb": speed["peak_mem_gb"],
               "seconds": time.time() - run_t0, "n_params": raw_model.num_params(), "world_size": d.world_size,
               "device": device_name, "block_size": cfg.block_size, "seq_len": cfg.seq_len, "truncated": truncated,
               "resample": cfg.resample, "resumed_from_step": start_step - 1 if ckpt else None,
               "reference_differences": reference_differences(cfg, "train", noise)}
    common.finish(cfg.out_dir, results, d, logger)
    if d.master:
        lines = [("train", "loss", "train NELBO"), ("val", "val_loss", "val NELBO")]
        segs = [("train", f"loss_{n}", n) for n in seg_names] if len(seg_names) > 1 else []
        common.plot_log_curves(cfg.out_dir, [("NELBO", "nats per token", lines)] +
                               ([("per segment (train)", "nats per token", segs)] if segs else []))
        if status == "done":
            logger.info(f"done: {step + 1} steps, train NELBO {train_loss:.4f}, val {val_loss}, in {cfg.out_dir}")
    return results


def bench(cfg, d, train_step, logger, tokens_per_step):
    for step in range(cfg.bench_warmup):
        train_step(step)
    common.synchronize(d.device_type)
    t0 = time.time()
    for step in range(cfg.bench_warmup, cfg.bench_warmup + cfg.bench_steps):
        stats, _, _ = train_step(step)
    loss = stats[0].item() / max(stats[1].item(), 1)
    seconds = time.time() - t0
    results = {"bench": True, "block_size": cfg.block_size, "seq_len": cfg.seq_len, "two_pass": cfg.two_pass,
               "step_ms": 1000 * seconds / cfg.bench_steps,
               "tokens_per_sec": cfg.bench_steps * tokens_per_step / seconds, "final_train_loss": loss}
    logger.info(f"bench: {results['tokens_per_sec']:,.0f} tokens/s ({results['step_ms']:.1f} ms/step), block "
                f"{cfg.block_size}, {'two passes' if cfg.two_pass else 'one 2L pass'}")
    if d.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        common.atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
    return results


# -----------------------------------------------------------------------------
# evaluation modes


def adopt_trained_layout(cfg, ckpt):
    """The config as the checkpoint trained it: data layout, block size, data files unless set, the synthetic
    problems' seed."""
    info = ckpt["bd3lm"]
    trained = ckpt["config"]
    for key in ("question_len", "plan_len", "exec_len", "flat_plans", "tokenizer", "block_size", "synthetic_plans",
                "synthetic_max_steps", "synthetic_templates"):
        setattr(cfg, key, trained.get(key, getattr(cfg, key)))  # the layout the model was trained with
    for key in ("data_dir", "val_data_path", "plans_path", "val_plans_path"):
        setattr(cfg, key, getattr(cfg, key) or trained[key])
    if cfg.data_seed is None:  # the synthetic problems of the trained run, whatever this evaluation's seed
        cfg.data_seed = trained.get("data_seed") if trained.get("data_seed") is not None else trained.get("seed")
    cfg.data, cfg.seq_len = info["data"], info["seq_len"]


def eval_setup(cfg, d):
    """Model, checkpoint facts and the config as the checkpoint trained it (data layout, block size)."""
    model, ckpt = load_for_eval(cfg, d.device)
    adopt_trained_layout(cfg, ckpt)
    return model, ckpt, ckpt["bd3lm"], load_tokenizer(cfg, ckpt["tokenizer"])


def ppl_eval(cfg, d):
    """NELBO per token (and its perplexity bound exp(NELBO)) on the evaluation set, t ~ U[eval_noise_beta, 1]
    per block, stratified over batch x blocks as in training (the reference's antithetic draw), with a seeded
    generator: the same seed gives the same number. The evaluated rows do not depend on the seed (synthetic
    problems come from the trained run's data seed); `rows_digest` names them, so two evaluations can be seen
    to compare like with like."""
    model, ckpt, info, tok = eval_setup(cfg, d)
    block_ids = make_block_ids(info["segment_lens"], cfg.block_size)
    attn_mask = attention_mask_for(block_ids, d.device, False)
    block_ids = block_ids.to(d.device)
    exec_pos = exec_positions_of(info["segment_lens"], model.config.exec_layers)
    exec_pos = exec_pos.to(d.device) if exec_pos is not None else None
    if cfg.data == "shards":
        loader = ShardRows(cfg.data_dir, "val", cfg.eval_batch_size, cfg.seq_len, d.rank, d.world_size)
        n_batches = cfg.eval_batches or 1
    else:
        x, valid, seg, _ = build_rows(cfg, tok, "val")
        loader = RowLoader(x, valid, seg, min(cfg.eval_batch_size, len(x)), d.rank, d.world_size, shuffle=False)
        n_batches = cfg.eval_batches or len(x) // (loader.batch * d.world_size)
    g = torch.Generator(device=d.device).manual_seed(cfg.seed + d.rank)
    names = info["segment_names"]
    totals = torch.zeros(2 + 2 * len(names), device=d.device, dtype=torch.float64)
    autocast = common.autocast(d.device_type, common.resolve_dtype(cfg.dtype, d.device))
    digest = hashlib.sha256()
    t0 = time.time()
    with torch.no_grad():
        for _ in common.progress(range(n_batches), master=d.master, desc="ppl_eval"):
            x0, valid, seg = (t.to(d.device) for t in loader.next_batch())
            digest.update(x0.cpu().numpy().astype(np.int64).tobytes())
            with autocast:
                terms = nelbo_terms(model, x0, block_ids, attn_mask, info["mask_id"], info["n_vocab"],
                                    cfg.eval_noise_beta, 1.0, cfg.antithetic, g, exec_positions=exec_pos,
                                    resample=cfg.resample) * valid
            totals[0] += terms.sum()
            totals[1] += valid.sum()
            for s in range(len(names)):
                totals[2 + 2 * s] += (terms * (valid & (seg == s))).sum()
                totals[3 + 2 * s] += (valid & (seg == s)).sum()
    totals = common.all_reduce(totals, "sum", d).tolist()
    nelbo = totals[0] / totals[1]
    results = {"mode": "ppl_eval", "checkpoint": ckpt["path"], "step": ckpt["step"], "ema": cfg.use_ema,
               "nelbo": nelbo, "ppl_bound": math.exp(nelbo), "tokens": int(totals[1]), "batches": n_batches,
               "block_size": cfg.block_size, "seed": cfg.seed, "antithetic": cfg.antithetic,
               "data_seed": data_seed(cfg) if cfg.synthetic_plans else None,
               "rows_digest": digest.hexdigest()[:16] if d.world_size == 1 else None, "seconds": time.time() - t0,
               "reference_differences": reference_differences(cfg, "ppl_eval")}
    if len(names) > 1:
        results["segments"] = {n: totals[2 + 2 * i] / max(totals[3 + 2 * i], 1) for i, n in enumerate(names)}
    if d.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        common.atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
        print(f"NELBO {nelbo:.4f} nats/token, perplexity <= {math.exp(nelbo):.2f} over {int(totals[1])} tokens")
    return results


def sample(cfg, d):
    """num_samples unconditional (flat) or question-conditioned (hierarchical: the validation questions) samples
    at temperature 1 -> samples.jsonl, through engine.BlockDiffusionEngine, the sampler eval_gsm8k.py scores with:
    a hierarchical question becomes the question segment as in training, a flat row is generated whole."""
    ckpt = load_any_checkpoint(cfg.checkpoint, (KIND,))
    adopt_trained_layout(cfg, ckpt)
    lm = load_block_diffusion_model(ckpt["path"], cfg.tokenizer_file or "", d.device,
                                    common.resolve_dtype(cfg.dtype, d.device), cfg.use_ema, ckpt=ckpt)
    sampling = BlockSampling(cfg.sampler, cfg.sample_steps, cfg.top_p, cfg.top_p_rule, temperature=1.0)
    sampler = BlockDiffusionEngine(lm, cfg.eval_batch_size, sampling, cfg.kv_cache, seed=cfg.seed)
    hierarchical = cfg.data == "hierarchical"
    if hierarchical:
        prompts = [r["question"] for r in plan_items(cfg, "val")][:cfg.num_samples]
    else:
        prompts = [""] * cfg.num_samples
    t0 = time.time()
    outs = sampler.generate([lm.tok.encode(p) for p in prompts], max_new_tokens=cfg.seq_len)
    seconds = time.time() - t0
    nfe = sampler.network_calls
    # the positions the sampler filled per row (everything but the question segment; padding after an end of
    # text included), so tokens/s compares across samplers and with the cache on or off
    generated = len(prompts) * (cfg.seq_len - (ckpt["bd3lm"]["segment_lens"][0] if hierarchical else 0))
    records = []
    for i, (p, (c,)) in enumerate(zip(prompts, outs)):  # every segment's text is cut at its end of text
        records.append({"id": i, "prompt": p, "text": "".join(c.segments.values()) if hierarchical else c.text,
                        **({"segments": c.segments} if hierarchical else {})})
    results = {"mode": "sample", "checkpoint": ckpt["path"], "sampler": cfg.sampler, "kv_cache": cfg.kv_cache,
               "block_size": cfg.block_size, "top_p": cfg.top_p, "top_p_rule": cfg.top_p_rule,
               "num_samples": len(prompts), "nfe": nfe, "generated_tokens": generated, "seconds": seconds,
               "tokens_per_sec": generated / seconds, "reference_differences": reference_differences(cfg, "sample")}
    if d.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "samples.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps({**r, "nfe": nfe}) + "\n")
        common.atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
        print(f"{len(prompts)} samples, {nfe} network calls, {generated / seconds:,.0f} tokens/s "
              f"({'with' if cfg.kv_cache else 'without'} KV cache) -> {cfg.out_dir}/samples.jsonl")
    return results


if __name__ == "__main__":
    common.run_main(main, preemptible=True)

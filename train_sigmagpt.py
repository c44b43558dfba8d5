"""
sigma-GPT in one file: a GPT trained on sequences shuffled by a permutation, each token carrying two
positions, its own and that of the token it predicts next (Pannatier, Courdier, Fleuret, "sigma-GPTs: A
New Approach to Autoregressive Models", arXiv 2404.09562). Read it top to bottom.

    python train_sigmagpt.py configs/sigmagpt_demo.yaml                  # train (mode=full), CPU demo
    python train_sigmagpt.py configs/sigmagpt_fair.yaml                  # mode=fair: conditional loss
    torchrun --nproc_per_node=4 train_sigmagpt.py configs/sigmagpt_full.yaml resume=latest
    python train_sigmagpt.py configs/sigmagpt_demo.yaml mode=eval ckpt=experiments/<run>
    python train_sigmagpt.py configs/sigmagpt_full.yaml mode=eval ckpt=experiments/<run> split=test  # WikiText-103 test
    python train_sigmagpt.py configs/sigmagpt_full.yaml mode=compare runs=[RUN_fair,RUN_full] labels=[fair,full] \
        split=test out_dir=experiments/sigmagpt_compare                  # comparison.json + comparison.png
    python train_sigmagpt.py configs/sigmagpt_demo.yaml mode=sample ckpt=experiments/<run> \
        prompt="The <missing>3</missing> sat on the mat." sampler=rejection

The sequence. Each training sequence is `block_size` tokens s[0..T-1] from the shards. A permutation
sigma of 0..T-1 orders it; row t of the model's input is token s[sigma(t)] with own position sigma(t)
and next position sigma(t+1), and its target is s[sigma(t+1)] (rows t = 0..T-2, as in an AR model the
first token is given, never predicted). With sigma = identity this is exactly the AR model.

The position code (model.py, `double_position`). The learned (block_size, n_embd) table serves both
positions: its left half looked up at the own position, its right half at the next position,
concatenated and added to the token embedding. A plain GPT's table (HF distilgpt2/gpt2, or a
train_gpt.py checkpoint) converts by model.double_position_table: left half row for row, right half
shifted down one row. So in left-to-right order the converted model IS the AR model (equal logits).

Orders (`order=`): random (a uniform permutation per sequence), left_to_right (the identity), and
curriculum (each sequence is random with a probability rising linearly from curriculum_start to 1
over curriculum_steps, else left to right; curriculum_granularity=batch draws once per micro batch for all its
sequences, as the reference does).

Modes. mode=full: every row is scored (T-1 targets per sequence, as an AR model). mode=fair: each
sequence splits into conditioning tokens, placed first in the order and not scored, and evaluation
tokens, scored: round(scored_share * T) of them (at least 1, at most T-1). The loss is then that of a
conditional model that sees a random subset and predicts the rest. mode=eval: perplexity left to right,
in eval_orders random orders (fixed seed), and fair-mode conditional, on split=val (the first
val_batches x micro_batch_size rows, as during training) or split=test (prepare_data's test split, e.g.
WikiText-103's, all of it: what the seed evaluates on). mode=compare: the same three perplexities of several
runs on one split, beside what each run learned from (tokens through the model vs tokens scored: fair mode's
"~40% learning efficiency") and their val curves: comparison.json and comparison.png. mode=sample: generation
in any order, infilling (`<missing>N</missing>` in the prompt), and token-based rejection sampling.

Training loop as train_gpt.py, on common's plumbing: DDP, bf16 autocast or fp16 with a grad scaler,
torch.compile on CUDA, gradient accumulation, epochs of max_samples sequences (or max_steps), exact resume
that refuses another run (model, data, mode, order, scored_share, curriculum; a larger max_steps continues),
SIGTERM/SIGUSR1 from process start to exit (save at the next step boundary, exit 0), a stop on a non-finite
loss. Outputs (the users' guide layout, checkpoints in common's layout="seed"):
    experiments/<name>_<timestamp>/config.json, logs/training_log.csv, checkpoint-N/model.pt,
    log.jsonl, log.txt, loss.png, results.json (and tensorboard/ with tensorboard=true)
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import contextlib
import csv
import dataclasses
import functools
import glob
import json
import math
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import GPT, GPTConfig, MODEL_SIZES, double_position_table, from_hf, model_config


@dataclass
class Config:
    mode: str = "full"  # full | fair (train) | eval | compare | sample
    # data: token shards + meta.json written by prepare_data.py (WikiText-103: source=wikitext)
    data_dir: str = "data/wikitext103"  # token shards and meta.json (prepare_data.py)
    tokenizer_file: Optional[str] = None  # GPT-2 ranks file for offline use (eval/sample text, prompts)
    block_size: int = 1024  # tokens per sequence, all of them in one permutation
    max_samples: int = 0  # sequences per epoch (0 = all the train shards hold)
    epochs: int = 1  # passes over max_samples sequences (unless max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    # model: HF GPT-2 weights (hub id or folder), a train_gpt.py / train_sigmagpt.py checkpoint, or scratch
    init_from: str = "distilgpt2"  # HF hub id or folder | a checkpoint file, checkpoint-N, run folder or RUN/latest | scratch
    model: str = "gpt2"  # size when init_from=scratch (model.MODEL_SIZES)
    n_layer: int = 0  # 0 = the size's default (init_from=scratch)
    n_head: int = 0  # 0 = the size's default (init_from=scratch)
    n_embd: int = 0  # 0 = the size's default (init_from=scratch; even: two position halves)
    dropout: float = 0.0  # dropout probability in the model
    # sigma-GPT
    order: str = "random"  # random | left_to_right | curriculum
    curriculum_start: float = 0.0  # curriculum: share of random orders at step 0
    curriculum_steps: int = 0  # curriculum: steps to reach 1.0 (0 = the whole run)
    # sequence: each sequence draws its order kind (random w.p. the share, else left to right); batch: one draw per
    # micro batch (per rank) decides for all its sequences, as the reference's get_batch (idiap/sigma-gpt)
    curriculum_granularity: str = "sequence"  # curriculum: sequence | batch (the reference's)
    scored_share: float = 0.4  # fair mode (and fair evaluation): share of each sequence that is scored
    # batch: sequences per optimizer step = micro_batch_size * grad_accum_steps * world_size
    micro_batch_size: int = 8  # sequences per forward pass per rank (the guide's BATCH_SIZE)
    grad_accum_steps: int = 64  # micro batches per optimizer step (the guide's GRAD_ACCUM)
    # optimisation (the paper's)
    learning_rate: float = 2.5e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 10000  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay (matrices only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip
    seed: int = 1337  # weights and the orders of every step
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on cuda) | fp32 | bf16 | fp16 (with a grad scaler)
    compile: bool = True  # torch.compile on cuda
    # output: experiments/<name>_<timestamp>/ unless out_dir is given
    out_root: str = "experiments"  # where <name>_<timestamp>/ run folders go (without out_dir)
    name: str = "sigmagpt"  # run name: out_root/<name>_<timestamp>/ (no path separators)
    out_dir: str = ""  # the run folder; empty = out_root/<name>_<timestamp>
    resume: Optional[str] = None  # latest (newest checkpoint; with no out_dir, the newest <name>_* run) | a path
    log_interval: int = 10  # steps between train records
    val_interval: int = 500  # 0 = only at the end
    val_batches: int = 8  # the val set: the first val_batches x micro_batch_size rows (split over ranks)
    eval_orders: int = 3  # K random orders for the random-order perplexity
    eval_seed: int = 1234  # seed of the fixed validation orders
    ckpt_interval: int = 5000  # steps between checkpoint-N/model.pt (the guide's save_steps; 0 = only at the end)
    keep_last_k: int = 3  # keep the newest k checkpoint-N folders (the guide's save_total_limit; 0 = all)
    stop_after_step: int = -1  # end this invocation after this step with a checkpoint, as if preempted
    tensorboard: bool = False  # also log to out_dir/tensorboard (tags <record type>/<key>)
    wandb_project: Optional[str] = None  # also log to this W&B project (wandb imported only when set)
    # eval / compare / sample
    ckpt: str = ""  # eval / sample: a run folder, RUN/latest, checkpoint-N folder or model.pt
    split: str = "val"  # eval / compare: val | test (prepare_data's test_split / test_path: WikiText-103's test)
    eval_rows: int = 0  # eval / compare: rows scored; 0 = val_batches x micro_batch_size (val), all of them (test)
    runs: list[str] = field(default_factory=list)  # compare: run folders (or checkpoints) to compare
    labels: list[str] = field(default_factory=list)  # compare: their names in the report ([] = the folder names)
    prompt: str = ""  # text; <missing>N</missing> marks N unknown tokens; without any, max_new_tokens follow
    max_new_tokens: int = 32  # unknown tokens after a prompt without <missing>
    sampler: str = "rejection"  # rejection | sequential
    sample_order: str = "random"  # random | left_to_right: the order unknown tokens are generated in
    num_samples: int = 4  # completions of the prompt
    temperature: float = 1.0  # sampling temperature


MODES = ("full", "fair", "eval", "compare", "sample")
ORDERS = ("random", "left_to_right", "curriculum")
DTYPES = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


def check_config(cfg):
    """Mistakes that need no data or devices to spot: refuse them before anything starts."""
    choices = (("mode", MODES), ("order", ORDERS), ("dtype", DTYPES), ("sampler", ("rejection", "sequential")),
               ("split", ("val", "test")),
               ("sample_order", ("random", "left_to_right")), ("curriculum_granularity", ("sequence", "batch")))
    for key, allowed in choices:
        if getattr(cfg, key) not in allowed:
            raise common.ConfigError(f"{key} '{getattr(cfg, key)}' is not one of {', '.join(allowed)}")
    if not 0.0 < cfg.scored_share <= 1.0:
        raise common.ConfigError(f"scored_share must be in (0, 1], got {cfg.scored_share}")
    if not 0.0 <= cfg.curriculum_start <= 1.0:
        raise common.ConfigError(f"curriculum_start must be in [0, 1], got {cfg.curriculum_start}")
    for key in ("micro_batch_size", "grad_accum_steps", "epochs", "log_interval", "eval_orders", "val_batches"):
        if getattr(cfg, key) <= 0:
            raise common.ConfigError(f"config key '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.block_size < 2:
        raise common.ConfigError(f"block_size must be at least 2 (one given token, one predicted), got {cfg.block_size}")
    if cfg.init_from == "scratch" and cfg.model not in MODEL_SIZES:
        raise common.ConfigError(f"model '{cfg.model}' is not a known size; choose from {', '.join(MODEL_SIZES)}")
    if not cfg.name or "/" in cfg.name or os.sep in cfg.name or ".." in cfg.name:
        raise common.ConfigError(f"name '{cfg.name}' must be a plain folder name (no '/' or '..'): the run goes to "
                                 f"{cfg.out_root}/<name>_<timestamp>; use out_dir= for another place")
    if cfg.eval_rows < 0:
        raise common.ConfigError(f"eval_rows must be >= 0 (0 = the split's default), got {cfg.eval_rows}")
    if cfg.mode == "compare" and len(cfg.runs) < 2:
        raise common.ConfigError(f"mode=compare needs runs=[RUN_A,RUN_B,...] (two or more), got {cfg.runs}")
    if cfg.mode == "compare" and cfg.labels and len(cfg.labels) != len(cfg.runs):
        raise common.ConfigError(f"labels= names each run: {len(cfg.labels)} labels for {len(cfg.runs)} runs")
    if cfg.mode in ("eval", "sample") and not cfg.ckpt and cfg.init_from == "scratch":
        raise common.ConfigError(f"mode={cfg.mode} needs ckpt=RUN_DIR|checkpoint-N|model.pt (or init_from=)")


# -----------------------------------------------------------------------------
# orders: the permutation bookkeeping


def num_scored(cfg, T):
    """Scored targets per sequence: T-1 in full mode; in fair mode the evaluation tokens, round(share*T)
    clamped to [1, T-1] (the first token of an order is always given)."""
    if cfg.mode != "fair":
        return T - 1
    return min(T - 1, max(1, round(cfg.scored_share * T)))


def random_share(cfg, step, max_steps):
    """The probability that a sequence gets a random order (else left to right) at this step."""
    if cfg.order == "random":
        return 1.0
    if cfg.order == "left_to_right":
        return 0.0
    ramp = cfg.curriculum_steps or max_steps
    return min(1.0, cfg.curriculum_start + (1.0 - cfg.curriculum_start) * step / max(1, ramp))


def draw_orders(B, T, share_random, generator, per_batch=False):
    """(B, T) permutations: each row uniform at random with probability share_random, else the identity.
    per_batch: one draw decides for every row (all random or all left to right), as the reference's curriculum."""
    perm = torch.argsort(torch.rand(B, T, generator=generator), dim=1)
    shuffled = torch.rand(1 if per_batch else B, generator=generator).expand(B) < share_random
    return torch.where(shuffled[:, None], perm, torch.arange(T).expand(B, T))


def sigma_batch(seq, perm, n_scored):
    """Sequences (B, T) in the orders perm (B, T) -> the model's rows (B, T-1): input tokens, own
    positions, next positions, targets. Row t holds token seq[perm[t]] at position perm[t] and predicts
    seq[perm[t+1]] at position perm[t+1]; only the last n_scored targets count (the rest are -100)."""
    ordered = seq.gather(1, perm)
    x, y = ordered[:, :-1], ordered[:, 1:].clone()
    y[:, :y.size(1) - n_scored] = -100  # fair mode: the conditioning tokens come first and are not scored
    return x, perm[:, :-1], perm[:, 1:], y


def order_generator(seed, *keys):
    """A CPU generator fixed by (seed, keys): the orders of a step do not depend on what ran before, so a
    resumed run draws the same orders without saving generator state."""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed,) + keys).encode()))


# -----------------------------------------------------------------------------
# the model: HF GPT-2 weights, a train_gpt.py checkpoint or a sigma-GPT one, or scratch


def sigma_from_ar(ar, vocab_size=None, dropout=0.0):
    """A plain GPT -> a double-position GPT that, in left-to-right order, computes exactly the same
    logits (model.double_position_table); the vocabulary may be padded up (new rows keep their init)."""
    c = ar.config
    config = dataclasses.replace(c, double_position=True, dropout=dropout,
                                 vocab_size=max(c.vocab_size, vocab_size or 0))
    model = GPT(config)
    source = ar.state_dict()
    source["transformer.wpe.weight"] = double_position_table(source["transformer.wpe.weight"])
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v[:source[k].shape[0]].copy_(source[k])  # rows past the source vocabulary keep their init
            else:
                v.copy_(source[k])
    return model


def build_model(cfg, meta):
    """The sigma-GPT to train: from scratch, from HF GPT-2 weights, or from a train_gpt.py / train_sigmagpt.py
    checkpoint (converted by the stated rule). Refuses another vocabulary and a too short position table."""
    data_vocab = common.padded_vocab_size(meta["vocab_size"])
    spec = meta["tokenizer"]
    if cfg.init_from == "scratch":
        c = model_config(cfg.model, data_vocab, cfg.block_size, cfg.dropout,
                         cfg.n_layer or None, cfg.n_head or None, cfg.n_embd or None)
        return GPT(dataclasses.replace(c, double_position=True))
    path = checkpoint_file(cfg.init_from)
    if path:
        ckpt = load_any_checkpoint(path)
        if ckpt.get("tokenizer") != spec:
            raise common.ConfigError(f"init_from {cfg.init_from} was trained with tokenizer {ckpt.get('tokenizer')}, "
                                     f"but {cfg.data_dir} holds {spec}: another vocabulary")
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        if not model.config.double_position:
            model = sigma_from_ar(model, dropout=cfg.dropout)
    else:
        if spec["kind"] != "gpt2":  # extra tokens after the 50257 GPT-2 ids are fine: new, padded rows
            raise common.ConfigError(f"init_from {cfg.init_from} has the GPT-2 vocabulary, but {cfg.data_dir} "
                                     f"holds '{spec['kind']}' tokens ({meta['vocab_size']} ids): another vocabulary")
        model = sigma_from_ar(from_hf(cfg.init_from), data_vocab, cfg.dropout)
    if cfg.block_size > model.config.block_size:
        raise common.ConfigError(f"block_size {cfg.block_size} is longer than the position table of "
                                 f"{cfg.init_from} ({model.config.block_size} positions)")
    if meta["vocab_size"] > model.config.vocab_size:
        raise common.ConfigError(f"data vocab {meta['vocab_size']} exceeds the vocabulary of {cfg.init_from} "
                                 f"({model.config.vocab_size}): another vocabulary")
    return model


# -----------------------------------------------------------------------------
# checkpoints in the guide's layout, <run>/checkpoint-<step>/model.pt (common's layout="seed")


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_file(path):
    """The checkpoint file `path` names: a .pt file, a checkpoint-N folder, a run folder (its newest checkpoint)
    or RUN/latest; None for an HF model (a hub id, or a folder holding HF weights)."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "model.pt")):
        return os.path.join(path, "model.pt")
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS):
        return None
    if os.path.isdir(path) or os.path.basename(path) == "latest":
        return common.resolve_checkpoint(path)  # FileNotFoundError for a run folder without checkpoints
    return None


def load_any_checkpoint(path):
    """A train_gpt.py or train_sigmagpt.py checkpoint (any form checkpoint_file takes)."""
    ckpt = common.load_checkpoint(checkpoint_file(path) or path)
    if ckpt.get("kind", "gpt") not in ("gpt", "sigmagpt"):
        raise common.ConfigError(f"{ckpt['path']} holds a '{ckpt['kind']}' model, not a GPT or sigma-GPT")
    return ckpt


# what defines the run: the weights' shape and start, the data (by content), the loss and the orders. A resumed
# run cannot change these; the rest (max_steps, epochs, the lr, the intervals) it may
IDENTITY_KEYS = ("model", "n_layer", "n_head", "n_embd", "block_size", "init_from", "mode", "scored_share", "order",
                 "curriculum_start", "curriculum_steps")


def identity(cfg):
    keys = IDENTITY_KEYS + (("curriculum_granularity",) if cfg.order == "curriculum" else ())
    return common.run_identity(cfg, keys, data=common.fingerprint(cfg.data_dir))


def run_folder(cfg, d):
    """out_dir, or experiments/<name>_<timestamp>; resume=latest without out_dir takes the newest <name>_* run."""
    if cfg.out_dir:
        if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
            raise common.ConfigError(f"out_dir {cfg.out_dir} is a file, not a folder: choose another out_dir")
        return cfg.out_dir
    folder = None
    if d.master:
        runs = sorted(p for p in glob.glob(os.path.join(cfg.out_root, f"{cfg.name}_*")) if common.list_checkpoints(p))
        if cfg.resume == "latest" and runs:
            folder = runs[-1]
        else:
            folder = os.path.join(cfg.out_root, f"{cfg.name}_{time.strftime('%Y%m%d_%H%M%S')}")
    if d.ddp:  # every rank writes to the folder rank 0 named
        box = [folder]
        dist.broadcast_object_list(box, src=0)
        folder = box[0]
    return folder


# -----------------------------------------------------------------------------
# evaluation: perplexity left to right, in K random orders, and fair-mode conditional


def sequence_nats(model, seq, perm, n_scored, autocast):
    """Per-target nats (B, T-1) of sequences in the given orders, 0 where not scored; and the targets."""
    x, pos, next_pos, y = (t.to(seq.device) for t in sigma_batch(seq.cpu(), perm, n_scored))
    with autocast:
        logits, _ = model(x, position_ids=pos, target_position_ids=next_pos)
    nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
    return nats.view_as(y), y


@torch.no_grad()
def evaluate(model, val_rows, token_bytes, cfg, d, autocast):
    """Validation on one fixed set of rows (common.validation_rows; rank r scores rows r, r+W, ...), in three
    ways: left to right, in eval_orders random orders, and fair (the evaluation tokens given the rest). Each
    row's orders are fixed by (eval_seed, row), so every evaluation, on any world size, sees the same ones.
    Nats per scored token, and bits per byte (special tokens count 0 bytes and are left out, as train_gpt)."""
    T = cfg.block_size
    fair = num_scored(dataclasses.replace(cfg, mode="fair"), T)
    sums = torch.zeros(3, 4, dtype=torch.float64, device=d.device)  # (l2r, random, fair) x (nats, tokens, byte nats, bytes)
    model.eval()
    rows = torch.arange(len(val_rows))[d.rank::d.world_size]
    for i in range(0, len(rows), cfg.micro_batch_size):
        index = rows[i:i + cfg.micro_batch_size].tolist()
        seq = val_rows[index].to(d.device)

        def orders(*key):
            return torch.cat([draw_orders(1, T, 1.0, order_generator(cfg.eval_seed, *key, r)) for r in index])

        runs = [(0, torch.arange(T).expand(len(index), T), T - 1)]
        runs += [(1, orders("random", k), T - 1) for k in range(cfg.eval_orders)]
        runs += [(2, orders("fair"), fair)]
        for slot, perm, n in runs:
            nats, y = sequence_nats(model, seq, perm, n, autocast)
            scored = y != -100
            nbytes = token_bytes[y.clamp(min=0)] * scored
            sums[slot] += torch.stack([nats.sum(), scored.sum(), (nats * (nbytes > 0)).sum(), nbytes.sum()]).double()
    model.train()
    sums = common.all_reduce(sums, "sum", d).tolist()
    out = {}
    for (nats, tokens, byte_nats, nbytes), name in zip(sums, ("l2r", "random", "fair")):
        out[f"val_loss_{name}"] = nats / max(tokens, 1)
        out[f"val_ppl_{name}"] = math.exp(out[f"val_loss_{name}"])
        out[f"val_bpb_{name}"] = byte_nats / math.log(2) / nbytes if nbytes > 0 else None
    return out


def validation_set(cfg, spec, vocab_size, device, split="val"):
    """The fixed rows of block_size tokens of a split and the token byte lengths. val: the first eval_rows (or
    val_batches x micro_batch_size) rows, as every validation during training; test: the first eval_rows, or all."""
    n_rows = cfg.eval_rows or (cfg.val_batches * cfg.micro_batch_size if split == "val" else 0)
    # prepare_data writes val always, test only when asked: a missing test split says how to make one
    if split != "val" and os.path.isdir(cfg.data_dir) and not glob.glob(os.path.join(cfg.data_dir, f"{split}_*.bin")):
        raise common.ConfigError(f"{cfg.data_dir} has no {split} split ({split}_*.bin): prepare it with prepare_data.py "
                                 "test_split=test (or test_path=FILE), as configs/data_wikitext103.yaml does")
    rows = common.validation_rows(cfg.data_dir, n_rows or 1 << 62, cfg.block_size - 1, split)
    token_bytes = common.token_byte_lengths(common.Tokenizer.from_spec(spec, cfg.tokenizer_file), vocab_size)
    return rows, token_bytes.to(device)


# -----------------------------------------------------------------------------
# generation: any order, infilling, token-based rejection sampling
#
# A partial sequence is a list over positions: a token id where known, None where unknown. The known
# tokens come first in the order (in position order), then the unknown positions in the sampling order.


def probs_of(logits, temperature, vocab_size=None):
    """Softmax at a temperature over the real vocabulary (the padded rows past vocab_size never come out)."""
    return torch.softmax(logits[..., :vocab_size].float() / max(temperature, 1e-6), dim=-1)


@torch.no_grad()
def conditionals(model, tokens, order, next_positions, temperature, vocab_size=None, attn_mask=None):
    """One causal pass over the known tokens at positions `order`, row k predicting next_positions[k]:
    the (len(order), V) distributions."""
    dev = model.lm_head.weight.device
    ids = torch.tensor([tokens[p] for p in order], device=dev)[None]
    pos = torch.tensor(order, device=dev)[None]
    logits, _ = model(ids, position_ids=pos, target_position_ids=torch.tensor(next_positions, device=dev)[None],
                      attn_mask=None if attn_mask is None else attn_mask[None, None].to(dev))
    return probs_of(logits[0], temperature, vocab_size).cpu()


@torch.no_grad()
def propose(model, tokens, prefix, remaining, temperature, vocab_size=None):
    """ONE pass: the distribution of every remaining position given the prefix alone. The last prefix
    token appears once per remaining position, each copy with that position as its next position and
    attending only to the prefix before it and itself."""
    L, m = len(prefix), len(remaining)
    n = L - 1 + m
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    mask[L - 1:, L - 1:] = torch.eye(m, dtype=torch.bool)  # the copies do not see each other
    order = prefix[:-1] + prefix[-1:] * m
    return conditionals(model, tokens, order, prefix[1:] + remaining, temperature, vocab_size, mask)[L - 1:]


def unknown_order(tokens, how, generator):
    unknown = [p for p, t in enumerate(tokens) if t is None]
    if how == "random":
        unknown = [unknown[i] for i in torch.randperm(len(unknown), generator=generator).tolist()]
    return unknown


@torch.no_grad()
def sample_sequential(model, tokens, how="random", temperature=1.0, generator=None, vocab_size=None):
    """One token per model call, in a random (or left-to-right) order of the unknown positions."""
    tokens = list(tokens)
    prefix = [p for p, t in enumerate(tokens) if t is not None]
    if not prefix:
        raise common.ConfigError("generation needs at least one known token")
    calls = 0
    for p in unknown_order(tokens, how, generator):
        probs = conditionals(model, tokens, prefix, prefix[1:] + [p], temperature, vocab_size)[-1]
        calls += 1
        tokens[p] = int(torch.multinomial(probs, 1, generator=generator))
        prefix.append(p)
    return tokens, {"calls": calls, "steps": calls, "accepted_per_step": [1] * calls}


@torch.no_grad()
def sample_rejection(model, tokens, temperature=1.0, generator=None, vocab_size=None):
    """Token-based rejection sampling. Each step: (1) one pass proposes every remaining token from
    q_j = p(x_j | prefix); (2) the drafts, in a fresh random order, go through one causal pass giving
    p_k = p(x_k | prefix, drafts before k); drafts are accepted in order while u < p_k(x)/q_k(x); at the
    first rejection that position is redrawn from the residual max(p_k - q_k, 0) and the step ends.
    The first draft is always accepted (its p and q condition on the same prefix), so every step
    generates at least one token, and by the speculative-sampling argument each generated token is
    distributed as p_k: the result is distributed as sequential sampling in a uniformly random order."""
    tokens = list(tokens)
    prefix = [p for p, t in enumerate(tokens) if t is not None]
    if not prefix:
        raise common.ConfigError("generation needs at least one known token")
    remaining = unknown_order(tokens, "random", generator)
    calls, accepted_per_step = 0, []
    while remaining:
        q = propose(model, tokens, prefix, remaining, temperature, vocab_size)
        calls += 1
        drafts = torch.multinomial(q, 1, generator=generator)[:, 0].tolist()
        if len(remaining) == 1:  # a single proposal is already an exact sample
            tokens[remaining[0]] = drafts[0]
            prefix, remaining = prefix + remaining, []
            accepted_per_step.append(1)
            break
        trial = list(tokens)
        for p, t in zip(remaining, drafts):
            trial[p] = t
        order = prefix + remaining
        p_all = conditionals(model, trial, order[:-1], order[1:], temperature, vocab_size)[len(prefix) - 1:]
        calls += 1
        n_new = len(remaining)
        for k in range(len(remaining)):
            x = drafts[k]
            ratio = 1.0 if k == 0 else float(p_all[k, x] / q[k, x])
            if float(torch.rand((), generator=generator)) < ratio:
                tokens[remaining[k]] = x
                continue
            residual = (p_all[k] - q[k]).clamp(min=0)
            tokens[remaining[k]] = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            n_new = k + 1
            break
        accepted_per_step.append(n_new)
        prefix, remaining = prefix + remaining[:n_new], remaining[n_new:]
        # the rest keep a uniformly random order: a fresh shuffle changes nothing in distribution
    return tokens, {"calls": calls, "steps": len(accepted_per_step), "accepted_per_step": accepted_per_step}


MISSING_RE = re.compile(r"<missing>(\d+)</missing>")


def parse_prompt(text, tokenizer, max_new_tokens):
    """'a <missing>3</missing> b' -> [ids of 'a', None, None, None, ids of ' b']; without any marker, the
    prompt is followed by max_new_tokens unknowns (plain continuation)."""
    tokens, last = [], 0
    for m in MISSING_RE.finditer(text):
        tokens += tokenizer.encode(text[last:m.start()]) + [None] * int(m.group(1))
        last = m.end()
    tokens += tokenizer.encode(text[last:])
    if last == 0:
        tokens += [None] * max_new_tokens
    return tokens


def run_sample(cfg, model, tokenizer):
    """num_samples completions of the prompt; prints them and the model calls per generated token."""
    tokens = parse_prompt(cfg.prompt, tokenizer, cfg.max_new_tokens)
    if len(tokens) > model.config.block_size:
        raise common.ConfigError(f"prompt and missing tokens make {len(tokens)} positions; the position table "
                                 f"has {model.config.block_size}")
    if all(t is None for t in tokens):
        tokens[0] = tokenizer.eot_id  # nothing known: start from the end-of-text token at position 0
    generator = torch.Generator().manual_seed(cfg.seed)
    out, calls, generated, steps, t0 = [], 0, 0, [], time.time()
    for i in range(cfg.num_samples):
        if cfg.sampler == "rejection":
            filled, stats = sample_rejection(model, tokens, cfg.temperature, generator, tokenizer.vocab_size)
        else:
            filled, stats = sample_sequential(model, tokens, cfg.sample_order, cfg.temperature, generator,
                                              tokenizer.vocab_size)
        text = tokenizer.decode(filled)
        print(f"--- sample {i} ({stats['steps']} steps, {stats['calls']} model calls)\n{text}")
        n = sum(t is None for t in tokens)
        out.append({"text": text, "tokens": filled, **stats})
        calls, generated, steps = calls + stats["calls"], generated + n, steps + stats["accepted_per_step"]
    summary = {"sampler": cfg.sampler, "samples": cfg.num_samples, "generated_tokens": generated,
               "model_calls_per_token": calls / max(generated, 1),
               "tokens_per_step": sum(steps) / max(len(steps), 1), "seconds": time.time() - t0}
    print(common.format_record(summary))
    return {"summary": summary, "samples": out}


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = common.load_config(Config, argv)
    check_config(cfg)
    d = common.setup_dist(cfg.device)
    try:
        if cfg.mode in ("eval", "compare", "sample"):
            return evaluate_or_sample(cfg, d)
        with common.preemption_handlers() as stop:
            return train(cfg, d, stop)
    finally:
        common.cleanup_dist(d)


def evaluate_or_sample(cfg, d):
    """mode=eval: the three perplexities on data_dir's `split`; mode=compare: those of several runs and how each
    learned; mode=sample: generation from `prompt`. A train_gpt.py checkpoint works too (converted: its
    left-to-right perplexity is the AR model's)."""
    if cfg.mode == "compare":
        return compare_runs(cfg, d)
    model, spec = model_to_evaluate(cfg, cfg.ckpt)
    if cfg.mode == "eval":
        results = evaluate_split(cfg, model, spec, d)
        if d.master:
            print(common.format_record(results))
        return results
    if not d.master:  # sampling is one process's job
        return None
    tokenizer = common.Tokenizer.from_spec(spec, cfg.tokenizer_file)
    return run_sample(cfg, model.to(d.device), tokenizer)


def model_to_evaluate(cfg, ckpt_path):
    """The sigma-GPT of a checkpoint (any form checkpoint_file takes; a plain GPT converted), else the one
    build_model makes from init_from; on the device, in eval mode, with its tokenizer spec."""
    if ckpt_path:
        ckpt = load_any_checkpoint(ckpt_path)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        if not model.config.double_position:
            model = sigma_from_ar(model)
        spec = ckpt["tokenizer"]
    else:
        meta = common.load_meta(cfg.data_dir)
        model, spec = build_model(cfg, meta), meta["tokenizer"]
    return model.eval(), spec


def evaluate_split(cfg, model, spec, d):
    """The three perplexities (evaluate) on cfg.split of data_dir; keys val_* or test_*, and the rows scored."""
    data_spec = common.load_meta(cfg.data_dir)["tokenizer"]
    if data_spec != spec:
        raise common.ConfigError(f"{cfg.ckpt or cfg.init_from} was trained with tokenizer {spec}, but {cfg.data_dir} "
                                 f"holds {data_spec}: another vocabulary")
    if cfg.block_size > model.config.block_size:
        raise common.ConfigError(f"block_size {cfg.block_size} is longer than the model's position table "
                                 f"({model.config.block_size} positions)")
    model.to(d.device).eval()
    autocast = common.autocast(d.device_type, common.resolve_dtype(cfg.dtype, d.device))
    rows, token_bytes = validation_set(cfg, spec, model.config.vocab_size, d.device, cfg.split)
    out = evaluate(model, rows, token_bytes, cfg, d, autocast)
    model.eval()
    out = {f"{cfg.split}_{k[len('val_'):]}": v for k, v in out.items()}
    return {**out, "split": cfg.split, "rows": len(rows), "block_size": cfg.block_size}


# -----------------------------------------------------------------------------
# compare: fair vs full (or any runs) on one split, with what each learned from


def run_dir_of(path):
    """The run folder of a run folder, RUN/latest, checkpoint-N folder or checkpoint file."""
    path = os.path.normpath(path)
    if os.path.basename(path) == "latest" or os.path.isfile(path):
        path = os.path.dirname(path)
    if common.SEED_CKPT_RE.match(os.path.basename(path)):
        path = os.path.dirname(path)
    return path


def learning_budget(run_cfg, results, train_records, steps):
    """What a run learned from: tokens through the model and tokens scored (fair mode scores round(share*T)
    of the T-1 targets: the seed's "~40% learning efficiency"), from its logged scored tokens per step."""
    T = run_cfg["block_size"]
    n_scored = num_scored(saved_config(run_cfg), T)
    scored_per_step = results.get("scored_tokens_per_step") or (train_records[-1]["scored_tokens"] if train_records
                                                                 else None)
    if scored_per_step is None:  # nothing logged: the run's own batch on one rank
        scored_per_step = n_scored * run_cfg["micro_batch_size"] * run_cfg["grad_accum_steps"]
    sequences_per_step = scored_per_step // n_scored
    return {"tokens_seen": steps * sequences_per_step * (T - 1), "tokens_scored": steps * scored_per_step,
            "learning_efficiency": n_scored / (T - 1), "sequences_per_step": sequences_per_step}


def saved_config(run_cfg):
    """The run's saved config as a Config (keys this version does not know are left out)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in run_cfg.items() if k in known})


def compare_runs(cfg, d):
    """Each run's newest checkpoint (or the checkpoint named) on the same rows of cfg.split in the same fixed
    orders, at cfg.block_size and cfg.scored_share; with each run's tokens seen and scored and its val curves.
    Writes comparison.json and comparison.png to out_dir (default out_root/sigmagpt_compare_<timestamp>)."""
    labels = cfg.labels or [os.path.basename(run_dir_of(r)) for r in cfg.runs]
    out_dir = cfg.out_dir or os.path.join(cfg.out_root, f"sigmagpt_compare_{time.strftime('%Y%m%d_%H%M%S')}")
    entries = []
    for label, path in zip(labels, cfg.runs):
        ckpt_file = checkpoint_file(path)
        if ckpt_file is None:
            raise common.ConfigError(f"runs: {path} is not a sigma-GPT run folder or checkpoint")
        ckpt = load_any_checkpoint(ckpt_file)
        run_dir = run_dir_of(ckpt["path"])
        run_cfg = ckpt.get("config") or {}
        model, spec = model_to_evaluate(cfg, ckpt["path"])
        scores = evaluate_split(dataclasses.replace(cfg, ckpt=ckpt["path"]), model, spec, d)
        log = os.path.join(run_dir, "log.jsonl")
        records_ = common.read_jsonl(log) if os.path.isfile(log) else []
        results_path = os.path.join(run_dir, "results.json")
        results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
        steps = ckpt["step"] + 1
        entry = {"label": label, "run": run_dir, "checkpoint": ckpt["path"], "steps": steps,
                 "mode": run_cfg.get("mode"), "order": run_cfg.get("order"), "scored_share": run_cfg.get("scored_share"),
                 **{k: v for k, v in scores.items() if k not in ("split", "rows", "block_size")}}
        if run_cfg.get("block_size"):
            entry.update(learning_budget(run_cfg, results, [r for r in records_ if r.get("type") == "train"], steps))
        entry["val_curve"] = [{"step": r["step"] + 1, **{k: r[k] for k in ("val_loss_l2r", "val_loss_random",
                                                                          "val_loss_fair") if k in r}}
                              for r in records_ if r.get("type") == "val" and r["step"] < steps]
        entries.append(entry)
    report = {"split": cfg.split, "data_dir": cfg.data_dir, "rows": scores["rows"], "block_size": cfg.block_size,
              "eval_orders": cfg.eval_orders, "eval_scored_share": cfg.scored_share, "runs": entries}
    if d.master:
        os.makedirs(out_dir, exist_ok=True)
        common.atomic_write_json(os.path.join(out_dir, "comparison.json"), report)
        plot_comparison(entries, os.path.join(out_dir, "comparison.png"))
        s = cfg.split
        print(f"{'run':<16} {'mode':<5} {'steps':>7} {'ppl l2r':>9} {'ppl random':>10} {'ppl fair':>9} "
              f"{'tok seen':>12} {'tok scored':>12} {'eff.':>5}")
        for e in entries:
            print(f"{e['label']:<16} {e['mode'] or '?':<5} {e['steps']:>7} {e[f'{s}_ppl_l2r']:>9.3f} "
                  f"{e[f'{s}_ppl_random']:>10.3f} {e[f'{s}_ppl_fair']:>9.3f} {e.get('tokens_seen', 0):>12,} "
                  f"{e.get('tokens_scored', 0):>12,} {e.get('learning_efficiency', 0):>5.2f}")
        print(f"({s} split of {cfg.data_dir}: {scores['rows']} rows of {cfg.block_size}; in {out_dir})")
    return report


def plot_comparison(entries, path):
    """Val loss against steps (left to right, random orders, fair) and, random orders, against tokens scored."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("val_loss_l2r", "left to right", "step"), ("val_loss_random", "random orders", "step"),
              ("val_loss_fair", "fair (conditional)", "step"), ("val_loss_random", "random orders", "scored")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title, x) in zip(axes, panels):
        for e in entries:
            pts = [(p["step"], p[key]) for p in e["val_curve"] if key in p]
            if x == "scored" and e.get("steps"):  # tokens scored grow linearly with the steps
                pts = [(s * e["tokens_scored"] / e["steps"], v) for s, v in pts]
            if pts:
                ax.plot(*zip(*pts), "o-", markersize=3, label=e["label"])
        ax.set(xlabel="tokens scored" if x == "scored" else "step", ylabel="val loss (nats/token)", title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# training: the plan, the state, one step, the records; train() puts them together


@dataclass
class Plan:
    """The shape of a run: sequences of T tokens, B per micro batch, accum micro batches a step, n_scored targets
    each; an epoch of steps_per_epoch steps (samples_per_epoch sequences), max_steps in all."""
    T: int
    B: int
    accum: int
    sequences_per_step: int
    n_scored: int
    samples_per_epoch: int
    steps_per_epoch: int
    max_steps: int


def plan_run(cfg, loader, world_size):
    """An epoch: max_samples sequences (or all the train shards hold), then the loader starts over."""
    T, B, accum = cfg.block_size, cfg.micro_batch_size, cfg.grad_accum_steps
    sequences_per_step = B * accum * world_size
    available = sum(len(common.read_shard(p)) - 1 for p in loader.shards) // (T - 1)
    samples_per_epoch = min(cfg.max_samples, available) if cfg.max_samples > 0 else available
    steps_per_epoch = max(1, samples_per_epoch // sequences_per_step)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    return Plan(T, B, accum, sequences_per_step, num_scored(cfg, T), samples_per_epoch, steps_per_epoch, max_steps)


@dataclass
class TrainState:
    """What a step changes and a checkpoint keeps; model is the wrapped module (DDP, compile), raw the plain one."""
    model: torch.nn.Module
    raw: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: common.ShardLoader
    autocast: object
    dtype: torch.dtype
    val: dict


def build_state(cfg, meta, ckpt, loader, d):
    """The model (a checkpoint's, else build_model's), optimizer, grad scaler, data position and RNG, restored
    from the checkpoint when resuming."""
    common.seed_everything(cfg.seed, d.device_type)
    if ckpt:
        raw = GPT(GPTConfig(**ckpt["model_config"]))
        raw.load_state_dict(ckpt["model"])
    else:
        raw = build_model(cfg, meta)
    raw.to(d.device)
    model = common.wrap_model(raw, d, cfg.compile)
    dtype = common.resolve_dtype(cfg.dtype, d.device)
    scaler = torch.amp.GradScaler(d.device_type, enabled=dtype == torch.float16)  # fp16 only: loss scaling
    optimizer = raw.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), d.device_type)
    state = TrainState(model, raw, optimizer, scaler, loader, common.autocast(d.device_type, dtype), dtype, {})
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.set_state(ckpt["loader"])
        common.set_rng_state(ckpt["rng"])
        state.val = ckpt.get("val", {})
    return state


def train_step(state, plan, cfg, d, step):
    """One optimizer step over plan.accum micro batches; returns device tensors (no host sync)."""
    if step > 0 and step % plan.steps_per_epoch == 0:
        state.loader.reset()  # a new epoch over the same max_samples sequences, in new orders
    share = random_share(cfg, step, plan.max_steps)
    state.optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=d.device)
    for micro in range(plan.accum):
        x, y = state.loader.next_batch()
        seq = torch.cat([x, y[:, -1:]], dim=1)
        perm = draw_orders(plan.B, plan.T, share, order_generator(cfg.seed, "train", d.rank, step, micro),
                           per_batch=cfg.order == "curriculum" and cfg.curriculum_granularity == "batch")
        x, pos, next_pos, y = (t.to(d.device, non_blocking=True) for t in sigma_batch(seq, perm, plan.n_scored))
        with state.model.no_sync() if d.ddp and micro < plan.accum - 1 else contextlib.nullcontext():
            with state.autocast:
                _, loss = state.model(x, y, position_ids=pos, target_position_ids=next_pos)
            # the mean over the scored tokens of the step (every micro batch scores the same number)
            loss = loss / plan.accum
            loss_accum += loss.detach()
            state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    lr = common.lr_at(step, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.warmup_steps, plan.max_steps)
    common.set_lr(state.optimizer, lr)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss_accum, grad_norm, lr


def save_state(out_dir, step, state, cfg, meta, run_identity, d):
    """checkpoint-N holds the weights after N optimizer steps, as the guide's (HF Trainer's) checkpoint-5000 at
    save_steps=5000; the state keeps the 0-based step index the loop resumes after."""
    raw = state.raw
    return common.save_training_checkpoint(out_dir, step + 1, {
        "kind": "sigmagpt", "model": raw.state_dict(), "model_config": dataclasses.asdict(raw.config),
        "tokenizer": meta["tokenizer"], "config": common.config_dict(cfg), "identity": run_identity, "step": step,
        "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(), "loader": state.loader.state(),
        "rng": common.rng_state(), "val": state.val}, d, cfg.keep_last_k, layout="seed")


# the guide's CSV log beside log.jsonl
CSV_FIELDS = ["step", "epoch", "loss", "lr", "scored_tokens", "tokens_per_sec", "val_loss_l2r", "val_loss_random",
              "val_loss_fair"]


def open_csv_log(out_dir, ckpt):
    """logs/training_log.csv: a header for a fresh run; a resumed one loses the rows past its checkpoint (a crash
    between checkpoints), which it logs again."""
    csv_path = os.path.join(out_dir, "logs", "training_log.csv")
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    if ckpt:
        trim_csv(csv_path, ckpt["step"])
    else:
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(CSV_FIELDS)
    return csv_path


def append_csv(csv_path, row):
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow([row.get(k, "") for k in CSV_FIELDS])


def plot_run(out_dir, cfg):
    common.plot_log_curves(out_dir, [
        ("sigma-GPT " + os.path.basename(os.path.normpath(out_dir)), "loss (nats/token)",
         [("train", "loss", "train"), ("val", "val_loss_l2r", "val, left to right"),
          ("val", "val_loss_random", f"val, {cfg.eval_orders} random orders"),
          ("val", "val_loss_fair", f"val, fair (scored share {cfg.scored_share})")])])


def train(cfg, d, stop):
    meta = common.load_meta(cfg.data_dir)
    train_loader = common.ShardLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.block_size - 1, d.rank,
                                      d.world_size)
    plan = plan_run(cfg, train_loader, d.world_size)
    T, max_steps, steps_per_epoch = plan.T, plan.max_steps, plan.steps_per_epoch
    out_dir = run_folder(cfg, d)

    # ---- where to start: fresh, or from a checkpoint (model, optimizer, scaler, step, data position, RNG)
    run_identity = identity(cfg)
    ckpt = common.restore(out_dir, cfg.resume, "sigmagpt", run_identity, d.master)
    start_step = ckpt["step"] + 1 if ckpt else 0
    finished = common.already_finished(ckpt, max_steps, d)
    if finished:
        return finished
    state = build_state(cfg, meta, ckpt, train_loader, d)
    # validation during training: always the first val_batches x micro_batch_size rows (eval_rows is mode=eval's)
    val_rows, token_bytes = validation_set(dataclasses.replace(cfg, eval_rows=0), meta["tokenizer"],
                                           state.raw.config.vocab_size, d.device)

    logger = common.Logger(out_dir, d.master, resume=ckpt is not None, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=common.config_dict(cfg))
    csv_path = open_csv_log(out_dir, ckpt) if d.master else None
    if d.master:
        common.atomic_write_json(os.path.join(out_dir, "config.json"), common.config_dict(cfg))
    scored_per_step = plan.n_scored * plan.sequences_per_step
    peak, device_name = common.peak_flops(d.device_type)
    logger.info(f"sigma-GPT {cfg.mode} mode, order {cfg.order}: {state.raw.num_params() / 1e6:.2f}M non-embedding "
                f"params from {cfg.init_from} | {d.device} x{d.world_size} ({device_name}), {state.dtype}, "
                f"{plan.sequences_per_step} sequences of {T} tokens/step = {plan.B} x {plan.accum} accum x "
                f"{d.world_size} ranks | {scored_per_step} scored tokens/step | {max_steps} steps "
                f"({steps_per_epoch}/epoch of {plan.samples_per_epoch} sequences) | {out_dir}")
    if ckpt:
        logger.info(f"resumed from {ckpt['path']} at step {start_step}")

    save = functools.partial(save_state, out_dir, state=state, cfg=cfg, meta=meta, run_identity=run_identity, d=d)
    stopped = common.stopped_before_start(stop, d, logger, start_step)
    if stopped:
        return stopped

    # ---- the loop
    watch = common.NonFiniteWatch(d.device)  # NaN/Inf in loss or gradients, remembered without a host sync
    # tokens through the model, scored or not (fair mode masks only the loss)
    tokens_per_step = plan.sequences_per_step * (T - 1)
    timer = common.StepTimer(d.device_type, state.raw.flops_per_token(T - 1), peak, d.world_size)
    run_t0 = time.time()
    train_loss, status, step = None, "done", start_step - 1
    logger.progress(total=max_steps, initial=start_step)
    for step in range(start_step, max_steps):
        loss_accum, grad_norm, lr = train_step(state, plan, cfg, d, step)
        timer.step(tokens_per_step)
        # under fp16 an overflowing gradient is the grad scaler's business (it skips that step), not divergence
        watch.update(step, loss_accum, None if state.scaler.is_enabled() else grad_norm)
        logger.bar.update(1)
        due = common.due(step, max_steps, cfg.log_interval, cfg.ckpt_interval, cfg.val_interval, cfg.stop_after_step,
                         first_step=start_step)
        signal_stop = stop.check(d, sync=due.log)  # under DDP the ranks agree on a signal at log points
        if not (due.log or signal_stop):
            continue

        train_loss, norm = common.all_reduce(loss_accum, "avg", d).item(), grad_norm.item()
        common.stop_if_diverged(watch, d, logger, out_dir)
        speed = timer.lap()
        record = {"type": "train", "step": step, "epoch": step // steps_per_epoch, "loss": train_loss, "lr": lr,
                  "grad_norm": norm, "scored_tokens": scored_per_step,
                  "random_share": random_share(cfg, step, max_steps), **speed}
        logger.log(record)
        logger.postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed.get('tokens_per_sec', 0):,.0f}")
        row = dict(record)
        if due.eval and cfg.val_batches > 0:
            state.val = evaluate(state.raw, val_rows, token_bytes, cfg, d, state.autocast)
            logger.log({"type": "val", "step": step, **state.val})
            row.update(state.val)
        if d.master:
            append_csv(csv_path, row)
        status = common.save_or_exit(due, signal_stop, stop, step, save, logger) or status
        if status != "done":
            break
        timer.restart()  # evaluation and saving are not training time

    speed = timer.summary()
    results = {"status": status, "steps": step + 1, "final_train_loss": train_loss, **state.val, "order": cfg.order,
               **({"curriculum_granularity": cfg.curriculum_granularity} if cfg.order == "curriculum" else {}),
               "scored_tokens_per_step": scored_per_step, "tokens_per_sec": speed["tokens_per_sec"],
               "mfu": speed["mfu"], "peak_mem_gb": speed["peak_mem_gb"], "seconds": time.time() - run_t0,
               "world_size": d.world_size, "device": device_name, "out_dir": out_dir,
               "resumed_from_step": start_step - 1 if ckpt else None}
    common.finish(out_dir, results, d, logger)
    if d.master:
        plot_run(out_dir, cfg)
        if status == "done":
            logger.info(f"done: {step + 1} steps, train loss {train_loss:.4f}, results in {out_dir}")
    return results


def trim_csv(csv_path, step):
    """Drop the CSV rows after `step`: the resumed run logs them again."""
    if os.path.isfile(csv_path):
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
        with open(csv_path + ".tmp", "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(csv_path + ".tmp", csv_path)


if __name__ == "__main__":
    common.run_main(main, preemptible=True)

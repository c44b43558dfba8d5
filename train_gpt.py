"""
GPT-2 pretraining in one file, build-nanogpt style: read it top to bottom.

    python train_gpt.py configs/demo.yaml                          # one process: cuda, mps or cpu
    torchrun --nproc_per_node=4 train_gpt.py configs/gpt2_124m_10b.yaml
    python train_gpt.py configs/demo.yaml resume=latest            # continue exactly where it stopped
    python train_gpt.py configs/demo.yaml bench=true               # tokens/s and MFU, no checkpoints

What happens in a step: `grad_accum_steps` micro batches of (micro_batch_size, block_size) tokens per
rank are pushed through the model (bf16 autocast on cuda), their gradients summed (DDP all-reduces
only on the last one), clipped to norm 1.0, and AdamW takes one step at the learning rate of a linear
warmup + cosine schedule. One step always consumes `total_batch_size` tokens over all ranks.

Checkpoints hold everything needed to continue bit for bit: weights, optimizer, step, the data
loader's position and the RNG state. SIGTERM / SIGUSR1 (SLURM preemption or time limit) only set a
flag; at the next step boundary the run saves a checkpoint and exits with code 0. That holds from process
start to exit: a signal during start-up (the imports take seconds) ends the run before its first step with
exit code 0 (nothing new to save), and one after the last checkpoint lets the run finish and exit 0.
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F

from model import GPT, GPTConfig, MODEL_SIZES, from_hf, model_config
from tasks.hellaswag import encode_items, hellaswag_eval, load_hellaswag


@dataclass
class Config:
    # data: token shards + meta.json written by prepare_data.py
    data_dir: str = "data/fineweb_edu_10b"
    tokenizer: Optional[str] = None  # expected tokenizer kind of the data (gpt2|byte); checked against meta.json
    tokenizer_file: Optional[str] = None  # GPT-2 ranks file for offline use (only HellaSwag needs the tokenizer)
    # model: a size from model.MODEL_SIZES, optionally reshaped; or HF GPT-2 weights to start from
    model: str = "gpt2"
    n_layer: int = 0  # 0 = the size's default
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 1024  # sequence length T
    dropout: float = 0.0
    init_from: str = "scratch"  # scratch | an HF GPT-2 hub id (gpt2, gpt2-medium, ...) or a local HF folder
    # batch: tokens per optimizer step over all ranks = micro_batch_size * block_size * world_size * accum
    micro_batch_size: int = 32  # sequences per forward pass per GPU
    total_batch_size: int = 524288  # 2**19 tokens, as GPT-3 small
    # optimisation
    max_steps: int = 19073  # 10B tokens / 2**19
    warmup_steps: int = 715
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to max_lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on cuda, else fp32) | bfloat16 | float32 (or bf16 | fp32)
    compile: bool = True  # torch.compile on cuda (never on cpu/mps, where it costs more than it gives)
    # output, evaluation, checkpoints
    out_dir: str = "out/gpt2_124m"
    log_interval: int = 10  # steps between train-loss records (the only per-step host syncs)
    val_interval: int = 250  # steps between validation losses (0 = never; always at the end)
    val_steps: int = 20  # validation = the first val_steps x micro_batch_size rows of the val split, in total
                         # over all ranks: one fixed set, whatever the world size
    hellaswag_file: Optional[str] = None  # e.g. ../shared/data/hellaswag/hellaswag_val_full.txt
    hellaswag_interval: int = 0  # 0 = at checkpoint steps and the end (the seed's protocol); N = every N steps
    hellaswag_limit: int = 0  # 0 = all items
    hellaswag_batch: int = 16  # items (4 rows each) per forward
    ckpt_interval: int = 2000  # steps between checkpoints (0 = only at the end)
    keep_last_k: int = 0  # keep only the newest k checkpoints (0 = keep all)
    resume: Optional[str] = None  # latest (newest in out_dir, or a fresh start if none) | a checkpoint path
    stop_after_step: int = -1  # end this invocation after this step with a checkpoint, as if preempted
    tensorboard: bool = False  # also log to out_dir/tensorboard (tags <record type>/<key>)
    wandb_project: Optional[str] = None  # also log to this W&B project (wandb imported only when set)
    # benchmark: time bench_steps steps after bench_warmup, print tokens/s and MFU, write results.json, exit
    bench: bool = False
    bench_steps: int = 20
    bench_warmup: int = 5
    peak_flops: float = 0.0  # accelerator peak FLOP/s for MFU; 0 = look the GPU up in PEAK_BF16_FLOPS


TrainingDiverged = common.TrainingDiverged  # the name callers (and tests) already use


def check_config(cfg):
    """Mistakes that need no data or devices to spot: refuse them before anything starts."""
    if cfg.model not in MODEL_SIZES:
        raise common.ConfigError(f"model '{cfg.model}' is not a known size; choose from {', '.join(MODEL_SIZES)}")
    common.resolve_dtype(cfg.dtype, "cpu")  # raises on a name outside the one dtype vocabulary
    for key in ("micro_batch_size", "total_batch_size", "block_size", "max_steps", "log_interval", "bench_steps",
                "hellaswag_batch"):
        if getattr(cfg, key) <= 0:
            raise common.ConfigError(f"config key '{key}' must be positive, got {getattr(cfg, key)}")
    for key in ("max_lr", "min_lr_ratio", "weight_decay", "warmup_steps", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise common.ConfigError(f"config key '{key}' must not be negative, got {getattr(cfg, key)}")
    if cfg.tokenizer is not None and cfg.tokenizer not in ("gpt2", "byte"):
        raise common.ConfigError(f"tokenizer '{cfg.tokenizer}' is not one of gpt2, byte")


# what the weights are: a resumed run cannot change these, nor the data (compared by content, not by the path's
# spelling); the rest, e.g. max_steps or the lr, it may
SHAPE_KEYS = ("model", "n_layer", "n_head", "n_embd", "block_size", "init_from")


def identity(cfg):
    return common.run_identity(cfg, SHAPE_KEYS, data=common.fingerprint(cfg.data_dir))


def grad_accum_steps(cfg, world_size):
    tokens_per_micro_step = cfg.micro_batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % tokens_per_micro_step:
        raise common.ConfigError(
            f"total_batch_size {cfg.total_batch_size} is not divisible by micro_batch_size * block_size * world_size "
            f"= {cfg.micro_batch_size} * {cfg.block_size} * {world_size} = {tokens_per_micro_step}")
    return cfg.total_batch_size // tokens_per_micro_step


def build_model(cfg, vocab_size):
    """A fresh GPT of the configured size, or HF GPT-2 weights copied into a model with a padded vocabulary."""
    if cfg.init_from == "scratch":
        return GPT(model_config(cfg.model, vocab_size, cfg.block_size, cfg.dropout,
                                cfg.n_layer or None, cfg.n_head or None, cfg.n_embd or None))
    if os.path.isfile(cfg.init_from):
        raise common.ConfigError(f"init_from={cfg.init_from} is a file: init_from takes an HF GPT-2 hub id or a local "
                                 "HF folder; to continue a checkpoint of this repository use resume=PATH")
    pretrained = from_hf(cfg.init_from)
    pc = pretrained.config
    if cfg.block_size > pc.block_size:
        raise common.ConfigError(f"block_size {cfg.block_size} exceeds the {pc.block_size} positions of {cfg.init_from}")
    # keep every pretrained row and all positions (so the export stays HF-shaped); pad the vocab for speed
    config = GPTConfig(block_size=pc.block_size, vocab_size=max(vocab_size, common.padded_vocab_size(pc.vocab_size)),
                       n_layer=pc.n_layer, n_head=pc.n_head, n_embd=pc.n_embd, dropout=cfg.dropout, bias=pc.bias)
    model = GPT(config)
    source = pretrained.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v[:source[k].shape[0]].copy_(source[k])  # rows past the real vocab keep their random init
            else:
                v.copy_(source[k])
    return model


def evaluate_val_loss(model, val_rows, token_bytes, cfg, d, autocast):
    """Loss on the fixed validation rows (rank r scores rows r, r + W, ...; sums all-reduced, so the number is
    the same whatever the world size): mean nats per token, and bits per byte when the token byte lengths are
    known (special tokens count 0 bytes and are left out of the bpb sum, as nanochat does)."""
    model.eval()
    sums = torch.zeros(4, device=d.device, dtype=torch.float64)  # nats, tokens, nats on byte tokens, bytes
    with torch.no_grad():
        mine = val_rows[d.rank::d.world_size]
        for i in range(0, len(mine), cfg.micro_batch_size):
            rows = mine[i:i + cfg.micro_batch_size].to(d.device)
            x, y = rows[:, :-1], rows[:, 1:]
            with autocast:
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            sums[0] += nats.sum()
            sums[1] += nats.numel()
            if token_bytes is not None:
                nbytes = token_bytes[y.flatten()]
                sums[2] += (nats * (nbytes > 0)).sum()
                sums[3] += nbytes.sum()
    model.train()
    nats, tokens, byte_nats, nbytes = common.all_reduce(sums, "sum", d).tolist()
    bpb = byte_nats / math.log(2) / nbytes if token_bytes is not None and nbytes > 0 else None
    return nats / max(tokens, 1), bpb


def evaluate_hellaswag(model, encoded_items, cfg, d, autocast):
    """acc / acc_norm / acc_norm_char over the pre-tokenized items: each rank scores its share, hellaswag_batch
    items per forward, and the counts are summed over ranks."""

    def logits_fn(idx):
        with autocast:
            return model(idx)[0].float()

    model.eval()
    counts = hellaswag_eval(logits_fn, encoded_items, d.device, d.rank, d.world_size, d.master, cfg.hellaswag_batch)
    model.train()
    c = torch.tensor([counts["correct"], counts["correct_norm"], counts["correct_norm_char"], counts["n"]],
                     dtype=torch.long, device=d.device)
    correct, correct_norm, correct_norm_char, n = common.all_reduce(c, "sum", d).tolist()
    return {"acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1),
            "acc_norm_char": correct_norm_char / max(n, 1), "n": n}


def main(argv=None):
    cfg = common.load_config(Config, argv)
    check_config(cfg)
    return common.launch(train, cfg)


def load_data_meta(cfg):
    """meta.json of the data, checked against the tokenizer the config expects."""
    meta = common.load_meta(cfg.data_dir)
    if cfg.tokenizer is not None and meta["tokenizer"]["kind"] != cfg.tokenizer:
        raise common.ConfigError(f"tokenizer '{cfg.tokenizer}' was asked for, but {cfg.data_dir} holds "
                                 f"'{meta['tokenizer']['kind']}' tokens")
    return meta


@dataclass
class Training:
    """The trained objects: the (wrapped) model, its plain module, the optimizer and the train loader."""
    model: torch.nn.Module
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    train_loader: common.ShardLoader


def build_training(cfg, d, meta, ckpt):
    """The model on the device (from the checkpoint, or built fresh), wrapped for compile / DDP, its optimizer
    and the train loader; a checkpoint also restores the optimizer, the loader's position and the RNG state."""
    common.seed_everything(cfg.seed, d.device_type)
    if ckpt:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = build_model(cfg, common.padded_vocab_size(meta["vocab_size"]))
    if meta["vocab_size"] > model.config.vocab_size:
        raise common.ConfigError(f"data vocab {meta['vocab_size']} exceeds the model's {model.config.vocab_size}")
    model.to(d.device)
    raw_model = model  # plain module: checkpoints, evaluation (variable shapes would recompile)
    model = common.wrap_model(model, d, cfg.compile)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), d.device_type)
    train_loader = common.ShardLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.block_size,
                                      d.rank, d.world_size)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.set_state(ckpt["loader"])
        common.set_rng_state(ckpt["rng"])
    return Training(model, raw_model, optimizer, train_loader)


def eval_data(cfg, d, meta, raw_model):
    """What evaluation reads, prepared once: the fixed validation rows, the token byte lengths for bits per byte
    (None without a tokenizer) and the tokenized HellaSwag items (None unless hellaswag_file is set)."""
    # every val shard is read now (a corrupt one fails here, not at the first validation hours in)
    val_rows = (common.validation_rows(cfg.data_dir, cfg.val_steps * cfg.micro_batch_size, cfg.block_size)
                if cfg.val_steps > 0 else None)  # val_steps=0: no validation
    tokenizer = token_bytes = hellaswag_items = None
    try:
        tokenizer = common.Tokenizer.from_spec(meta["tokenizer"], cfg.tokenizer_file)
        token_bytes = common.token_byte_lengths(tokenizer, raw_model.config.vocab_size).to(d.device)
    except RuntimeError as e:  # GPT-2 ranks unavailable offline: no bits per byte (HellaSwag needs them, below)
        print(f"warning: no tokenizer, so no val bits per byte: {str(e).splitlines()[0]}", file=sys.stderr)
    if cfg.hellaswag_file and not cfg.bench:
        if tokenizer is None:
            try:
                tokenizer = common.Tokenizer.from_spec(meta["tokenizer"], cfg.tokenizer_file)
            except RuntimeError as e:
                raise common.ConfigError(f"hellaswag_file needs the data's tokenizer: {e}") from e
        # tokenized once here, not at every evaluation; contexts longer than the block lose tokens from the left
        hellaswag_items = encode_items(tokenizer, load_hellaswag(cfg.hellaswag_file, cfg.hellaswag_limit or None),
                                       max_len=raw_model.config.block_size)
    return val_rows, token_bytes, hellaswag_items


def train_step(cfg, d, run, autocast, accum, step):
    """One optimizer step over `accum` micro batches; returns device tensors (no host sync) and the lr."""
    run.optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=d.device)
    for micro in range(accum):
        x, y = run.train_loader.next_batch()
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        # DDP all-reduces gradients only on the last micro step; before that they just accumulate
        # (no_sync must cover the forward too: DDP arms its reducer there)
        with run.model.no_sync() if d.ddp and micro < accum - 1 else contextlib.nullcontext():
            with autocast:
                _, loss = run.model(x, y)
            loss = loss / accum  # the mean over the whole step, not a sum over micro batches
            loss_accum += loss.detach()
            loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = common.lr_at(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
    common.set_lr(run.optimizer, lr)
    run.optimizer.step()
    return loss_accum, grad_norm, lr


def save_run(cfg, d, run, meta, run_identity, step, val_loss, val_bpb):
    raw = run.raw_model
    return common.save_training_checkpoint(cfg.out_dir, step, {
        "kind": "gpt", "model": raw.state_dict(), "model_config": dataclasses.asdict(raw.config),
        "tokenizer": meta["tokenizer"], "config": common.config_dict(cfg), "identity": run_identity, "step": step,
        "optimizer": run.optimizer.state_dict(), "loader": run.train_loader.state(), "rng": common.rng_state(),
        "val_loss": val_loss, "val_bpb": val_bpb}, d, cfg.keep_last_k)


def train(cfg, d, stop):
    accum = grad_accum_steps(cfg, d.world_size)
    meta = load_data_meta(cfg)

    # ---- where to start: fresh, or from a checkpoint (model, optimizer, step, data position, RNG)
    run_identity = identity(cfg)
    ckpt = None if cfg.bench else common.restore(cfg.out_dir, cfg.resume, "gpt", run_identity, d.master)
    start_step = ckpt["step"] + 1 if ckpt else 0
    finished = common.already_finished(ckpt, cfg.max_steps, d)
    if finished:
        return finished
    run = build_training(cfg, d, meta, ckpt)
    val_loss, val_bpb = (ckpt.get("val_loss"), ckpt.get("val_bpb")) if ckpt else (None, None)
    dtype = common.resolve_dtype(cfg.dtype, d.device)
    autocast = common.autocast(d.device_type, dtype)
    val_rows, token_bytes, hellaswag_items = eval_data(cfg, d, meta, run.raw_model)

    logger = common.Logger(cfg.out_dir, d.master, resume=ckpt is not None, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=common.config_dict(cfg))
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
    n_params = run.raw_model.num_params()
    peak, device_name = common.peak_flops(d.device_type, cfg.peak_flops)
    logger.info(f"model {cfg.model if cfg.init_from == 'scratch' else cfg.init_from}: {n_params / 1e6:.2f}M "
                f"non-embedding params, vocab {run.raw_model.config.vocab_size} | device {d.device} x{d.world_size} "
                f"({device_name}), {str(dtype).replace('torch.', '')}, compile {cfg.compile and d.device_type == 'cuda'}"
                f" | {cfg.total_batch_size} tokens/step = {cfg.micro_batch_size} x {cfg.block_size} x "
                f"{d.world_size} ranks x {accum} accum")
    if ckpt:
        logger.info(f"resumed from {ckpt['path']} at step {start_step}")
    if cfg.bench:
        return bench(cfg, d, run, autocast, accum, logger)
    stopped = common.stopped_before_start(stop, d, logger, start_step)
    if stopped:
        return stopped

    # ---- the loop
    watch = common.NonFiniteWatch(d.device)  # NaN/Inf in loss or gradients, remembered without a host sync
    timer = common.StepTimer(d.device_type, run.raw_model.flops_per_token(cfg.block_size), peak, d.world_size)
    run_t0 = time.time()
    train_loss, hellaswag, status, step = None, None, "done", start_step - 1
    logger.progress(total=cfg.max_steps, initial=start_step)
    for step in range(start_step, cfg.max_steps):
        loss_accum, grad_norm, lr = train_step(cfg, d, run, autocast, accum, step)
        timer.step(cfg.total_batch_size)
        watch.update(step, loss_accum, grad_norm)
        logger.bar.update(1)
        due = common.due(step, cfg.max_steps, cfg.log_interval, cfg.ckpt_interval, cfg.val_interval,
                         cfg.stop_after_step, first_step=start_step)
        hella_now = hellaswag_items is not None and (
            due.ckpt if cfg.hellaswag_interval == 0 else due.last or (step + 1) % cfg.hellaswag_interval == 0)
        # a signal stops the run at a step boundary; under DDP the ranks agree on it at log points
        signal_stop = stop.check(d, sync=due.log or hella_now)
        if not (due.log or hella_now or signal_stop):
            continue

        # the rank average and the host sync of this interval (gradients are already all-reduced)
        train_loss, norm = common.all_reduce(loss_accum, "avg", d).item(), grad_norm.item()
        common.stop_if_diverged(watch, d, logger, cfg.out_dir)
        speed = timer.lap()
        logger.log({"type": "train", "step": step, "loss": train_loss, "lr": lr, "grad_norm": norm, **speed,
                    "tokens": (step + 1) * cfg.total_batch_size})
        logger.postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed.get('tokens_per_sec', 0):,.0f}")
        if due.eval and cfg.val_steps > 0:
            val_loss, val_bpb = evaluate_val_loss(run.raw_model, val_rows, token_bytes, cfg, d, autocast)
            logger.log({"type": "val", "step": step, "val_loss": val_loss, "val_bpb": val_bpb,
                        "val_rows": len(val_rows)})
        if hella_now:
            hellaswag = evaluate_hellaswag(run.raw_model, hellaswag_items, cfg, d, autocast)
            logger.log({"type": "hellaswag", "step": step, **hellaswag})
        # a signal or stop_after_step ends the run here, after its checkpoint (the last step ends it anyway)
        save = lambda s: save_run(cfg, d, run, meta, run_identity, s, val_loss, val_bpb)  # noqa: E731
        status = common.save_or_exit(due, signal_stop, stop, step, save, logger) or status
        if status != "done":
            break
        timer.restart()  # evaluation and saving are not training time

    speed = timer.summary()
    results = {
        "status": status, "steps": step + 1, "final_train_loss": train_loss, "final_val_loss": val_loss,
        "final_val_bpb": val_bpb,
        "tokens_seen": (step + 1) * cfg.total_batch_size, "tokens_per_sec": speed["tokens_per_sec"],
        "tokens_per_sec_per_device": speed["tokens_per_sec"] / d.world_size if speed["tokens_per_sec"] else None,
        "mfu": speed["mfu"], "peak_mem_gb": speed["peak_mem_gb"],
        "seconds": time.time() - run_t0, "n_params": n_params, "world_size": d.world_size, "device": device_name,
        "hellaswag_acc_norm": hellaswag["acc_norm"] if hellaswag else None,
        "resumed_from_step": start_step - 1 if ckpt else None,
    }
    common.finish(cfg.out_dir, results, d, logger)
    if d.master:
        plot_curves(cfg.out_dir)
        if status == "done":
            logger.info(f"done: {step + 1} steps, train loss {train_loss:.4f}, val loss "
                        f"{val_loss if val_loss is None else round(val_loss, 4)}, results in {cfg.out_dir}")
    return results


def plot_curves(out_dir):
    """loss.png from log.jsonl: train and val loss against step, HellaSwag acc_norm beside them if measured."""
    common.plot_log_curves(out_dir, [
        (os.path.basename(os.path.normpath(out_dir)), "loss (nats/token)",
         [("train", "loss", "train loss"), ("val", "val_loss", "val loss")]),
        ("HellaSwag", "accuracy", [("hellaswag", "acc_norm", "acc_norm (per token)"),
                                   ("hellaswag", "acc_norm_char", "acc_norm_char (per character)")])])


def bench(cfg, d, run, autocast, accum, logger):
    """Throughput of full optimizer steps: bench_warmup untimed steps (compile, allocator), then bench_steps."""
    n_params, flops_per_token = run.raw_model.num_params(), run.raw_model.flops_per_token(cfg.block_size)
    peak, device_name = common.peak_flops(d.device_type, cfg.peak_flops)
    for step in common.progress(range(cfg.bench_warmup), master=d.master, desc="bench warm-up"):
        train_step(cfg, d, run, autocast, accum, step)
    common.synchronize(d.device_type)
    t0 = time.time()
    for step in common.progress(range(cfg.bench_warmup, cfg.bench_warmup + cfg.bench_steps), master=d.master,
                                desc="bench"):
        loss_accum, _, _ = train_step(cfg, d, run, autocast, accum, step)
    loss = loss_accum.item()
    common.synchronize(d.device_type)
    seconds = time.time() - t0
    tokens_per_sec = cfg.bench_steps * cfg.total_batch_size / seconds
    per_device = tokens_per_sec / d.world_size
    mfu = common.mfu(per_device, flops_per_token, peak)
    results = {"bench": True, "model": cfg.model, "n_params": n_params, "block_size": cfg.block_size,
               "micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": accum, "world_size": d.world_size,
               "dtype": cfg.dtype, "device": device_name, "bench_steps": cfg.bench_steps,
               "step_ms": 1000 * seconds / cfg.bench_steps, "tokens_per_sec": tokens_per_sec,
               "tokens_per_sec_per_device": per_device, "flops_per_token": flops_per_token, "peak_flops": peak,
               "mfu": mfu, "final_train_loss": loss}
    logger.log({"type": "bench", **{k: v for k, v in results.items() if k != "bench"}}, echo=False)
    mfu_text = f"MFU {100 * mfu:.1f}% of {peak / 1e12:.1f} TFLOP/s" if mfu is not None else "MFU n/a"
    logger.info(f"bench: {tokens_per_sec:,.0f} tokens/s ({per_device:,.0f} tokens/s per device, "
                f"{results['step_ms']:.1f} ms/step) | {mfu_text} | {device_name}")
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
    return results


if __name__ == "__main__":
    common.run_main(main, preemptible=True)

"""
Shared plumbing for every stage: distributed setup, checkpoints, the training loop's helpers and the
shard loader. Its torch-free half (config, JSON files, token shards, the tokenizer, logging) lives in
dataio.py, so that the data path runs without torch; every name of it is re-exported here.
"""
import dataio  # first: it installs the stop-signal handlers before the slow imports (torch) of a stage
from dataio import (  # noqa: F401  (re-exported: the stages write common.load_config, common.Tokenizer, ...)
    BYTE_ENCODER, CONFIG_ALIASES, EXPECTED_ERRORS, GPT2_EOT, GPT2_PATTERN, HEADER_BYTES, HEADER_INTS, MUL_RE,
    RECEIVED_SIGNALS, SHARD_MAGIC, SHARD_VERSION, ConfigError, Interrupted, Logger, ShardError, Tokenizer,
    atomic_write_json, build_hf_tokenizer, bytes_to_unicode, config_dict, config_help, find_shards, format_record,
    gpt2_ranks, hf_tokenizer, load_config, load_meta, merges_from_ranks, iter_jsonl, mul_split_regex, mul_token_strings,
    padded_vocab_size, progress, read_jsonl, read_shard, sample_text, token_dtype, token_str, write_shard)

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
# shared data for tests and local runs sits beside the repository (never copied into it)
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def run_main(main, expected=(), preemptible=False):
    """dataio.run_main with a diverged run among the expected endings (one line, exit 1)."""
    dataio.run_main(main, tuple(expected) + (TrainingDiverged,), preemptible)


# -----------------------------------------------------------------------------
# distributed: one process per GPU under torchrun, else a single process on cuda/mps/cpu


@dataclasses.dataclass
class Dist:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]


def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device):
    """The one dtype vocabulary of every stage: auto (bf16 on cuda, else fp32) | float32 | bfloat16 | float16,
    or their short names fp32 | bf16 | fp16 -> a torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def autocast(device_type, dtype):
    """Mixed precision for bf16/fp16 (weights stay fp32), nothing for fp32."""
    import contextlib
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def vllm_available():
    """vLLM is the fast path only where it is installed and CUDA is present (never imported otherwise)."""
    import importlib.util
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def setup_dist(device="auto"):
    """Initialise torch.distributed when launched by torchrun (RANK set), else a single process."""
    if int(os.environ.get("RANK", -1)) != -1:
        import torch.distributed as dist
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        else:
            dev = "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return Dist(True, rank, local_rank, world_size, dev)
    dev = autodetect_device() if device == "auto" else device
    return Dist(False, 0, 0, 1, dev)


def cleanup_dist(d):
    if d.ddp:
        import torch.distributed as dist
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# files: atomic writes, checkpoints



CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
SEED_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")  # the seeds' layout: checkpoint-5000/model.pt
SHARDED_CKPT_RE = re.compile(r"^ckpt_(\d+)\.dcp$")  # FSDP: a torch.distributed.checkpoint folder
CHECKPOINT_LAYOUTS = ("ckpt", "seed")


def checkpoint_path(out_dir, step, layout="ckpt"):
    """ckpt_000100.pt (layout ckpt) or checkpoint-100/model.pt (layout seed: step numbers as the seeds count)."""
    if layout == "seed":
        return os.path.join(out_dir, f"checkpoint-{step}", "model.pt")
    return os.path.join(out_dir, f"ckpt_{step:06d}.pt")


def list_checkpoints(out_dir):
    """All finished checkpoints of a run folder in either layout, sorted by step: [(step, path), ...]."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = CKPT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
        m = SEED_CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(out_dir, name, "model.pt")):
            found.append((int(m.group(1)), os.path.join(out_dir, name, "model.pt")))
        m = SHARDED_CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(out_dir, name, "extra.pt")):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def remove_checkpoint(path):
    """A checkpoint file, or its checkpoint-N folder in the seed layout."""
    import shutil
    folder = os.path.dirname(path)
    if os.path.basename(path) == "model.pt" and SEED_CKPT_RE.match(os.path.basename(folder)):
        shutil.rmtree(folder, ignore_errors=True)
    elif os.path.isdir(path):  # a sharded checkpoint
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


def save_checkpoint(path, state):
    """Write to a temporary name then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_checkpoint(path_or_dir):
    """A checkpoint file, or `DIR/latest` / a run folder meaning its newest checkpoint."""
    p = path_or_dir
    if os.path.basename(p) == "latest":
        p = os.path.dirname(p) or "."
    if os.path.isfile(os.path.join(p, "extra.pt")):  # a sharded checkpoint is a folder
        return p
    if os.path.isfile(os.path.join(p, "model.pt")) and SEED_CKPT_RE.match(os.path.basename(os.path.normpath(p))):
        return os.path.join(p, "model.pt")  # a checkpoint-N folder of the seed layout
    if os.path.isdir(p):
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints (ckpt_*.pt, checkpoint-N/model.pt or ckpt_*.dcp) in {p}")
        return ckpts[-1][1]
    if not os.path.isfile(p):
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path, expected_kind=None, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint; refuse files that are not ours or of another model."""
    path = resolve_checkpoint(path)
    if os.path.isdir(path):
        return load_sharded_extra(path, expected_kind)
    try:
        # weights_only: a checkpoint is a pickle, and only tensors, numbers, strings and containers may come out
        # of it; a file that would build other objects (or run code) is refused, not executed
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if blocked:
            raise ValueError(f"{path} holds objects other than tensors, numbers, strings and lists; refusing to "
                             f"load it (a checkpoint is a pickle and could run code): {blocked[0]}") from e
        raise ValueError(f"could not read checkpoint {path}: not a readable torch file") from e
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this repository (no 'model'/'model_config' entries)")
    kind = ckpt.get("kind", "gpt")
    if expected_kind is not None and kind != expected_kind:
        raise ValueError(f"{path} holds a '{kind}' model, expected a '{expected_kind}' checkpoint")
    ckpt["path"] = path
    return ckpt


def rng_state():
    """Every generator's state as tensors, numbers and lists, so a checkpoint loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                            has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: resumable on fewer GPUs
    return state


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# the training loop's plumbing: small functions every trainer calls (its loop stays in its own script)


class TrainingDiverged(RuntimeError):
    pass


def seed_everything(seed, device_type="cpu"):
    """The same seed on every rank: identical initial weights without a broadcast."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain


def start_or_resume(out_dir, resume, kind):
    """The checkpoint to continue from, or None for a fresh start. resume=None refuses a folder that already
    holds checkpoints (nothing is overwritten by accident); 'latest' takes the newest checkpoint that loads,
    stepping back past a truncated or corrupt one with a warning; any other value is a checkpoint path."""
    if not resume:
        if list_checkpoints(out_dir):
            raise ConfigError(f"{out_dir} already holds checkpoints; continue with resume=latest, or choose another out_dir")
        return None
    if resume != "latest":
        return load_checkpoint(resume, expected_kind=kind)
    for step, path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path, expected_kind=kind)
        except ValueError as e:
            if "holds a" in str(e):  # another model kind: a wrong folder, not a damaged file
                raise ConfigError(str(e)) from e
            print(f"warning: cannot read {path} ({str(e).splitlines()[0][:200]}); trying an older checkpoint",
                  file=sys.stderr)
    return None


def check_resume_config(cfg, ckpt, keys):
    """Refuse a config that contradicts the checkpoint it resumes in any of `keys` (what the weights, the data
    layout and the loss are: the log would describe another run); other keys (the lr, max_steps) may change."""
    saved = ckpt.get("config") or {}
    differ = [f"{k}={saved[k]!r} in the checkpoint but {getattr(cfg, k)!r} now" for k in keys
              if k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        raise ConfigError(f"resume={cfg.resume} continues {ckpt['path']}, which was trained with another model, "
                          f"data or loss: {'; '.join(differ)}. Use that run's settings, or another out_dir")


def trim_log(out_dir, step):
    """Drop log.jsonl records after `step`: the steps after a checkpoint are about to be redone."""
    path = os.path.join(out_dir, "log.jsonl")
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if r.get("step", -1) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)


def wrap_model(model, d, compile=False):
    """torch.compile (CUDA only; on CPU it costs more than it gives), then DDP across ranks."""
    if compile and d.device_type == "cuda":
        model = torch.compile(model)
    if d.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device_type == "cuda"
                                                          else None)
    return model


def all_reduce(t, op, d):
    """In place over all ranks: op sum | avg | max | min (avg as sum / world size: older gloo has no AVG)."""
    if d.ddp:
        import torch.distributed as dist
        ops = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
        if op == "avg":
            t /= d.world_size
    return t


def barrier(d):
    if d.ddp:
        import torch.distributed as dist
        dist.barrier()


def nonfinite_tensors(state_dict):
    return [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def save_training_checkpoint(out_dir, step, state, d, keep_last_k=0, layout="ckpt"):
    """Rank 0 writes the step's checkpoint atomically, never with non-finite weights; keep_last_k > 0 prunes
    older ones."""
    path = checkpoint_path(out_dir, step, layout)
    if d.master:
        bad = nonfinite_tensors(state["model"])
        if bad:
            raise TrainingDiverged(f"not saving step {step}: non-finite weights in {', '.join(bad[:3])}")
        save_checkpoint(path, state)
        if keep_last_k > 0:
            for _, old in list_checkpoints(out_dir)[:-keep_last_k]:
                remove_checkpoint(old)
    barrier(d)
    return path


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM preemption or time limit) only set a flag; the loop saves and exits at a step
    boundary. A signal that came before (during the imports and set-up, remembered by dataio's handler) counts
    as one received now. Under DDP the ranks agree (one may get the signal later) with an all_reduce at log
    points. On exit the previous handlers return (in a stage: remember, never die)."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        import signal

        def handler(signum, frame):
            self.signal = signal.Signals(signum).name

        if RECEIVED_SIGNALS:
            self.signal = RECEIVED_SIGNALS[0]
            RECEIVED_SIGNALS.clear()
        self.previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def check(self, d, sync=True):
        """True when a signal arrived (on any rank, if sync; without sync only this rank's flag, no collective)."""
        if not d.ddp:
            return self.signal is not None
        if not sync:
            return False
        flag = torch.tensor(int(self.signal is not None), device=d.device)
        stop = bool(all_reduce(flag, "max", d).item())
        if stop and self.signal is None:
            self.signal = "a signal on another rank"
        return stop


def preemption_handlers():
    return Preemption()


class NonFiniteWatch:
    """Remembers the first step whose loss or gradient norm was NaN/Inf, on the device: no host sync per step.
    (A finite loss with non-finite gradients would spread NaN into the weights through clipping.)"""

    def __init__(self, device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step, loss, grad_norm=None):
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float())
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def first_bad_step(self, d):
        """The earliest bad step on any rank, or None (a host sync: call it at log points)."""
        never = torch.iinfo(torch.long).max
        first = torch.where(self.first < 0, torch.full_like(self.first, never), self.first)
        step = int(all_reduce(first, "min", d).item())
        return None if step == never else step


def diverged_message(out_dir, bad_step, what="loss or gradient norm", checkpoints=None):
    """The error of a diverged run, naming the last checkpoint before the bad step. checkpoints: [(step, path)]
    for a run with its own layout (default: out_dir's ckpt_*.pt)."""
    checkpoints = list_checkpoints(out_dir) if checkpoints is None else checkpoints
    good = [p for s, p in checkpoints if s < bad_step]
    return (f"{what} is not finite at step {bad_step}: training diverged. Last good checkpoint: "
            f"{good[-1] if good else 'none'}")


# -----------------------------------------------------------------------------
# what every trainer's loop calls: restore, the due-step flags, the step timer, the divergence stop, the ending


def fingerprint(path):
    """What a data path holds, however its name is spelled: for a folder of shards meta.json's bytes and each
    file's name and size; for a file its bytes (past 64 MB its size and first and last MB)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name == "meta.json":
                with open(full, "rb") as f:
                    h.update(f.read())
            elif os.path.isfile(full) and not TEMP_RE.search(name):
                h.update(f"{name}:{os.path.getsize(full)};".encode())
    elif os.path.isfile(path):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read() + str(size).encode())
    else:
        h.update(str(path).encode())  # a hub name: the name is what there is to compare
    return h.hexdigest()[:16]


def run_identity(cfg, keys, **extra):
    """{name: value} of what defines a run: the config's `keys` (model, loss settings) and `extra` (e.g.
    data=fingerprint(cfg.data_dir)). A checkpoint stores it; resume refuses a change of any entry."""
    identity = {k: getattr(cfg, k) for k in keys}
    identity.update(extra)
    return json.loads(json.dumps(identity, default=str))  # lists, not tuples: compares equal after a round trip


TEMP_RE = re.compile(r"\.tmp(\d*)$")


def remove_orphaned_temps(out_dir):
    """Temporary files and folders of a save killed halfway (NAME.tmpPID, NAME.tmp) are removed at the next
    start, unless the process that writes them still runs."""
    import shutil
    if not os.path.isdir(out_dir):
        return []
    removed = []
    names = sorted(os.listdir(out_dir))
    names += [os.path.join(n, sub) for n in names if SEED_CKPT_RE.match(n) and os.path.isdir(os.path.join(out_dir, n))
              for sub in sorted(os.listdir(os.path.join(out_dir, n)))]
    for name in names:
        m = TEMP_RE.search(name)
        if not m:
            continue
        if m.group(1) and int(m.group(1)) != os.getpid():
            try:
                os.kill(int(m.group(1)), 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(name)
    for name in os.listdir(out_dir):  # a seed-layout folder whose only file was a killed save's temp
        folder = os.path.join(out_dir, name)
        if SEED_CKPT_RE.match(name) and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            removed.append(name + "/")
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by a killed save in {out_dir}: {', '.join(removed)}",
              file=sys.stderr)
    return removed


def check_identity(ckpt, identity, resume):
    """Refuse to continue a checkpoint whose run differs from this one in any entry of `identity`. Checkpoints
    written before identities were stored are compared on the config keys they hold."""
    saved = ckpt.get("identity")
    if saved is None:
        saved = {k: v for k, v in json.loads(json.dumps(ckpt.get("config") or {}, default=str)).items()
                 if k in identity}
    differ = [f"{k}={saved[k]!r} in the checkpoint but {identity[k]!r} now" for k in identity
              if k in saved and saved[k] != identity[k]]
    if differ:
        raise ConfigError(f"resume={resume} continues {ckpt['path']}, which was another run: {'; '.join(differ)}. "
                          "Use that run's settings, or another out_dir")


def restore(out_dir, resume, kind, identity, master=True):
    """Where a trainer starts: None (fresh) or the checkpoint to continue (start_or_resume), after removing a
    killed save's temporary files and checking the run's identity; log.jsonl loses the records past it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder: choose another out_dir")
    if master:
        remove_orphaned_temps(out_dir)
    ckpt = start_or_resume(out_dir, resume, kind)
    if ckpt is not None:
        check_identity(ckpt, identity, resume)
        if master:
            trim_log(out_dir, ckpt["step"])
    return ckpt


@dataclasses.dataclass
class Due:
    """What a step is due for: last (the final step), log (a host sync and a record), ckpt, eval, stop_after
    (stop_after_step: end this invocation here with a checkpoint, as if preempted)."""
    last: bool
    log: bool
    ckpt: bool
    eval: bool
    stop_after: bool


def due(step, max_steps, log_interval=1, ckpt_interval=0, eval_interval=0, stop_after_step=-1, first_step=-1):
    """The flags of `step` (0-based): intervals count steps done (step + 1); 0 means only at the last step.
    The first step of an invocation is always logged (it shows the run is alive)."""
    last = step == max_steps - 1

    def every(n):
        return n > 0 and (step + 1) % n == 0

    ckpt, evaluate, stop_after = last or every(ckpt_interval), last or every(eval_interval), step == stop_after_step
    log = every(log_interval) or step == first_step or ckpt or evaluate or stop_after
    return Due(last, log, ckpt, evaluate, stop_after)


def peak_memory_gb(device_type):
    """Peak GPU memory allocated by this process since the start (CUDA only, else None)."""
    return torch.cuda.max_memory_allocated() / 1e9 if device_type == "cuda" else None


class StepTimer:
    """Training throughput between log points: tokens/s, and MFU where the model gives FLOPs per token and the
    device a peak. The first lap after a start (compile, allocator warm-up) stays out of the run's mean, and so
    does the time spent evaluating or saving (call restart() after them)."""

    def __init__(self, device_type, flops_per_token=None, peak=None, world_size=1):
        self.device_type, self.flops_per_token, self.peak, self.world_size = device_type, flops_per_token, peak, world_size
        self.total_tokens, self.total_seconds, self.first = 0.0, 0.0, True
        self.restart()

    def restart(self):
        self.t0, self.steps, self.tokens = time.time(), 0, 0

    def step(self, tokens):
        """One optimizer step of `tokens` over all ranks (a number, or a device tensor: no host sync here)."""
        self.steps += 1
        self.tokens = self.tokens + tokens

    def lap(self):
        """{dt_ms, tokens_per_sec, mfu, peak_mem_gb} since the last lap (a host sync: call it at log points)."""
        synchronize(self.device_type)
        seconds, tokens = time.time() - self.t0, float(self.tokens)
        rate = tokens / seconds if seconds > 0 else None
        if not self.first:
            self.total_tokens += tokens
            self.total_seconds += seconds
        self.first = False
        figures = {"dt_ms": 1000 * seconds / max(self.steps, 1), "tokens_per_sec": rate,
                   "mfu": mfu(rate, self.flops_per_token, self.peak, self.world_size) if self.flops_per_token else None,
                   "peak_mem_gb": peak_memory_gb(self.device_type)}
        self.restart()
        return {k: v for k, v in figures.items() if v is not None}

    def summary(self):
        """The run's mean throughput (first lap left out) and peak memory, for results.json."""
        rate = self.total_tokens / self.total_seconds if self.total_seconds > 0 else None
        return {"tokens_per_sec": rate,
                "mfu": mfu(rate, self.flops_per_token, self.peak, self.world_size) if self.flops_per_token else None,
                "peak_mem_gb": peak_memory_gb(self.device_type)}


def stop_if_diverged(watch, d, logger, out_dir, checkpoints=None):
    """At a log point: if a loss or gradient norm was NaN/Inf since the start, log the error record (naming
    the last good checkpoint) and raise TrainingDiverged."""
    bad_step = watch.first_bad_step(d)
    if bad_step is None:
        return
    msg = diverged_message(out_dir, bad_step, checkpoints=checkpoints)
    logger.log({"type": "error", "step": bad_step, "message": msg}, echo=False)
    logger.close()
    raise TrainingDiverged(msg)


def launch(train, cfg):
    """train(cfg, d, stop) in this process (one of torchrun's, or alone) with the stop-signal flag `stop`;
    the process group is torn down however it ends."""
    d = setup_dist(cfg.device)
    try:
        with preemption_handlers() as stop:
            return train(cfg, d, stop)
    finally:
        cleanup_dist(d)


def already_finished(ckpt, max_steps, d):
    """The result of a resume whose checkpoint is already at max_steps (nothing to do), else None."""
    if ckpt is None or ckpt["step"] + 1 < max_steps:
        return None
    if d.master:
        print(f"{ckpt['path']} is step {ckpt['step']}: the run already finished {max_steps} steps")
    return {"status": "already_finished", "step": ckpt["step"]}


def stopped_before_start(stop, d, logger, start_step):
    """A signal during start-up: no step taken yet, so nothing new to save; the result to return, else None."""
    if not stop.check(d):
        return None
    logger.info(f"received {stop.signal} before the first step: exiting without training (continue with resume=latest)")
    logger.close()
    return {"status": "preempted", "step": start_step - 1}


def save_or_exit(due_now, signal_stop, stop, step, save, logger):
    """The end of a step: save(step) when a checkpoint is due or the run stops here; then 'preempted' /
    'stopped' when it ends before its last step (early_exit), else None."""
    if not (due_now.ckpt or due_now.stop_after or signal_stop):
        return None
    return early_exit(stop, due_now, signal_stop, step, save(step), logger)


def early_exit(stop, due_now, signal_stop, step, path, logger):
    """After a step's save: 'preempted' (a signal) or 'stopped' (stop_after_step) when the run ends here before
    its last step, with the line that says how to continue; None when the loop goes on (or ends anyway)."""
    if not (signal_stop or due_now.stop_after) or due_now.last:
        return None
    why = f"received {stop.signal}" if signal_stop else f"stop_after_step={step}"
    logger.close()
    logger.info(f"{why}: saved {path} at step {step}; exiting (continue with resume=latest)")
    return "preempted" if signal_stop else "stopped"


def finish(out_dir, results, d, logger):
    """The end of a run on rank 0: results.json written atomically, the bar and the writers closed."""
    logger.close()
    if d.master:
        atomic_write_json(os.path.join(out_dir, "results.json"), results)
    return results


def lr_at(step, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine"):
    """Linear warmup to max_lr, then cosine or linear decay to min_lr at max_steps, or constant."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return max_lr + ratio * (min_lr - max_lr)
    if schedule != "cosine":
        raise ConfigError(f"lr schedule '{schedule}' is not one of cosine, linear, constant")
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# dense bf16 peak FLOP/s by torch.cuda.get_device_name() substring, first match wins
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989.5e12), ("H200", 989.5e12), ("A100", 312e12)]


def peak_flops(device_type, override=0.0):
    """(peak FLOP/s or None, device name): `override` wins, else the GPU's dense bf16 peak from the table."""
    name = torch.cuda.get_device_name() if device_type == "cuda" else device_type
    if override > 0:
        return override, name
    for key, flops in PEAK_BF16_FLOPS if device_type == "cuda" else []:
        if key in name:
            return flops, name
    return None, name


def mfu(tokens_per_sec, flops_per_token, peak, world_size=1):
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices (None without a peak)."""
    if not tokens_per_sec or not peak:
        return None
    return tokens_per_sec * flops_per_token / (peak * world_size)


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def plot_log_curves(out_dir, panels, filename="loss.png"):
    """A PNG of curves from out_dir/log.jsonl. panels: [(title, ylabel, [(record type, key, label), ...]), ...];
    panels with no data are left out. Returns the path, or None when nothing was logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    filled = []
    for title, ylabel, lines in panels:
        series = [(label, [(r["step"], r[key]) for r in rows if r.get("type") == kind and r.get(key) is not None])
                  for kind, key, label in lines]
        series = [(label, pts) for label, pts in series if pts]
        if series:
            filled.append((title, ylabel, series))
    if not filled:
        return None
    fig, axes = plt.subplots(1, len(filled), figsize=(6 * len(filled), 4), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], filled):
        for label, pts in series:
            ax.plot(*zip(*pts), "-" if len(pts) > 20 else "o-", label=label, markersize=3)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



# -----------------------------------------------------------------------------
# past one GPU's memory: FSDP2 (torch.distributed.fsdp.fully_shard) and sharded checkpoints
# (torch.distributed.checkpoint): every rank holds 1/world of the weights, gradients and optimizer state


def transformer_blocks(model):
    """The repeated blocks of a causal LM (native GPT, any HF decoder, MoE or LoRA-wrapped): the ModuleList
    holding the most parameters (an MoE layer's experts are a smaller list inside it)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError("fsdp=true: the model has no list of transformer blocks to shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard_model(model, d, param_dtype=torch.float32, cpu_offload=False):
    """FSDP2 over the ranks: each transformer block is one unit (gathered for its forward and backward, then
    freed), the root (embeddings, final norm, head) another. param_dtype bf16: weights are gathered and
    computed in bf16, gradients reduced in fp32, the sharded master weights and AdamW state stay fp32.
    cpu_offload: the sharded weights, gradients and optimizer state live in CPU memory between uses."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    if not d.ddp:
        raise ConfigError("fsdp=true shards over the ranks of torchrun: launch with torchrun (one process has "
                          "nothing to shard over)")
    options = {}
    if param_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def estimate_memory(n_params, n_trainable, n_layer, d_model, vocab_size, micro_batch_size, seq_len, world_size,
                    fsdp=False, weight_bytes=4, compute_bytes=2, activation_checkpointing=False, cpu_offload=False):
    """GB per GPU before a run: weights, gradients, AdamW state (two fp32 moments per trainable weight) and
    activations. Weights as stored (weight_bytes: 4 fp32 master weights, 2 bf16, ~0.5 4-bit); activations
    ~34 * tokens * d_model bytes per layer in 16-bit with flash attention (Korthikanti et al. 2022, no s^2
    term), 2 * tokens * d_model with activation checkpointing, plus fp32 logits. FSDP divides the first three
    by the world size (and keeps one gathered block); CPU offload moves them to host memory. A rough figure:
    it tells a run that cannot fit from one that may."""
    gb = 1e9
    shard = world_size if fsdp else 1
    weights = n_params * weight_bytes / shard + (n_params / max(n_layer, 1) * compute_bytes if fsdp else 0)
    grads = n_trainable * 4 / shard
    optimizer = n_trainable * 8 / shard
    if cpu_offload:
        weights, grads, optimizer = (n_params / max(n_layer, 1) * compute_bytes if fsdp else 0), 0, 0
    tokens = micro_batch_size * seq_len
    per_layer = (2 if activation_checkpointing else 34) * tokens * d_model
    activations = n_layer * per_layer + tokens * vocab_size * 4 * 2  # logits and their gradient in fp32
    parts = {"weights": weights / gb, "grads": grads / gb, "optimizer": optimizer / gb, "activations": activations / gb}
    parts["total"] = sum(parts.values())
    return parts


def check_memory_fits(estimate, device_type, capacity_gb=None):
    """A one-line error when the estimate obviously exceeds the GPU (1.5x its memory; None = ask CUDA)."""
    if capacity_gb is None:
        if device_type != "cuda":
            return
        capacity_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    if estimate["total"] > 1.5 * capacity_gb:
        raise ConfigError(f"this run needs ~{estimate['total']:.0f} GB per GPU (weights {estimate['weights']:.0f}, "
                          f"grads {estimate['grads']:.0f}, optimizer {estimate['optimizer']:.0f}, activations "
                          f"{estimate['activations']:.0f}) but the GPU has {capacity_gb:.0f} GB: use fsdp=true over "
                          "more GPUs, lora=true, cpu_offload=true, gradient_checkpointing=true or a smaller micro batch")


def full_model_state(model):
    """The whole (unsharded) state dict on rank 0's CPU, e.g. for an HF folder; {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_checkpoint(out_dir, step, model, optimizer, extra, d, keep_last_k=0):
    """Every rank writes its shards of the model and optimizer with torch.distributed.checkpoint into
    ckpt_<step>.dcp.tmp; rank 0 adds `extra` (step, config, identity, loader position) and each rank its RNG
    state, and renames the folder into place once all have written: as atomic as a single-file checkpoint."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(out_dir, f"ckpt_{step:06d}.dcp")
    tmp = final + ".tmp"
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    model_state, optim_state = get_state_dict(model, optimizer)
    local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in model_state.items()}
    bad = torch.tensor(int(bool(nonfinite_tensors(local))))
    if all_reduce(bad, "max", d).item():
        raise TrainingDiverged(f"not saving step {step}: non-finite weights")
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_{d.rank}.pt"))
    barrier(d)
    if d.master:
        torch.save({**extra, "step": step, "world_size": d.world_size}, os.path.join(tmp, "extra.pt"))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again by a resumed run
        os.replace(tmp, final)
        if keep_last_k > 0:
            for _, old in list_checkpoints(out_dir)[:-keep_last_k]:
                remove_checkpoint(old)
    barrier(d)
    return final


def load_sharded_extra(path, expected_kind=None):
    """A sharded checkpoint's `extra` (what load_checkpoint returns for a single file, without the weights)."""
    try:
        ckpt = torch.load(os.path.join(path, "extra.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read sharded checkpoint {path}: {e}") from e
    kind = ckpt.get("kind", "gpt")
    if expected_kind is not None and kind != expected_kind:
        raise ValueError(f"{path} holds a '{kind}' model, expected a '{expected_kind}' checkpoint")
    return {**ckpt, "path": path, "sharded": True}


def load_sharded_checkpoint(path, model, optimizer=None, rank=0):
    """Load a sharded checkpoint into `model` (and `optimizer`), sharded or not, over any number of ranks (the
    shards are re-cut for this world size), and this rank's RNG state where the checkpoint has it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    rng = os.path.join(path, f"rng_{rank}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=True))


class ShardLoader:
    """Deterministic (B, T) batches from a split's shards. Rank r of R reads the r-th slice of each
    window of R*B*T tokens, so ranks never overlap; the position is checkpointable with state()."""

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1):
        self.shards = find_shards(data_dir, split)
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        # every header and length is checked now, so a corrupt shard fails at start rather than hours in;
        # a shard shorter than one batch window (the tail of a small source) cannot be read and is left out
        window = B * T * world_size + 1
        # and ids outside the vocabulary of meta.json (shards of another tokenizer) stop the run here too
        vocab_size = load_meta(data_dir)["vocab_size"] if os.path.isfile(os.path.join(data_dir, "meta.json")) else None
        self.vocab_size = vocab_size  # and each shard's ids are scanned when it is opened (its header may lie)
        short = [p for p in self.shards if len(read_shard(p, vocab_size)) < window]
        self.shards = [p for p in self.shards if p not in short]
        if not self.shards:
            raise ShardError(f"every {split} shard in {data_dir} is shorter than one batch window "
                             f"({B}*{T}*{world_size}+1 tokens); use a smaller batch or more data")
        if short and rank == 0:
            print(f"warning: skipping {len(short)} {split} shard(s) shorter than one batch window: "
                  f"{', '.join(os.path.basename(p) for p in short)}", file=sys.stderr)
        self.reset()

    def reset(self):
        self.set_state({"file": os.path.basename(self.shards[0]), "pos": 0})

    def state(self):
        # the file by name (the list of readable shards depends on the batch geometry) and the start of the
        # current window in it; every rank's offset within the window follows from its rank
        return {"file": os.path.basename(self.shards[self.shard]), "pos": self.pos}

    def set_state(self, state):
        names = [os.path.basename(p) for p in self.shards]
        if state["file"] not in names:
            raise ShardError(f"the checkpoint's data position is in {state['file']}, which is not a readable shard "
                             f"here ({len(names)} shards; a shard shorter than one batch window of this geometry is "
                             "left out): resume with the batch geometry of the run, or start afresh")
        self.shard, self.pos = names.index(state["file"]), state["pos"]
        self.tokens = read_shard(self.shards[self.shard], self.vocab_size, scan=True)
        if self.pos + self.B * self.T * self.world_size + 1 > len(self.tokens):  # another geometry: next file
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
            self.tokens = read_shard(self.shards[self.shard], self.vocab_size, scan=True)

    def next_batch(self):
        B, T = self.B, self.T
        start = self.pos + self.rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        if torch.cuda.is_available():
            buf = buf.pin_memory()  # so that .to(device, non_blocking=True) really overlaps
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.pos += B * T * self.world_size
        if self.pos + B * T * self.world_size + 1 > len(self.tokens):
            self.set_state({"file": os.path.basename(self.shards[(self.shard + 1) % len(self.shards)]), "pos": 0})
        return x, y


def validation_rows(data_dir, n_rows, T, split="val"):
    """The first n_rows (T+1)-token windows of a split's shards (split_*.bin; val unless asked): one fixed
    validation set, whatever the world size (each rank scores rows rank, rank + W, ...). Fewer rows when the
    split is shorter; the tail of each shard shorter than a window is left out."""
    rows = []
    vocab_size = load_meta(data_dir)["vocab_size"] if os.path.isfile(os.path.join(data_dir, "meta.json")) else None
    for path in find_shards(data_dir, split):
        tokens = read_shard(path, vocab_size, scan=True)
        for start in range(0, len(tokens) - T, T):
            if len(rows) == n_rows:
                return torch.from_numpy(np.stack(rows).astype(np.int64))
            rows.append(tokens[start:start + T + 1])
    if not rows:
        raise ShardError(f"the {split} split of {data_dir} is shorter than one row of {T + 1} tokens")
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def token_byte_lengths(tokenizer, vocab_size):
    """UTF-8 bytes each token id stands for (0 for end of text, roles and other special tokens; padding rows 0):
    bits per byte = summed nats / ln 2 / bytes, a loss comparable across tokenizers."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    special = set(tokenizer.special.values())
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        if tokenizer.kind == "byte" and i < 256:
            lengths[i] = 1
        elif tokenizer.kind == "gpt2" and i < tokenizer.eot_id:
            lengths[i] = len(tokenizer.base.decode_single_token_bytes(i))
        else:  # a multiplication token: the bytes of its canonical text a*b=c
            lengths[i] = len(tokenizer.id_to_text[i].encode("utf-8"))
    return lengths



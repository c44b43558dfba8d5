"""
Shared plumbing for every stage: config, distributed setup, checkpoints, token shards,
the tokenizer, logging and the HellaSwag scorer. One copy here, used by all scripts.
"""
import dataclasses
import json
import math
import os
import pickle
import random
import re
import sys
import typing

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
# shared data for tests and local runs sits beside the repository (never copied into it)
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

# -----------------------------------------------------------------------------
# config: `python stage.py [CONFIG.yaml] key=value ...`


class ConfigError(ValueError):
    pass


def _convert(value, typ, key):
    """Coerce a YAML value or a command-line string into the field's declared type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}' expects a bool (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            import yaml
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        elem = args[0] if args else None
        items = [_convert(v, elem, key) if elem not in (None, Ellipsis) else v for v in value]
        return tuple(items) if origin is tuple else items
    if typ is dict or origin is dict:
        if isinstance(value, str):
            import yaml
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return value
    return value


def load_config(cls, argv=None):
    """Build the dataclass `cls` from defaults, then an optional YAML file, then key=value overrides.
    Unknown keys, wrong types and missing files raise ConfigError naming the problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}

    def put(key, value, where):
        if key not in fields:
            raise ConfigError(f"unknown config key '{key}' ({where}); valid keys: {', '.join(sorted(fields))}")
        values[key] = _convert(value, hints[key], key)

    # accept `--key value` and `--flag` (bools) as well as key=value
    args, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg:
            key = arg[2:].replace("-", "_")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key in fields and hints[key] is bool and (nxt is None or nxt.startswith("--") or "=" in nxt
                                                         or nxt.lower() not in ("true", "false", "1", "0", "yes", "no")):
                args.append(f"{key}=true")
                i += 1
                continue
            if nxt is None:
                raise ConfigError(f"option {arg} needs a value")
            args.append(f"{key}={nxt}")
            i += 2
            continue
        args.append(arg)
        i += 1

    for arg in args:
        if "=" not in arg:
            if not (arg.endswith(".yaml") or arg.endswith(".yml")):
                raise ConfigError(f"expected a CONFIG.yaml or key=value, got {arg!r}")
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            import yaml
            with open(arg) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {arg} must hold a mapping of key: value")
            for k, v in loaded.items():
                put(k, v, f"in {arg}")
        else:
            k, v = arg.split("=", 1)
            put(k.strip().lstrip("-").replace("-", "_"), v, "on the command line")
    return cls(**values)


def config_dict(cfg):
    return dataclasses.asdict(cfg)


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


def atomic_write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:06d}.pt")


def list_checkpoints(out_dir):
    """All finished checkpoints of a run folder, sorted by step: [(step, path), ...]."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = CKPT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


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
    if os.path.isdir(p):
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints (ckpt_*.pt) in {p}")
        return ckpts[-1][1]
    if not os.path.isfile(p):
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path, expected_kind=None, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint; refuse files that are not ours or of another model."""
    path = resolve_checkpoint(path)
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


def save_training_checkpoint(out_dir, step, state, d, keep_last_k=0):
    """Rank 0 writes ckpt_<step>.pt atomically, never with non-finite weights; keep_last_k > 0 prunes older ones."""
    path = checkpoint_path(out_dir, step)
    if d.master:
        bad = nonfinite_tensors(state["model"])
        if bad:
            raise TrainingDiverged(f"not saving step {step}: non-finite weights in {', '.join(bad[:3])}")
        save_checkpoint(path, state)
        if keep_last_k > 0:
            for _, old in list_checkpoints(out_dir)[:-keep_last_k]:
                os.remove(old)
    barrier(d)
    return path


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM preemption or time limit) only set a flag; the loop saves and exits at a step
    boundary. Under DDP the ranks agree (one may get the signal later) with an all_reduce at log points."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        import signal

        def handler(signum, frame):
            self.signal = signal.Signals(signum).name

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


def diverged_message(out_dir, bad_step, what="loss or gradient norm"):
    good = [p for s, p in list_checkpoints(out_dir) if s < bad_step]
    return (f"{what} is not finite at step {bad_step}: training diverged. Last good checkpoint: "
            f"{good[-1] if good else 'none'}")


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
# token shards: a 256 x int32 header (magic, version, token count, bytes per token), then the tokens

SHARD_MAGIC = 20251122
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    pass


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens, vocab_size=None):
    tokens = np.asarray(tokens)
    dtype = token_dtype(vocab_size if vocab_size is not None else int(tokens.max(initial=0)) + 1)
    if tokens.size and int(tokens.max()) >= np.iinfo(dtype).max + 1:
        raise ShardError(f"token id {int(tokens.max())} does not fit in {np.dtype(dtype).name}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2], header[3] = SHARD_MAGIC, SHARD_VERSION, tokens.size, np.dtype(dtype).itemsize
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """Memory-map a shard's tokens after checking its header and length."""
    if not os.path.isfile(path):
        raise ShardError(f"shard not found: {path}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    ntok, width = int(header[2]), int(header[3])
    if width not in (2, 4):
        raise ShardError(f"{path}: bad token width {width} bytes")
    expected = HEADER_BYTES + ntok * width
    if size != expected:
        raise ShardError(f"{path}: header promises {ntok} tokens ({expected} bytes) but the file has {size} bytes")
    return np.memmap(path, dtype=np.uint16 if width == 2 else np.uint32, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def find_shards(data_dir, split):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir not found: {data_dir} (run prepare_data.py first)")
    shards = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                    if f.startswith(f"{split}_") and f.endswith(".bin"))
    if not shards:
        raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir} (run prepare_data.py first)")
    return shards


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (run prepare_data.py first)")
    with open(path) as f:
        return json.load(f)


class ShardLoader:
    """Deterministic (B, T) batches from a split's shards. Rank r of R reads the r-th slice of each
    window of R*B*T tokens, so ranks never overlap; the position is checkpointable with state()."""

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1):
        self.shards = find_shards(data_dir, split)
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        # every header and length is checked now, so a corrupt shard fails at start rather than hours in;
        # a shard shorter than one batch window (the tail of a small source) cannot be read and is left out
        window = B * T * world_size + 1
        short = [p for p in self.shards if len(read_shard(p)) < window]
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
        self.tokens = read_shard(self.shards[self.shard])
        if self.pos + self.B * self.T * self.world_size + 1 > len(self.tokens):  # another geometry: next file
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
            self.tokens = read_shard(self.shards[self.shard])

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


def validation_rows(data_dir, n_rows, T):
    """The first n_rows (T+1)-token windows of the val split: one fixed validation set, whatever the world size
    (each rank scores rows rank, rank + W, ...). Fewer rows when the split is shorter."""
    rows = []
    for path in find_shards(data_dir, "val"):
        tokens = read_shard(path)
        for start in range(0, len(tokens) - T, T):
            if len(rows) == n_rows:
                return torch.from_numpy(np.stack(rows).astype(np.int64))
            rows.append(tokens[start:start + T + 1])
    if not rows:
        raise ShardError(f"the val split of {data_dir} is shorter than one row of {T + 1} tokens")
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


# -----------------------------------------------------------------------------
# tokenizer: GPT-2 BPE through tiktoken (or raw bytes), plus extra tokens after the base vocabulary

GPT2_EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# a correct product written as a*b=c, a x b = c, a × b = c or a times b is c (not part of a longer number)
MUL_RE = re.compile(r"(?<![\d.,])(\d+)\s*(?:\*|×|\bx\b|\btimes\b)\s*(\d+)\s*(?:=|\bis\b)\s*(\d+)(?![\d]|[.,]\d)")


def mul_token_strings(lo, hi):
    return [(a, b, f"{a}*{b}={a * b}") for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


class Tokenizer:
    """kind='gpt2' (tiktoken BPE, 50257 ids) or 'byte' (256 byte ids + end of text). Extra tokens
    (chat roles, ...) follow the base vocabulary, then one token per multiplication fact when
    mul_range=(lo, hi) is set. `spec` records everything needed to rebuild the same tokenizer."""

    def __init__(self, kind="gpt2", extra_tokens=(), mul_range=None, tokenizer_file=None):
        self.kind = kind
        self.extra_tokens = list(extra_tokens)
        self.mul_range = tuple(mul_range) if mul_range else None
        if kind == "gpt2":
            self.base = _gpt2_encoding(tokenizer_file)
            self.eot_id = self.base.eot_token
            n_base = self.base.n_vocab
        elif kind == "byte":
            self.base = None
            self.eot_id = 256
            n_base = 257
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'gpt2' or 'byte')")
        self.special = {GPT2_EOT: self.eot_id}
        for i, tok in enumerate(self.extra_tokens):
            self.special[tok] = n_base + i
        n = n_base + len(self.extra_tokens)
        self.mul_ids = {}  # (a, b) -> id
        self.id_to_text = {v: k for k, v in self.special.items()}
        if self.mul_range:
            for i, (a, b, text) in enumerate(mul_token_strings(*self.mul_range)):
                self.mul_ids[(a, b)] = n + i
                self.id_to_text[n + i] = text
            n += len(self.mul_ids)
        self.vocab_size = n
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)))

    @property
    def spec(self):
        return {"kind": self.kind, "extra_tokens": self.extra_tokens,
                "mul_range": list(self.mul_range) if self.mul_range else None, "vocab_size": self.vocab_size}

    @classmethod
    def from_spec(cls, spec, tokenizer_file=None):
        tok = cls(spec["kind"], spec.get("extra_tokens", ()), spec.get("mul_range"), tokenizer_file)
        if "vocab_size" in spec and spec["vocab_size"] != tok.vocab_size:
            raise ValueError(f"tokenizer spec says vocab_size {spec['vocab_size']} but rebuilds to {tok.vocab_size}")
        return tok

    def _encode_plain(self, text):
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self.base.encode_ordinary(text)

    def _encode_math(self, text):
        """Plain encoding, except that correct in-range products become their multiplication token."""
        if not self.mul_range:
            return self._encode_plain(text)
        lo, hi = self.mul_range
        ids, last = [], 0
        for m in MUL_RE.finditer(text):
            a, b, c = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if lo <= a <= hi and lo <= b <= hi and a * b == c:
                ids += self._encode_plain(text[last:m.start()])
                ids.append(self.mul_ids[(a, b)])
                last = m.end()
        ids += self._encode_plain(text[last:])
        return ids

    def encode(self, text, allow_special=False):
        """Text -> ids. With allow_special, literal special strings (<|endoftext|>, extra tokens) map to their ids."""
        if not allow_special:
            return self._encode_math(text)
        ids, last = [], 0
        for m in self._special_re.finditer(text):
            ids += self._encode_math(text[last:m.start()])
            ids.append(self.special[m.group(0)])
            last = m.end()
        ids += self._encode_math(text[last:])
        return ids

    def decode(self, ids):
        out, run = [], []

        def flush():
            if run:
                if self.kind == "byte":
                    out.append(bytes(run).decode("utf-8", errors="replace"))
                else:
                    out.append(self.base.decode(run))
                run.clear()

        base_limit = 256 if self.kind == "byte" else self.eot_id
        for i in ids:
            i = int(i)
            if i < base_limit:
                run.append(i)
            else:
                flush()
                if i not in self.id_to_text:
                    raise ValueError(f"token id {i} is outside this tokenizer's vocabulary ({self.vocab_size})")
                out.append(self.id_to_text[i])
        flush()
        return "".join(out)


def _gpt2_encoding(tokenizer_file=None):
    import tiktoken
    if tokenizer_file:
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"tokenizer_file not found: {tokenizer_file}")
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe(tokenizer_file)
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={GPT2_EOT: 50256})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise RuntimeError(
            "could not load the GPT-2 BPE ranks through tiktoken (offline?). Provide them with "
            "tokenizer_file=PATH (a tiktoken ranks file, e.g. ../shared/data/tokenizers/gpt2.tiktoken), "
            "or point TIKTOKEN_CACHE_DIR at a tiktoken cache that holds gpt2, or use tokenizer=byte. "
            f"Original error: {e}") from e


def padded_vocab_size(n, multiple=64):
    """Round the embedding table up (50257 -> 50304) so matmuls hit fast kernel shapes."""
    return ((n + multiple - 1) // multiple) * multiple


# HF tokenizer: common.Tokenizer -> a `tokenizers` ByteLevel BPE with the same ids (the notes on the
# differences are in export_hf.py, which verifies them; model.save_hf_folder writes the result)


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map (the vocabulary's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


BYTE_ENCODER = bytes_to_unicode()


def token_str(b):
    return "".join(BYTE_ENCODER[x] for x in b)


def merges_from_ranks(ranks):
    """Recover the BPE merge list from tiktoken ranks: the merge that creates token t is the last step of
    running BPE on t's bytes with only the ranks below t's own. Ordered by rank (= GPT-2's merges.txt)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while True:  # tiktoken's BPE: merge the adjacent pair of lowest rank, restricted to ranks < rank
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((token_str(parts[0]), token_str(parts[1])))
    return merges


def gpt2_ranks(tok):
    """{token bytes: id} of the base BPE, read through tiktoken's public API (no private attributes)."""
    enc = tok.base
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != tok.eot_id}


def mul_split_regex(tok):
    """Isolates exactly the canonical strings of the multiplication tokens, with MUL_RE's guards
    (not preceded by a digit, '.' or ','; not followed by a digit or by '.'/',' and a digit)."""
    strings = sorted((tok.id_to_text[i] for i in tok.mul_ids.values()), key=len, reverse=True)
    return "(?:" + "|".join(re.escape(s) for s in strings) + ")"


def build_hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` giving the same ids as `tok` (see the module notes for the exceptions)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if tok.kind == "gpt2":
        ranks = gpt2_ranks(tok)
        vocab = {token_str(b): i for b, i in ranks.items()}
        merges = merges_from_ranks(ranks)
    else:  # byte: ids 0..255 are the bytes themselves, no merges
        vocab = {BYTE_ENCODER[i]: i for i in range(256)}
        merges = []
    # end of text, extra tokens and multiplication tokens sit in the BPE vocabulary at their own ids
    # (so the added-token machinery reuses those ids instead of appending new ones)
    for text, i in tok.special.items():
        vocab[text] = i
    for i in tok.mul_ids.values():
        vocab[tok.id_to_text[i]] = i
    if len(set(vocab.values())) != tok.vocab_size or max(vocab.values()) != tok.vocab_size - 1:
        raise ValueError(f"vocabulary ids are not 0..{tok.vocab_size - 1}")

    # ignore_merges: a whole pre-token found in the vocabulary is taken as is, which is what tiktoken does
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    splits = []
    if tok.mul_ids:
        hf.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex(rf"(?<![\d.,]){a}\s*(?:\*|×|\bx\b|\btimes\b)\s*{b}\s*(?:=|\bis\b)\s*{a * b}"
                                      r"(?![\d]|[.,]\d)"), f"{a}*{b}={a * b}")
            for (a, b), _ in sorted(tok.mul_ids.items(), key=lambda kv: kv[1])])
        alternatives = mul_split_regex(tok)
        splits.append(pre_tokenizers.Split(Regex(r"(?<![\d.,])" + alternatives + r"(?![\d]|[.,]\d)"), behavior="isolated"))
        whole_mul = r"\A" + alternatives + r"\z|"  # keeps an isolated product in one piece through the next split
    else:
        whole_mul = ""
    if tok.kind == "gpt2":
        splits.append(pre_tokenizers.Split(Regex(whole_mul + GPT2_PATTERN), behavior="isolated"))
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.special])
    return hf


def hf_tokenizer(tok, model_max_length):
    """The transformers wrapper around build_hf_tokenizer (what save_pretrained writes)."""
    from transformers import PreTrainedTokenizerFast
    eot = GPT2_EOT
    return PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(tok), bos_token=eot, eos_token=eot,
                                   unk_token=eot, pad_token=eot, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def sample_text(tok):
    """Text for the tokenizer check: prose, numbers, whitespace, unicode, every special/extra token, every
    multiplication token in canonical form, and near-misses that must stay plain text."""
    parts = [
        "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'll pay $1,234.50 (or 12.5%)!\n\n",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n",
        "  indented\tTabs\r\nCRLF  and   spaces. Ünïcödé: café, naïve, 日本語, emoji 🙂, math ∑ x² ≥ 0.\n",
        "#### 72\n<<48/2=24>> 1*1=1? 13*4=52, 3*4=13, 3*4=125, 123*4=492, 3*4=12.5, 1.3*4=12 ",
        "surface forms: 3 x 4 = 12, 3 × 4 = 12, 3 times 4 is 12, 3 * 4 = 12, 2 x 6 = 12 bags, 12x12=144\n",
    ]
    for text in tok.special:
        parts.append(f"{text}a {text}\n")
    for i in sorted(tok.mul_ids.values()):
        s = tok.id_to_text[i]
        parts.append(f"{s} ({s}),x{s}\n")
    return "".join(parts)



# -----------------------------------------------------------------------------
# logging: log.jsonl (machine), log.txt (human), stdout; rank 0 only


def format_record(record):
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


class Logger:
    def __init__(self, out_dir, master=True, resume=False):
        self.master = master
        self.out_dir = out_dir
        if master:
            os.makedirs(out_dir, exist_ok=True)
            mode = "a" if resume else "w"
            self.jsonl = open(os.path.join(out_dir, "log.jsonl"), mode)
            self.txt = open(os.path.join(out_dir, "log.txt"), mode)

    def log(self, record, echo=True):
        if not self.master:
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        line = format_record(record)
        self.txt.write(line + "\n")
        self.txt.flush()
        if echo:
            print(line, flush=True)

    def info(self, msg):
        if self.master:
            self.txt.write(msg + "\n")
            self.txt.flush()
            print(msg, flush=True)


def progress(iterable=None, master=True, **kwargs):
    """A tqdm bar on rank 0, silent elsewhere."""
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=not master, dynamic_ncols=True, **kwargs)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

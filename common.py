"""
Shared plumbing for every stage: config, distributed setup, checkpoints, token shards,
the tokenizer, logging and the HellaSwag scorer. One copy here, used by all scripts.
"""
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
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


def resolve_dtype(dtype, device):
    """'auto' (bf16 on cuda, else fp32) | float32 | bfloat16 | float16 -> a torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


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
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: resumable on fewer GPUs
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        self.set_state({"shard": 0, "pos": 0})

    def state(self):
        # `pos` is the start of the current window; every rank's offset within it follows from its rank
        return {"shard": self.shard, "pos": self.pos}

    def set_state(self, state):
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = read_shard(self.shards[self.shard])

    def next_batch(self):
        B, T = self.B, self.T
        start = self.pos + self.rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.pos += B * T * self.world_size
        if self.pos + B * T * self.world_size + 1 > len(self.tokens):
            self.set_state({"shard": (self.shard + 1) % len(self.shards), "pos": 0})
        return x, y


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


# -----------------------------------------------------------------------------
# small helpers


def cosine_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def elapsed(self):
        return time.time() - self.t0

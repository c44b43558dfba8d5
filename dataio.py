"""
The torch-free half of the shared plumbing: config, JSON files, token shards, the tokenizer (GPT-2 BPE
with extra and multiplication tokens, and its HF twin) and logging. prepare_data.py and its tokenizer
workers import only this module: torch costs ~3 s and ~225 MB per process, and the data path needs none
of it. common.py re-exports every name, so the other stages keep writing common.X.
"""
import os
import signal
import sys

# -----------------------------------------------------------------------------
# signals from the first moment of a stage's process: SLURM sends SIGTERM / SIGUSR1 to preempt a job or at its
# time limit, and the default handler would kill the process mid-import (rc -15) or mid-save. A stage script
# imports this module first (through common), so the handler is in place before the slow imports (torch);
# until run_main knows what the stage does with a signal, it is only remembered.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RECEIVED_SIGNALS = []  # names of the signals received, in order (read by common.Preemption and run_main)


class Interrupted(BaseException):
    """A stop signal in a stage that has no step boundary to stop at (an evaluation, an export): run_main
    ends the process with 128 + the signal number and one line, without a traceback."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_signal_mode = {"raise": False}


_STAGE_PID = os.getpid()


def _on_stop_signal(signum, frame):
    if os.getpid() != _STAGE_PID:  # a forked worker (a Pool's): it ends as by default when its parent ends it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    RECEIVED_SIGNALS.append(signal.Signals(signum).name)
    if _signal_mode["raise"]:
        raise Interrupted(signum)


def _is_stage_process():
    """The main process of a stage script of this repository (not pytest, not a multiprocessing worker)."""
    import multiprocessing
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    here = os.path.dirname(os.path.abspath(__file__))
    return (main is not None and os.path.dirname(os.path.abspath(main)) == here
            and multiprocessing.parent_process() is None)


if _is_stage_process():
    for _sig in STOP_SIGNALS:
        signal.signal(_sig, _on_stop_signal)

import dataclasses  # noqa: E402  (after the handlers, on purpose)
import json  # noqa: E402
import re  # noqa: E402
import typing  # noqa: E402

import numpy as np  # noqa: E402

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
            try:
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
            except yaml.YAMLError:
                raise ConfigError(f"config key '{key}' expects a list, got {value!r} (not valid YAML)") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        elem = args[0] if args else None
        items = [_convert(v, elem, key) if elem not in (None, Ellipsis) else v for v in value]
        return tuple(items) if origin is tuple else items
    if typ is dict or origin is dict:
        if isinstance(value, str):
            import yaml
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"config key '{key}' expects a mapping, got {value!r} (not valid YAML)") from None
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return value
    return value


# the seeds' names for settings that have one name here (what their users type keeps working), in one place
CONFIG_ALIASES = {
    "save_steps": "ckpt_interval",  # sigma-GPT's guide, TRL / HF Trainer
    "save_interval": "ckpt_interval",
    "save_total_limit": "keep_last_k",  # HF Trainer
    "per_device_train_batch_size": "micro_batch_size",  # HF Trainer / TRL: sequences per forward pass per rank
    "logging_steps": "log_interval",  # HF Trainer
}


def field_comments(cls):
    """{field: the first line of its comment} read from the source of `cls` and its dataclass bases."""
    import ast
    import inspect
    import tokenize
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        text = "".join(lines)
        by_line = {}
        for tok in tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__):
            if tok.type == tokenize.COMMENT:
                by_line.setdefault(tok.start[0], tok.string.lstrip("#").strip())
        body = ast.parse(inspect.cleandoc(text) if text[:1].isspace() else text).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                comment = by_line.get(node.end_lineno) or by_line.get(node.lineno)
                if comment:
                    comments[node.target.id] = comment
    return comments


def config_help(cls, prog=None):
    """`--help`: every key with its type, default and the first line of its comment."""
    prog = prog or os.path.basename(sys.argv[0])
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = [f"usage: python {prog} [CONFIG.yaml] key=value ... (also --key value)", "", "keys:"]
    for f in dataclasses.fields(cls):
        typ = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        line = f"  {f.name} ({typ}, default {default!r})"
        out.append(line + (f": {comments[f.name]}" if f.name in comments else ""))
    aliases = [f"{a} -> {t}" for a, t in CONFIG_ALIASES.items() if t in hints and a not in hints]
    if aliases:
        out += ["", "also accepted: " + ", ".join(aliases)]
    return "\n".join(out)


def load_config(cls, argv=None):
    """Build the dataclass `cls` from defaults, then an optional YAML file, then key=value overrides.
    Unknown keys, wrong types and missing files raise ConfigError naming the problem. `--help` prints the keys
    and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}

    def put(key, value, where):
        if key not in fields and CONFIG_ALIASES.get(key) in fields:
            key = CONFIG_ALIASES[key]
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
            try:
                with open(arg, encoding="utf-8") as f:
                    loaded = yaml.safe_load(f) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"config file {arg} is not valid YAML: {' '.join(str(e).split())}") from None
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


# what bad input raises (a config, a data file, a checkpoint): a stage reports these in one line, not a traceback
EXPECTED_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                   IsADirectoryError, PermissionError)


def _exit_without_teardown():
    """A torchrun rank whose work is done and written leaves with exit 0 after Python's exit handlers (W&B,
    TensorBoard, tqdm) but without the interpreter's teardown: on CPU, gloo's threads sometimes abort that
    teardown ("terminate called without an active exception", exit -6), which would fail a finished run."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_main(main, expected=(), preemptible=False):
    """A stage's `if __name__ == "__main__"`. Bad input (EXPECTED_ERRORS and `expected`) ends in one line
    `error: ...` on stderr and exit code 1. SIGTERM / SIGUSR1: a trainer (preemptible) reads the signal at its
    next step boundary (common.Preemption), saves and exits 0; a signal before or after its loop is remembered,
    never fatal. Any other stage stops at once with one line and exit code 128 + the signal number."""
    import pickle
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        if not preemptible:
            if RECEIVED_SIGNALS:
                raise Interrupted(getattr(signal, RECEIVED_SIGNALS[0]))
            _signal_mode["raise"] = True
        main()
        if _is_stage_process() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _exit_without_teardown()
    except Interrupted as e:
        print(f"stopped: received {e} before the work was done (finished files are kept, nothing half-written)",
              file=sys.stderr)
        sys.exit(128 + e.signum)
    except EXPECTED_ERRORS + (pickle.UnpicklingError,) + tuple(expected) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)
    finally:
        _signal_mode["raise"] = False
        for sig in STOP_SIGNALS:
            if not _is_stage_process():  # called in another program's process (a test): leave it as it was
                signal.signal(sig, previous[sig])
            elif preemptible:  # the run is over; while Python shuts down it restores the default (fatal) handlers
                signal.signal(sig, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# files


def atomic_write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
    """Header, then the tokens in the narrowest dtype for vocab_size. The header records max id + 1, so a
    reader can check the ids against its vocabulary without scanning the tokens."""
    tokens = np.asarray(tokens)
    dtype = token_dtype(vocab_size if vocab_size is not None else int(tokens.max(initial=0)) + 1)
    id_bound = int(tokens.max()) + 1 if tokens.size else 0
    if id_bound > np.iinfo(dtype).max + 1:
        raise ShardError(f"token id {id_bound - 1} does not fit in {np.dtype(dtype).name}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:5] = SHARD_MAGIC, SHARD_VERSION, tokens.size, np.dtype(dtype).itemsize, id_bound
    tokens = np.ascontiguousarray(tokens, dtype=dtype)  # no copy when the buffer already has the dtype
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(memoryview(tokens).cast("B"))  # straight from the buffer: no bytes copy of the shard
    os.replace(tmp, path)


def read_shard(path, vocab_size=None, scan=False):
    """Memory-map a shard's tokens after checking its header and length, and (given vocab_size) that its
    ids are below it: from the header's id bound, or a scan for shards written without one. scan=True reads
    every id whatever the header says (a header can lie: a loader scans each shard as it opens it)."""
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
    tokens = np.memmap(path, dtype=np.uint16 if width == 2 else np.uint32, mode="r", offset=HEADER_BYTES, shape=(ntok,))
    if vocab_size is not None:
        id_bound = int(header[4]) if header[4] and not scan else (int(tokens.max()) + 1 if ntok else 0)
        if id_bound > vocab_size:
            raise ShardError(f"{path}: token id {id_bound - 1} is outside the vocabulary of {vocab_size} "
                             "(shards from another tokenizer?)")
    return tokens


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
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON (truncated?): {e}; run prepare_data.py again") from None
    missing = [k for k in ("tokenizer", "vocab_size") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)}: not a meta.json of prepare_data.py; run it again")
    return meta



# -----------------------------------------------------------------------------
# tokenizer: GPT-2 BPE through tiktoken (or raw bytes), plus extra tokens after the base vocabulary

GPT2_EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# A multiplication fact: a correct product of ASCII-digit numbers (no leading zeros) on one line, written with
# '*', '×' or 'x' and '=' (one optional space on each side of each) or with 'times' and 'is' ('3*4=12',
# '3 x 4 = 12', '3×4=12', '3 times 4 is 12'), standing alone: no letter, digit, '.', ',' or operator
# touching it and no operator one space away, so '2*3*4=12', '-3*4=12', 'a3*4=12', '1e3*4=12', '3*4=12.5'
# stay text. The same pattern (these lookarounds run in Python's re and in the HF tokenizer's Oniguruma alike)
# drives our encoder and the exported HF tokenizer (build_hf_tokenizer).
FACT_NUMBER = r"[1-9][0-9]*"
FACT_BEFORE = r"(?<![\w.,*×/+\-^=])(?<![*×/+\-^=] )(?<!\bx )(?<!\btimes )"
FACT_AFTER = r"(?![\w*×/+\-^=]|[.,][0-9]| [*×/+\-^=]| x\b| times\b)"


def fact_pattern(a=FACT_NUMBER, b=FACT_NUMBER, c=FACT_NUMBER):
    """The surface forms of a fact a*b=c with its guards (groups: a, b, c)."""
    return rf"{FACT_BEFORE}({a})(?: ?[*×x] ?| times )({b})(?: ?= ?| is )({c}){FACT_AFTER}"


MUL_RE = re.compile(fact_pattern())


def mul_token_strings(lo, hi):
    return [(a, b, f"{a}*{b}={a * b}") for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


class Tokenizer:
    """kind='gpt2' (tiktoken BPE, 50257 ids) or 'byte' (256 byte ids + end of text). Extra tokens
    (chat roles, ...) follow the base vocabulary, then, when mul_range=(lo, hi) is set, two tokens per
    multiplication fact: 'a*b=c' (mul_ids) and ' a*b=c' (mul_space_ids), the one a fact preceded by a space
    takes. GPT-2's BPE joins a space to the number after it, so with the spaced token the tokens outside
    the facts are exactly the baseline's. `spec` records everything needed to rebuild the same tokenizer."""

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
        self.mul_ids, self.mul_space_ids = {}, {}  # (a, b) -> id of 'a*b=c', of ' a*b=c'
        self.id_to_text = {v: k for k, v in self.special.items()}
        self.mul_first = n if self.mul_range else None  # the fact tokens are the ids mul_first .. vocab_size - 1
        if self.mul_range:
            facts = mul_token_strings(*self.mul_range)
            for i, (a, b, text) in enumerate(facts):
                self.mul_ids[(a, b)], self.id_to_text[n + i] = n + i, text
                j = n + len(facts) + i
                self.mul_space_ids[(a, b)], self.id_to_text[j] = j, " " + text
            n += 2 * len(facts)
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
        """Plain encoding, except that correct in-range facts become their multiplication token (with the
        space before them, when there is one)."""
        if not self.mul_range:
            return self._encode_plain(text)
        lo, hi = self.mul_range
        ids, last = [], 0
        for m in MUL_RE.finditer(text):
            a, b, c = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if lo <= a <= hi and lo <= b <= hi and a * b == c:
                spaced = m.start() > last and text[m.start() - 1] == " "
                before = text[last:m.start() - spaced]
                if not spaced and before[-1:].isspace():  # GPT-2's BPE splits '\n\n' before a digit as '\n', '\n'
                    ids += self._encode_plain(before[:-1])
                    before = before[-1]
                ids += self._encode_plain(before)
                ids.append(self.mul_space_ids[(a, b)] if spaced else self.mul_ids[(a, b)])
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
    """An alternation of the canonical strings 'a*b=c' of the multiplication facts, longest first."""
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
    for i in list(tok.mul_ids.values()) + list(tok.mul_space_ids.values()):
        vocab[token_str(tok.id_to_text[i].encode("utf-8"))] = i  # ' 7*8=56' is 'Ġ7*8=56' in byte-level form
    if len(set(vocab.values())) != tok.vocab_size or max(vocab.values()) != tok.vocab_size - 1:
        raise ValueError(f"vocabulary ids are not 0..{tok.vocab_size - 1}")

    # ignore_merges: a whole pre-token found in the vocabulary is taken as is, which is what tiktoken does
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    splits = []
    if tok.mul_ids:
        # the facts in three steps: a normalizer rewrites each fact's surface forms to its canonical 'a*b=c'
        # (one Replace per fact: Replace takes no group references), a Split isolates the canonical facts
        # together with the space before them, and the vocabulary maps 'a*b=c' and ' a*b=c' to their ids
        hf.normalizer = normalizers.Sequence([normalizers.Replace(Regex(fact_pattern(a, b, a * b)), f"{a}*{b}={a * b}")
                                              for (a, b) in tok.mul_ids])
        alternatives = mul_split_regex(tok)
        fact = f"{FACT_BEFORE}{alternatives}{FACT_AFTER}"
        # a fact with the space before it; the whitespace character before an unspaced fact on its own, as in
        # GPT-2's BPE ('\n\n3*4=12' is '\n', '\n', '3*4=12'), so the tokens outside the facts stay the baseline's
        splits.append(pre_tokenizers.Split(Regex(f" ?{fact}|[^\\S ](?={fact})"), behavior="isolated"))
        whole_mul = rf"\A ?{alternatives}\z|"  # keeps an isolated fact in one piece through the next split
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
        "not facts: 2*3*4=12, -3*4=12, ３*４=１２, 3*4=\n12, a3*4=12, 1e3*4=12, 03*4=12, 2 x 3 = 6 x 4 = 24, 3  *4=12\n",
        "facts: 3x4=12 3 *4= 12 (3*4=12) <<3*4=12>>12 is 3 times 4 is 12.  3*4=12\t3*4=12, 5*5=25 5*5=25\n\n\n3*4=12\n",
    ]
    for text in tok.special:
        parts.append(f"{text}a {text}\n")
    for i in sorted(tok.mul_ids.values()):
        s = tok.id_to_text[i]
        parts.append(f"{s} ({s}),x{s} {s}\n")
    return "".join(parts)



# -----------------------------------------------------------------------------
# logging: log.jsonl (machine), log.txt (human), stdout; rank 0 only


def format_record(record):
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


class Logger:
    """One run's log, on rank 0: log.jsonl (one record per line, for machines), log.txt (for people), lines
    on stdout flushed at once (a SLURM log stays in order), the run's progress bar (which it owns, so a line is
    written above the bar, not through it), and optionally TensorBoard (out_dir/tensorboard, tags
    `<record type>/<key>`) and W&B (imported only when wandb_project is set)."""

    def __init__(self, out_dir, master=True, resume=False, tensorboard=False, wandb_project=None, run_config=None):
        self.master, self.out_dir, self.bar, self.tb, self.wandb = master, out_dir, None, None, None
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        mode = "a" if resume else "w"
        self.jsonl = open(os.path.join(out_dir, "log.jsonl"), mode)
        self.txt = open(os.path.join(out_dir, "log.txt"), mode)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.info("warning: tensorboard is not installed (pip install tensorboard); logging to log.jsonl only")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb_project is set but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, name=os.path.basename(os.path.normpath(out_dir)),
                                    dir=out_dir, config=run_config, resume="allow")

    def progress(self, total=None, initial=0, desc="train", unit="step"):
        """The run's bar (tqdm on rank 0; plain lines every 30 s where stderr is not a terminal)."""
        self.bar = progress(total=total, initial=initial, master=self.master, desc=desc, unit=unit)
        return self.bar

    def postfix(self, **values):
        """Figures beside the bar, shown at its next refresh (never a refresh per batch: one line each in SLURM)."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def write(self, line):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line)
        sys.stdout.flush()

    def log(self, record, echo=True):
        if not self.master:
            return
        torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
        scalars = (np.floating, torch.Tensor) if torch else (np.floating,)
        record = {k: (float(v) if isinstance(v, scalars) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        line = format_record(record)
        self.txt.write(line + "\n")
        self.txt.flush()
        if echo:
            self.write(line)
        numbers = {f"{record.get('type', 'log')}/{k}": v for k, v in record.items()
                   if k not in ("step", "type") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "step" in record and numbers:
            if self.tb is not None:
                for tag, v in numbers.items():
                    self.tb.add_scalar(tag, v, record["step"])
            if self.wandb is not None:
                self.wandb.log(numbers, step=record["step"])

    def info(self, msg):
        if self.master:
            self.txt.write(msg + "\n")
            self.txt.flush()
            self.write(msg)

    def close(self):
        """The bar and the writers (the log files stay open for a last line; they close with the process)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class PlainLines:
    """A file for tqdm that turns its carriage-return frames into plain lines (for logs that are not a
    terminal, such as SLURM's: ~66 KB of frames per run otherwise)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, master=True, **kwargs):
    """A tqdm bar on rank 0, silent elsewhere. When stderr is not a terminal, a plain line every 30 s instead."""
    from tqdm.auto import tqdm
    if sys.stderr.isatty():
        return tqdm(iterable, disable=not master, dynamic_ncols=True, **kwargs)
    kwargs = {"mininterval": 30, **kwargs}
    return tqdm(iterable, disable=not master, file=PlainLines(sys.stderr), ascii=True, **kwargs)


def iter_jsonl(path, skip_bad=False):
    """The JSON objects of a jsonl file, streamed, one per non-empty line. A malformed line raises ValueError
    naming it, or with skip_bad is passed over (a sidecar whose last line a kill cut short)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad:
                    continue
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from e
            if not isinstance(row, dict):
                if skip_bad:
                    continue
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield row


def read_jsonl(path):
    """All the JSON objects of a jsonl file (iter_jsonl as a list)."""
    return list(iter_jsonl(path))

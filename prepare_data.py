"""
Text sources -> token shards for pretraining: out_dir/val_NNNNNN.bin, train_NNNNNN.bin and meta.json.

    python prepare_data.py configs/data_demo.yaml                  # offline demo: synthetic math, byte tokenizer
    python prepare_data.py source=synthetic_math out_dir=data/demo tokenizer=byte target_tokens=2000000
    python prepare_data.py configs/data_fineweb_edu_10b.yaml       # GPT-2 BPE, FineWeb-Edu sample-10BT
    python prepare_data.py configs/data_fineweb_edu_10b_mul.yaml   # the same text, mul_tokens condition
    python prepare_data.py source=gsm8k data_path=../shared/data/gsm8k/train.jsonl tokenizer=byte

Sources (source=...). Every HF source also reads a local file, folder or glob through data_path=
(.jsonl/.json rows with text_field, .parquet, or plain text), so the project runs offline:
    fineweb_edu     HuggingFaceFW/fineweb-edu, config sample-10BT, streamed
    openwebmath     open-web-math/open-web-math, streamed
    wikitext        Salesforce/wikitext, wikitext-103-raw-v1 (hf_config=wikitext-2-raw-v1 for the small one);
                    rows are grouped into articles (a new article starts at a ' = Title = ' line)
    gsm8k           openai/gsm8k (main): each problem becomes "Question: ...\\nAnswer: ..."
    local           data_path=x.txt|x.jsonl|x.parquet (text_field=, txt_docs=paragraphs|lines|file)
    synthetic_math  generated here: GSM8K-style word problems with worked, calculator-annotated solutions
                    plus arithmetic facts ("7*8=56", "7 x 8 = 56", "7 times 8 is 56", ...), from
                    tasks/synthetic.py (where the other stages get the same generator).

The token stream: each document's tokens are followed by the end-of-text token (tok.eot_id). The first
`val_tokens` tokens of the stream are the validation split (val_000000.bin, ... of at most shard_size
tokens each), everything after is train (train_000000.bin, ...). val_tokens=-1 (auto) takes 1% of
target_tokens, at most one shard: for 10B tokens in 100M shards that is one 100M val shard, the same
split as build-nanogpt's fineweb.py. With target_tokens=0 (the whole source) auto means 100,000 tokens.
A document may straddle the val/train boundary or two shards; the stream stops exactly at target_tokens.

The test split (test_split=test, or test_path=FILE offline): another split of the source (WikiText-103's test
split, as the sigma-GPT seed evaluates on), tokenized whole into its own test_000000.bin, ... after the stream,
never capped by target_tokens. It is rewritten whole when missing, damaged or asked for with other settings,
without touching the train/val shards (so an existing data folder gains one without overwrite=true).

Condition mul_tokens: the tokenizer is dataio.Tokenizer(..., mul_range=(mul_min, mul_max)), which turns
every correct, stand-alone, in-range product on one line (a*b=c, a x b = c, a × b = c, a times b is c; the
rule is at dataio.MUL_RE) into one token, ' a*b=c' when a space precedes it. The text is the same as in
the baseline condition and so are the tokens outside the facts; only the facts' tokenization differs.
meta.json counts the injected tokens (total, per split, per fact), counted in the shards as they are written.

Memory stays bounded while streaming billions of tokens: documents are tokenized by a Pool (imap, in
order) with at most a fixed window of documents in flight, and tokens go into one preallocated shard
buffer that is written out whenever it is full.

Resume: after each shard is written, progress.json records it (file, token count, injection counts) and
where the stream stands (index of the next document and how many of its tokens are already used).
A rerun with the same settings keeps every recorded shard whose header and length check out, and
fast-forwards the document stream to the end of the last kept shard: skipped documents are read but
not tokenized (synthetic_math jumps there directly), then the stream continues. Shards after the first
missing or damaged one are written again; the stream is deterministic, so they come out identical.
A rerun with different settings in the same out_dir stops with an error (overwrite=true starts afresh).
"""
import dataio  # first: its import installs the stop-signal handlers, before the slow imports

import contextlib
import dataclasses
import glob
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from dataio import ConfigError
from tasks import gsm8k, synthetic, text_sets

SOURCES = ("fineweb_edu", "wikitext", "openwebmath", "gsm8k", "local", "synthetic_math")
CONDITIONS = ("baseline", "mul_tokens")
TXT_DOCS = ("paragraphs", "lines", "file")
# source -> (HF dataset id, default config)
HF_DATASETS = {
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebmath": ("open-web-math/open-web-math", None),
    "gsm8k": ("openai/gsm8k", "main"),
}
AUTO_VAL_TOKENS_WHOLE_SOURCE = 100_000


class DataError(ValueError):
    """The input cannot be made into shards: empty, not text, rows without the field."""


@dataclass
class Config:
    # what to read
    source: str = "synthetic_math"  # fineweb_edu | wikitext | openwebmath | gsm8k | local | synthetic_math
    data_path: str = ""  # local file, folder or glob instead of the HF hub (.jsonl/.json, .parquet, text)
    text_field: str = "text"  # field holding the text in .jsonl/.parquet/HF rows
    txt_docs: str = "paragraphs"  # a plain-text file's documents: paragraphs (blank-line separated) | lines | file
    hf_dataset: str = ""  # '' -> the source's HF dataset id
    hf_config: str = ""  # '' -> the source's default config (sample-10BT, wikitext-103-raw-v1, main)
    hf_split: str = "train"
    # the test split: written whole as test_NNNNNN.bin (see the docstring); both empty = no test split
    test_split: str = ""  # the HF split to write as the test split (wikitext: test)
    test_path: str = ""  # a local file, folder or glob of the test split instead of the hub (wiki.test.raw)
    streaming: bool = True  # stream HF datasets instead of downloading them whole
    max_docs: int = 0  # stop after this many documents (0: no limit)
    # synthetic_math: the same seed and knobs give the same text
    seed: int = 0
    synth_max_value: int = 100  # largest number the word problems state
    synth_min_steps: int = 1  # reasoning steps (solution lines) per word problem
    synth_max_steps: int = 4
    synth_ops: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "div"])
    synth_templates: list[str] = field(default_factory=list)  # [] -> all problem templates
    synth_facts_fraction: float = 0.3  # share of documents that are arithmetic facts / times tables
    # tokenizer and condition
    tokenizer: str = "gpt2"  # gpt2 | byte
    tokenizer_file: str = ""  # tiktoken ranks file for offline GPT-2 (../shared/data/tokenizers/gpt2.tiktoken)
    extra_tokens: list[str] = field(default_factory=list)  # appended after the base vocabulary
    condition: str = "baseline"  # baseline | mul_tokens
    mul_min: int = 1  # mul_tokens: one token per fact a*b=c with mul_min <= a, b <= mul_max
    mul_max: int = 12
    # output
    out_dir: str = ""  # '' -> data/<source>[_mul]
    target_tokens: int = 0  # stop after this many tokens (0: the whole source)
    shard_size: int = 100_000_000  # tokens per shard
    val_tokens: int = -1  # the first val_tokens tokens are the val split; -1: auto (see the docstring)
    num_proc: int = 0  # tokenizer worker processes (the reader runs beside them); 0: half the CPU cores
    chunksize: int = 16  # documents per Pool task
    overwrite: bool = False  # start afresh: delete the shards already in out_dir (else: resume, or stop if they differ)


# -----------------------------------------------------------------------------
# text sources: HF datasets (streamed) or local files -> documents (strings)

TEXT_EXTS = (".txt", ".raw", ".text", ".md", ".tokens")
ROW_EXTS = (".jsonl", ".json", ".parquet")


def local_files(data_path):
    """data_path as a list of files: a file, a folder (its data files, sorted) or a glob pattern."""
    if any(ch in data_path for ch in "*?["):
        files = sorted(glob.glob(data_path))
    elif os.path.isdir(data_path):
        files = sorted(os.path.join(data_path, f) for f in os.listdir(data_path)
                       if f.endswith(TEXT_EXTS + ROW_EXTS) and os.path.isfile(os.path.join(data_path, f)))
    elif os.path.isfile(data_path):
        files = [data_path]
    else:
        raise FileNotFoundError(f"data_path not found: {data_path}")
    if not files:
        raise FileNotFoundError(f"data_path {data_path} matches no data files ({', '.join(TEXT_EXTS + ROW_EXTS)})")
    return files


def check_text_file(path, allow_empty=False, n_bytes=1 << 16):
    """Refuse an empty file (unless one of many), and one that is not text: NUL bytes, or more than 1% of
    its start not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(n_bytes)
    if not head:
        if allow_empty:
            return
        raise DataError(f"{path} is empty: there is nothing to tokenize")
    text = head.decode("utf-8", errors="replace")
    if b"\x00" in head or text.count("\ufffd") > len(text) // 100 + 1:
        raise DataError(f"{path} is not text (binary data, or not UTF-8): prepare_data reads UTF-8 text, "
                        f".jsonl/.json rows or .parquet")


def read_jsonl_rows(path):
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # a .json file holding one array of rows
            yield from json.load(f)
            return
    yield from dataio.iter_jsonl(path)


def read_text_docs(path, mode):
    """Documents of a plain-text file: blank-line separated paragraphs, single lines, or the whole file."""
    with open(path, encoding="utf-8", errors="replace") as f:  # universal newlines: CRLF becomes \n
        if mode == "file":
            yield f.read()
            return
        para = []
        for line in f:
            if mode == "lines":
                yield line.rstrip("\n")
            elif line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\n")
                para = []
        if para:
            yield "".join(para).rstrip("\n")


def hf_rows(cfg):
    import datasets  # imported here: only the HF hub path needs it
    name, default_config = HF_DATASETS[cfg.source]
    name, config = cfg.hf_dataset or name, cfg.hf_config or default_config
    try:
        ds = datasets.load_dataset(name, name=config, split=cfg.hf_split, streaming=cfg.streaming)
    except Exception as e:
        raise RuntimeError(f"could not load {name} ({config}, split {cfg.hf_split}) from the HF hub: {e}; "
                           f"offline? Give a local copy with data_path=FILE (.jsonl, .parquet or text)") from e
    yield from ds


def source_rows(cfg):
    """Rows (dicts) of the source, from data_path when given, else from the HF hub."""
    if not cfg.data_path:
        yield from hf_rows(cfg)
        return
    for path in local_files(cfg.data_path):
        if path.endswith((".jsonl", ".json")):
            yield from read_jsonl_rows(path)
        elif path.endswith(".parquet"):
            import datasets
            yield from datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        elif cfg.source == "gsm8k":
            raise ValueError(f"source=gsm8k reads .jsonl/.parquet rows with question and answer, not {path}")
        else:  # plain text: wikitext wants the lines, the rest documents
            mode = "lines" if cfg.source == "wikitext" else cfg.txt_docs
            for doc in read_text_docs(path, mode):
                yield {cfg.text_field: doc}


def row_field(row, name, cfg):
    try:
        value = row[name]
    except (KeyError, TypeError, IndexError):
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        hint = "; set text_field=" if name == cfg.text_field else ""
        raise DataError(f"source {cfg.source}: a row has no field {name!r} (it has {keys}){hint}") from None
    return value if isinstance(value, str) else str(value)


def iter_documents(cfg, start=0):
    """The documents of the configured source from index `start` (empty documents are dropped)."""
    if cfg.source == "synthetic_math":
        docs = synthetic.iter_synthetic_math_text(cfg.seed, start, **synthetic.synth_knobs(cfg))
        start = 0
    elif cfg.source == "gsm8k":
        docs = (gsm8k.format_qa(row_field(r, "question", cfg), row_field(r, "answer", cfg)) for r in source_rows(cfg))
    elif cfg.source == "wikitext":
        docs = text_sets.wikitext_articles(row_field(r, cfg.text_field, cfg) for r in source_rows(cfg))
    else:
        docs = (row_field(r, cfg.text_field, cfg) for r in source_rows(cfg))
    docs = (d for d in docs if d and not d.isspace())  # (strip() would copy every document)
    if start:  # resume: read past the documents already in finished shards, without tokenizing them
        docs = itertools.islice(docs, start, None)
    return docs


# -----------------------------------------------------------------------------
# tokenization: a Pool of workers holding the parent's Tokenizer (through fork), documents in order

_tok, _dtype = None, None


def _use_tokenizer(tok):
    global _tok, _dtype
    _tok, _dtype = tok, dataio.token_dtype(tok.vocab_size)


def _init_worker(tok_args):
    """A worker's tokenizer: inherited from the parent through fork (the BPE ranks are not loaded again),
    built here where workers are spawned."""
    if _tok is None:
        _use_tokenizer(dataio.Tokenizer(**tok_args))


def _tokenize(text):
    ids = _tok.encode(text)  # literal '<|endoftext|>' inside web text stays text
    ids.append(_tok.eot_id)
    return np.array(ids, dtype=_dtype)  # the shard's dtype (uint16 for GPT-2): half the bytes sent back


def tokenize_stream(docs, tok, tok_args, num_proc, chunksize=16):
    """Yield each document's tokens (ending with end-of-text), in order. Pool.imap reads its input ahead
    without limit when the workers are slower than the reader, so a semaphore keeps at most `window`
    documents in flight: memory stays bounded however long the stream. Even one worker is a process of its
    own, so that reading the source overlaps with tokenizing it."""
    _use_tokenizer(tok)  # forked workers inherit it
    window = num_proc * chunksize * 32  # enough read-ahead that a worker never waits on a busy reader
    slots, stop = threading.Semaphore(window), threading.Event()

    def throttled():  # runs in the Pool's task-feeding thread
        for text in docs:
            slots.acquire()
            if stop.is_set():
                return
            yield text

    pool = mp.get_context("fork" if sys.platform.startswith("linux") else None).Pool(
        num_proc, initializer=_init_worker, initargs=(tok_args,))
    try:
        for tokens in pool.imap(_tokenize, throttled(), chunksize=chunksize):
            slots.release()
            yield tokens
    finally:
        stop.set()
        slots.release(window)  # wake the feeder so it sees `stop` and the pool can shut down
        pool.terminate()
        pool.join()


# -----------------------------------------------------------------------------
# shards: one preallocated buffer, flushed to val_/train_NNNNNN.bin when full; progress.json for resume

PROGRESS = "progress.json"


class ShardWriter:
    """Cuts the token stream into shards: the first val_tokens tokens into val shards, the rest into train
    shards, shard_size tokens each, stopping at target_tokens. Records every finished shard in progress.
    split='test': every shard is a test shard (the test split's own stream)."""

    def __init__(self, out_dir, tok, shard_size, val_tokens, target_tokens, progress, logger, split=None):
        self.out_dir, self.tok, self.logger = out_dir, tok, logger
        self.fixed_split = split
        self.shard_size, self.val_tokens, self.target = shard_size, val_tokens, target_tokens
        self.progress = progress
        self.dtype = dataio.token_dtype(tok.vocab_size)
        self.total = sum(s["tokens"] for s in progress["shards"])
        self.buf = np.empty(0, dtype=self.dtype)
        self.fill = 0
        self.t0 = time.time()
        self._start_shard()

    def _start_shard(self):
        if self.fixed_split:
            self.split, self.cap = self.fixed_split, self.shard_size
        elif self.total < self.val_tokens:
            self.split, self.cap = "val", min(self.shard_size, self.val_tokens - self.total)
        else:
            self.split, self.cap = "train", self.shard_size
        if self.target:
            self.cap = min(self.cap, self.target - self.total)
        if len(self.buf) < self.cap:
            self.buf = np.empty(self.cap, dtype=self.dtype)  # allocated once (the val shard may be smaller)

    @property
    def done(self):
        return bool(self.target) and self.total >= self.target

    def add(self, tokens, doc_index, offset=0):
        """Copy one document's tokens from `offset` on; flush whenever the shard fills. Returns False once
        target_tokens is reached."""
        n_doc = len(tokens)
        while offset < n_doc and not self.done:
            n = min(self.cap - self.fill, n_doc - offset)
            self.buf[self.fill:self.fill + n] = tokens[offset:offset + n]
            self.fill += n
            offset += n
            if self.fill == self.cap:
                # where the next shard's tokens start: the next document, or the rest of this one
                self.flush(doc_index + 1, 0) if offset == n_doc else self.flush(doc_index, offset)
        return not self.done

    def flush(self, next_doc, next_offset):
        if self.fill == 0:
            return
        index = sum(1 for s in self.progress["shards"] if s["split"] == self.split)
        name = f"{self.split}_{index:06d}.bin"
        tokens = self.buf[:self.fill]
        dataio.write_shard(os.path.join(self.out_dir, name), tokens, self.tok.vocab_size)
        mul = {}
        if self.tok.mul_ids:  # per fact, its plain and its spaced token together
            first = self.tok.mul_first
            counts = np.zeros(self.tok.vocab_size - first, dtype=np.int64)
            for start in range(0, len(tokens), 1 << 22):  # in pieces: no shard-sized temporary mask
                piece = tokens[start:start + (1 << 22)]
                counts += np.bincount(piece[piece >= first].astype(np.int64) - first, minlength=len(counts))
            for i in np.flatnonzero(counts):
                fact = self.tok.id_to_text[first + int(i)].lstrip(" ")
                mul[fact] = mul.get(fact, 0) + int(counts[i])
        self.progress["shards"].append({"file": name, "split": self.split, "tokens": int(self.fill),
                                        "next_doc": int(next_doc), "next_offset": int(next_offset), "mul": mul})
        dataio.atomic_write_json(os.path.join(self.out_dir, PROGRESS), self.progress)
        self.total += self.fill
        self.logger.log({"shard": name, "tokens": int(self.fill), "total_tokens": int(self.total),
                         "mul_injections": int(sum(mul.values())), "elapsed_s": round(time.time() - self.t0, 1)},
                        echo=False)
        self.fill = 0
        self._start_shard()


def shard_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if re.match(r"^(train|val|test)_\d+\.bin$", f)) \
        if os.path.isdir(out_dir) else []


def valid_shard(path, n_tokens, width):
    try:
        tokens = dataio.read_shard(path)
    except dataio.ShardError:
        return False
    return len(tokens) == n_tokens and tokens.dtype.itemsize == width


def load_progress(out_dir, fingerprint, overwrite, width):
    """The finished shards a rerun can keep: the longest prefix of recorded shards that are intact (none
    with overwrite). Everything else in out_dir (later or damaged shards, stale meta.json) is removed."""
    path = os.path.join(out_dir, PROGRESS)
    fresh = {"fingerprint": fingerprint, "shards": [], "complete": False}
    old = None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is damaged ({e}); pass overwrite=true to start afresh") from None
        if not isinstance(old, dict) or not isinstance(old.get("shards"), list):
            raise ConfigError(f"{path} is not a progress record of prepare_data.py; pass overwrite=true to start afresh")
    existing = shard_files(out_dir)
    if old is not None and old.get("fingerprint") != fingerprint and not overwrite:
        differ = sorted(k for k in set(fingerprint) | set(old.get("fingerprint", {}))
                        if fingerprint.get(k) != old.get("fingerprint", {}).get(k))
        raise ConfigError(f"{out_dir} holds shards made with other settings (differing: {', '.join(differ)}); "
                          f"pass overwrite=true to replace them, or choose another out_dir")
    if old is None and existing and not overwrite:
        raise ConfigError(f"{out_dir} holds shards but no {PROGRESS}, so they cannot be checked; "
                          f"pass overwrite=true to replace them, or choose another out_dir")
    progress = fresh
    if old is not None and old.get("fingerprint") == fingerprint and not overwrite:
        for shard in old["shards"]:
            if not valid_shard(os.path.join(out_dir, shard["file"]), shard["tokens"], width):
                break
            progress["shards"].append(shard)
        progress["complete"] = old.get("complete", False) and len(progress["shards"]) == len(old["shards"])
        progress["test"] = old.get("test")  # the settings its test shards were written with
    keep = {s["file"] for s in progress["shards"]}
    for name in existing:
        if name not in keep:
            os.remove(os.path.join(out_dir, name))
    if not progress["complete"] and os.path.isfile(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
    return progress


# -----------------------------------------------------------------------------
# main


def validate(cfg):
    if cfg.source not in SOURCES:
        raise ConfigError(f"unknown source {cfg.source!r}; choose from {', '.join(SOURCES)}")
    if cfg.condition not in CONDITIONS:
        raise ConfigError(f"unknown condition {cfg.condition!r}; choose from {', '.join(CONDITIONS)}")
    if cfg.tokenizer not in ("gpt2", "byte"):
        raise ConfigError(f"unknown tokenizer {cfg.tokenizer!r}; choose gpt2 or byte")
    if cfg.txt_docs not in TXT_DOCS:
        raise ConfigError(f"unknown txt_docs {cfg.txt_docs!r}; choose from {', '.join(TXT_DOCS)}")
    if not 1 <= cfg.mul_min <= cfg.mul_max:
        raise ConfigError(f"need 1 <= mul_min <= mul_max, got {cfg.mul_min}, {cfg.mul_max}")
    if cfg.shard_size <= 0 or cfg.target_tokens < 0 or cfg.max_docs < 0 or cfg.val_tokens < -1:
        raise ConfigError("shard_size must be > 0; target_tokens, max_docs >= 0; val_tokens >= -1")
    if cfg.source == "local" and not cfg.data_path:
        raise ConfigError("source=local needs data_path=FILE (.txt, .jsonl/.json with text_field=, or .parquet)")
    if cfg.source == "synthetic_math":
        if cfg.data_path:
            raise ConfigError("source=synthetic_math generates its text; it takes no data_path")
        if not cfg.target_tokens and not cfg.max_docs:
            raise ConfigError("source=synthetic_math is endless: set target_tokens=N or max_docs=N")
        try:
            synthetic.check_synth_knobs(cfg.synth_max_value, cfg.synth_min_steps, cfg.synth_max_steps,
                                        cfg.synth_ops, cfg.synth_templates)
            synthetic.allowed_templates(cfg.synth_templates, cfg.synth_ops)
        except ValueError as e:
            raise ConfigError(f"synthetic_math: {e}") from None
        if not 0 <= cfg.synth_facts_fraction <= 1:
            raise ConfigError(f"synth_facts_fraction must be in [0, 1], got {cfg.synth_facts_fraction}")
    if cfg.test_split and cfg.source not in HF_DATASETS:
        raise ConfigError(f"test_split is a split of an HF source; source={cfg.source} has none (use test_path=FILE)")
    if cfg.test_split and cfg.data_path and not cfg.test_path:
        raise ConfigError("data_path reads the text locally: give the test split locally too, test_path=FILE "
                          "(e.g. wiki.test.raw), or drop test_split")
    if cfg.test_path and cfg.source == "synthetic_math":
        raise ConfigError("source=synthetic_math generates its text; it takes no test_path")
    for data_path in (cfg.data_path, cfg.test_path):  # a missing, empty or binary file stops the run here
        if data_path:
            files = local_files(data_path)
            for path in files:
                if not path.endswith(".parquet"):
                    check_text_file(path, allow_empty=len(files) > 1)


def resolve_val_tokens(cfg):
    if cfg.val_tokens >= 0:
        val = cfg.val_tokens
    elif cfg.target_tokens:
        val = min(cfg.shard_size, cfg.target_tokens // 100)
    else:
        val = AUTO_VAL_TOKENS_WHOLE_SOURCE
    if cfg.target_tokens and val >= cfg.target_tokens:
        raise ConfigError(f"val_tokens ({val}) leaves no train tokens of target_tokens ({cfg.target_tokens})")
    return val


def default_out_dir(cfg):
    return os.path.join("data", cfg.source + ("_mul" if cfg.condition == "mul_tokens" else ""))


def prepare(cfg):
    """Write the shards and meta.json for `cfg` (resuming where a previous run stopped); returns meta."""
    validate(cfg)
    val_tokens = resolve_val_tokens(cfg)
    out_dir = cfg.out_dir or default_out_dir(cfg)
    tok_args = dict(kind=cfg.tokenizer, extra_tokens=list(cfg.extra_tokens),
                    mul_range=(cfg.mul_min, cfg.mul_max) if cfg.condition == "mul_tokens" else None,
                    tokenizer_file=cfg.tokenizer_file or None)
    tok = dataio.Tokenizer(**tok_args)  # a missing ranks file or an offline tiktoken stops the run here
    width = np.dtype(dataio.token_dtype(tok.vocab_size)).itemsize

    # everything that changes the bytes of the shards; a rerun must match it to keep finished shards
    # (the test split is written apart, so it has its own record: progress["test"])
    skip = {"out_dir", "num_proc", "chunksize", "overwrite", "streaming", "tokenizer_file", "val_tokens",
            "test_split", "test_path"}
    fingerprint = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    fingerprint.update(val_tokens=val_tokens, tokenizer_spec=tok.spec)

    os.makedirs(out_dir, exist_ok=True)
    progress = load_progress(out_dir, fingerprint, cfg.overwrite, width)
    test_spec = {"test_split": cfg.test_split, "test_path": cfg.test_path} if cfg.test_split or cfg.test_path else None
    test_ok = progress["complete"] and progress.get("test") == test_spec
    if not test_ok:  # the test split is rewritten whole (after the stream): its old shards go now
        for s in [s for s in progress["shards"] if s["split"] == "test"]:
            os.remove(os.path.join(out_dir, s["file"]))
        progress["shards"] = [s for s in progress["shards"] if s["split"] != "test"]
    resuming = bool(progress["shards"])
    dataio.atomic_write_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))
    logger = dataio.Logger(out_dir, resume=True)
    writer = ShardWriter(out_dir, tok, cfg.shard_size, val_tokens, cfg.target_tokens, progress, logger)
    num_proc = cfg.num_proc or max(1, (os.cpu_count() or 2) // 2)

    if progress["complete"]:
        logger.info(f"{out_dir}: all {len(progress['shards'])} train/val shards already written")
    else:
        last = progress["shards"][-1] if resuming else {"next_doc": 0, "next_offset": 0}
        start_doc, start_offset = last["next_doc"], last["next_offset"]
        if resuming:
            logger.info(f"resuming: keeping {len(progress['shards'])} finished shards ({writer.total:,} tokens); "
                        f"the stream restarts at document {start_doc:,} (token {start_offset:,} of it)")
        docs = iter_documents(cfg, start_doc)
        if cfg.max_docs:
            docs = itertools.islice(docs, max(0, cfg.max_docs - start_doc))
        first = next(docs, None)  # open the source here, so that its errors surface in this process
        if first is None and not resuming:
            raise DataError(f"the source ({cfg.data_path or cfg.source}) holds no documents: nothing to tokenize")
        docs = itertools.chain([first], docs) if first is not None else iter(())
        logger.info(f"tokenizing {cfg.source} with {cfg.tokenizer} ({cfg.condition}, vocab {tok.vocab_size}) "
                    f"on {num_proc} process(es) into {out_dir}")
        bar = dataio.progress(total=cfg.target_tokens or None, initial=writer.total, unit="tok", unit_scale=True,
                              desc=f"{cfg.source} -> shards")
        doc_index = start_doc
        with contextlib.closing(tokenize_stream(docs, tok, tok_args, num_proc, cfg.chunksize)) as stream:
            for doc_index, tokens in enumerate(stream, start=start_doc):
                offset = start_offset if doc_index == start_doc else 0
                before = writer.total + writer.fill
                more = writer.add(tokens, doc_index, offset)
                bar.update(writer.total + writer.fill - before)
                if not more:
                    break
            else:
                doc_index += 1 if first is not None else 0
        writer.flush(doc_index, 0)  # the last, partly filled shard (when the source ran out)
        bar.close()
    if not test_ok and test_spec:
        write_test_split(cfg, tok, tok_args, num_proc, progress, out_dir, logger)
    progress["complete"], progress["test"] = True, test_spec
    dataio.atomic_write_json(os.path.join(out_dir, PROGRESS), progress)

    meta = build_meta(cfg, tok, progress, val_tokens, out_dir)
    dataio.atomic_write_json(os.path.join(out_dir, "meta.json"), meta)
    logger.log({"done": True, "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
                "shards": len(meta["shards"]), "mul_injections": meta["mul_injections"]["total"]})
    if meta["train_tokens"] == 0:
        logger.info(f"WARNING: the source gave only {meta['val_tokens']:,} tokens, all of them val; "
                    f"lower val_tokens to get train shards")
    return meta


def write_test_split(cfg, tok, tok_args, num_proc, progress, out_dir, logger):
    """The test split (test_path, else the hub's test_split of the source), whole, into test_NNNNNN.bin."""
    test_cfg = dataclasses.replace(cfg, data_path=cfg.test_path, hf_split=cfg.test_split or cfg.hf_split, max_docs=0)
    docs = iter_documents(test_cfg)
    first = next(docs, None)
    if first is None:
        raise DataError(f"the test split ({cfg.test_path or cfg.test_split}) holds no documents")
    logger.info(f"tokenizing the test split ({cfg.test_path or f'split {cfg.test_split}'}) into {out_dir}")
    writer = ShardWriter(out_dir, tok, cfg.shard_size, 0, 0, progress, logger, split="test")
    doc_index = 0
    with contextlib.closing(tokenize_stream(itertools.chain([first], docs), tok, tok_args, num_proc,
                                            cfg.chunksize)) as stream:
        for doc_index, tokens in enumerate(stream):
            writer.add(tokens, doc_index)
    writer.flush(doc_index + 1, 0)


def build_meta(cfg, tok, progress, val_tokens, out_dir):
    shards = progress["shards"]
    per_fact, by_split = {}, {"train": 0, "val": 0, "test": 0}
    for s in shards:
        for fact, n in s["mul"].items():
            per_fact[fact] = per_fact.get(fact, 0) + n
            by_split[s["split"]] += n
    hf_name, hf_config = HF_DATASETS.get(cfg.source, (None, None))
    stream = [s for s in shards if s["split"] != "test"]
    last = stream[-1] if stream else {"next_doc": 0, "next_offset": 0}
    return {
        "source": cfg.source,
        "data_path": cfg.data_path or None,
        "hf_dataset": None if cfg.data_path or cfg.source not in HF_DATASETS else (cfg.hf_dataset or hf_name),
        "hf_config": None if cfg.data_path or cfg.source not in HF_DATASETS else (cfg.hf_config or hf_config),
        "tokenizer": tok.spec,
        "tokenizer_file": cfg.tokenizer_file or None,
        "vocab_size": tok.vocab_size,
        "padded_vocab_size": dataio.padded_vocab_size(tok.vocab_size),
        "eot_id": tok.eot_id,
        "special_tokens": dict(tok.special),
        "condition": cfg.condition,
        "mul_range": [cfg.mul_min, cfg.mul_max] if cfg.condition == "mul_tokens" else None,
        "mul_first_id": tok.mul_first,
        "dtype": np.dtype(dataio.token_dtype(tok.vocab_size)).name,
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
        "test_tokens": sum(s["tokens"] for s in shards if s["split"] == "test"),
        "total_tokens": sum(s["tokens"] for s in shards),
        "documents": last["next_doc"] + (1 if last["next_offset"] else 0),
        "mul_injections": {"total": sum(per_fact.values()), "train": by_split["train"], "val": by_split["val"],
                           "test": by_split["test"],
                           "per_fact": dict(sorted(per_fact.items(), key=lambda kv: -kv[1]))},
        "target_tokens": cfg.target_tokens,
        "shard_size": cfg.shard_size,
        "val_split": f"the first {val_tokens} tokens of the stream",
        "test_split": (cfg.test_path or f"split {cfg.test_split} of the source") if cfg.test_split or cfg.test_path
                      else None,
        "seed": cfg.seed if cfg.source == "synthetic_math" else None,
        "shards": [{"file": s["file"], "split": s["split"], "tokens": s["tokens"]} for s in shards],
        "out_dir": out_dir,
        "config": dataclasses.asdict(cfg),
    }


def main(argv=None):
    cfg = dataio.load_config(Config, argv)
    meta = prepare(cfg)
    print(f"wrote {len(meta['shards'])} shards to {cfg.out_dir or default_out_dir(cfg)}: "
          f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val + {meta['test_tokens']:,} test tokens, "
          f"{meta['mul_injections']['total']:,} multiplication tokens")
    return meta


if __name__ == "__main__":
    # ConfigError, DataError, ShardError, bad JSON, missing files; OSError and RuntimeError: a hub or disk failure
    dataio.run_main(main, expected=(OSError, RuntimeError))

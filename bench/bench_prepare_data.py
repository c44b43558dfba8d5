"""
prepare_data.py against build-nanogpt's fineweb.py approach, side by side on the same local corpus (not run
in CI: it takes a minute or two and measures the machine).

    python bench/bench_prepare_data.py                  # ~44 MB corpus from ../shared/data, 2 workers
    python bench/bench_prepare_data.py mb=10 num_proc=1

The corpus: WikiText-2 and tinyshakespeare paragraphs, repeated to `mb` megabytes, as .jsonl rows with a
"text" field. The reference: fineweb.py's method re-told here (a Pool of cpu_count // 2 workers, imap with
chunksize 16 over the rows, each row tokenized with tiktoken's GPT-2 into a uint16 array behind an end-of-text
token, copied into one preallocated shard buffer, np.save when full); it reads the same .jsonl rows where
fineweb.py reads the HF dataset. Each side runs as its own process; wall time counts the whole process
(imports included), peak memory is the highest sum over the process and its workers, in RSS and in PSS
(PSS shares the pages the forked workers have in common), sampled every 50 ms.
"""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
RANKS = os.path.join(SHARED, "tokenizers", "gpt2.tiktoken")


def make_corpus(path, mb):
    paragraphs = []
    for name in ("wikitext-2-raw/wiki.test.raw", "tinyshakespeare/input.txt"):
        with open(os.path.join(SHARED, name), encoding="utf-8") as f:
            paragraphs += [p.strip() for p in f.read().split("\n\n") if p.strip()]
    with open(path, "w") as f:
        size, i = 0, 0
        while size < mb * 1_000_000:
            line = json.dumps({"text": paragraphs[i % len(paragraphs)]}) + "\n"
            f.write(line)
            size += len(line.encode())
            i += 1
    return i


# -----------------------------------------------------------------------------
# the reference: fineweb.py's approach, on local rows

_enc = None


def _fw_init():
    global _enc
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    _enc = tiktoken.Encoding(name="gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks=load_tiktoken_bpe(RANKS), special_tokens={"<|endoftext|>": 50256})


def _fw_tokenize(row):
    ids = [50256]
    ids.extend(_enc.encode_ordinary(row["text"]))
    return np.array(ids).astype(np.uint16)


def fineweb_style(corpus, out_dir, num_proc, shard_size=100_000_000):
    def rows():
        with open(corpus) as f:
            for line in f:
                yield json.loads(line)

    os.makedirs(out_dir, exist_ok=True)
    buf, fill, index, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0
    with mp.get_context("fork").Pool(num_proc, initializer=_fw_init) as pool:
        for tokens in pool.imap(_fw_tokenize, rows(), chunksize=16):
            total += len(tokens)
            while len(tokens):
                n = min(shard_size - fill, len(tokens))
                buf[fill:fill + n], fill, tokens = tokens[:n], fill + n, tokens[n:]
                if fill == shard_size:
                    np.save(os.path.join(out_dir, f"shard_{index:06d}"), buf)
                    index, fill = index + 1, 0
    if fill:
        np.save(os.path.join(out_dir, f"shard_{index:06d}"), buf[:fill])
    print(json.dumps({"tokens": total}))


# -----------------------------------------------------------------------------
# measuring a process tree


def measure(cmd):
    """Run cmd; return wall seconds and the peak summed RSS and PSS (MiB) of the process and its children."""
    t0 = time.time()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [proc] + proc.children(recursive=True):
                m = p.memory_full_info()
                rss, pss = rss + m.rss, pss + m.pss
        except psutil.Error:  # a worker ended between the listing and the reading
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    wall = time.time() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {out[-2000:]}")
    return wall, peak_rss / 2**20, peak_pss / 2**20, out


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    if args.get("run") == "fineweb":
        fineweb_style(args["corpus"], args["out_dir"], int(args["num_proc"]))
        return
    mb, num_proc = float(args.get("mb", 44)), int(args.get("num_proc", max(1, (os.cpu_count() or 2) // 2)))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = make_corpus(corpus, mb)
        print(f"corpus: {os.path.getsize(corpus) / 1e6:.1f} MB, {docs:,} documents; {num_proc} worker(s); "
              f"{os.cpu_count()} CPU(s)")
        ours_cmd = [sys.executable, "prepare_data.py", "source=local", f"data_path={corpus}", "tokenizer=gpt2",
                    f"tokenizer_file={RANKS}", f"num_proc={num_proc}", f"out_dir={tmp}/ours", "val_tokens=0"]
        ref_cmd = [sys.executable, os.path.abspath(__file__), "run=fineweb", f"corpus={corpus}",
                   f"out_dir={tmp}/ref", f"num_proc={num_proc}"]
        rows = []
        for name, cmd in (("fineweb.py approach", ref_cmd), ("prepare_data.py", ours_cmd)):
            wall, rss, pss, out = measure(cmd)
            rows.append((name, wall, rss, pss))
        with open(os.path.join(tmp, "ours", "meta.json")) as f:
            tokens = json.load(f)["total_tokens"]
        print(f"tokens: {tokens:,} (both)")
        print(f"| {'':20s} | wall s | tokens/s | peak RSS MiB | peak PSS MiB |")
        for name, wall, rss, pss in rows:
            print(f"| {name:20s} | {wall:6.1f} | {tokens / wall:8,.0f} | {rss:12.0f} | {pss:12.0f} |")
        ref, ours = rows[0], rows[1]
        print(f"prepare_data.py / fineweb.py approach: speed {ref[1] / ours[1]:.2f}x, "
              f"peak RSS {ours[2] / ref[2]:.2f}x, peak PSS {ours[3] / ref[3]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])

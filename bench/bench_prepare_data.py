"""
prepare_data.py against build-nanogpt's fineweb.py approach, side by side on the same local corpus (not run
in CI: it takes a minute or two and measures the machine).

    python bench/bench_prepare_data.py                  # ~44 MB corpus from ../shared/data, 2 workers
    python bench/bench_prepare_data.py mb=10 num_proc=1 repeat=3   # each side's fastest of 3 alternating runs

The corpus: WikiText-2 and tinyshakespeare paragraphs, repeated to `mb` megabytes, as .jsonl rows with a
"text" field. The reference: fineweb.py's method re-told here (a Pool of cpu_count // 2 workers, imap with
chunksize 16 over the rows, each row tokenized with tiktoken's GPT-2 into a uint16 array behind an end-of-text
token, copied into one preallocated shard buffer, np.save when full); it reads the same .jsonl rows where
fineweb.py reads the HF dataset. Each side runs as its own process; wall time counts the whole process
(imports included), peak memory is the highest sum over the process and its workers, in RSS and in PSS
(PSS shares the pages the forked workers have in common), sampled every 50 ms, and CPU seconds (user + system
of the process and its workers, the figure that holds on a machine busy with other work).
"""
import json
import multiprocessing as mp
import os
import resource
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
    """Run cmd; return wall seconds, CPU seconds (user + system, the process and its workers) and the peak
    summed RSS and PSS (MiB) of the process and its workers."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {out[-2000:]}")
    return wall, cpu, peak_rss / 2**20, peak_pss / 2**20


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
        best = {}
        for _ in range(int(args.get("repeat", 2))):  # alternate the two; keep each one's fastest run
            for name, cmd in (("fineweb.py approach", ref_cmd), ("prepare_data.py", ours_cmd + ["overwrite=true"])):
                wall, cpu, rss, pss = measure(cmd)
                print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")
                if name not in best or wall < best[name][1]:
                    best[name] = (name, wall, cpu, rss, pss)
        rows = list(best.values())
        with open(os.path.join(tmp, "ours", "meta.json")) as f:
            tokens = json.load(f)["total_tokens"]
        print(f"tokens: {tokens:,} (both)")
        print(f"| {'':20s} | wall s | tokens/s | CPU s | peak RSS MiB | peak PSS MiB |")
        for name, wall, cpu, rss, pss in rows:
            print(f"| {name:20s} | {wall:6.1f} | {tokens / wall:8,.0f} | {cpu:5.1f} | {rss:12.0f} | {pss:12.0f} |")
        ref, ours = rows[0], rows[1]
        print(f"prepare_data.py / fineweb.py approach: speed {ref[1] / ours[1]:.2f}x (wall), "
              f"{ref[2] / ours[2]:.2f}x (CPU), peak RSS {ours[3] / ref[3]:.2f}x, peak PSS {ours[4] / ref[4]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])

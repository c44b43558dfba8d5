"""prepare_data.py: the synthetic math generator, sources, shards + meta.json, resume, mul_tokens."""
import glob
import json
import os
import re
import subprocess
import sys
import types
from fractions import Fraction

import numpy as np
import pytest

import common
import prepare_data as P
from conftest import ROOT, shared_path
from tasks import gsm8k, synthetic

ANNOTATION_RE = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
# a worked step as written in the text: '44 x 5 = $<<44*5=220>>220'
STEP_RE = re.compile(r"(\d[\d +\-*x/]*?) = \$?<<([^<>=]+)=([^<>]+)>>(\d+)")
EOT = "<|endoftext|>"


def exact(expr):
    """Evaluate an annotation with Fractions, independently of prepare_data's own evaluator."""
    assert re.fullmatch(r"[\d+\-*/()]+", expr), expr
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group(0)})", expr), {"Fraction": Fraction})


def run(tmp_path, *args, name="out"):
    out = str(tmp_path / name)
    meta = P.main([f"out_dir={out}", *args])
    return out, meta


def all_tokens(out_dir, meta):
    """The whole token stream: val shards then train shards, in meta.json's order."""
    parts = [common.read_shard(os.path.join(out_dir, s["file"])) for s in meta["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def shard_state(out_dir):
    return {os.path.basename(p): (os.stat(p).st_mtime_ns, open(p, "rb").read())
            for p in sorted(glob.glob(os.path.join(out_dir, "*.bin")))}


# -----------------------------------------------------------------------------
# synthetic math generator


def test_synthetic_generators_are_deterministic():
    a = synthetic.synthetic_math_problems(60, seed=7)
    assert a == synthetic.synthetic_math_problems(60, seed=7)
    assert synthetic.synthetic_math_problems(20, seed=7) == a[:20]  # problem i does not depend on n
    assert sum(x != y for x, y in zip(a, synthetic.synthetic_math_problems(60, seed=8))) > 50
    assert synthetic.synthetic_math_text(40, seed=3) == synthetic.synthetic_math_text(40, seed=3)
    assert synthetic.synthetic_math_text(40, seed=3) != synthetic.synthetic_math_text(40, seed=4)
    assert synthetic.synthetic_arithmetic_facts(100, seed=1) == synthetic.synthetic_arithmetic_facts(100, seed=1)
    # the pretraining text's problems are not the evaluation problems of the same seed
    questions = {p["question"] for p in synthetic.synthetic_math_problems(300, seed=0)}
    text = synthetic.synthetic_math_text(300, seed=0)
    assert sum(d.startswith("Question: ") and d.split("\n")[0][10:] in questions for d in text) < 5


@pytest.mark.parametrize("knobs", [dict(), dict(max_value=20, min_steps=1, max_steps=2),
                                   dict(max_value=1000, min_steps=5, max_steps=8)])
def test_synthetic_problems_are_correct(knobs):
    lo, hi = knobs.get("min_steps", 1), knobs.get("max_steps", 4)
    problems = synthetic.synthetic_math_problems(400, seed=11, **knobs)
    for p in problems:
        assert p["question"].endswith("?") and set(p) >= {"question", "answer"}
        *steps, final = p["answer"].split("\n")
        assert lo <= len(steps) <= hi, p
        last = None
        for line in steps:
            notes = ANNOTATION_RE.findall(line)
            assert len(notes) == 1, line
            for expr, value in notes:
                assert exact(expr) == Fraction(int(value)), line  # the calculator note is right
                last = int(value)
            shown = STEP_RE.search(line)  # the spelled-out expression is the annotated one
            assert shown, line
            assert shown.group(1).replace(" ", "").replace("x", "*") == shown.group(2)
            assert shown.group(3) == shown.group(4)
        assert re.fullmatch(r"#### \d+", final), final
        assert int(final[5:]) == last  # the answer is the final computed value
        assert gsm8k.final_answer(p["answer"]) == str(last)
    templates = {p["template"] for p in problems}
    assert len({p["question"] for p in problems}) > 390
    assert len(templates) >= (12 if hi <= 4 else 4), templates


def test_synthetic_problem_knobs():
    only = synthetic.synthetic_math_problems(100, seed=2, templates=["eggs", "ages"])
    assert {p["template"] for p in only} == {"eggs", "ages"}
    add_sub = synthetic.synthetic_math_problems(100, seed=2, ops=("add", "sub"))
    for p in add_sub:
        assert not any(set(expr) & set("*/") for expr, _ in ANNOTATION_RE.findall(p["answer"]))
    small = synthetic.synthetic_math_problems(200, seed=2, max_value=10)
    big = synthetic.synthetic_math_problems(200, seed=2, max_value=1000)
    mean = lambda ps: np.mean([int(gsm8k.final_answer(p["answer"])) for p in ps])
    assert mean(big) > 3 * mean(small)
    with pytest.raises(ValueError, match="templates"):
        synthetic.synthetic_math_problems(1, templates=["nope"])
    with pytest.raises(ValueError, match="min_steps"):
        synthetic.synthetic_math_problems(1, min_steps=3, max_steps=2)


FACT_RE = re.compile(r"(\d+) ?(\*|x|×|times|\+|plus|-|minus|/|divided by) ?(\d+) ?(=|is) ?(\d+)")


def test_arithmetic_facts_are_correct_in_every_form():
    ops = {"*": "mul", "x": "mul", "×": "mul", "times": "mul", "+": "add", "plus": "add", "-": "sub",
           "minus": "sub", "/": "div", "divided by": "div"}
    seen = set()
    for fact in synthetic.synthetic_arithmetic_facts(3000, seed=1, mul_min=1, mul_max=12):
        m = FACT_RE.fullmatch(fact)
        assert m, fact
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(5))
        expected = {"mul": lambda: a * b, "add": lambda: a + b, "sub": lambda: a - b,
                    "div": lambda: Fraction(a, b)}[ops[op]]()
        assert c == expected, fact
        seen.add(op)
    assert seen == set(ops)


def test_synthetic_text_has_every_multiplication_form():
    forms = {"*": 0, "x": 0, "×": 0, "times": 0}
    for doc in synthetic.synthetic_math_text(500, seed=0):
        for m in common.MUL_RE.finditer(doc):
            a, b, c = map(int, m.groups())
            if 1 <= a <= 12 and 1 <= b <= 12 and a * b == c:
                op = re.search(r"\*|×|\bx\b|\btimes\b", m.group(0)).group(0)
                forms[op] += 1
    assert all(n > 20 for n in forms.values()), forms


# -----------------------------------------------------------------------------
# end to end: shards + meta.json


SYNTH = ["source=synthetic_math", "tokenizer=byte", "seed=5", "max_docs=400", "shard_size=20000",
         "val_tokens=15000", "num_proc=2"]


def test_synthetic_byte_end_to_end_and_rerun_skips(tmp_path):
    out, meta = run(tmp_path, *SYNTH)
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.bin")))
    assert files == sorted(s["file"] for s in meta["shards"]) and "val_000000.bin" in files
    lens = {s["file"]: len(common.read_shard(os.path.join(out, s["file"]))) for s in meta["shards"]}
    assert all(lens[s["file"]] == s["tokens"] for s in meta["shards"])
    assert meta["val_tokens"] == 15000 == sum(n for f, n in lens.items() if f.startswith("val_"))
    assert meta["train_tokens"] == sum(n for f, n in lens.items() if f.startswith("train_")) > 60000
    assert meta["documents"] == 400 and meta["vocab_size"] == 257 and meta["tokenizer"]["kind"] == "byte"
    assert meta == common.load_meta(out)

    # decoding the shards gives back the generated text, each document followed by end-of-text
    cfg = common.load_config(P.Config, SYNTH)
    docs = synthetic.synthetic_math_text(400, seed=5, **synthetic.synth_knobs(cfg))
    tokens = all_tokens(out, meta)
    assert tokens[-1] == 256 and int((tokens == 256).sum()) == 400
    tok = common.Tokenizer.from_spec(meta["tokenizer"])
    assert tok.decode(tokens) == "".join(d + EOT for d in docs)

    # the training loader reads them
    x, y = common.ShardLoader(out, "train", 4, 64).next_batch()
    assert x.shape == (4, 64) and bool((x[:, 1:] == y[:, :-1]).all())

    # a rerun with the same config leaves every finished shard alone
    before = shard_state(out)
    meta2 = P.main([f"out_dir={out}", *SYNTH])
    assert shard_state(out) == before and meta2 == meta

    # a lost shard is written again, identical, and only from there on
    os.remove(os.path.join(out, "train_000002.bin"))
    meta3 = P.main([f"out_dir={out}", *SYNTH])
    after = shard_state(out)
    assert {f: b for f, (_, b) in after.items()} == {f: b for f, (_, b) in before.items()}
    for f in ("val_000000.bin", "train_000000.bin", "train_000001.bin"):
        assert after[f][0] == before[f][0]  # untouched
    assert meta3 == meta


def test_interrupted_run_resumes_mid_stream(tmp_path, monkeypatch):
    """A crash after some shards; the rerun fast-forwards the document stream and finishes with the same
    bytes as an uninterrupted run (plain-text source, documents cut across shard boundaries)."""
    text = shared_path("tinyshakespeare", "input.txt")
    args = ["source=local", f"data_path={text}", "tokenizer=byte", "max_docs=1500", "shard_size=9000",
            "val_tokens=5000", "num_proc=2"]
    clean, clean_meta = run(tmp_path, *args, name="clean")
    assert len(clean_meta["shards"]) >= 6

    flush = P.ShardWriter.flush

    def crash_after_four(self, *a):
        if len(self.progress["shards"]) == 4:
            raise RuntimeError("simulated crash")
        return flush(self, *a)

    monkeypatch.setattr(P.ShardWriter, "flush", crash_after_four)
    out = str(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.main([f"out_dir={out}", *args])
    assert not os.path.exists(os.path.join(out, "meta.json"))
    progress = json.load(open(os.path.join(out, P.PROGRESS)))
    assert len(progress["shards"]) == 4 and not progress["complete"]
    assert any(s["next_offset"] > 0 for s in progress["shards"])  # a document was cut by a shard boundary
    kept = shard_state(out)

    monkeypatch.setattr(P.ShardWriter, "flush", flush)
    meta = P.main([f"out_dir={out}", *args])
    final = shard_state(out)
    assert all(final[f][0] == kept[f][0] for f in kept)  # finished shards not rewritten
    assert {f: b for f, (_, b) in final.items()} == {f: b for f, (_, b) in shard_state(clean).items()}
    assert {k: v for k, v in meta.items() if k not in ("out_dir", "config")} == \
        {k: v for k, v in clean_meta.items() if k not in ("out_dir", "config")}
    # text documents are blank-line separated paragraphs
    first = open(text, encoding="utf-8").read().split("\n\n")[0]
    assert common.Tokenizer("byte").decode(all_tokens(out, meta)).startswith(first + EOT)


def test_target_tokens_cli(tmp_path):
    out = str(tmp_path / "demo")
    r = subprocess.run([sys.executable, "prepare_data.py", "source=synthetic_math", f"out_dir={out}",
                        "tokenizer=byte", "target_tokens=200000"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = common.load_meta(out)
    assert meta["total_tokens"] == 200000 and meta["val_tokens"] == 2000  # auto: 1% of the target
    assert len(all_tokens(out, meta)) == 200000


def test_demo_config_runs(tmp_path):
    cfg = common.load_config(P.Config, [os.path.join(ROOT, "configs", "data_demo.yaml")])
    assert cfg.source == "synthetic_math" and cfg.tokenizer == "byte" and cfg.out_dir == "data/demo"
    assert 1_000_000 <= cfg.target_tokens <= 10_000_000
    out = str(tmp_path / "demo")
    r = subprocess.run([sys.executable, "prepare_data.py", "configs/data_demo.yaml", f"out_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert common.load_meta(out)["total_tokens"] == cfg.target_tokens


def test_fineweb_configs():
    base = common.load_config(P.Config, [os.path.join(ROOT, "configs", "data_fineweb_edu_10b.yaml")])
    mul = common.load_config(P.Config, [os.path.join(ROOT, "configs", "data_fineweb_edu_10b_mul.yaml")])
    assert (base.source, base.tokenizer, base.condition) == ("fineweb_edu", "gpt2", "baseline")
    assert (base.hf_config or P.HF_DATASETS["fineweb_edu"][1]) == "sample-10BT"
    assert base.target_tokens == 10_000_000_000 and base.shard_size == 100_000_000
    assert (mul.condition, mul.mul_min, mul.mul_max) == ("mul_tokens", 1, 12)
    # the two conditions read the same text: only the condition and the output folder differ
    differ = {k for k in P.Config.__dataclass_fields__ if getattr(base, k) != getattr(mul, k)}
    assert differ <= {"condition", "out_dir", "mul_min", "mul_max"} and base.out_dir != mul.out_dir
    P.validate(base), P.validate(mul)


# -----------------------------------------------------------------------------
# sources


def test_gsm8k_local(tmp_path):
    path = shared_path("gsm8k", "train.jsonl")
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    out, meta = run(tmp_path, "source=gsm8k", f"data_path={path}", "tokenizer=gpt2", f"tokenizer_file={ranks}",
                    "max_docs=20", "val_tokens=500", "num_proc=1")
    rows = [json.loads(line) for line in open(path)][:20]
    tok = common.Tokenizer.from_spec(meta["tokenizer"], ranks)
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == 50256 and meta["documents"] == 20
    text = tok.decode(all_tokens(out, meta))
    assert text == "".join(f"Question: {r['question']}\nAnswer: {r['answer']}" + EOT for r in rows)


def test_wikitext_local_articles(tmp_path):
    path = shared_path("wikitext-2-raw", "wiki.test.raw")
    out, meta = run(tmp_path, "source=wikitext", f"data_path={path}", "tokenizer=byte", "max_docs=3",
                    "val_tokens=1000", "num_proc=1")
    docs = common.Tokenizer("byte").decode(all_tokens(out, meta)).split(EOT)
    assert docs[-1] == "" and len(docs) == 4
    assert docs[0].startswith(" = Robert Boulter = \n") and docs[1].startswith(" = Du Fu = \n")
    assert " = = Career = = " in docs[0] and "\n\n" not in docs[0] and "\r" not in docs[0]


def wikitext_halves(tmp_path):
    """WikiText-2's test file cut at an article boundary: a train file and a test file that share no article."""
    lines = open(shared_path("wikitext-2-raw", "wiki.test.raw"), encoding="utf-8", newline="").read().splitlines(True)
    cut = next(i for i in range(1500, len(lines)) if re.match(r"^ = [^=].* = \r?$", lines[i].rstrip("\n")))
    train, test = tmp_path / "wiki.train.raw", tmp_path / "wiki.test.raw"
    train.write_text("".join(lines[:cut]), encoding="utf-8", newline="")
    test.write_text("".join(lines[cut:]), encoding="utf-8", newline="")
    return str(train), str(test)


def split_text(out, meta, split):
    parts = [common.read_shard(os.path.join(out, s["file"])) for s in meta["shards"] if s["split"] == split]
    return common.Tokenizer("byte").decode(np.concatenate(parts).tolist()) if parts else ""


def test_wikitext_test_split_is_its_own_shards(tmp_path):
    """The test split (the sigma-GPT seed's evaluation set) is written whole beside train/val, from its own file,
    added to an existing folder without touching the train/val shards, and rewritten when damaged."""
    train, test = wikitext_halves(tmp_path)
    args = ["source=wikitext", f"data_path={train}", "tokenizer=byte", "val_tokens=5000", "num_proc=1",
            "shard_size=200000"]
    out, meta = run(tmp_path, *args)
    assert meta["test_tokens"] == 0 and meta["test_split"] is None and not glob.glob(os.path.join(out, "test_*"))
    before = shard_state(out)
    out, meta = run(tmp_path, *args, f"test_path={test}")
    assert {k: v for k, v in shard_state(out).items() if not k.startswith("test_")} == before  # train/val kept
    articles = [a for a in P.text_sets.wikitext_articles(open(test, encoding="utf-8", newline=""))]
    assert articles[0].startswith(" = ") and len(articles) > 5
    assert split_text(out, meta, "test") == "".join(a + EOT for a in articles)
    assert meta["test_tokens"] == sum(len(a.encode()) + 1 for a in articles) > 200_000  # more than one shard of 200k
    names = [f"test_{i:06d}.bin" for i in range(-(-meta["test_tokens"] // 200_000))]  # full shards, then the rest
    assert [s["file"] for s in meta["shards"] if s["split"] == "test"] == names and len(names) >= 2
    assert meta["test_split"] == test and meta["val_tokens"] == 5000
    train_text = split_text(out, meta, "val") + split_text(out, meta, "train")
    assert articles[0] not in train_text and train_text.startswith(" = Robert Boulter = ")
    # train/val hold exactly what they held before the test split was added; common's loaders see the new split
    assert common.find_shards(out, "test") == [os.path.join(out, f) for f in names]
    # a rerun does nothing; a damaged test shard is rewritten, and the rest stays as it was
    state = shard_state(out)
    run(tmp_path, *args, f"test_path={test}")
    assert shard_state(out) == state
    with open(os.path.join(out, "test_000001.bin"), "r+b") as f:
        f.truncate(1000)
    out, meta2 = run(tmp_path, *args, f"test_path={test}")
    assert split_text(out, meta2, "test") == "".join(a + EOT for a in articles)
    assert {k: v for k, v in shard_state(out).items() if not k.startswith("test_")} == before
    # dropping the test split removes its shards
    out, meta3 = run(tmp_path, *args)
    assert meta3["test_tokens"] == 0 and not glob.glob(os.path.join(out, "test_*"))


def test_wikitext_test_split_from_the_hub_and_its_errors(tmp_path, monkeypatch):
    calls = []
    rows = {"train": [{"text": " = A = \n"}, {"text": " x y \n"}], "test": [{"text": " = T = \n"}, {"text": " z \n"}]}

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter(rows[split])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out, meta = run(tmp_path, "source=wikitext", "tokenizer=byte", "val_tokens=0", "num_proc=1", "test_split=test")
    assert calls == [(*P.HF_DATASETS["wikitext"], "train", True), (*P.HF_DATASETS["wikitext"], "test", True)]
    assert split_text(out, meta, "train") == " = A = \n x y " + EOT and split_text(out, meta, "test") == " = T = \n z " + EOT
    assert meta["test_split"] == "split test of the source"
    # the configs' WikiText-103 data: train, the first 1M tokens as val, and the test split
    cfg = common.load_config(P.Config, [os.path.join(ROOT, "configs", "data_wikitext103.yaml")])
    assert (cfg.source, cfg.hf_split, cfg.test_split, cfg.val_tokens) == ("wikitext", "train", "test", 1_000_000)
    with pytest.raises(common.ConfigError, match="test_path=FILE"):
        run(tmp_path, "source=wikitext", "data_path=" + shared_path("wikitext-2-raw", "wiki.test.raw"), "test_split=test",
            "tokenizer=byte", name="x")
    with pytest.raises(common.ConfigError, match="no test_path"):
        run(tmp_path, "source=synthetic_math", "max_docs=5", "test_path=" + shared_path("wikitext-2-raw", "wiki.test.raw"),
            "tokenizer=byte", name="y")
    with pytest.raises(FileNotFoundError, match="nope.raw"):
        run(tmp_path, "source=wikitext", "data_path=" + shared_path("wikitext-2-raw", "wiki.test.raw"),
            f"test_path={tmp_path / 'nope.raw'}", "tokenizer=byte", name="z")


@pytest.mark.parametrize("source,rows,expected_docs", [
    ("fineweb_edu", [{"text": "one doc"}, {"text": ""}, {"text": "two doc"}], ["one doc", "two doc"]),
    ("openwebmath", [{"text": "$x^2$ is 7 x 8 = 56"}], ["$x^2$ is 7 x 8 = 56"]),
    ("gsm8k", [{"question": "Q?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}], ["Question: Q?\nAnswer: 1 + 1 = <<1+1=2>>2\n#### 2"]),
    ("wikitext", [{"text": " = A = \n"}, {"text": ""}, {"text": " x y \n"}, {"text": " = B = \n"}, {"text": " z \n"}],
     [" = A = \n x y ", " = B = \n z "]),
])
def test_hf_sources_go_through_datasets(tmp_path, monkeypatch, source, rows, expected_docs):
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out, meta = run(tmp_path, f"source={source}", "tokenizer=byte", "val_tokens=0", "num_proc=1")
    assert calls == [(*P.HF_DATASETS[source], "train", True)]
    assert common.Tokenizer("byte").decode(all_tokens(out, meta)) == "".join(d + EOT for d in expected_docs)
    assert meta["hf_dataset"] == P.HF_DATASETS[source][0]


def test_local_jsonl_with_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}", "id": i}) for i in range(5)) + "\n")
    out, meta = run(tmp_path, "source=local", f"data_path={path}", "text_field=body", "tokenizer=byte",
                    "val_tokens=0", "num_proc=1")
    assert common.Tokenizer("byte").decode(all_tokens(out, meta)) == "".join(f"document {i}{EOT}" for i in range(5))
    with pytest.raises(P.DataError, match="no field 'text'"):
        run(tmp_path, "source=local", f"data_path={path}", "tokenizer=byte", "val_tokens=0", name="nofield")


# -----------------------------------------------------------------------------
# mul_tokens condition


def test_mul_tokens_gpt2(tmp_path):
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    docs = ["Facts: 7*8=56 and 7 x 8 = 56 and 7 × 8 = 56 and 7 times 8 is 56.",
            "Wrong: 3*4=13. Out of range: 13*4=52 and 4 x 13 = 52.",
            "In range: 12 x 12 = 144, 1*1=1, 3 * 4 = 12."]
    path = tmp_path / "facts.txt"
    path.write_text("\n".join(docs) + "\n")
    args = ["source=local", f"data_path={path}", "txt_docs=lines", "tokenizer=gpt2", f"tokenizer_file={ranks}",
            "val_tokens=0", "num_proc=1"]
    out, meta = run(tmp_path, *args, "condition=mul_tokens", name="mul")
    base_out, base_meta = run(tmp_path, *args, name="base")

    assert meta["vocab_size"] == 50257 + 2 * 144 and meta["mul_first_id"] == 50257 and meta["dtype"] == "uint16"
    tok = common.Tokenizer.from_spec(meta["tokenizer"], ranks)
    tokens = all_tokens(out, meta)
    mul = [tok.decode([t]).lstrip(" ") for t in tokens if t >= meta["mul_first_id"]]
    expected = {"7*8=56": 4, "12*12=144": 1, "1*1=1": 1, "3*4=12": 1}
    assert {f: mul.count(f) for f in set(mul)} == expected
    assert meta["mul_injections"]["per_fact"] == expected and meta["mul_injections"]["total"] == 7
    # each fact is one token; wrong and out-of-range products stay text; decoding is canonical
    assert tok.decode(tokens).split(EOT)[:3] == [
        "Facts: 7*8=56 and 7*8=56 and 7*8=56 and 7*8=56.",
        "Wrong: 3*4=13. Out of range: 13*4=52 and 4 x 13 = 52.",
        "In range: 12*12=144, 1*1=1, 3*4=12."]
    base_tokens = all_tokens(base_out, base_meta)
    assert base_meta["mul_injections"]["total"] == 0 and int(base_tokens.max()) == 50256
    base_docs = np.split(base_tokens, np.where(base_tokens == 50256)[0] + 1)
    mul_docs = np.split(tokens, np.where(tokens == 50256)[0] + 1)
    assert np.array_equal(base_docs[1], mul_docs[1])  # the wrong / out-of-range line: same tokens
    assert len(mul_docs[0]) < len(base_docs[0]) and len(mul_docs[2]) < len(base_docs[2])


def test_mul_tokens_synthetic_counts_match_text_and_shards(tmp_path):
    args = ["source=synthetic_math", "tokenizer=byte", "condition=mul_tokens", "seed=2", "max_docs=300",
            "shard_size=15000", "val_tokens=5000", "num_proc=2"]
    out, meta = run(tmp_path, *args)
    cfg = common.load_config(P.Config, args)
    # count the correct in-range products in the text itself
    expected = {}
    for doc in synthetic.synthetic_math_text(300, seed=2, **synthetic.synth_knobs(cfg)):
        for m in common.MUL_RE.finditer(doc):
            a, b, c = map(int, m.groups())
            if 1 <= a <= 12 and 1 <= b <= 12 and a * b == c:
                expected[f"{a}*{b}={c}"] = expected.get(f"{a}*{b}={c}", 0) + 1
    tokens = all_tokens(out, meta)
    in_shards = tokens[tokens >= meta["mul_first_id"]]
    assert sum(expected.values()) > 200
    assert meta["mul_injections"]["total"] == len(in_shards) == sum(expected.values())
    assert meta["mul_injections"]["per_fact"] == expected
    val = sum(int((common.read_shard(os.path.join(out, s["file"])) >= meta["mul_first_id"]).sum())
              for s in meta["shards"] if s["split"] == "val")
    assert meta["mul_injections"]["val"] == val and meta["mul_injections"]["train"] == len(in_shards) - val
    # the text is the baseline's text: decoding gives it back with products in canonical form
    base_out, base_meta = run(tmp_path, *[a for a in args if not a.startswith("condition")], name="base")
    base_text = common.Tokenizer("byte").decode(all_tokens(base_out, base_meta))
    canon = lambda s: common.MUL_RE.sub(lambda m: f"{m[1]}*{m[2]}={m[3]}"
                                        if 1 <= int(m[1]) <= 12 and 1 <= int(m[2]) <= 12
                                        and int(m[1]) * int(m[2]) == int(m[3]) else m[0], s)
    assert common.Tokenizer.from_spec(meta["tokenizer"]).decode(tokens) == canon(base_text)


# -----------------------------------------------------------------------------
# errors


def test_clear_errors(tmp_path):
    with pytest.raises(common.ConfigError, match="unknown source 'fineweb'.*fineweb_edu"):
        run(tmp_path, "source=fineweb")
    with pytest.raises(FileNotFoundError, match="data_path not found: .*missing.jsonl"):
        run(tmp_path, "source=gsm8k", f"data_path={tmp_path / 'missing.jsonl'}", "tokenizer=byte")
    with pytest.raises(common.ConfigError, match="source=local needs data_path"):
        run(tmp_path, "source=local", "tokenizer=byte")
    with pytest.raises(common.ConfigError, match="endless"):
        run(tmp_path, "source=synthetic_math", "tokenizer=byte")
    with pytest.raises(common.ConfigError, match="unknown condition"):
        run(tmp_path, "condition=mul", "tokenizer=byte", "max_docs=5")
    with pytest.raises(FileNotFoundError, match="tokenizer_file not found"):
        run(tmp_path, "tokenizer=gpt2", f"tokenizer_file={tmp_path / 'nope.tiktoken'}", "max_docs=5")
    r = subprocess.run([sys.executable, "prepare_data.py", "source=nope"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown source 'nope'" in r.stderr


def test_other_settings_in_same_out_dir_refused(tmp_path):
    args = ["source=synthetic_math", "tokenizer=byte", "max_docs=50", "val_tokens=1000", "num_proc=1"]
    out, _ = run(tmp_path, *args)
    with pytest.raises(common.ConfigError, match="other settings.*seed"):
        run(tmp_path, *args, "seed=1")
    out, meta = run(tmp_path, *args, "seed=1", "overwrite=true")
    assert meta["seed"] == 1 and json.load(open(os.path.join(out, P.PROGRESS)))["fingerprint"]["seed"] == 1


def test_data_path_does_not_import_torch(tmp_path):
    """prepare_data.py and its tokenizer workers never pay torch's import (~3 s and ~225 MB per process)."""
    code = ("import sys, prepare_data as P; "
            f"P.main(['source=synthetic_math', 'tokenizer=byte', 'target_tokens=20000', 'num_proc=2', "
            f"'out_dir={tmp_path / 'out'}']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def bad_inputs(tmp_path):
    """(name, arguments) for prepare_data.py that must stop with one 'error: ...' line and exit code 1."""
    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    garbage = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / P.PROGRESS).write_text('{"fingerprint": {"source": "loc')  # a truncated progress.json
    local = ["source=local", "tokenizer=byte", "num_proc=1"]
    nl = chr(10)
    malformed, fieldless = write("bad.jsonl", '{"text": "a"'), write("nofield.jsonl", '{"body": "a"}' + nl)
    numbers, no_answer = write("numbers.jsonl", "5" + nl), write("q.jsonl", '{"question": "q"}' + nl)
    return [
        ("unknown key", ["colour=blue"]),
        ("wrong type", ["shard_size=lots"]),
        ("bad list", ["synth_ops=[add, mul"]),
        ("yaml syntax error", [write("bad.yaml", "source: [local\ntokenizer: byte\n")]),
        ("yaml not a mapping", [write("list.yaml", "- 1\n- 2\n")]),
        ("missing data_path", [*local, f"data_path={tmp_path / 'nope.txt'}"]),
        ("empty text file", [*local, f"data_path={write('empty.txt', '')}"]),
        ("blank text file", [*local, f"data_path={write('blank.txt', nl * 5)}"]),
        ("binary garbage", [*local, f"data_path={write('garbage.txt', garbage)}"]),
        ("binary jsonl", [*local, f"data_path={write('garbage.jsonl', garbage)}"]),
        ("malformed jsonl", [*local, f"data_path={malformed}"]),
        ("field-less jsonl", [*local, f"data_path={fieldless}"]),
        ("jsonl of numbers", [*local, f"data_path={numbers}"]),
        ("empty jsonl", [*local, f"data_path={write('empty.jsonl', '')}"]),
        ("gsm8k from text", ["source=gsm8k", "tokenizer=byte", f"data_path={write('q.txt', 'question')}"]),
        ("gsm8k rows without answer", ["source=gsm8k", "tokenizer=byte", f"data_path={no_answer}"]),
        ("missing tokenizer file", ["tokenizer=gpt2", f"tokenizer_file={tmp_path / 'no.tiktoken'}", "max_docs=5"]),
        ("damaged progress.json", ["source=synthetic_math", "tokenizer=byte", "max_docs=5", f"out_dir={damaged}"]),
    ]


def test_bad_inputs_end_in_one_error_line(tmp_path):
    for name, args in bad_inputs(tmp_path):
        if not any(a.startswith("out_dir=") for a in args):
            args = [*args, f"out_dir={tmp_path / 'out'}"]
        r = subprocess.run([sys.executable, "prepare_data.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, name
    assert not os.path.exists(tmp_path / "out" / "train_000000.bin")  # nothing was tokenized


def test_empty_and_binary_inputs_are_refused_clearly(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(P.DataError, match="empty.txt is empty"):
        run(tmp_path, "source=local", "tokenizer=byte", f"data_path={tmp_path / 'empty.txt'}")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(P.DataError, match="holds no documents"):
        run(tmp_path, "source=local", "tokenizer=byte", f"data_path={tmp_path / 'blank.jsonl'}")
    (tmp_path / "garbage.txt").write_bytes(np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(P.DataError, match="garbage.txt is not text"):
        run(tmp_path, "source=local", "tokenizer=byte", f"data_path={tmp_path / 'garbage.txt'}")
    # text with a few stray bytes (a Latin-1 'é' in UTF-8 prose) is still text
    (tmp_path / "latin.txt").write_bytes("Caf".encode() + b"\xe9 " + "plain words here. ".encode() * 50)
    _, meta = run(tmp_path, "source=local", "tokenizer=byte", f"data_path={tmp_path / 'latin.txt'}", "val_tokens=10",
                  name="latin")
    assert meta["train_tokens"] > 0

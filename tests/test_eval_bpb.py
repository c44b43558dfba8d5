"""eval_gsm8k.py task=bpb: bits per byte of held-out math text, checked against a direct computation with the
exported HF model, the same on both model paths, independent of batching, and in the comparison report."""
import json
import math

import pytest
import torch

import common
import eval_gsm8k as ev
import export_hf
from conftest import one_line_error, shared_path
from tasks import gsm8k
from test_export_hf import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with multiplication tokens (its tokenizer differs from GPT-2's), 64 positions so that GSM8K
    solutions need several windows, and its verified HF export."""
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    root = tmp_path_factory.mktemp("bpbrun")
    make_run(str(root / "run"), "gpt2", (1, 12), steps=10, block_size=64, tokenizer_file=ranks)
    export_hf.export(str(root / "run"), str(root / "hf"), ranks)
    return {"run": str(root / "run"), "hf": str(root / "hf"), "ranks": ranks, "root": root}


def bpb_args(run, out, model, *extra):
    return ["task=bpb", f"model={model}", f"gsm8k_path={shared_path('gsm8k', 'test.jsonl')}", "limit=6",
            f"out_dir={out}", f"tokenizer_file={run['ranks']}", *extra]


def direct_bpb(hf_dir, docs, span):
    """Independently: transformers' model and tokenizer, each document after the end-of-text id, scored in
    windows of `span` inputs, one window per forward pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    nats = nbytes = 0.0
    for doc in docs:
        ids = [tok.eos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
        for lo in range(0, len(ids) - 1, span):
            piece = torch.tensor([ids[lo:lo + span + 1]])
            with torch.no_grad():
                logp = torch.log_softmax(hf(input_ids=piece[:, :-1]).logits[0].float(), -1)
            nats -= logp[torch.arange(piece.size(1) - 1), piece[0, 1:]].sum().item()
        nbytes += len(doc.encode("utf-8"))
    return nats / math.log(2) / nbytes


def test_bpb_equals_direct_computation_on_both_model_paths(run, tmp_path):
    rows = gsm8k.load_gsm8k(shared_path("gsm8k", "test.jsonl"))[:6]
    docs = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    expected = direct_bpb(run["hf"], docs, 64)
    native = ev.main(bpb_args(run, tmp_path / "native", run["run"], "batch_size=3"))
    hf = ev.main(bpb_args(run, tmp_path / "hf", run["hf"], "batch_size=1"))
    assert native["metrics"]["bpb_gsm8k"] == pytest.approx(expected, rel=1e-5)
    assert hf["metrics"]["bpb_gsm8k"] == pytest.approx(expected, rel=1e-5)
    counts = native["counts"]
    assert counts["n"] == 6 and counts["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert counts["windows"] > 6  # the solutions are longer than 64 tokens: several windows each
    assert native["engine"] == "loss" and native["data"].endswith("test.jsonl")
    records = common.read_jsonl(str(tmp_path / "native" / "predictions.jsonl"))
    assert sum(r["nats"] for r in records) == pytest.approx(counts["nats"])
    assert 0 < native["metrics"]["bpb_gsm8k"] < 30


def test_bpb_of_a_local_text_file_and_one_line_errors(run, tmp_path, capsys):
    text = tmp_path / "math.txt"
    text.write_text("Seven times eight is 7*8=56.\n\nTwelve times twelve is 12*12=144, and 3*4=12.\n")
    res = ev.main(bpb_args(run, tmp_path / "txt", run["run"], "bpb_text=text", f"bpb_path={text}"))
    assert res["metrics"]["bpb_text"] > 0 and res["n"] == 2 and res["data"] == str(text)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "no documents" in one_line_error(ev.main, bpb_args(run, tmp_path / "e", run["run"], "bpb_text=text",
                                                                f"bpb_path={empty}"), capsys)
    assert "unknown text dataset 'nope'" in one_line_error(ev.main, bpb_args(run, tmp_path / "e", run["run"],
                                                                             "bpb_text=nope"), capsys)


def test_compare_reports_bits_per_byte_of_each_condition(run, tmp_path):
    """Two conditions, each with a pretrain/bpb results folder: the report's text_bpb and its chart."""
    figures = {}
    for label, model in (("baseline", run["run"]), ("other", run["hf"])):
        res = ev.main(bpb_args(run, tmp_path / label / "pretrain" / "bpb", model, "limit=2"))
        figures[label] = res["metrics"]["bpb_gsm8k"]
    out = tmp_path / "cmp"
    ev.main(["task=compare", f"runs=[{tmp_path / 'baseline'},{tmp_path / 'other'}]", "labels=[baseline,other]",
             f"out_dir={out}"])
    with open(out / "comparison_report.json") as f:
        rep = json.load(f)
    assert rep["text_bpb"] == {"pretrain/bpb_gsm8k": figures}
    assert rep["delta_vs_baseline"]["pretrain/bpb_gsm8k"]["other"] == pytest.approx(figures["other"] - figures["baseline"])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

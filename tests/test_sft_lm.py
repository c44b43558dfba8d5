"""sft.py objective=lm: continued pretraining on text (tasks/text_sets.py). Real WikiText-2 text from
../shared/data, tiny models built from configs (native GPT, HF GPT-2 / Llama), nothing downloaded. Packed rows
are full and cover the stream once; a packed row's loss is the loss of its document pieces each alone (documents
that fit in a row: the document alone); the loss falls; resume is exact; mixtures and LoRA run; bad names fail."""
import json
import math
import os

import pytest
import torch

import common
import sft
from conftest import shared_path
from tasks import synthetic, text_sets
from test_sft import byte_tok, hf_byte_tok, save_native, tiny_hf, tiny_native, train_losses


def wiki():
    return shared_path("wikitext-2-raw", "wiki.test.raw")


def encoded(texts, tok):
    return [sft.encode_document(t, tok) for t in texts]


def test_wikitext_articles_and_holdout():
    train, held = text_sets.load_documents("wikitext2", wiki())
    assert len(train) + len(held) == 62 and len(held) == 3  # 62 articles; a local train copy holds out 5%
    assert not set(train) & set(held)
    assert all(text_sets.WIKI_TITLE_RE.match(d.split("\n")[0]) for d in train)  # each opens with its ' = Title = '
    five, one = text_sets.load_documents("wikitext2", wiki(), max_samples=5, eval_samples=1)
    assert len(five) == 5 and set(five) <= set(train) and one[0] in held  # seeded subsets of the same split
    assert text_sets.load_documents("wikitext2", wiki(), eval_samples=0) == (train, [])  # the same train documents
    train, held = text_sets.load_documents("wikitext2", wiki(), wiki(), eval_samples=100)
    assert len(train) == len(held) == 62  # its own eval copy: nothing held out


# one row of each text set in its hub schema (the columns the hub's rows have)
HUB_ROWS = {
    "wikitext2": {"text": " = Robert Boulter = \n"}, "wikitext103": {"text": " = Valkyria Chronicles III = \n"},
    "openwebmath": {"url": "https://x.org/a", "text": "Let $x^2 = 4$; then $x = \\pm 2$.", "date": "2023", "metadata": "{}"},
    "bookcorpus": {"text": "the half-ling book one in the fall of igneeria series kaylee soderburg ."},
    "common_corpus": {"identifier": "x1", "collection": "Public Domain", "language": "English", "word_count": 6,
                      "title": "A letter", "text": "Dear Sir, I write to you about the harvest."},
    "financial_news": {"title": "Stocks rally", "text": "The S&P 500 rose 1.2% on Tuesday.", "url": "https://x.com"},
    "sec_reports": {"cik": "0000001750", "sentence": "Our revenue increased 12% in fiscal 2019.", "section": 7,
                    "docID": "0000001750_10-K_2019", "sentenceID": "0000001750_10-K_2019_section_7_3"},
    "imdb_text": {"text": "A moving film with a superb cast.", "label": -1},
    "text": {"text": "Any local text."},
}


def test_every_text_set_reads_its_hub_schema_and_local_copies(tmp_path):
    assert set(HUB_ROWS) == set(text_sets.REGISTRY), "every text set needs a row in its hub schema here"
    for name, row in HUB_ROWS.items():
        assert text_sets.row_text(text_sets.get_set(name), row).strip(), name
    assert text_sets.row_text(text_sets.get_set("financial_news"), HUB_ROWS["financial_news"]) == \
        "Stocks rally\n\nThe S&P 500 rose 1.2% on Tuesday."
    rows = [HUB_ROWS["financial_news"], {"title": "Bonds slip", "text": "Yields rose.", "url": ""}]
    (tmp_path / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "news.parquet")
    for suffix in ("jsonl", "parquet"):
        copy = str(tmp_path / f"news.{suffix}")
        docs = text_sets.load_documents("financial_news", copy, copy)[1]  # an eval copy: read whole
        assert docs == ["Stocks rally\n\nThe S&P 500 rose 1.2% on Tuesday.", "Bonds slip\n\nYields rose."], suffix
    (tmp_path / "book.txt").write_text("First paragraph,\nstill first.\n\n  \nSecond one.\n\nThird.\n")
    book = str(tmp_path / "book.txt")
    assert text_sets.load_documents("text", book, book)[1] == ["First paragraph,\nstill first.", "Second one.", "Third.\n"]
    with pytest.raises(common.ConfigError, match="a row has no field 'sentence'"):
        text_sets.load_documents("sec_reports", str(tmp_path / "news.jsonl"))


def test_packed_rows_are_full_and_cover_the_stream_once():
    tok = byte_tok()
    docs = encoded(text_sets.load_documents("wikitext2", wiki())[0][:3], tok)
    stream = torch.cat([torch.as_tensor(d) for d in docs] + [torch.tensor([tok.eos_id], dtype=torch.int32)])
    examples, rows = sft.pack_documents(docs, 512, tok.eos_id)
    assert len(rows) == (len(stream) - 1) // 512
    assert all(sum(len(examples[i][0]) for i in row) == 512 for row in rows)  # full rows, no padding
    x = torch.cat([torch.as_tensor(examples[i][0]) for row in rows for i in row])
    y = torch.cat([torch.as_tensor(examples[i][1]) for row in rows for i in row])
    assert torch.equal(x, stream[:len(x)]) and torch.equal(y, stream[1:len(x) + 1])
    tail_examples, tail_rows = sft.pack_documents(docs, 512, tok.eos_id, keep_tail=True)
    assert sum(len(e[1]) for e in tail_examples) == len(stream) - 1  # eval: every token but the first, once
    starts = [i for row in rows for i in row[1:]]  # a piece after a row's first starts a document
    assert len(starts) == 2 and all(examples[i][0][0] == tok.eos_id for i in starts)


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama"])
def test_packed_loss_equals_each_document_alone(arch):
    """WikiText-2 lines as documents in rows of 256 bytes: a row's loss equals the sum of its pieces' losses,
    each run alone from position 0; a document inside one row is scored exactly as [EOS] + document alone."""
    tok = byte_tok()
    with open(wiki(), encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()][:30]
    docs = encoded(lines, tok)
    examples, rows = sft.pack_documents(docs, 256, tok.eos_id, keep_tail=True)
    m = tiny_native() if arch == "native" else tiny_hf(arch)
    kind = "native" if arch == "native" else "hf"
    m.eval()
    with torch.no_grad():
        x, y, pos, doc = sft.collate(rows, examples, tok.pad_id, True)
        packed = sft.summed_loss(m, kind, x, y, pos, doc, "sdpa").item()
        alone = sum(sft.summed_loss(m, kind, *sft.collate([[i]], examples, tok.pad_id, False), "sdpa").item()
                    for row in rows for i in row)
    assert math.isclose(packed, alone, rel_tol=1e-5), (packed, alone)
    # the pieces that are whole documents: [EOS] + the line, with the line and the next EOS as targets
    whole = {bytes(examples[i][0][1:].tolist()).decode() for row in rows for i in row
             if examples[i][0][0] == tok.eos_id and examples[i][1][-1] == tok.eos_id}
    assert len(whole) >= 5 and whole <= set(lines)


def lm_args(model, *extra):
    return [f"model={model}", "objective=lm", "datasets=[wikitext2]", f"data_paths=[{wiki()}]", "max_samples=4",
            "eval_samples=2", "max_length=128", "micro_batch_size=4", "learning_rate=1e-2", "max_steps=8",
            "warmup_ratio=0.1", "log_interval=1", "eval_interval=4", "tensorboard=false", *extra]


def test_lm_loss_falls_and_resume_is_exact_in_an_auto_named_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the auto-named folder goes to ./out
    base = tmp_path / "base"
    save_native(str(base / "ckpt_000000.pt"), tiny_native(n_embd=32), common.Tokenizer("byte"))
    whole = sft.main(lm_args(f"{base}/latest", f"out_dir={tmp_path / 'whole'}"))
    losses = train_losses(tmp_path / "whole")
    assert losses[7] < losses[0] - 0.8, losses  # from ~5.6 nats per byte
    assert 0 < whole["eval_bpb"]["wikitext2"] < 8 and whole["tokens"] == 8 * 4 * 128
    assert "generation" not in whole and os.path.isfile(tmp_path / "whole" / "hf" / "config.json")
    stopped = sft.main(lm_args(f"{base}/latest", "stop_after_step=3"))
    assert stopped["status"] == "stopped"
    resumed = sft.main(lm_args(f"{base}/latest", "resume=latest"))
    runs = os.listdir(tmp_path / "out")
    assert resumed["status"] == "done" and len(runs) == 1  # resume=latest found the run by its name
    assert sft.STAMP_RE.sub("", runs[0]) == "base_wikitext2_lm_bs4_len128"
    assert train_losses(tmp_path / "out" / runs[0]) == losses  # every step's loss, bit for bit


def test_lm_mixture_and_lora_on_an_hf_model(tmp_path):
    folder = tmp_path / "gpt2"
    tiny_hf("gpt2").save_pretrained(folder)
    hf_byte_tok().tok.save_pretrained(folder)
    math_text = tmp_path / "math.jsonl"
    math_text.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic.synthetic_math_text(60, seed=1)))
    out = tmp_path / "run"
    results = sft.main(lm_args(folder, "datasets=[wikitext2,text]", f"data_paths=[{wiki()},{math_text}]",
                               "mixture_rates=[0.7,0.3]", "max_samples=30", f"out_dir={out}"))
    losses = train_losses(out)
    assert losses[7] < losses[0] - 0.5, losses
    assert set(results["eval_bpb"]) == {"wikitext2", "text"} and results["steps"] == 8
    # LoRA: the same loop with adapters only (a random tiny GPT-2 moves slowly through them)
    sft.main(lm_args(folder, "max_steps=4", "lora=true", "lora_r=8", "learning_rate=5e-2", f"out_dir={out}_lora"))
    meta = common.read_jsonl(os.path.join(f"{out}_lora", "log.jsonl"))[0]
    losses = train_losses(f"{out}_lora")
    assert meta["trainable_ratio"] < 0.2 and meta["lora_targets"] == "c_attn,c_proj,c_fc" and losses[3] < losses[0]
    cfg = sft.Config(model=str(folder), objective="lm", datasets=["wikitext2", "text"], mixture_rates=[0.7, 0.3],
                     micro_batch_size=4, max_length=128, lora=True)
    assert sft.run_name(cfg, 1) == "gpt2_mix_wikitext2-70_text-30_lm_bs4_len128_lora"


def test_lm_bad_input():
    with pytest.raises(common.ConfigError, match="unknown text dataset 'wikitext'.*openwebmath.*wikitext103"):
        sft.check_config(sft.Config(model="x", objective="lm", datasets=["wikitext"]))
    with pytest.raises(common.ConfigError, match="unknown dataset 'wikitext2'"):  # an SFT run names SFT sets
        sft.check_config(sft.Config(model="x", datasets=["wikitext2"]))
    with pytest.raises(common.ConfigError, match="objective 'pretrain' is not one of sft, lm"):
        sft.check_config(sft.Config(model="x", objective="pretrain"))
    with pytest.raises(common.ConfigError, match="streamed from the hub.*set max_samples"):
        text_sets.load_documents("openwebmath")
    with pytest.raises(common.ConfigError, match="has no hub copy; give data_paths"):
        text_sets.load_documents("text")

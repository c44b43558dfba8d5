"""export_hf.py: a native checkpoint becomes an HF folder that transformers loads as the same model
(logits, tokenizer ids, generation), for both tokenizer kinds; corrupted exports never land."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import dataio
import export_hf
import model as model_lib
from conftest import ROOT, shared_path

EXTRAS = ["<|user|>", "<|assistant|>"]


def make_run(run_dir, kind, mul_range, steps=10, seed=0, block_size=128, tokenizer_file=None):
    """A tiny GPT trained a few steps on text with multiplication facts, saved like train_gpt.py does."""
    tok = common.Tokenizer(kind, extra_tokens=EXTRAS, mul_range=mul_range, tokenizer_file=tokenizer_file)
    torch.manual_seed(seed)
    cfg = model_lib.model_config("tiny", common.padded_vocab_size(tok.vocab_size), block_size)
    gpt = model_lib.GPT(cfg)
    text = " ".join(f"{a}*{b}={a * b}. so {b} x {a} = {a * b}!" for a in range(1, 13) for b in range(1, 13))
    text += "<|user|> What is 7*8? <|assistant|> 7*8=56<|endoftext|>" * 20
    ids = torch.tensor(tok.encode(text, allow_special=True))
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    T = 32
    for step in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (4,))
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        _, loss = gpt(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    common.save_checkpoint(os.path.join(run_dir, f"ckpt_{steps - 1:06d}.pt"), {
        "kind": "gpt", "model": gpt.state_dict(), "model_config": dataclasses.asdict(cfg), "tokenizer": tok.spec,
        "config": {"tokenizer_file": tokenizer_file}, "step": steps - 1, "optimizer": None, "loader": None,
        "rng": None, "val_loss": loss.item()})
    return gpt.eval(), tok


@torch.no_grad()
def greedy_uncached(gpt, ids, n):
    """Reference decoding: the native model re-reads the whole sequence at every step."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(gpt(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    run = tmp_path_factory.mktemp("gpt2run")
    gpt, tok = make_run(str(run), "gpt2", (1, 12), tokenizer_file=ranks)
    out = run.parent / (run.name + "_hf")
    # the CLI as documented, on the run folder's `latest`
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export_hf.py"), "--checkpoint", str(run / "latest"),
                        "--output-dir", str(out), "--tokenizer-file", ranks], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verified: max abs logit diff" in r.stdout
    return gpt, tok, str(run), str(out), ranks


def test_hf_tokenizer_equals_tiktoken_on_real_text():
    ranks = shared_path("tokenizers", "gpt2.tiktoken")
    tok = common.Tokenizer("gpt2", extra_tokens=EXTRAS, mul_range=(1, 12), tokenizer_file=ranks)
    hf = common.build_hf_tokenizer(tok)
    with open(shared_path("gsm8k", "test.jsonl")) as f:
        rows = [json.loads(line) for line in f][:300]
    with open(shared_path("tinyshakespeare", "input.txt")) as f:
        text = f.read()[:30000]
    text += "".join(r["question"] + "\n" + r["answer"] + "<|endoftext|>" for r in rows)
    text += common.sample_text(tok)
    ours = tok.encode(text, allow_special=True)
    assert hf.encode(text).ids == ours
    assert any(i in tok.mul_ids.values() for i in ours)  # the real GSM8K answers contain canonical products
    assert hf.decode(ours, skip_special_tokens=False) == tok.decode(ours)
    # without multiplication tokens the base BPE alone equals tiktoken too
    plain = common.Tokenizer("gpt2", tokenizer_file=ranks)
    assert common.build_hf_tokenizer(plain).encode(text).ids == plain.encode(text, allow_special=True)


def test_merges_are_recovered_exactly_from_ranks():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5, b"cab": 6}
    assert common.merges_from_ranks(ranks) == [("a", "b"), ("ab", "c"), ("b", "c"), ("c", "ab")]
    with pytest.raises(ValueError, match="not the merge"):
        common.merges_from_ranks({b"a": 0, b"b": 1, b"abb": 2})


def test_gpt2_export_round_trip(gpt2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gpt, tok, run, out, _ = gpt2_run
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "export_info.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "gpt2" and "auto_map" not in config  # no custom code
    assert config["vocab_size"] == tok.vocab_size == 50257 + 2 + 2 * 144  # padded 50560 cut to the real vocabulary
    assert gpt.config.vocab_size == 50560
    with open(os.path.join(out, "export_info.json")) as f:
        info = json.load(f)
    assert info["verification"]["max_abs_logit_diff"] <= 1e-4 and info["verification"]["tokenizer_ids_equal"]

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf.generation_config.eos_token_id == tok.eot_id == hf.generation_config.pad_token_id == 50256

    # logits on text the exporter never saw, with mul tokens and extras inside
    text = "<|user|> Tom buys 6*7=42 apples, 3 x 4 = 12 pears.<|assistant|> 12*11=132 and 5*5=25<|endoftext|>"
    ids = tok.encode(text, allow_special=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.mul_space_ids[(6, 7)] in ids and tok.mul_space_ids[(12, 11)] in ids and tok.special["<|assistant|>"] in ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = gpt(x)[0][..., :tok.vocab_size]
        got = hf(input_ids=x).logits
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-4
    # every extra and multiplication token encodes to its own id and decodes to its text
    for text_, i in list(tok.special.items()) + [(tok.id_to_text[i], i) for i in tok.mul_ids.values()]:
        assert hf_tok(text_, add_special_tokens=False)["input_ids"] == [i] == tok.encode(text_, allow_special=True)
        assert hf_tok.decode([i]) == text_
    # the other surface forms of a product map to its token in both; a chain is no fact in either
    for form in ("3 x 4 = 12", "3 × 4 = 12", "3 times 4 is 12", "3 * 4 = 12"):
        assert hf_tok(form, add_special_tokens=False)["input_ids"] == tok.encode(form) == [tok.mul_ids[(3, 4)]]
    chain = "2*3=4*5=20"
    assert tok.mul_ids[(4, 5)] not in tok.encode(chain)
    assert hf_tok(chain, add_special_tokens=False)["input_ids"] == tok.encode(chain)

    # generation: HF's generate (KV cache) == the native model decoding without a cache
    prompt = tok.encode("<|user|> What is 7*8? <|assistant|>", allow_special=True)
    want = greedy_uncached(gpt, prompt, 8)
    got = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)[0].tolist()
    assert got == want[:len(got)] and (len(got) == len(want) or got[-1] == tok.eot_id)
    assert hf_tok.decode(got[len(prompt):]) == tok.decode(want[len(prompt):])


def test_reverse_direction_hf_weights_into_model_py(gpt2_run):
    gpt, tok, run, out, _ = gpt2_run
    back = model_lib.from_hf(out)  # HF folder -> model.py
    assert back.config.vocab_size == tok.vocab_size and back.config.block_size == gpt.config.block_size
    x = torch.randint(0, tok.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(x)[0] - gpt(x)[0][..., :tok.vocab_size]).abs().max().item() < 1e-5
    # hf_state_dict / load_hf_state_dict are inverses
    fresh = model_lib.GPT(gpt.config)
    fresh.load_hf_state_dict(gpt.hf_state_dict())
    for k, v in gpt.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_byte_kind_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gpt, tok = make_run(str(tmp_path / "run"), "byte", (2, 9), steps=5)
    info = export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert info["vocab_size"] == 257 + 2 + 2 * 64 and info["padded_vocab_size"] == 448
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Café 日本 🙂: 3*4=12, 13*4=52, 9*9=81<|user|>2*2=4?<|endoftext|>"
    ids = tok.encode(text, allow_special=True)
    assert ids[:3] == list("Caf".encode()) and tok.mul_space_ids[(3, 4)] in ids and tok.mul_space_ids[(9, 9)] in ids
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(input_ids=x).logits - gpt(x)[0][..., :tok.vocab_size]).abs().max().item() < 1e-4
    assert hf.generation_config.eos_token_id == 256


def test_corrupted_export_is_caught_and_leaves_nothing(gpt2_run, tmp_path, monkeypatch):
    _, _, run, _, ranks = gpt2_run
    out = tmp_path / "hf_bad"
    original = model_lib.GPT.hf_state_dict

    def untransposed(self, vocab_size=None):  # the classic exporter bug: a square Conv1D weight not transposed
        sd = original(self, vocab_size)
        sd["transformer.h.0.attn.c_proj.weight"] = sd["transformer.h.0.attn.c_proj.weight"].t().contiguous()
        return sd

    monkeypatch.setattr(model_lib.GPT, "hf_state_dict", untransposed)
    with pytest.raises(export_hf.ExportVerificationError, match=r"logits differ: max abs difference"):
        export_hf.export(run, str(out), ranks)
    assert not out.exists() and os.listdir(tmp_path) == []  # no output, no temp folder
    monkeypatch.undo()

    # a tokenizer that forgets one multiplication token is caught too
    original_regex = dataio.mul_split_regex
    monkeypatch.setattr(dataio, "mul_split_regex", lambda tok: original_regex(tok).replace("7\\*8=56|", ""))
    with pytest.raises(export_hf.ExportVerificationError, match="tokenizer ids differ"):
        export_hf.export(run, str(out), ranks)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(gpt2_run, tmp_path):
    _, _, run, _, ranks = gpt2_run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf.export(run, str(out), ranks)
    assert (out / "old.txt").exists()
    export_hf.export(run, str(out), ranks, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with pytest.raises(common.ConfigError, match="checkpoint= and output_dir= are required"):
        export_hf.main([f"checkpoint={run}"])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        export_hf.export(str(tmp_path / "empty_run"), str(tmp_path / "x"))

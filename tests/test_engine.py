"""engine.py: one generation interface for native GPT checkpoints (model.KVCache) and HF causal LMs
(transformers' cache): greedy agreement between the two, log-probs equal to a full forward pass, sampling
filters, seeds, one prefill per prompt for num_samples, EOS / stop strings / length."""
import pytest
import torch

import engine as engine_lib
import model as model_lib
from test_export_hf import make_run

PROMPTS = ["7*8=", "So 3 x 4 = 12 and 5*5=25, then", "Hi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny weights as a native checkpoint and as an HF folder (byte tokenizer, padded vocabulary)."""
    root = tmp_path_factory.mktemp("engine")
    make_run(str(root / "run"), "byte", (2, 9), steps=30, block_size=64)
    native = engine_lib.load_model(str(root / "run"))
    gpt, tok = native.model, native.tok.tok
    assert gpt.config.vocab_size > tok.vocab_size  # padded rows exist and must never be sampled
    model_lib.save_hf_folder(gpt, tok, str(root / "hf"), {})
    hf = engine_lib.load_model(str(root / "hf"))
    prompts = [native.tok.encode_prompt(t) for t in PROMPTS]
    assert prompts == [hf.tok.encode_prompt(t) for t in PROMPTS] and len({len(p) for p in prompts}) == 3
    return native, hf, prompts


@torch.no_grad()
def greedy_uncached(lm, ids, n):
    """Reference decoding: re-read the whole sequence at every step, argmax over the tokenizer's vocabulary."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(lm.logits(torch.tensor([ids]))[0, -1, :lm.tok.vocab_size].argmax()))
    return ids


@torch.no_grad()
def full_logprobs(lm, prompt, ids):
    """log_softmax of one full forward pass over prompt + ids, at the generated ids (the model's whole output)."""
    seq = torch.tensor([prompt + ids])
    logits = lm.model(seq)[0] if lm.kind == "native" else lm.model(input_ids=seq).logits
    logp = torch.log_softmax(logits[0].float(), -1)
    return logp[torch.arange(len(prompt) - 1, seq.size(1) - 1), torch.tensor(ids)]


def test_native_and_hf_give_the_same_greedy_tokens_as_uncached_decoding(models):
    native, hf, prompts = models
    for lm in (native, hf):
        lm.tok.eos_ids = set()  # run the whole length
    try:
        got_native = engine_lib.Engine(native).generate(prompts, 12)
        got_hf = engine_lib.Engine(hf, batch_size=2).generate(prompts, 12)  # two batches, one of one prompt
    finally:
        native.tok.eos_ids, hf.tok.eos_ids = {native.tok.tok.eot_id}, {native.tok.tok.eot_id}
    ids_native = [out[0].ids for out in got_native]
    assert ids_native == [out[0].ids for out in got_hf]
    for p, ids in zip(prompts, ids_native):
        assert ids == greedy_uncached(native, p, 12)[len(p):]
    assert all(out[0].finish_reason == "length" and len(out[0].ids) == 12 for out in got_native)
    assert got_native[0][0].logprobs == []  # only when asked


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_sampled_logprobs_equal_a_full_forward_pass(models, kind):
    native, hf, prompts = models
    lm = native if kind == "native" else hf
    outs = engine_lib.Engine(lm).generate(prompts, 10, temperature=0.7, top_k=30, num_samples=3, seed=1,
                                          logprobs=True)
    checked = 0
    for p, samples in zip(prompts, outs):
        assert len(samples) == 3
        for c in samples:
            assert len(c.logprobs) == len(c.ids) > 0
            ref = full_logprobs(lm, p, c.ids)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)  # raw model, temperature 1
            checked += len(c.ids)
    assert checked > 30


def test_top_k_and_top_p_only_sample_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    g = torch.Generator().manual_seed(0)
    top5 = logits.topk(5, -1).indices
    seen = set()
    for _ in range(200):
        t = engine_lib.sample_next(logits, 1.0, 5, 1.0, g)
        assert all(t[b] in top5[b] for b in range(4))
        seen.add(int(t[0]))
    assert len(seen) > 1  # it samples, not argmax
    probs = logits.softmax(-1)
    for _ in range(200):
        t = engine_lib.sample_next(logits, 1.0, 0, 0.6, g)
        for b in range(4):  # the nucleus: tokens more likely than t hold less than 0.6 of the mass
            assert probs[b][probs[b] > probs[b, t[b]]].sum() < 0.6
    assert torch.equal(engine_lib.sample_next(logits, 0.0, 0, 1.0, g), logits.argmax(-1))
    with pytest.raises(ValueError, match="top_p"):
        engine_lib.Engine(None).generate([[1]], 2, top_p=0.0)
    assert engine_lib.Engine(None).generate([], 2) == []
    with pytest.raises(ValueError, match="empty prompt"):
        engine_lib.Engine(None).generate([[1], []], 2)


def test_fixed_seed_reproduces_samples_and_num_samples_shares_one_prefill(models, monkeypatch):
    native, _, prompts = models
    engine = engine_lib.Engine(native)
    kw = dict(temperature=1.0, num_samples=4, seed=7)
    a, b = engine.generate(prompts, 8, **kw), engine.generate(prompts, 8, **kw)
    assert [[c.ids for c in s] for s in a] == [[c.ids for c in s] for s in b]
    other = engine.generate(prompts, 8, **{**kw, "seed": 8})
    assert [[c.ids for c in s] for s in a] != [[c.ids for c in s] for s in other]
    assert any(len({tuple(c.ids) for c in s}) > 1 for s in a)  # the samples of a prompt differ

    shapes = []
    forward = native.model.forward
    monkeypatch.setattr(native.model, "forward", lambda idx, **k: shapes.append(tuple(idx.shape)) or forward(idx, **k))
    engine.generate(prompts, 5, **kw)
    L = max(len(p) for p in prompts)
    assert shapes[0] == (3, L)  # one prefill of the three prompts ...
    assert all(s[1] == 1 for s in shapes[1:]) and shapes[1][0] <= 12  # ... then one token per sample row


def test_stop_strings_eos_and_finish_reasons(models):
    native, hf, prompts = models
    engine = engine_lib.Engine(native)
    eot = native.tok.tok.eot_id
    native.tok.eos_ids = set()
    try:
        free = [out[0] for out in engine.generate(prompts, 12)]
        # EOS: the token at step 3 of row 0 ends that row (kept as its last id), the others run on
        eos = free[0].ids[3]
        native.tok.eos_ids = {eos}
        ended = [out[0] for out in engine.generate(prompts, 12)]
    finally:
        native.tok.eos_ids = {eot}
    first = free[0].ids.index(eos)
    assert ended[0].ids == free[0].ids[:first + 1] and ended[0].finish_reason == "eos"
    assert ended[0].content_ids == free[0].ids[:first]
    for e, f in zip(ended, free):  # rows left in the shrunken batch decode exactly as before
        assert e.ids == (f.ids[:f.ids.index(eos) + 1] if eos in f.ids else f.ids)
    # a stop string: the row ends on the token that completes it, and the text is cut before it
    text = native.tok.decode(free[1].ids)
    stop = text[4:6]
    native.tok.eos_ids = set()
    try:
        stopped = engine.generate(prompts, 12, stop=[stop, "never seen"])
    finally:
        native.tok.eos_ids = {eot}
    c = stopped[1][0]
    k = next(i for i in range(1, 13) if stop in native.tok.decode(free[1].ids[:i]))
    assert c.finish_reason == "stop" and c.ids == free[1].ids[:k]
    assert c.text == text[:text.index(stop)] and stop not in c.text
    assert all(out[0].finish_reason in ("stop", "length") for out in stopped)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        engine.generate(prompts, 64)


def test_one_tokenizer_interface_and_its_two_eos_rules():
    """eos_id is what a trained reply ends with (the tokenizer's EOS); eos_ids, what ends a generation, adds the
    generation config's end-of-turn ids. The native tokenizer gives the same interface with one id for both."""
    import common
    from transformers import GenerationConfig
    base = common.Tokenizer("byte", extra_tokens=["<|im_start|>", "<|im_end|>"])
    hf_tok = common.hf_tokenizer(base, 512)
    end_of_turn = hf_tok.convert_tokens_to_ids("<|im_end|>")
    tok = engine_lib.HFTokenizer(hf_tok, GenerationConfig(eos_token_id=[end_of_turn]))
    assert tok.eos_id == hf_tok.eos_token_id != end_of_turn
    assert tok.eos_ids == {tok.eos_id, end_of_turn}
    assert tok.pad_id in (hf_tok.pad_token_id, tok.eos_id)
    assert engine_lib.HFTokenizer(hf_tok).eos_ids == {tok.eos_id}  # no generation config: the tokenizer's alone
    native = engine_lib.NativeTokenizer(base)
    assert native.eos_ids == {native.eos_id} and native.eos_id == base.eot_id
    for t in (tok, native):  # the same methods, the same ids for plain text
        assert t.encode_reply("7*8=56") == t.encode("7*8=56") and t.decode(t.encode("12 + 3")) == "12 + 3"
        assert not t.has_mul_tokens


def test_load_model_for_training_adds_lora_on_the_hf_twin_of_a_native_checkpoint(models):
    """train=True with lora: a native checkpoint becomes its HF GPT-2 twin with peft adapters, in train mode; its
    logits before any step are the eval load's (LoRA's B starts at zero)."""
    path = models[0].name
    lm = engine_lib.load_model(path, train=True, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": []})
    assert lm.kind == "hf" and lm.model.training and lm.lora_targets == engine_lib.LORA_TARGETS["gpt2"]
    trained = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    ref = engine_lib.load_model(path)
    assert ref.kind == "native" and not ref.model.training
    ids = torch.tensor([ref.tok.encode("Q: 2+3?\nA:")])
    lm.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(ids)[..., :ref.tok.vocab_size], ref.logits(ids), atol=1e-4, rtol=0)

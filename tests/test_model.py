import pytest
import torch

from model import GPT, GPTConfig, model_config


def tiny(vocab=97, block=32):
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab, block)).eval()


def test_causality_future_tokens_never_change_earlier_logits():
    m = tiny()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    lx, _ = m(x)
    ly, _ = m(y)
    assert torch.allclose(lx[:, :12], ly[:, :12], atol=1e-6)
    assert not torch.allclose(lx[:, 12:], ly[:, 12:], atol=1e-3)


def test_explicit_causal_mask_and_positions_match_the_defaults():
    m = tiny()
    x = torch.randint(0, 97, (2, 16))
    mask = torch.tril(torch.ones(16, 16, dtype=torch.bool))[None, None]
    default, _ = m(x)
    explicit, _ = m(x, position_ids=torch.arange(16), attn_mask=mask)
    assert torch.allclose(default, explicit, atol=1e-5)
    # a full (bidirectional) mask lets the future in, so it must change earlier logits
    full, _ = m(x, attn_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool))
    assert not torch.allclose(default[:, :8], full[:, :8], atol=1e-3)
    shifted, _ = m(x, position_ids=torch.arange(16) + 3)
    assert not torch.allclose(default, shifted, atol=1e-3)


def test_loss_is_cross_entropy_and_too_long_input_is_refused():
    m = tiny()
    x = torch.randint(0, 97, (2, 16))
    logits, loss = m(x, x)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 97), x.view(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_sizes_match_gpt2_parameter_counts():
    cfg = model_config("gpt2", 50257, 1024)
    with torch.device("meta"):
        m = GPT(cfg)
    # GPT-2 small: 124,439,808 parameters with tied embeddings
    assert sum(p.numel() for p in m.parameters()) == 124_439_808
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("gpt5", 100, 16)


def test_optimizer_decays_only_matrices():
    m = tiny()
    opt = m.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in m.parameters())


def test_hf_gpt2_weights_load_and_give_the_same_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=24,
                                    bos_token_id=100, eos_token_id=100)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randint(0, 101, (3, 24))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-5
    # and back: our weights in HF's layout reproduce our logits in a fresh HF model
    hf2 = GPT2LMHeadModel(hf.config).eval()
    hf2.load_state_dict(ours.hf_state_dict(), strict=False)
    with torch.no_grad():
        assert (ours(x)[0] - hf2(x).logits).abs().max().item() < 1e-5


def test_padded_vocab_is_cut_for_hf():
    m = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=16))
    sd = m.hf_state_dict(vocab_size=100)
    assert sd["transformer.wte.weight"].shape == (100, 16) and sd["lm_head.weight"].shape == (100, 16)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D layout (in, out)

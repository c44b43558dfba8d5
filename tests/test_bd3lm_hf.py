"""The published BD3-LM checkpoints (kuleshov-group/bd3lm-owt-block_size16 and its siblings) mapped into our GPT:
a tiny random state dict with the published key names and shapes, run through an independent re-implementation
of their DiT forward (written here from the definition in the reference code) and through our mapped model under
the same BD3-LM mask: the logits must agree. No network: the hub is offline in these tests."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import engine
import model as model_lib
import train_bd3lm as bd
from model import GPT, block_diffusion_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = os.path.join(ROOT, "tests", "fixtures", "plans_small.json")


def published_state(n_vocab, dim=32, n_heads=2, n_blocks=2, cond_dim=16, freq_dim=256, adaln=True, seed=0):
    """Random weights under the HF file's names ('backbone.' + the DiT's) and shapes. The adaLN weights are
    random too (the reference initialises them at zero, training moves them), so every fold is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, around=0.0):
        return around + scale * torch.randn(*shape, generator=g)

    sd = {"vocab_embed.embedding": rand(n_vocab, dim, scale=1.0),
          "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, dim // n_heads, 2).float() / (dim // n_heads))}
    if adaln:
        sd.update({"sigma_map.mlp.0.weight": rand(cond_dim, freq_dim), "sigma_map.mlp.0.bias": rand(cond_dim),
                   "sigma_map.mlp.2.weight": rand(cond_dim, cond_dim), "sigma_map.mlp.2.bias": rand(cond_dim)})
    for i in range(n_blocks):
        b = f"blocks.{i}"
        sd.update({f"{b}.norm1.weight": rand(dim, around=1.0), f"{b}.attn_qkv.weight": rand(3 * dim, dim),
                   f"{b}.attn_out.weight": rand(dim, dim), f"{b}.norm2.weight": rand(dim, around=1.0),
                   f"{b}.mlp.0.weight": rand(4 * dim, dim), f"{b}.mlp.0.bias": rand(4 * dim),
                   f"{b}.mlp.2.weight": rand(dim, 4 * dim), f"{b}.mlp.2.bias": rand(dim)})
        if adaln:
            sd.update({f"{b}.adaLN_modulation.weight": rand(6 * dim, cond_dim),
                       f"{b}.adaLN_modulation.bias": rand(6 * dim)})
    sd.update({"output_layer.norm_final.weight": rand(dim, around=1.0),
               "output_layer.linear.weight": rand(n_vocab, dim), "output_layer.linear.bias": rand(n_vocab)})
    if adaln:
        sd.update({"output_layer.adaLN_modulation.weight": rand(2 * dim, cond_dim),
                   "output_layer.adaLN_modulation.bias": rand(2 * dim)})
    state = {f"backbone.{k}": v for k, v in sd.items()}
    state.update({"sampling_eps_min": torch.tensor(1e-3), "sampling_eps_max": torch.tensor(1.0)})  # HF buffers
    return state


# ---------------------------------------------------------------------------- their DiT, from its definition


def reference_mask(n, block_size):
    """The reference's three masks over [x_t | x_0]: block-diagonal (same half, same block), offset
    block-causal (x_t reads strictly earlier blocks of x_0), block-causal (x_0 reads its own and earlier)."""
    q, k = torch.arange(2 * n)[:, None], torch.arange(2 * n)[None, :]
    q_clean, k_clean = q >= n, k >= n
    block_q, block_k = (q % n) // block_size, (k % n) // block_size
    diagonal = (block_q == block_k) & (q_clean == k_clean)
    offset_causal = (block_q > block_k) & k_clean & ~q_clean
    causal = (block_q >= block_k) & k_clean & q_clean
    return diagonal | offset_causal | causal


def reference_dit_logits(state, x_t, x_0, block_size, n_heads, sigma=None):
    """The DiT forward of the published model in training mode (x_t and x_0 side by side), no dropout."""
    p = lambda name: state[f"backbone.{name}"]  # noqa: E731
    B, n = x_t.shape
    dim = p("vocab_embed.embedding").shape[1]
    head_dim = dim // n_heads
    adaln = "backbone.sigma_map.mlp.0.weight" in state

    def layer_norm(x, weight):  # no bias; normalised in fp32, then the weight
        return F.layer_norm(x.float(), [dim]) * weight

    x = p("vocab_embed.embedding")[torch.cat([x_t, x_0], dim=1)]
    if adaln:  # without time conditioning the model zeroes sigma, whatever it is given
        sigma = torch.zeros(B) if sigma is None else torch.zeros_like(sigma)
        freq_dim = p("sigma_map.mlp.0.weight").shape[1]
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = sigma[:, None] * freqs[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        h = F.silu(t_freq @ p("sigma_map.mlp.0.weight").T + p("sigma_map.mlp.0.bias"))
        c = F.silu(h @ p("sigma_map.mlp.2.weight").T + p("sigma_map.mlp.2.bias"))

    # rotary tables for positions 0..n-1, used by both halves
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(n).float()[:, None] * inv_freq[None]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

    def rotate(t):  # (B, n, H, hd)
        t1, t2 = t[..., :head_dim // 2], t[..., head_dim // 2:]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    allowed = reference_mask(n, block_size)
    n_blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    for i in range(n_blocks):
        b = f"blocks.{i}"
        if adaln:
            mod = c @ p(f"{b}.adaLN_modulation.weight").T + p(f"{b}.adaLN_modulation.bias")
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, None] for m in mod.chunk(6, dim=1))
        else:
            shift_msa = scale_msa = shift_mlp = scale_mlp = torch.zeros(1)
            gate_msa = gate_mlp = torch.ones(1)
        h = layer_norm(x, p(f"{b}.norm1.weight")) * (1 + scale_msa) + shift_msa
        qkv = (h @ p(f"{b}.attn_qkv.weight").T).view(B, 2 * n, 3, n_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = torch.cat([rotate(q[:, :n]), rotate(q[:, n:])], dim=1)  # each half at positions 0..n-1
        k = torch.cat([rotate(k[:, :n]), rotate(k[:, n:])], dim=1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, 2 * n, dim)
        x = x + gate_msa * (y @ p(f"{b}.attn_out.weight").T)
        h = layer_norm(x, p(f"{b}.norm2.weight")) * (1 + scale_mlp) + shift_mlp
        h = F.gelu(h @ p(f"{b}.mlp.0.weight").T + p(f"{b}.mlp.0.bias"), approximate="tanh")
        x = x + gate_mlp * (h @ p(f"{b}.mlp.2.weight").T + p(f"{b}.mlp.2.bias"))
    if adaln:
        shift, scale = (m[:, None] for m in (c @ p("output_layer.adaLN_modulation.weight").T
                                            + p("output_layer.adaLN_modulation.bias")).chunk(2, dim=1))
    else:
        shift, scale = torch.zeros(1), torch.zeros(1)
    h = layer_norm(x, p("output_layer.norm_final.weight")) * (1 + scale) + shift
    logits = h @ p("output_layer.linear.weight").T + p("output_layer.linear.bias")
    return logits[:, :n]


def ours_logits(model, x_t, x_0, block_size):
    n = x_t.size(1)
    positions = torch.arange(n)
    logits, _ = model(torch.cat([x_t, x_0], dim=1), position_ids=torch.cat([positions, positions]),
                      attn_mask=block_diffusion_mask(positions // block_size), logits_len=n)
    return logits


def noisy_pair(n_vocab, B, n, seed=1):
    """x_0 of real ids (the last id is [MASK]) and x_t with about half of them masked."""
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, n_vocab - 1, (B, n), generator=g)
    x_t = torch.where(torch.rand(B, n, generator=g) < 0.5, torch.full_like(x_0, n_vocab - 1), x_0)
    return x_t, x_0


# ---------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize("adaln", [True, False])
def test_mapped_model_matches_the_published_dit(adaln):
    n_vocab, n, block_size = 67, 16, 4
    state = published_state(n_vocab, adaln=adaln)
    config, mapped = model_lib.dit_to_gpt(state, n_head=2, model_length=n)
    assert config.pos_encoding == "rope" and config.head_bias and config.vocab_size == 128  # padded to 64s
    model = GPT(config).eval()
    model.load_state_dict(mapped, strict=True)
    x_t, x_0 = noisy_pair(n_vocab, 3, n)
    with torch.no_grad():
        expected = reference_dit_logits(state, x_t, x_0, block_size, n_heads=2, sigma=torch.rand(3))
        got = ours_logits(model, x_t, x_0, block_size)[..., :n_vocab]
    assert expected.abs().max() > 1.0  # logits of a real size, not a vanishing signal
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and the comparison can fail: another block size gives other logits
    with torch.no_grad():
        other = ours_logits(model, x_t, x_0, 8)[..., :n_vocab]
    assert (other - expected).abs().max() > 1e-2


def test_mapped_model_samples_the_same_with_and_without_kv_cache():
    """Rotary positions through the block KV cache: cached keys are rotated at their own positions."""
    n_vocab, n = 67, 16
    config, mapped = model_lib.dit_to_gpt(published_state(n_vocab), n_head=2, model_length=n)
    model = GPT(config).eval()
    model.load_state_dict(mapped)
    cfg = bd.Config(sampler="first_hitting", top_p=1.0)
    block_ids = torch.arange(n) // 4
    x = torch.zeros(2, n, dtype=torch.long)
    fixed = torch.zeros(2, n, dtype=torch.bool)
    fixed[:, :3] = True
    x[:, :3] = torch.tensor([[5, 6, 7], [8, 9, 10]])
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(0)
        out, _ = engine.block_diffusion_generate(model, x.clone(), fixed.clone(), block_ids, [n], n_vocab - 1,
                                                 n_vocab - 1, 0, cfg, g, use_cache)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert (outs[0][:, 3:] != n_vocab - 1).all()  # every masked position was filled


# ---------------------------------------------------------------------------- init_from= a folder or the hub


def write_published_folder(folder, state, **config):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    config = {"model_type": "bd3lm", "block_size": 16, "vocab_size": state["backbone.vocab_embed.embedding"].shape[0],
              "model_length": 128, "hidden_dim": 32, "cond_dim": 16, "n_blocks": 2, "n_heads": 2,
              "time_conditioning": False, **config}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def plans_args(out_dir, **overrides):
    args = dict(data="hierarchical", plans_path=PLANS, val_plans_path=PLANS, tokenizer="byte", seq_len=128,
                question_len=48, plan_len=48, exec_len=32, block_size=16, model="tiny", batch_size=4,
                micro_batch_size=2, max_steps=2, warmup_steps=1, log_interval=1, val_interval=0, ckpt_interval=0,
                device="cpu", dtype="fp32", ema=0.9, seed=5, out_dir=out_dir)
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def test_init_from_a_published_folder_loads_the_mapped_weights_and_trains(tmp_path):
    # byte tokenizer: 257 ids, then [MASK] = 257, as GPT-2's 50257 ids and [MASK] = 50257 in the published models
    state = published_state(258)
    folder = str(tmp_path / "bd3lm-owt-block_size16")
    write_published_folder(folder, state)
    cfg = common.load_config(bd.Config, plans_args(str(tmp_path / "run"), init_from=folder))
    model = bd.build_model(cfg, common.padded_vocab_size(258), common.Dist(False, 0, 0, 1, "cpu"), mask_id=257).eval()
    x_t, x_0 = noisy_pair(258, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours_logits(model, x_t, x_0, 16)[..., :258],
                                   reference_dit_logits(state, x_t, x_0, 16, n_heads=2), atol=1e-5, rtol=0)
    results = bd.main(plans_args(str(tmp_path / "run"), init_from=folder))
    assert math.isfinite(results["final_train_loss"])
    ckpt = common.load_checkpoint(str(tmp_path / "run" / "latest"))
    assert ckpt["model_config"]["pos_encoding"] == "rope" and ckpt["model_config"]["head_bias"]


def test_published_bd3lm_refusals(tmp_path):
    folder = str(tmp_path / "timed")
    write_published_folder(folder, published_state(258), time_conditioning=True)
    with pytest.raises(common.ConfigError, match="time_conditioning"):
        model_lib.published_bd3lm(folder, 320, 257)
    folder = str(tmp_path / "other_vocab")
    write_published_folder(folder, published_state(67))
    with pytest.raises(common.ConfigError, match=r"\[MASK\] at 257"):
        model_lib.published_bd3lm(folder, 320, 257)


def test_unreachable_hub_is_a_one_line_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    proc = subprocess.run([sys.executable, "train_bd3lm.py", *plans_args(str(tmp_path / "run")),
                           "init_from=kuleshov-group/bd3lm-owt-block_size16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: init_from 'kuleshov-group/bd3lm-owt-block_size16'")


def test_published_block_size_must_match_and_the_dropout_is_carried(tmp_path, capsys):
    """A published BD3-LM is trained for one block size: another configured block size is refused in one line (the
    one-block pretraining checkpoint, block size = model_length, starts any block size, as the reference's
    recipe). The model takes the checkpoint's dropout unless dropout= is set."""
    state = published_state(258)
    folder = str(tmp_path / "bd3lm-owt-block_size16")
    write_published_folder(folder, state, dropout=0.25)
    with pytest.raises(common.ConfigError, match="trained with block size 16, but block_size=8 here"):
        model_lib.published_bd3lm(folder, 320, 257, block_size=8)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: bd.main(plans_args(str(tmp_path / "r8"), init_from=folder, block_size=8)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {folder} was trained with block size 16, but block_size=8 here: set block_size=16, or start from "
        "the block-size-8 checkpoint"]
    d = common.Dist(False, 0, 0, 1, "cpu")
    carried = bd.build_model(common.load_config(bd.Config, plans_args(str(tmp_path / "a"), init_from=folder)), 320, d,
                             mask_id=257)
    assert carried.config.dropout == 0.25
    assert [m.p for m in carried.modules() if isinstance(m, torch.nn.Dropout)][:1] == [0.25]
    chosen = bd.build_model(common.load_config(bd.Config, plans_args(str(tmp_path / "b"), init_from=folder,
                                                                     dropout=0.0)), 320, d, mask_id=257)
    assert chosen.config.dropout == 0.0
    unnamed = str(tmp_path / "no_dropout_key")
    write_published_folder(unnamed, state)
    assert model_lib.published_bd3lm(unnamed, 320, 257, block_size=16)[0]["dropout"] == model_lib.PUBLISHED_DROPOUT == 0.1
    pretrain = str(tmp_path / "bd3lm-owt-block_size128-pretrain")  # model_length 128: one block, any block size
    write_published_folder(pretrain, state, block_size=128)
    base, _, label = model_lib.published_bd3lm(pretrain, 320, 257, block_size=8)
    assert base["n_layer"] == 2 and "block size 128" in label

"""
The GPT-2 transformer shared by the training scripts, its KV cache for generation, and its conversions to
and from HuggingFace transformers.

Attention goes through one function, attention(), which picks the kernel:
  - plain causal: flash-attn when installed and the tensors are half precision on CUDA, else SDPA;
  - a dense boolean mask (True = may attend): SDPA with that mask (BD3-LM, sigma-GPT and the KV cache use it);
  - packed rows (doc_ids: a document id per position; attention is causal within each document): flash-attn's
    varlen kernel on CUDA when installed, else SDPA with the block-diagonal causal mask.
forward() takes explicit position ids, so packed documents restart their positions and left-padded prompts
count only their real tokens. Generation with a KVCache attends through SDPA with the cache's mask
(flash-attn's kvcache kernel would be the CUDA fast path there; not wired in yet).
"""
import inspect
import json
import os
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

import common

try:  # the CUDA fast path; imported only where it is installed
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build on a CPU machine
    flash_attn_func = flash_attn_varlen_func = None
try:  # FlexAttention: block-sparse masks (BD3-LM) on CUDA; a dense boolean mask through SDPA elsewhere
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except Exception:
    BlockMask = create_block_mask = flex_attention = None


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # sigma-GPT's double position encoding: the left half of each wpe row encodes a token's own position,
    # the right half the position of the token it predicts next (forward's target_position_ids)
    double_position: bool = False
    tie_embeddings: bool = True  # GPT-2 ties wte and lm_head; BD3-LM keeps them apart (its input has [MASK])
    exec_layers: int = 0  # hierarchical BD3-LM: the top exec_layers get a second copy for execution positions
    # positions: "learned" (GPT-2's wpe table, added to the input) or "rope" (rotary, applied to queries and keys in
    # every layer: the published BD3-LM DiT's; no wpe then)
    pos_encoding: str = "learned"
    rope_base: float = 10000.0
    head_bias: bool = False  # a bias on lm_head (the published BD3-LM DiT's output layer has one)


# the GPT-2 family and a few tiny sizes for tests and the CPU demo
MODEL_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    "mini": dict(n_layer=6, n_head=6, n_embd=192),
}


# HF GPT-2 stores these as Conv1D (in, out): transposed against nn.Linear's (out, in)
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def model_config(size, vocab_size, block_size, dropout=0.0, n_layer=None, n_head=None, n_embd=None):
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {', '.join(MODEL_SIZES)}")
    shape = dict(MODEL_SIZES[size])
    for k, v in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if v:
            shape[k] = v
    if shape["n_embd"] % shape["n_head"]:
        raise ValueError(f"n_embd {shape['n_embd']} is not divisible by n_head {shape['n_head']}")
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, dropout=dropout, **shape)


def use_flash(q):
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def packed_causal_mask(doc_ids):
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal within each document, nothing across documents."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def cu_seqlens(doc_ids):
    """flash-attn varlen's view of packed rows: the start offsets of the documents in the flattened (B*T)
    batch, closed by B*T, and the longest document. A document ends where its id changes or its row ends."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    cu = torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def rope_cos_sin(position_ids, head_dim, base, dtype=torch.float32):
    """Rotary tables for position_ids (T,) or (B, T): cos and sin of shape (B|1, T, 1, head_dim), each frequency
    repeated over the two halves of the head (the GPT-NeoX / DiT layout that rotate_half pairs with)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    if angles.dim() == 2:
        angles = angles[None]
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, hd): pairs (i, i + hd/2) turn by the angle of their frequency and the position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(q, k, v, attn_mask=None, doc_ids=None, dropout_p=0.0):
    """q (B, Tq, H, hd), k and v (B, Tk, H, hd) -> (B, Tq, H, hd).
    No attn_mask and no doc_ids: causal (Tq == Tk). attn_mask: bool (B|1, 1|H, Tq, Tk), True = may attend.
    doc_ids: (B, T) document id per position of packed rows; causal within a document, never across."""
    if attn_mask is not None and doc_ids is not None:
        raise ValueError("give attn_mask or doc_ids, not both")
    if BlockMask is not None and isinstance(attn_mask, BlockMask):  # CUDA: the compiled block-sparse kernel
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=attn_mask)
        return y.transpose(1, 2)
    if attn_mask is None and use_flash(q):
        if doc_ids is None and flash_attn_func is not None:
            return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        if doc_ids is not None and flash_attn_varlen_func is not None:
            B, T, H, hd = q.shape
            cu, longest = cu_seqlens(doc_ids)
            q, k, v = (t.reshape(B * T, H, hd) for t in (q, k, v))
            y = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout_p, causal=True)
            return y.view(B, T, H, hd)
    if doc_ids is not None:
        attn_mask = packed_causal_mask(doc_ids)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=attn_mask is None)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# BD3-LM (block diffusion): the model reads [x_t | x_0], the noised sequence and its clean copy, in one pass,
# both at positions 0..L-1. Every position belongs to a block (block_ids: (L,) non-decreasing; i // block_size
# for the flat model, restarting at segment boundaries for the hierarchical one). A noisy token sees its own
# noisy block and the clean copy of strictly earlier blocks; a clean token sees clean tokens of its own and
# earlier blocks.


def _block_diffusion_allowed(q, k, block_ids, L):
    """True where query position q may attend to key position k of the 2L input (both index tensors)."""
    q_clean, k_clean = q >= L, k >= L
    bq, bk = block_ids[q % L], block_ids[k % L]
    noisy_to_noisy = ~q_clean & ~k_clean & (bq == bk)  # block-diagonal within x_t
    noisy_to_clean = ~q_clean & k_clean & (bk < bq)  # x_t -> strictly earlier blocks of x_0
    clean_to_clean = q_clean & k_clean & (bk <= bq)  # block-causal within x_0
    return noisy_to_noisy | noisy_to_clean | clean_to_clean


def block_diffusion_mask(block_ids):
    """Dense (2L, 2L) boolean mask for SDPA, True = may attend."""
    L = block_ids.numel()
    idx = torch.arange(2 * L, device=block_ids.device)
    return _block_diffusion_allowed(idx[:, None], idx[None, :], block_ids, L)


def flex_block_diffusion_mask(block_ids):
    """The same mask as a FlexAttention BlockMask (CUDA only), which skips the all-False tiles."""
    L = block_ids.numel()
    return create_block_mask(lambda b, h, q, k: _block_diffusion_allowed(q, k, block_ids, L),
                             B=None, H=None, Q_LEN=2 * L, KV_LEN=2 * L, device=block_ids.device)


def exec_positions_of(segment_lens, exec_layers):
    """(L,) bool: the execution segment (the last), for a model with an execution module; else None."""
    if not exec_layers or len(segment_lens) < 3:
        return None
    return torch.arange(sum(segment_lens)) >= sum(segment_lens[:-1])


def make_block_ids(segment_lens, block_size):
    """(L,) block index of every position: blocks of block_size that restart at each segment boundary
    (the last block of a segment may be shorter)."""
    ids, next_id = [], 0
    for n in segment_lens:
        n_blocks = -(-n // block_size)
        ids += [next_id + i // block_size for i in range(n)]
        next_id += n_blocks
    return torch.tensor(ids, dtype=torch.long)



class KVCache:
    """Keys and values of every layer for a batch of rows being generated, preallocated to max_len slots.
    All rows write at one slot position (prompts are left-padded to one length); `valid` marks the slots that
    hold real tokens, so padding is never attended to. GPT.forward(..., kv_cache=cache) fills it: a prompt
    (prefill) and then one or more tokens at a time. Layout (n_layer, B, max_len, H, hd), as flash-attn's."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None  # allocated at the first write, in the dtype of the keys
        self.valid = None       # (B, max_len) bool
        self.pos = 0            # slots filled so far

    def open(self, padding_mask):
        """Mark the slots of T new tokens (padding_mask (B, T), True = real token) and return their attention
        mask (B, 1, T, pos + T): causal over the real tokens. A padding slot also sees itself, so that no row of
        the mask is empty (SDPA would give NaN, and a NaN value poisons even masked-out products)."""
        B, T = padding_mask.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        if self.valid is None:
            self.valid = torch.zeros(B, self.max_len, dtype=torch.bool, device=padding_mask.device)
        self.valid[:, self.pos:self.pos + T] = padding_mask
        query = torch.arange(self.pos, self.pos + T, device=padding_mask.device)[:, None]
        key = torch.arange(self.pos + T, device=padding_mask.device)[None, :]
        return ((self.valid[:, None, :self.pos + T] & (key <= query)) | (key == query))[:, None]

    def update(self, layer, k, v):
        """Store a layer's keys and values of the new tokens (B, T, H, hd); return all of them so far."""
        if self.k is None:
            shape = (self.n_layer, k.size(0), self.max_len, k.size(2), k.size(3))
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        T = k.size(1)
        self.k[layer, :, self.pos:self.pos + T] = k
        self.v[layer, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :self.pos + T], self.v[layer, :, :self.pos + T]

    def advance(self, T):
        self.pos += T

    def keep(self, rows):
        """Keep these batch rows (a LongTensor of indices, in the new order). Repeating an index copies a row:
        one prompt's prefill becomes the shared prefix of several samples."""
        self.k, self.v, self.valid = self.k[:, rows], self.v[:, rows], self.valid[rows]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer_idx = layer_idx  # its slot in a KVCache

    def forward(self, x, attn_mask=None, doc_ids=None, kv_cache=None, rope=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        if rope is not None:  # rotary positions: keys enter the cache already rotated
            q, k = apply_rope(q, *rope).to(v.dtype), apply_rope(k, *rope).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        # attention() looks at q's dtype, not x's: under autocast the LayerNorm output x is fp32 while the
        # c_attn projections come out in bf16
        y = attention(q, k, v, attn_mask, doc_ids, self.dropout if self.training else 0.0)
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, doc_ids=None, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), attn_mask, doc_ids, kv_cache, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.double_position and config.n_embd % 2:
            raise ValueError(f"double_position splits the position code in halves: n_embd {config.n_embd} must be even")
        if config.pos_encoding not in ("learned", "rope"):
            raise ValueError(f"pos_encoding must be 'learned' or 'rope', got {config.pos_encoding!r}")
        if config.pos_encoding == "rope" and (config.double_position or (config.n_embd // config.n_head) % 2):
            raise ValueError("pos_encoding 'rope' needs an even head size and no double_position")
        self.config = config
        learned = config.pos_encoding == "learned"  # rotary positions have no table
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.exec_layers:  # KV-cache slots after the shared ones
            self.transformer["h_exec"] = nn.ModuleList([Block(config, config.n_layer + i)
                                                        for i in range(config.exec_layers)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "SCALE_INIT", False):  # residual projections: keep the stream's variance flat
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameters, each counted once (tied wte/lm_head are one); non_embedding leaves out the vocabulary
        matrices (wte, and lm_head when untied) and the position table: the count scaling laws use."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, idx, targets=None, position_ids=None, attn_mask=None, doc_ids=None, kv_cache=None,
                padding_mask=None, loss_reduction="mean", ignore_index=-100, target_position_ids=None,
                logits_len=None, exec_positions=None):
        """idx (B, T) -> logits (B, T, V) and the cross-entropy against targets (or None): 'mean' over the
        targets that are not ignore_index, or their 'sum' (callers count tokens as (targets != -100).sum(), so
        gradient accumulation and packed rows normalise over the right tokens).
        position_ids (B, T) or (T,) default to 0..T-1 (after the cached tokens with a kv_cache). Attention is
        causal unless given attn_mask (bool (B|1, 1|H, T, T), True = may attend) or doc_ids (packed rows, see
        attention()). With kv_cache the tokens are appended to the cache and attend to it; padding_mask (B, T),
        True = real token, marks left padding (default: all real). With config.double_position,
        target_position_ids (the position each token predicts; default position_ids + 1) feed the second half
        of the position code. logits_len runs the head on the first logits_len positions only (BD3-LM scores
        the noisy half of its [x_t | x_0] input). exec_positions (B|1, T) bool sends those positions through the
        execution copy of the top layers (config.exec_layers)."""
        B, T = idx.size()
        if T > self.config.block_size and position_ids is None:  # BD3-LM's two copies share their positions
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if kv_cache is not None:
            if attn_mask is not None or doc_ids is not None:
                raise ValueError("a kv_cache makes its own mask: give padding_mask, not attn_mask or doc_ids")
            if padding_mask is None:
                padding_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            attn_mask = kv_cache.open(padding_mask)
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device) + (kv_cache.pos if kv_cache is not None else 0)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = rope_cos_sin(position_ids, self.config.n_embd // self.config.n_head, self.config.rope_base)
        else:
            x = x + self.position_code(position_ids, target_position_ids)
        x = self.transformer.drop(x)
        first_exec = self.config.n_layer - self.config.exec_layers
        for i, block in enumerate(self.transformer.h):
            if i >= first_exec and exec_positions is not None:  # each position's output from its own module
                exec_out = self.transformer.h_exec[i - first_exec](x, attn_mask, doc_ids, kv_cache, rope)
                x = torch.where(exec_positions[..., None], exec_out, block(x, attn_mask, doc_ids, kv_cache, rope))
            else:
                x = block(x, attn_mask, doc_ids, kv_cache, rope)
        if kv_cache is not None:
            kv_cache.advance(T)
        if logits_len is not None:
            x = x[:, :logits_len]
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index, reduction=loss_reduction)
        return logits, loss

    def position_code(self, position_ids, target_position_ids=None):
        """wpe at the token's position; under double_position, the row's left half at the token's own
        position concatenated with the right half at the position it predicts (sigma-GPT, arXiv 2404.09562)."""
        wpe = self.transformer.wpe
        if not self.config.double_position:
            return wpe(position_ids)
        if target_position_ids is None:
            target_position_ids = position_ids + 1  # left to right; the last row's target may run off the table
            target_position_ids = target_position_ids.clamp(max=self.config.block_size - 1)
        half = self.config.n_embd // 2
        return torch.cat([wpe.weight[position_ids, :half], wpe.weight[target_position_ids, half:]], dim=-1)

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with decay on 2D weights only (matmuls, embeddings); fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T):
        """Training FLOPs per token: 6N for the matmuls, N counting lm_head but neither embedding table (a
        lookup), plus 12*L*T*d for attention (PaLM appendix B)."""
        c = self.config
        return 6 * (self.num_params() + self.lm_head.weight.numel()) + 12 * c.n_layer * T * c.n_embd

    def load_hf_state_dict(self, sd_hf):
        sd = self.state_dict()
        keys = [k for k in sd_hf if not k.endswith((".attn.masked_bias", ".attn.bias"))]
        missing = set(sd) - set(keys)
        if missing:
            raise ValueError(f"HF state dict lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(HF_CONV1D) else sd_hf[k]
                if w.shape != sd[k].shape:
                    raise ValueError(f"shape mismatch for {k}: HF {tuple(w.shape)} vs model {tuple(sd[k].shape)}")
                sd[k].copy_(w)

    def hf_state_dict(self, vocab_size=None):
        """The weights in HF GPT2LMHeadModel's layout; vocab_size cuts the padded embedding rows."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            if k.endswith(HF_CONV1D):
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight") and vocab_size is not None:
                v = v[:vocab_size]
            out[k] = v.contiguous()
        return out


def double_position_table(wpe):
    """A plain GPT's (block_size, n_embd) position table -> the sigma-GPT table, by the rule: the left half
    (own position) is copied row for row; the right half (next position) is shifted down one row, row q
    holding row q-1's right half (row 0 keeps its own). In left-to-right order (next = own + 1) every token
    then gets exactly the plain model's position vector, so the converted model starts as the AR model."""
    half = wpe.shape[1] // 2
    out = wpe.clone()
    out[1:, half:] = wpe[:-1, half:]
    return out


def build_model(model_config_dict):
    return GPT(GPTConfig(**model_config_dict))


def model_config_dict(config):
    return asdict(config)


# -----------------------------------------------------------------------------
# native checkpoint <-> HuggingFace GPT2LMHeadModel (no custom code: GPT-2's own architecture)

def from_checkpoint(path, tokenizer_file=None):
    """(GPT in eval mode, common.Tokenizer, checkpoint dict) from a checkpoint path / run folder / RUN/latest."""
    ckpt = common.load_checkpoint(path, expected_kind="gpt")
    gpt = build_model(ckpt["model_config"])
    try:
        gpt.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing, unexpected or differently shaped tensors
        raise ValueError(f"{ckpt['path']}: its model_config does not match its weights: "
                         f"{' '.join(str(e).split())[:300]}") from e
    gpt.eval()
    tok = common.Tokenizer.from_spec(ckpt["tokenizer"], tokenizer_file or run_tokenizer_file(ckpt))
    return gpt, tok, ckpt


def run_tokenizer_file(ckpt):
    """The ranks file the run was trained with, if its config names one that exists here."""
    path = (ckpt.get("config") or {}).get("tokenizer_file")
    return path if path and os.path.isfile(path) else None


def hf_config(cfg, tok):
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=tok.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu_new",  # = nn.GELU(approximate="tanh")
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id, tie_word_embeddings=True)


def generation_config(tok):
    from transformers import GenerationConfig
    return GenerationConfig(bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)


def to_hf(gpt, tok):
    """An in-memory GPT2LMHeadModel (fp32, eval mode) with gpt's weights; the padded vocabulary rows are cut."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(hf_config(gpt.config, tok))
    sd = gpt.hf_state_dict(vocab_size=tok.vocab_size)
    for k, v in hf.state_dict().items():  # models trained with bias=False: HF GPT-2 always has biases, zeros are the same
        if k not in sd and k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
    hf.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    hf.generation_config = generation_config(tok)
    return hf.eval()


def from_hf(hf_model_or_name):
    """A GPT with the weights of an HF GPT-2 model: a GPT2LMHeadModel, a hub id (gpt2, distilgpt2) or a folder."""
    hf = hf_model_or_name
    if isinstance(hf, str):
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(hf)
    hc = hf.config
    config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                       n_head=hc.n_head, n_embd=hc.n_embd, dropout=0.0, bias=True)
    gpt = GPT(config)
    gpt.load_hf_state_dict(hf.state_dict())
    return gpt


# -----------------------------------------------------------------------------
# the published BD3-LM checkpoints (kuleshov-group/bd3lm-owt-block_size4/8/16 on the HF hub) as our GPT.
# Their network is a DiT: token embedding without a position table, rotary positions on queries and keys, per
# layer a LayerNorm (weight, no bias) followed by adaLN's shift and scale, fused qkv without bias, an output
# projection and an MLP whose results are multiplied by adaLN's gates, and a final layer with its own adaLN and
# a biased linear head. adaLN reads c = silu(sigma_map(sigma)); BD3-LM has no time conditioning, so sigma is 0
# and c, hence every shift/scale/gate, is a constant vector. It folds exactly into our layers:
#   LayerNorm(x) * w * (1 + scale) + shift  ->  LayerNorm weight w * (1 + scale), bias shift
#   gate * (W y + b)                         ->  W' = gate[:, None] * W, b' = gate * b
# Rotary positions are model.py's pos_encoding="rope" (the same rotate-half layout), the head bias head_bias.


def is_published_bd3lm(name):
    """An HF folder (config.json beside safetensors/bin weights; a run folder has config.json beside ckpt_*.pt),
    or an owner/name hub id that is no local path."""
    if os.path.isdir(name):
        files = os.listdir(name)
        return "config.json" in files and any(f.endswith(".safetensors") or f == "pytorch_model.bin" for f in files)
    return not os.path.exists(name) and name.count("/") == 1 and not name.endswith((".pt", "/latest")) \
        and not name.startswith((".", "/"))


def read_published_bd3lm(name):
    """(state dict, config dict) of a published BD3-LM: a local folder, or the hub (downloaded once, cached)."""
    folder = name
    if not os.path.isdir(name):
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.bin"])
        except Exception as e:  # offline, no such repository, no permission
            reason = " ".join(str(e).split())[:160]
            raise common.ConfigError(f"init_from '{name}' is no local checkpoint or folder and the HF hub could "
                                     f"not provide it ({type(e).__name__}: {reason})") from e
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    state = {}
    if files:
        from safetensors.torch import load_file
        for n in files:
            state.update(load_file(os.path.join(folder, n)))
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        state = read_weights_bin(os.path.join(folder, "pytorch_model.bin"))
    else:
        raise common.ConfigError(f"{name}: no *.safetensors or pytorch_model.bin beside its config.json")
    return state, config


def read_weights_bin(path):
    """A pytorch_model.bin: a pickle, so only tensors may come out of it (weights_only); a file that would build
    other objects, or run code, is refused with what it asked for."""
    import pickle
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        raise ValueError(f"{path} holds objects other than tensors; refusing to load it (a .bin file is a pickle "
                         f"and could run code){': ' + blocked[0] if blocked else ''}") from e
    except Exception as e:  # truncated, not a torch file
        raise ValueError(f"could not read {path}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (names -> tensors)")
    return state


PUBLISHED_DROPOUT = 0.1  # BD3LMConfig's default, for a config.json that does not name its dropout


def published_bd3lm(name, vocab_size, mask_id, block_size=None):
    """(model config dict, state dict in our names, label) for a published BD3-LM, with the checks that the
    mapping is exact: no time conditioning, and its vocabulary = our tokenizer's ids then [MASK]; and that it was
    trained with the configured block size (the one-block pretraining checkpoint, block size = model_length,
    starts any block size, as in the reference's recipe). The config carries its dropout."""
    state, config = read_published_bd3lm(name)
    trained = config.get("block_size")
    one_block = trained is not None and trained == config.get("model_length")
    if block_size is not None and trained is not None and trained != block_size and not one_block:
        raise common.ConfigError(f"{name} was trained with block size {trained}, but block_size={block_size} here: "
                                 f"set block_size={trained}, or start from the block-size-{block_size} checkpoint")
    if config.get("time_conditioning", False):
        raise common.ConfigError(f"{name} conditions on the noise level (time_conditioning); our GPT has no "
                                 "timestep input, so its adaLN cannot be folded into constant weights")
    n_dit_vocab = state[dit_key(state, "vocab_embed.embedding")].shape[0]
    if mask_id is not None and n_dit_vocab != mask_id + 1:
        raise common.ConfigError(f"{name} has {n_dit_vocab} token ids ([MASK] = {n_dit_vocab - 1}); the tokenizer "
                                 f"here puts [MASK] at {mask_id} (the published models use the gpt2 tokenizer)")
    gpt_config, mapped = dit_to_gpt(state, config["n_heads"], config.get("model_length", 1024), vocab_size)
    gpt_config.dropout = float(config.get("dropout", PUBLISHED_DROPOUT))
    return asdict(gpt_config), mapped, f"{name} (published BD3-LM, block size {trained})"


def dit_key(state, name):
    """The stored key of a DiT weight: HF files prefix the backbone's names with 'backbone.'."""
    for key in (f"backbone.{name}", name):
        if key in state:
            return key
    raise common.ConfigError(f"the BD3-LM state dict lacks '{name}' (nor 'backbone.{name}')")


@torch.no_grad()
def dit_to_gpt(state, n_head, model_length, vocab_size=None):
    """The DiT's weights as a GPTConfig (pos_encoding='rope', head_bias) and a state dict in our names; the
    vocabulary padded to vocab_size with zero rows ([MASK] and padding are never predicted: SUBS)."""
    w = {k: v.float() for k, v in state.items()}
    get = lambda name: w[dit_key(w, name)]  # noqa: E731
    embedding = get("vocab_embed.embedding")
    n_vocab, n_embd = embedding.shape
    n_layer = len({k.split("blocks.")[1].split(".")[0] for k in w if "blocks." in k})
    vocab_size = vocab_size or common.padded_vocab_size(n_vocab)
    adaln = any("adaLN_modulation" in k for k in w)
    if adaln:  # the conditioning vector at sigma = 0: the sinusoidal embedding of 0 is [cos 0 ..., sin 0 ...]
        freq_dim = get("sigma_map.mlp.0.weight").shape[1]
        t_freq = torch.cat([torch.ones(freq_dim // 2), torch.zeros(freq_dim - freq_dim // 2)])
        hidden = F.silu(get("sigma_map.mlp.0.weight") @ t_freq + get("sigma_map.mlp.0.bias"))
        c = F.silu(get("sigma_map.mlp.2.weight") @ hidden + get("sigma_map.mlp.2.bias"))

    def modulation(prefix, n):
        if not adaln:  # plain LayerNorms: shift 0, scale 0, gate 1
            return ([torch.zeros(n_embd), torch.zeros(n_embd), torch.ones(n_embd)] * 2)[:n]
        return list((get(f"{prefix}.adaLN_modulation.weight") @ c + get(f"{prefix}.adaLN_modulation.bias")).chunk(n))

    out = {}
    padded = torch.zeros(vocab_size, n_embd)
    padded[:n_vocab] = embedding
    out["transformer.wte.weight"] = padded
    for i in range(n_layer):
        b, o = f"blocks.{i}", f"transformer.h.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(b, 6)
        out[f"{o}.ln_1.weight"] = get(f"{b}.norm1.weight") * (1 + scale_msa)
        out[f"{o}.ln_1.bias"] = shift_msa
        out[f"{o}.attn.c_attn.weight"] = get(f"{b}.attn_qkv.weight")
        out[f"{o}.attn.c_attn.bias"] = torch.zeros(3 * n_embd)
        out[f"{o}.attn.c_proj.weight"] = gate_msa[:, None] * get(f"{b}.attn_out.weight")
        out[f"{o}.attn.c_proj.bias"] = torch.zeros(n_embd)
        out[f"{o}.ln_2.weight"] = get(f"{b}.norm2.weight") * (1 + scale_mlp)
        out[f"{o}.ln_2.bias"] = shift_mlp
        out[f"{o}.mlp.c_fc.weight"] = get(f"{b}.mlp.0.weight")
        out[f"{o}.mlp.c_fc.bias"] = get(f"{b}.mlp.0.bias")
        out[f"{o}.mlp.c_proj.weight"] = gate_mlp[:, None] * get(f"{b}.mlp.2.weight")
        out[f"{o}.mlp.c_proj.bias"] = gate_mlp * get(f"{b}.mlp.2.bias")
    shift, scale = modulation("output_layer", 2)
    out["transformer.ln_f.weight"] = get("output_layer.norm_final.weight") * (1 + scale)
    out["transformer.ln_f.bias"] = shift
    head, head_bias = torch.zeros(vocab_size, n_embd), torch.zeros(vocab_size)
    head[:n_vocab], head_bias[:n_vocab] = get("output_layer.linear.weight"), get("output_layer.linear.bias")
    out["lm_head.weight"], out["lm_head.bias"] = head, head_bias
    config = GPTConfig(block_size=model_length, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, bias=True, tie_embeddings=False, pos_encoding="rope", head_bias=True)
    return config, out



def save_hf_folder(gpt, tok, folder, info):
    """Write gpt as an HF folder: config, safetensors weights, fast tokenizer, generation config, and `info`
    as export_info.json. (export_hf.py adds the verification; sft.py and grpo.py write their results with it.)"""
    hf = to_hf(gpt, tok)
    hf.save_pretrained(folder, safe_serialization=True)
    common.hf_tokenizer(tok, gpt.config.block_size).save_pretrained(folder)
    # name the generic fast-tokenizer class, which every transformers version (4.x and 5.x) resolves
    tc_path = os.path.join(folder, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    common.atomic_write_json(tc_path, tc)
    common.atomic_write_json(os.path.join(folder, "export_info.json"), info)
    # transformers writes the weights with mode 0600 (a temporary file renamed); give them the mode the umask
    # gave the other files, so that group members can read a shared export
    mode = os.stat(os.path.join(folder, "config.json")).st_mode & 0o777
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(folder, name), mode)

"""
The GPT-2 transformer shared by the training scripts. Attention runs through flash-attn when it is
installed and the tensors are on CUDA in half precision, else through PyTorch's
scaled_dot_product_attention. forward() takes explicit position ids and an explicit attention mask
so that the diffusion and any-order models can reuse the same blocks.
"""
import inspect
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

try:  # the CUDA fast path; imported only where it is installed
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a broken CUDA build on a CPU machine
    flash_attn_func = None
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
    tie_embeddings: bool = True  # GPT-2 ties wte and lm_head; BD3-LM keeps them apart (its input has [MASK])


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


# -----------------------------------------------------------------------------
# BD3-LM (block diffusion): the model reads [x_t | x_0], the noised sequence and its clean copy, in one pass.
# Every position belongs to a block (block_ids: (L,) non-decreasing; i // block_size for the flat model,
# restarting at segment boundaries for the hierarchical one). A noisy token sees its own noisy block and
# the clean copy of strictly earlier blocks; a clean token sees clean tokens of its own and earlier blocks.


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hd = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hd) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if kv_cache is not None:  # keys/values of earlier positions, (B, T_past + T, H, hd); attn_mask covers them
            k, v = kv_cache.update(layer, k, v)
        if BlockMask is not None and isinstance(attn_mask, BlockMask):  # CUDA: compiled block-sparse kernel
            y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=attn_mask)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        # q, not x: under autocast the LayerNorm output x is fp32 while the c_attn projections come out in bf16
        if attn_mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q, k, v, dropout_p=p, causal=True)  # (B, T, H, hd)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
            y = y.transpose(1, 2)
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
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, position_ids=None, attn_mask=None, ignore_index=-100,
                kv_cache=None, logits_len=None):
        """idx (B, T) -> logits (B, T, V) and the mean cross-entropy against targets (or None).
        position_ids (B, T) or (T,) default to 0..T-1; attn_mask is a bool (B|1, 1|H, T, T) mask where True
        means 'may attend' (or a FlexAttention BlockMask); without one, attention is causal.
        kv_cache (an object with update(layer, k, v) -> (k, v)) prepends cached keys/values; the mask then
        spans (T, T_past + T). logits_len computes the head on the first logits_len positions only (BD3-LM
        scores the noisy half of its [x_t | x_0] input)."""
        B, T = idx.size()
        if position_ids is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            position_ids = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, layer)
        if logits_len is not None:
            x = x[:, :logits_len]
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss

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
        """Training FLOPs per token: 6N for the matmuls plus 12*L*T*d for attention (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * T * c.n_embd

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load HF GPT-2 weights (hub id such as gpt2/distilgpt2, or a local folder) into this model."""
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        hc = hf.config
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, dropout=0.0, bias=True)
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict())
        return model

    def load_hf_state_dict(self, sd_hf):
        # HF GPT-2 stores these as Conv1D (in, out): transpose them into nn.Linear's (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = self.state_dict()
        keys = [k for k in sd_hf if not k.endswith((".attn.masked_bias", ".attn.bias"))]
        missing = set(sd) - set(keys)
        if missing:
            raise ValueError(f"HF state dict lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                if w.shape != sd[k].shape:
                    raise ValueError(f"shape mismatch for {k}: HF {tuple(w.shape)} vs model {tuple(sd[k].shape)}")
                sd[k].copy_(w)

    def hf_state_dict(self, vocab_size=None):
        """The weights in HF GPT2LMHeadModel's layout; vocab_size cuts the padded embedding rows."""
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            if k.endswith(transposed):
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight") and vocab_size is not None:
                v = v[:vocab_size]
            out[k] = v.contiguous()
        return out


def build_model(model_config_dict):
    return GPT(GPTConfig(**model_config_dict))


def model_config_dict(config):
    return asdict(config)

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hd = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hd) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
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

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.double_position and config.n_embd % 2:
            raise ValueError(f"double_position splits the position code in halves: n_embd {config.n_embd} must be even")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
                target_position_ids=None):
        """idx (B, T) -> logits (B, T, V) and the mean cross-entropy against targets (or None).
        position_ids (B, T) or (T,) default to 0..T-1; attn_mask is a bool (B|1, 1|H, T, T) mask where True
        means 'may attend'; without one, attention is causal. With config.double_position, target_position_ids
        (the position each token predicts; default position_ids + 1) feed the second half of the position code."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.position_code(position_ids, target_position_ids))
        for block in self.transformer.h:
            x = block(x, attn_mask)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
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

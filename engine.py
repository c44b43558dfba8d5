"""
Generation for every model the repository makes or loads, behind one interface: a native checkpoint (file,
run folder, RUN/latest) runs as model.GPT with its own KV cache (no conversion), a folder written by
export_hf.py / sft.py or any HF causal LM runs with transformers' cache.

    lm = load_model("out/run/latest", tokenizer_file, device="cpu", dtype=torch.float32)
    engine = Engine(lm, batch_size=64)
    outs = engine.generate([lm.tok.encode_prompt("Q: 7*8?\nA:")], max_new_tokens=32, temperature=1.0,
                           top_p=0.95, stop=["\n\n"], num_samples=8, seed=0, logprobs=True)
    outs[0][3].ids, outs[0][3].logprobs, outs[0][3].finish_reason, outs[0][3].text   # prompt 0, sample 3

Engine.generate batches prompts with left padding (positions count real tokens only, as without padding),
prefills each prompt once and samples num_samples continuations from that shared prefix (the KV cache rows
are copied after the prefill: what GRPO's groups need), drops finished rows from the batch, and ends a row on
an EOS id ('eos'), a stop string ('stop') or max_new_tokens ('length'). Greedy is temperature=0.

Log-probs (logprobs=True): for each sampled token, log_softmax of the model's raw logits at temperature 1, in
fp32, before temperature, top-k and top-p reshape the distribution that was sampled from, and over the model's
whole output (for a native model its padded vocabulary too, exactly what its training forward pass computes).
That is the policy's log-probability GRPO needs for its ratio. Sampling itself never picks an id beyond the
tokenizer's vocabulary.

VLLMEngine gives the same interface through vLLM on CUDA (imported only there), with load_weights() to push
new policy weights into a running engine (GRPO).
"""
import dataclasses
import functools
import inspect
import json
import os
from typing import List, Optional

import torch

import common
import model as model_lib
from tasks.base import cut_at_stop


# -----------------------------------------------------------------------------
# models and tokenizers: one loader and one tokenizer interface for every stage (sft, grpo, eval, gen_plans)


class NativeTokenizer:
    """common.Tokenizer behind the interface every stage uses (ids exactly as in pretraining).

    eos_id is the id a trained reply ends with; eos_ids the ids that end a generation (here the same one).
    Prompts are encoded as pretraining encoded text (a product becomes a multiplication token when the tokenizer
    has them); an SFT reply only with inject_mul_tokens, else by the same tokenizer without them (every other id
    is identical)."""
    chat_template = None

    def __init__(self, tok, inject_mul_tokens=False, tokenizer_file=None):
        self.tok = tok
        self.eos_id = self.pad_id = tok.eot_id
        self.eos_ids = {tok.eot_id}
        self.vocab_size = tok.vocab_size
        self.has_mul_tokens = bool(tok.mul_ids)
        self.inject_mul_tokens, self.tokenizer_file = inject_mul_tokens, tokenizer_file
        self._plain = None

    def encode(self, text, first=False):
        return self.tok.encode(text)

    def encode_prompt(self, text):
        return self.encode(text, first=True)

    def encode_reply(self, text):
        if self.inject_mul_tokens or not self.tok.mul_range:
            return self.tok.encode(text)
        if self._plain is None:  # built on first use: eval never needs it
            self._plain = common.Tokenizer(self.tok.kind, self.tok.extra_tokens, None, self.tokenizer_file)
        return self._plain.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


class HFTokenizer:
    """An HF tokenizer. eos_id is the tokenizer's EOS (what SFT appends to a reply, and what sft.py writes into
    the saved generation config); eos_ids adds the generation config's (chat models end a turn on e.g.
    <|im_end|> or <|eot_id|>), so generation stops where the model's authors say it does. The first piece of a
    sequence (encode(first=True), encode_prompt) gets the BOS the model wants; continuations get none."""

    def __init__(self, tok, generation_config=None):
        self.tok = tok
        self.chat_template = getattr(tok, "chat_template", None)
        self.eos_id = tok.eos_token_id
        eos = set() if self.eos_id is None else {self.eos_id}
        extra = getattr(generation_config, "eos_token_id", None)
        eos.update([extra] if isinstance(extra, int) else extra or [])
        self.eos_ids = eos
        fallback = self.eos_id if self.eos_id is not None else min(eos) if eos else 0
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else fallback
        self.vocab_size = len(tok)
        self.has_mul_tokens = "2*3=6" in tok.get_vocab()

    def encode(self, text, first=False):
        return self.tok(text, add_special_tokens=first, verbose=False)["input_ids"]

    def encode_prompt(self, text):
        return self.encode(text, first=True)

    def encode_reply(self, text):
        return self.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module       # model.GPT (native), a transformers causal LM (hf) or encoder-decoder (seq2seq)
    tok: object                  # NativeTokenizer | HFTokenizer
    name: str                    # what the user passed
    kind: str                    # native | hf | seq2seq
    max_positions: Optional[int]
    info: dict                   # where it came from: checkpoint path, step, val_loss (or the HF folder / hub id)
    hf_dir: Optional[str] = None  # a folder vLLM can load (None for native)
    native_checkpoint: Optional[str] = None
    attn: str = "sdpa"           # the attention kernel an HF model runs (native: model.attention dispatches)
    lora_targets: Optional[List[str]] = None  # the modules given LoRA adapters (train=True, lora=...)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def logits(self, idx):
        """(B, T) ids -> (B, T, V) logits; a native model's are cut to the tokenizer's vocabulary (the padded
        rows are dropped, as in its HF export)."""
        if self.kind == "native":
            return self.model(idx)[0][..., :self.tok.vocab_size]
        return self.model(input_ids=idx).logits


def is_native(path):
    if os.path.isfile(path):
        return path.endswith(".pt")
    if os.path.basename(path) == "latest":
        return True
    return os.path.isdir(path) and bool(common.list_checkpoints(path))


def check_model_path(name):
    """A model= that is a path must exist: else transformers reads it as a hub repo id and says so confusingly."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"model={name}: no such checkpoint, run folder or HF folder")


def exported_spec(name):
    """The native tokenizer spec of a folder written by export_hf.py / sft.py from a native model, else None."""
    path = os.path.join(name, "export_info.json")
    if os.path.isdir(name) and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("tokenizer")
    return None


def model_kind(name, trust_remote_code=False, exported_as_native=False):
    """'native' | 'hf' (a causal LM) | 'seq2seq' (an encoder-decoder), read from the HF config before any weight
    is loaded. exported_as_native: a folder exported from a native model counts as native (training continues
    on model.GPT with the run's own tokenizer; evaluation reads it as the HF model it is, which vLLM can load).
    Encoder-only models (BERT, RoBERTa, ...) are refused: every stage here generates text."""
    if is_native(name) or (exported_as_native and exported_spec(name)):
        return "native"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no such folder or hub id (or offline), or a config transformers can't read
        raise common.ConfigError(f"cannot read the model config of {name}: {str(e).splitlines()[0][:300]}") from e
    if config.is_encoder_decoder:
        return "seq2seq"
    archs = config.architectures or []
    # BERT-like types also have a CausalLM class in transformers, but only a checkpoint saved as a decoder is one
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False))
    if causal or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "hf"
    raise common.ConfigError(f"{name} is an encoder-only model ({config.model_type}: {', '.join(archs) or 'no head'})"
                             f": it has no generation head, and this repository trains and scores replies as "
                             f"generated text. Use a causal LM or an encoder-decoder (T5, BART)")


def resolve_attn(attn_implementation, device_type):
    """The attention kernel to ask an HF model for: flash-attn 2 when installed on CUDA, else SDPA; eager on MPS
    (SDPA gives NaN there on some models)."""
    if attn_implementation != "auto":
        return attn_implementation
    if device_type == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "eager" if device_type == "mps" else "sdpa"


def from_pretrained(auto_model, name, **kwargs):
    """auto_model.from_pretrained, with one-line errors: a weights file (pytorch_model.bin) that would build
    objects other than tensors, which torch.load(weights_only=True) refuses, and a name nothing loads under."""
    import pickle
    import re
    try:
        return auto_model.from_pretrained(name, **kwargs)
    except pickle.UnpicklingError as e:
        why = re.search(r"WeightsUnpickler error: (.+?)(?= Check the documentation|$)", " ".join(str(e).split()))
        raise common.ConfigError(f"model={name}: its weights file holds objects other than tensors, numbers, "
                                 f"strings and lists; refusing to load it (a weights file is a pickle and could "
                                 f"run code){': ' + why.group(1) if why else ''}. Use a safetensors copy") from None
    except OSError as e:  # transformers' words for "no such hub repo" and "not a model folder"
        raise FileNotFoundError(f"model={name} is not a checkpoint, run folder or HF folder here, and no HF model "
                                f"loads under that name: {str(e).splitlines()[0]}") from e


def load_native(name, tokenizer_file, inject_mul_tokens):
    """A checkpoint / run folder / RUN/latest, or a folder exported from one, as model.GPT + NativeTokenizer."""
    if is_native(name):
        gpt, tok, ckpt = model_lib.from_checkpoint(name, tokenizer_file or None)
        info = {"checkpoint": ckpt["path"], "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
                "tokenizer": tok.spec}
        tokenizer_file = tokenizer_file or model_lib.run_tokenizer_file(ckpt)
    else:  # an exported folder: the same GPT-2 weights, with the run's own tokenizer
        gpt = model_lib.from_hf(name)
        tok = common.Tokenizer.from_spec(exported_spec(name), tokenizer_file or None)
        info, ckpt = {"hf_folder": name, "tokenizer": tok.spec}, {}
    if tok.vocab_size > gpt.config.vocab_size:
        raise common.ConfigError(f"{name}: tokenizer has {tok.vocab_size} ids, the model only "
                                 f"{gpt.config.vocab_size} rows")
    return LoadedModel(gpt, NativeTokenizer(tok, inject_mul_tokens, tokenizer_file), name, "native",
                       gpt.config.block_size, info, native_checkpoint=ckpt.get("path"))


def load_hf(name, kind, dtype, device, attn_implementation, quantize, trust_remote_code):
    """An HF folder or hub id: AutoModelForCausalLM (or Seq2SeqLM) + its tokenizer. quantize='4bit'|'8bit' loads
    the weights through bitsandbytes onto `device` (CUDA); an attention kernel the architecture lacks falls back
    to eager with a warning."""
    import sys
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    auto_model = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantize:
        from transformers import BitsAndBytesConfig
        kwargs = {**kwargs, "dtype": torch.bfloat16, "device_map": {"": device},
                  "quantization_config": BitsAndBytesConfig(
                      load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit",
                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf = from_pretrained(auto_model, name, **kwargs)
    except (ValueError, ImportError) as e:  # this architecture has no such kernel: fall back to eager
        if kwargs.get("attn_implementation", "eager") == "eager" or isinstance(e, common.ConfigError):
            raise
        print(f"warning: attn_implementation={attn_implementation} unavailable for {name} "
              f"({str(e).splitlines()[0][:120]}); using eager", file=sys.stderr)
        hf = from_pretrained(auto_model, name, **{**kwargs, "attn_implementation": "eager"})
    if not quantize:
        hf.to(device)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    c = hf.config
    max_pos = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
    info = {"hf_model": name}
    if os.path.isfile(os.path.join(name, "export_info.json")):
        with open(os.path.join(name, "export_info.json")) as f:
            e = json.load(f)
        info = {"checkpoint": e.get("source_checkpoint"), "step": e.get("step"), "val_loss": e.get("val_loss")}
    return LoadedModel(hf, HFTokenizer(tok, hf.generation_config), name, kind, max_pos, info, hf_dir=name,
                       attn=c._attn_implementation)


def load_model(name, tokenizer_file="", device="cpu", dtype=torch.float32, train=False, lora=None,
               attn_implementation=None, quantize="", trust_remote_code=False, inject_mul_tokens=False,
               gradient_checkpointing=False):
    """Any model this repository makes or reads: a native checkpoint / run folder / RUN/latest, an HF folder or
    an HF hub id, on `device` in `dtype`, in eval mode; with train=True in train mode, ready for an optimizer:
    - a folder exported from a native model loads as model.GPT with the run's tokenizer (so training keeps its
      kernels and multiplication tokens), an MoE returns its router logits (the load-balancing loss counts);
    - lora={"r", "alpha", "dropout", "target_modules"} wraps it with peft LoRA adapters (a native model first
      becomes its HF GPT-2 twin); quantize='4bit'|'8bit' loads the base through bitsandbytes (CUDA, with LoRA);
    - gradient_checkpointing recomputes each block's activations in the backward pass.
    attn_implementation: HF's kernel name, 'auto' (flash-attn 2 on CUDA when installed, else SDPA) or None
    (transformers' default)."""
    if not name:
        raise common.ConfigError("model= is required (a checkpoint, run folder, RUN/latest, HF folder or hub id)")
    if not is_native(name):  # (RUN/latest names the newest checkpoint, not a file)
        check_model_path(name)
    kind = model_kind(name, trust_remote_code, exported_as_native=train)
    if kind == "native":
        lm = load_native(name, tokenizer_file, inject_mul_tokens)
        lm.model.to(device=device, dtype=dtype)
    else:
        attn = resolve_attn(attn_implementation, torch.device(device).type) if attn_implementation else None
        lm = load_hf(name, kind, dtype, device, attn, quantize, trust_remote_code)
    if not train:
        lm.model.eval()
        return lm
    if getattr(lm.model.config, "output_router_logits", None) is False:
        lm.model.config.output_router_logits = True
    if lora and lm.kind == "native":  # LoRA goes through peft on the equivalent HF GPT-2
        lm.model = model_lib.to_hf(lm.model, lm.tok.tok).to(device)
        lm.model.config._attn_implementation = "sdpa"
        lm.kind = "hf"
    if lora:
        lm.model, lm.lora_targets = add_lora(lm.model, quantized=bool(quantize),
                                             gradient_checkpointing=gradient_checkpointing, **lora)
        if not quantize:  # the adapters beside their base weights
            lm.model.to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(lm.model, lm.kind)
    lm.model.train()
    return lm


LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2",
                 "phi3", "olmo", "olmo2", "smollm3")},
    # encoder-decoder: the attention's query and value projections (T5's LoRA paper setting)
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5", "switch_transformers")},
    **{t: ["q_proj", "v_proj"] for t in ("bart", "mbart", "pegasus", "marian")},
}


def add_lora(model, r=8, alpha=16, dropout=0.05, target_modules=(), quantized=False, gradient_checkpointing=False):
    """Wrap `model` with peft LoRA adapters on the architecture's target modules (checked to exist); -> (peft
    model, target module names)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    arch = model.config.model_type
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if type(m).__name__ in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt") and name}
    wanted = list(target_modules) or [t for t in LORA_TARGETS.get(arch, sorted(present - {"lm_head"}))
                                      if t in present]
    missing = [t for t in wanted if t not in present]
    if missing or not wanted:
        raise common.ConfigError(f"LoRA target modules {missing or wanted} are not in this {arch} model; its linear "
                                 f"layers are: {', '.join(sorted(present))}")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=wanted, task_type=task,
                        fan_in_fan_out=arch == "gpt2")  # GPT-2's Conv1D stores (in, out)
    return get_peft_model(model, config), wanted


def checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model, kind):
    """Recompute each block's activations in the backward pass instead of keeping them."""
    if kind != "native":  # HF causal LMs and encoder-decoders
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    for block in model.transformer.h:  # an instance attribute: nn.Module.__call__ finds it, state_dict is unchanged
        block.forward = functools.partial(checkpointed, block.forward)


# -----------------------------------------------------------------------------
# decoders: prefill a left-padded batch, then one token per row at a time, dropping or copying rows


class NativeDecoder:
    """model.GPT through model.KVCache."""

    def __init__(self, gpt):
        self.gpt, self.cache = gpt, None

    def prefill(self, idx, real, pos, max_len):
        self.cache = model_lib.KVCache(self.gpt.config.n_layer, max_len)
        return self.gpt(idx, position_ids=pos, kv_cache=self.cache, padding_mask=real)[0][:, -1].float()

    def step(self, tokens, pos):
        return self.gpt(tokens[:, None], position_ids=pos, kv_cache=self.cache)[0][:, -1].float()

    def keep(self, rows):
        self.cache.keep(rows)


class HFDecoder:
    """A transformers causal LM through its own cache (DynamicCache: rows selected with batch_select_indices)."""

    def __init__(self, hf):
        self.hf, self.past, self.mask = hf, None, None
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}

    def prefill(self, idx, real, pos, max_len):
        self.mask = real.long()
        out = self.hf(input_ids=idx, attention_mask=self.mask, position_ids=pos, use_cache=True, **self.keep_last)
        self.past = out.past_key_values
        return out.logits[:, -1].float()

    def step(self, tokens, pos):
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        out = self.hf(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=pos,
                      past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()

    def keep(self, rows):
        self.past.batch_select_indices(rows)
        self.mask = self.mask[rows]


# -----------------------------------------------------------------------------
# sampling


def sample_next(logits, temperature, top_k, top_p, generator):
    """logits (B, V) fp32 -> token ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 switch those off.
    top-p keeps the smallest set of most likely tokens whose mass reaches top_p (the first always stays)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the tokens before it already hold top_p of the mass
        logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclasses.dataclass
class Completion:
    ids: List[int] = dataclasses.field(default_factory=list)         # every sampled token, the EOS included
    logprobs: List[float] = dataclasses.field(default_factory=list)  # per id (logprobs=True): see the module notes
    finish_reason: str = "length"                                    # eos | stop | length
    text: str = ""                                                   # decoded without the EOS, cut at the stop string

    @property
    def content_ids(self):
        """The ids without the final EOS."""
        return self.ids[:-1] if self.finish_reason == "eos" else self.ids


def check_sampling(temperature, top_p, top_k, num_samples):
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1; got "
                         f"{temperature}, {top_p}, {top_k}, {num_samples}")


class Engine:
    """Batched generation in plain PyTorch for a LoadedModel (native or HF). batch_size counts rows, so a
    batch holds batch_size // num_samples prompts."""
    name = "hf"

    def __init__(self, lm, batch_size=32):
        self.lm, self.batch_size = lm, batch_size

    def decoder(self):
        if self.lm.kind == "seq2seq":
            raise common.ConfigError(f"{self.lm.name} is an encoder-decoder: the engine's KV cache is decoder-only "
                                     f"(sft.py scores encoder-decoders with HF generate)")
        return NativeDecoder(self.lm.model) if self.lm.kind == "native" else HFDecoder(self.lm.model)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop=(), num_samples=1,
                 seed=None, logprobs=False):
        """prompts: lists of token ids -> per prompt, a list of num_samples Completions."""
        check_sampling(temperature, top_p, top_k, num_samples)
        if not prompts:
            return []
        if min(len(p) for p in prompts) == 0:
            raise ValueError("an empty prompt: give at least one token (a BOS or end-of-text id)")
        longest = max(len(p) for p in prompts)
        if self.lm.max_positions and longest + max_new_tokens > self.lm.max_positions:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"{self.lm.max_positions} positions")
        generator = torch.Generator(device=self.lm.device)
        if seed is None:
            generator.seed()  # a fresh, unrepeatable stream
        else:
            generator.manual_seed(seed)
        per_batch = max(1, self.batch_size // num_samples)
        sampling = (max_new_tokens, temperature, top_p, top_k, list(stop), num_samples, generator, logprobs)
        out = []
        for start in range(0, len(prompts), per_batch):
            out += self.generate_batch(prompts[start:start + per_batch], *sampling)
        return out

    def generate_batch(self, prompts, max_new_tokens, temperature, top_p, top_k, stop, num_samples, generator,
                       logprobs):
        tok, device = self.lm.tok, self.lm.device
        B, L = len(prompts), max(len(p) for p in prompts)
        idx = torch.full((B, L), tok.pad_id, dtype=torch.long)
        real = torch.zeros((B, L), dtype=torch.bool)
        for i, p in enumerate(prompts):
            idx[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            real[i, L - len(p):] = True
        idx, real = idx.to(device), real.to(device)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as without padding
        decoder = self.decoder()
        logits = decoder.prefill(idx, real, pos, L + max_new_tokens)
        rows = torch.arange(B, device=device).repeat_interleave(num_samples)  # one prefill, num_samples rows
        if num_samples > 1:
            decoder.keep(rows)
        logits, last_pos = logits[rows], pos[rows, -1:]
        outs = [[Completion() for _ in range(num_samples)] for _ in range(B)]
        running = [outs[i][s] for i in range(B) for s in range(num_samples)]  # the Completion of each batch row
        for step in range(max_new_tokens):
            allowed = logits[:, :tok.vocab_size]  # never sample the padded rows of a native vocabulary
            nxt = sample_next(allowed, temperature, top_k, top_p, generator)
            lps = torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0].tolist() if logprobs else None
            keep = []
            for j, t in enumerate(nxt.tolist()):
                c = running[j]
                c.ids.append(t)
                if lps is not None:
                    c.logprobs.append(lps[j])
                if t in tok.eos_ids:
                    c.finish_reason = "eos"
                elif stop and any(s in tok.decode(c.ids[-(len(s) + 8):]) for s in stop):  # only the tail is new
                    c.finish_reason = "stop"
                else:
                    keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(running):
                sel = torch.tensor(keep, device=device)
                decoder.keep(sel)
                nxt, last_pos = nxt[sel], last_pos[sel]
                running = [running[j] for j in keep]
            last_pos = last_pos + 1
            logits = decoder.step(nxt, last_pos)
        for c in (c for row in outs for c in row):
            c.text = cut_at_stop(tok.decode(c.content_ids), stop)
        return outs

    def close(self):
        pass




# -----------------------------------------------------------------------------
# vLLM on CUDA


class VLLMEngine:
    """vllm.LLM behind Engine's interface, on an HF folder (a native checkpoint is written to a temporary
    folder with model.save_hf_folder first). Prompts go in as token ids from our tokenizer, so multiplication
    tokens are exactly the training ones.

    Log-probs are vLLM's sampled-token log-probs; vLLM V1 reports them from the raw model output by default
    (logprobs_mode 'raw_logprobs': temperature 1, before top-k/top-p), the same convention as Engine's.
    Memory: vLLM does not give back all GPU memory when an LLM object is deleted (close() frees what it can),
    so a sweep that builds a new VLLMEngine per checkpoint grows; for many checkpoints keep one engine and
    call load_weights() with each checkpoint's model instead."""
    name = "vllm"

    def __init__(self, lm, dtype, batch_size=512, gpu_memory_utilization=0.85):
        from vllm import LLM
        self.lm, self.batch_size = lm, batch_size  # vLLM schedules its own batches; chunks only feed a progress bar
        # vLLM takes the GPU: the PyTorch copy moves out of its way (loss-based tasks run before this)
        lm.model.to("cpu")
        model_dir = lm.hf_dir
        if lm.kind == "native":
            import tempfile
            self._tmp = tempfile.TemporaryDirectory(prefix="engine_hf_")
            model_dir = os.path.join(self._tmp.name, "hf")
            model_lib.save_hf_folder(lm.model, lm.tok.tok, model_dir, {"source_checkpoint": lm.native_checkpoint})
        torch.cuda.empty_cache()
        self.llm = LLM(model=model_dir, dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
                       seed=0, max_model_len=lm.max_positions, gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop=(), num_samples=1,
                 seed=None, logprobs=False):
        from vllm import SamplingParams
        check_sampling(temperature, top_p, top_k, num_samples)
        eos = self.lm.tok.eos_ids
        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, top_k=top_k or -1, seed=seed,
                                max_tokens=max_new_tokens, stop=list(stop) or None, stop_token_ids=sorted(eos),
                                logprobs=0 if logprobs else None, skip_special_tokens=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[self.completion(o, eos, logprobs) for o in out.outputs] for out in outs]

    @staticmethod
    def completion(o, eos, logprobs):
        ids = list(o.token_ids)
        reason = "length" if o.finish_reason == "length" else "stop" if isinstance(o.stop_reason, str) else "eos"
        lps = [d[t].logprob for t, d in zip(ids, o.logprobs)] if logprobs else []
        return Completion(ids, lps, reason, o.text)

    def load_weights(self, model):
        """Push a policy's current weights (model.GPT or an HF model of the same architecture) into the running
        engine, e.g. after each GRPO step. Reaches the in-process model runner (vLLM with
        VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocated mode does)."""
        if isinstance(model, model_lib.GPT):
            weights = model.hf_state_dict(vocab_size=self.lm.tok.vocab_size).items()
        else:
            weights = model.state_dict().items()
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights

    def close(self):
        """Free the GPU for the next checkpoint of a sweep (see the class notes on what vLLM keeps)."""
        import gc
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()


# -----------------------------------------------------------------------------
# block diffusion (train_bd3lm.py's models): block by block, a KV cache of clean blocks


class BlockKVCache:
    """Keys/values of the clean blocks so far, in model.KVCache's protocol (open / update / advance / pos).
    The new tokens attend to every cached token and to each other (a block is bidirectional), unless `mask`
    is set. With store=False the new keys/values are read with the cached ones but not kept: the noisy
    block being denoised; store=True appends a finished clean block."""

    def __init__(self, store=False):
        self.k, self.v, self.store, self.pos, self.mask = {}, {}, store, 0, None

    def open(self, padding_mask):
        B, T = padding_mask.shape
        if self.mask is not None:
            return self.mask
        return torch.ones(1, 1, T, self.pos + T, dtype=torch.bool, device=padding_mask.device)

    def update(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=1), torch.cat([self.v[layer], v], dim=1)
        if self.store:
            self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, T):
        if self.store:
            self.pos += T


def top_p_filter(probs, top_p, rule="hf"):
    """Nucleus, renormalised. rule=hf (transformers' TopP): the smallest set of most likely tokens whose mass
    reaches top_p, so the token that crosses top_p is kept; rule=reference (bd3lms' _nucleus_sample): the tokens
    whose cumulative mass stays within top_p, so the crossing token is dropped (the most likely one always stays)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    if rule == "reference":
        drop = cum > top_p
        drop[..., 0] = False
    else:
        drop = cum - sorted_p > top_p  # tokens entirely beyond the nucleus
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


def block_logits(model, x, lo, hi, block_ids, cache, exec_positions=None):
    """Logits (B, hi-lo, V) for the noisy block x[:, lo:hi] given the clean tokens before it."""
    ex = None if exec_positions is None else exec_positions.to(x.device)[None]
    if cache is not None:  # the cache holds exactly the clean tokens before lo
        logits, _ = model(x[:, lo:hi], position_ids=torch.arange(lo, hi, device=x.device), kv_cache=cache,
                          exec_positions=None if ex is None else ex[:, lo:hi])
        return logits
    ids = block_ids[:hi].to(x.device)  # no cache: the clean prefix and the noisy block, block-causal
    logits, _ = model(x[:, :hi], attn_mask=ids[None, :] <= ids[:, None],
                      exec_positions=None if ex is None else ex[:, :hi])
    return logits[:, lo:]


def choose_reveals(still, sampler, step, steps, generator):
    """Which masked positions (B, n) get their token now. first_hitting: one per row (uniformly among the
    still masked ones); ancestral step i of T from t=1-i/T to s=1-(i+1)/T: each w.p. (t - s) / t."""
    if sampler == "first_hitting":
        scores = torch.rand(still.shape, device=still.device, generator=generator).masked_fill(~still, -1.0)
        pick = torch.zeros_like(still)
        pick.scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        return pick & still
    t, s = 1.0 - step / steps, max(1.0 - (step + 1) / steps, 0.0)
    return still & (torch.rand(still.shape, device=still.device, generator=generator) < (t - s) / t)


@torch.no_grad()
def block_diffusion_generate(model, x, fixed, block_ids, segment_ends, mask_id, n_vocab, eos_id, cfg, generator,
                             use_cache, exec_positions=None, temperature=1.0):
    """Fill every position of x (B, L) that is not `fixed` (the prompt), block by block. After an end of
    text, the rest of that segment is padding (as in training). cfg: the sampling settings (sampler,
    sample_steps, top_p, top_p_rule: a train_bd3lm Config or a BlockSampling); a revealed token is drawn from
    softmax(logits / temperature) under top-p, or is the argmax at temperature 0. Returns (tokens, network
    calls)."""
    x = torch.where(fixed, x, torch.full_like(x, mask_id))
    B, L = x.shape
    bounds = [0] + [i for i in range(1, L) if block_ids[i] != block_ids[i - 1]] + [L]
    cache = BlockKVCache() if use_cache else None
    nfe = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        step = 0
        while True:
            still = x[:, lo:hi] == mask_id
            if not still.any():
                break
            steps = cfg.sample_steps if cfg.sampler == "ancestral" else 1
            reveal = choose_reveals(still, cfg.sampler, min(step, steps - 1), steps, generator)
            step += 1
            if not reveal.any():
                continue  # no token changes in this step: no network call needed
            logits = block_logits(model, x, lo, hi, block_ids, cache, exec_positions)[..., :n_vocab].float()
            nfe += 1
            rows, cols = reveal.nonzero(as_tuple=True)  # draw only the tokens revealed now
            picked = logits[rows, cols]
            if temperature == 0.0:
                x[rows, lo + cols] = picked.argmax(-1)
            else:
                probs = top_p_filter(torch.softmax(picked / temperature, dim=-1), cfg.top_p, cfg.top_p_rule)
                x[rows, lo + cols] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        pad_after_end_of_text(x, fixed, lo, hi, segment_ends, eos_id)
        if cache is not None and hi < L:  # the clean block joins the cache: one pass, no logits
            cache.store = True
            ex = None if exec_positions is None else exec_positions[lo:hi].to(x.device)[None]
            model(x[:, lo:hi], position_ids=torch.arange(lo, hi, device=x.device), kv_cache=cache, logits_len=0,
                  exec_positions=ex)
            cache.store = False
        last_start = segment_ends[-2] if len(segment_ends) > 1 else 0
        if hi < L and lo >= last_start and ended_all(x[:, last_start:hi], fixed[:, last_start:hi], eos_id):
            x[:, hi:] = torch.where(x[:, hi:] == mask_id, torch.full_like(x[:, hi:], eos_id), x[:, hi:])
            break  # every row has finished its last segment: the rest is padding
    return x, nfe


def ended_all(x, fixed, eos_id):
    return bool(((x == eos_id) & ~fixed).any(dim=1).all())


def pad_after_end_of_text(x, fixed, lo, hi, segment_ends, eos_id):
    """Positions after a generated end of text, up to the segment's end, become padding (eos)."""
    seg_start = max([0] + [e for e in segment_ends if e <= lo])
    seg_end = min(e for e in segment_ends if e >= hi)
    generated = (x[:, seg_start:hi] == eos_id) & ~fixed[:, seg_start:hi]
    seen = generated.cumsum(dim=1) > 0
    after = torch.zeros_like(x[:, seg_start:seg_end], dtype=torch.bool)
    after[:, :hi - seg_start] = seen
    after[:, hi - seg_start:] = seen[:, -1:]
    after[:, :hi - seg_start] &= ~generated  # the end-of-text token itself stays
    region = x[:, seg_start:seg_end]
    x[:, seg_start:seg_end] = torch.where(after & ~fixed[:, seg_start:seg_end], torch.full_like(region, eos_id),
                                          region)
    fixed[:, hi:seg_end] |= after[:, hi - seg_start:]  # later blocks of this segment are already decided


@dataclasses.dataclass
class BlockSampling:
    """How block_diffusion_generate denoises a block."""
    sampler: str = "first_hitting"  # first_hitting (one token per network call) | ancestral (sample_steps steps)
    sample_steps: int = 16          # ancestral: T steps per block
    top_p: float = 1.0              # nucleus
    top_p_rule: str = "hf"          # hf: keep the token that crosses top_p | reference: drop it (bd3lms)
    temperature: float = 0.0        # BlockDiffusionEngine: 0 = each revealed token is the argmax (greedy)


def bd3lm_layout(ckpt):
    """The row layout a train_bd3lm.py checkpoint was trained with: [MASK] id, real ids, block size, segments."""
    info = ckpt["bd3lm"]
    return {"mask_id": info["mask_id"], "n_vocab": info["n_vocab"], "block_size": info["block_size"],
            "seq_len": info["seq_len"], "segment_lens": list(info["segment_lens"]),
            "segment_names": list(info["segment_names"]), "data": info["data"]}


def load_block_diffusion_model(name, tokenizer_file="", device="cpu", dtype=torch.float32, use_ema=True, ckpt=None):
    """A train_bd3lm.py checkpoint (file, run folder, RUN/latest) as a LoadedModel of kind 'bd3lm', with the EMA
    weights unless use_ema=False; info['bd3lm'] holds its row layout (bd3lm_layout). ckpt: the checkpoint, when
    the caller has read it already (train_bd3lm.py's mode=sample also needs its training config)."""
    ckpt = ckpt or common.load_checkpoint(name, expected_kind="bd3lm")
    gpt = model_lib.GPT(model_lib.GPTConfig(**ckpt["model_config"]))
    gpt.load_state_dict(ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"])
    gpt.to(device=device, dtype=dtype).eval()
    tok = common.Tokenizer.from_spec(ckpt["tokenizer"], tokenizer_file or model_lib.run_tokenizer_file(ckpt))
    layout = bd3lm_layout(ckpt)
    info = {"checkpoint": ckpt["path"], "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
            "tokenizer": tok.spec, "ema": bool(use_ema and ckpt.get("ema")), "bd3lm": layout}
    # a flat model's prompt and answer share its seq_len positions; a hierarchical one reads only the question
    # (see BlockDiffusionEngine), so a prompt has no length limit there
    max_positions = layout["seq_len"] if layout["data"] != "hierarchical" else None
    return LoadedModel(gpt, NativeTokenizer(tok), name, "bd3lm", max_positions, info, native_checkpoint=ckpt["path"])


@dataclasses.dataclass
class SegmentCompletion(Completion):
    """A Completion of a hierarchical model: `text` is its execution segment, `segments` every generated one."""
    segments: dict = dataclasses.field(default_factory=dict)

    @property
    def record(self):
        """What a predictions.jsonl record keeps beside the scored completion: the plan."""
        return {k: v for k, v in self.segments.items() if k not in ("question", "execution")}


def question_of(prompt):
    """The last question of a few-shot ('Question: q\\nAnswer:') or chat ('User: q\\nAssistant:') prompt; a
    prompt in neither form is taken whole."""
    for opener, closer in (("Question: ", "\nAnswer:"), ("User: ", "\nAssistant:")):
        start = prompt.rfind(opener)
        end = prompt.rfind(closer)
        if 0 <= start < end:
            return prompt[start + len(opener):end]
    return prompt


class BlockDiffusionEngine:
    """Engine's interface for a BD3-LM (load_block_diffusion_model): a row of the model's layout per sample,
    generated block by block (block_diffusion_generate) with the clean blocks in a KV cache.
    Flat model: the prompt ids open the row, the row runs to the block holding prompt + max_new_tokens (at most
    seq_len), the completion is what follows the prompt, cut at end of text and at max_new_tokens.
    Hierarchical model ([question | plan | execution]): the prompt's last question becomes the question segment
    as in training ('Question: q\\n' + end of text, padded); plan and execution are generated, the completion is
    the execution segment and the plan is kept in SegmentCompletion.segments.
    seed=None draws from the engine's own generator (seeded once at construction), so one evaluation is
    repeatable; logprobs are not computed (a masked diffusion model has no left-to-right token probability)."""
    name = "bd3lm"

    def __init__(self, lm, batch_size=16, sampling=None, kv_cache=True, seed=0):
        self.lm, self.batch_size, self.kv_cache = lm, batch_size, kv_cache
        self.sampling = sampling or BlockSampling()
        self.layout = lm.info["bd3lm"]
        self.generator = torch.Generator(device=lm.device).manual_seed(seed)
        self.network_calls = 0  # forward passes that denoised a block so far (NFE; the cache's pushes not counted)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=None, top_p=None, top_k=0, stop=(), num_samples=1,
                 seed=None, logprobs=False):
        """prompts: lists of token ids -> per prompt, a list of num_samples Completions. temperature / top_p
        None: the engine's BlockSampling; top_k is not supported (0 only)."""
        sampling = dataclasses.replace(self.sampling, **{k: v for k, v in (("temperature", temperature),
                                                                           ("top_p", top_p)) if v is not None})
        temperature = sampling.temperature
        check_sampling(temperature, sampling.top_p, top_k, num_samples)
        if top_k or logprobs:
            raise ValueError("the block-diffusion engine samples with top_p only and gives no logprobs")
        generator = self.generator if seed is None else torch.Generator(device=self.lm.device).manual_seed(seed)
        rows = [p for p in prompts for _ in range(num_samples)]
        outs = []
        for start in range(0, len(rows), self.batch_size):
            outs += self.generate_batch(rows[start:start + self.batch_size], max_new_tokens, temperature, sampling,
                                        list(stop), generator)
        return [outs[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

    def generate_batch(self, prompts, max_new_tokens, temperature, sampling, stop, generator):
        lay, tok = self.layout, self.lm.tok
        hierarchical = lay["data"] == "hierarchical"
        segment_lens = lay["segment_lens"] if hierarchical else [self.flat_length(prompts, max_new_tokens)]
        x, fixed = self.prompt_rows(prompts, segment_lens)
        device = self.lm.device
        ends = [sum(segment_lens[:i + 1]) for i in range(len(segment_lens))]
        exec_positions = model_lib.exec_positions_of(segment_lens, self.lm.model.config.exec_layers)
        with common.autocast(device.type, self.lm.dtype):
            out, nfe = block_diffusion_generate(self.lm.model, x.to(device), fixed.to(device),
                                                model_lib.make_block_ids(segment_lens, lay["block_size"]), ends,
                                                lay["mask_id"], lay["n_vocab"], tok.pad_id, sampling, generator,
                                                self.kv_cache, exec_positions, temperature)
        self.network_calls += nfe
        out, completions = out.cpu(), []
        for i in range(len(prompts)):
            segments = segment_ids(out[i].tolist(), fixed[i].tolist(), segment_lens, lay["segment_names"],
                                   tok.eos_ids)
            ids = segments[lay["segment_names"][-1]][:max_new_tokens]
            c = SegmentCompletion(segments={k: tok.decode(strip_eos(v, tok)) for k, v in segments.items()}) \
                if hierarchical else Completion()
            c.ids, c.finish_reason = ids, "eos" if ids and ids[-1] in tok.eos_ids else "length"
            text = tok.decode(c.content_ids)
            if stop and cut_at_stop(text, stop) != text:
                c.finish_reason = "stop"
            c.text = cut_at_stop(text, stop)
            completions.append(c)
        return completions

    def flat_length(self, prompts, max_new_tokens):
        """Positions of a flat batch: the longest prompt + max_new_tokens, up to a whole block, at most seq_len."""
        bs, L = self.layout["block_size"], self.layout["seq_len"]
        longest = max(len(p) for p in prompts)
        if longest >= L:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's {L} positions")
        return min(L, -(-(longest + max_new_tokens) // bs) * bs)

    def prompt_rows(self, prompts, segment_lens):
        """(x, fixed): rows of the layout's length with the prompt tokens fixed (the rest is generated)."""
        tok, L = self.lm.tok, sum(segment_lens)
        x = torch.full((len(prompts), L), tok.pad_id, dtype=torch.long)
        fixed = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            if self.layout["data"] == "hierarchical":
                ids = tok.encode(f"Question: {question_of(tok.decode(p))}\n") + [tok.pad_id]
                ids = ids[:segment_lens[0]] + [tok.pad_id] * (segment_lens[0] - len(ids))  # as in training
            else:
                ids = list(p)
            x[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            fixed[i, :len(ids)] = True
        return x, fixed

    def close(self):
        pass


def segment_ids(row, fixed_row, segment_lens, segment_names, eos_ids):
    """{segment name: its generated ids up to and including its first end of text}, of one generated row (after
    an end of text the rest of a segment is padding)."""
    out, pos = {}, 0
    for name, n in zip(segment_names, segment_lens):
        ids = [t for t, f in zip(row[pos:pos + n], fixed_row[pos:pos + n]) if not f]
        ends = [i for i, t in enumerate(ids) if t in eos_ids]
        out[name] = ids[:ends[0] + 1] if ends else ids
        pos += n
    return out


def strip_eos(ids, tok):
    """ids without a final end of text."""
    return ids[:-1] if ids and ids[-1] in tok.eos_ids else ids


# -----------------------------------------------------------------------------
# sigma-GPT (train_sigmagpt.py) left to right: with target positions = own + 1 (model.GPT's default under
# double_position) it is a causal LM, so Engine and its KV cache generate with it unchanged


def load_sigmagpt_model(name, tokenizer_file="", device="cpu", dtype=torch.float32):
    """A train_sigmagpt.py checkpoint as a native LoadedModel, read left to right (info['order'] says so). vLLM
    cannot run it: its HF export would drop the second position code."""
    ckpt = common.load_checkpoint(name, expected_kind="sigmagpt")
    gpt = model_lib.GPT(model_lib.GPTConfig(**ckpt["model_config"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.to(device=device, dtype=dtype).eval()
    tok = common.Tokenizer.from_spec(ckpt["tokenizer"], tokenizer_file or model_lib.run_tokenizer_file(ckpt))
    info = {"checkpoint": ckpt["path"], "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
            "tokenizer": tok.spec, "source_kind": "sigmagpt", "order": "left_to_right"}
    return LoadedModel(gpt, NativeTokenizer(tok), name, "native", gpt.config.block_size, info,
                       native_checkpoint=ckpt["path"])

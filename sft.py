"""
Supervised fine-tuning in one file, nanochat chat_sft style: read it top to bottom.

    python sft.py configs/sft_demo.yaml                                  # one process: cuda, mps or cpu
    torchrun --nproc_per_node=4 sft.py configs/sft_gsm8k.yaml model=out/sft_tulu/hf
    python sft.py configs/sft_lora_qwen.yaml resume=latest              # continue exactly where it stopped

Model in: a native checkpoint (ckpt_N.pt, a run folder, RUN/latest), a folder exported by export_hf.py (trained
as the native GPT, its own tokenizer), or any HF causal LM (hub id or folder). Model out: out_dir/hf, an HF folder
(weights, tokenizer, generation config) that eval_gsm8k.py and grpo.py load as they are.

Data: the registry of tasks/sft_sets.py (datasets=[gsm8k] or a mixture: datasets=[imdb,sst2]
mixture_rates=[0.7,0.3]). Each example is a chat; the user/system turns are the prompt and only the assistant
turns (and the EOS closing each) carry loss. How turns become text: the model's chat template when it has one,
else `User: ...\\nAssistant: ...` (what eval_gsm8k.py's zero-shot chat mode scores); prompt_format= overrides.
An example longer than max_length loses tokens from the left (its prompt first); such cuts are counted.

What happens in a step: grad_accum_steps micro batches of batch_size rows per rank go through the model (bf16
autocast on cuda); the loss is the sum of the completion tokens' cross-entropies divided by the step's completion
token count over all ranks, so every completion token weighs the same however the rows are cut. Gradients are
clipped, AdamW steps at a warmup + cosine (or linear) learning rate. With packing=true the rows are filled with
whole examples back to back; attention never crosses an example (native GPT: model.py's doc_ids; HF models: a
block-diagonal mask, or flash-attn varlen through position ids on CUDA) and positions restart per example, so
the packed loss is the unpacked loss of the same examples.

The whole token stream (which example lands in which row of which step) is fixed before the first step from
the seed, so a checkpoint's data position is its step; resume=latest restores model, optimizer, step and RNG and
the resumed losses equal the uninterrupted run's. SIGTERM / SIGUSR1 save a checkpoint and exit 0.
"""
import contextlib
import functools
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

import common
import model as model_lib
from tasks import sft_sets


@dataclass
class Config:
    # model in: a native checkpoint / run folder / RUN/latest, an exported HF folder, or an HF hub id / folder
    model: str = ""
    tokenizer_file: str = ""          # GPT-2 ranks for native checkpoints offline (default: the run's, else tiktoken's)
    # data: registry names (tasks/sft_sets.py), one local copy per dataset ("" = the hub), mixture rates
    datasets: List[str] = field(default_factory=lambda: ["gsm8k"])
    data_paths: List[str] = field(default_factory=list)       # train split copies, one per dataset
    eval_data_paths: List[str] = field(default_factory=list)  # eval split copies, one per dataset
    mixture_rates: List[float] = field(default_factory=list)  # per-draw rates summing to 1; [] = concatenate
    dataset_options: dict = field(default_factory=dict)       # e.g. synthetic: {max_steps: 1, max_value: 20}
    max_samples: int = 0              # train examples per dataset (a seeded subset; 0 = all)
    eval_samples: int = 200           # eval examples per dataset (eval loss and generation accuracy; 0 = none)
    # auto (the chat template if the model has one, else user_assistant) | chat_template | user_assistant | plain
    prompt_format: str = "auto"
    inject_mul_tokens: bool = False   # encode assistant replies with the multiplication tokens (mul_tokens condition)
    max_length: int = 1024            # tokens per example (and per packed row)
    packing: bool = False
    pad_to_max_length: bool = False   # unpacked rows padded to max_length, not to the batch's longest (fixed shapes)
    # optimisation: one step = batch_size rows x grad_accum_steps x world size
    epochs: float = 1.0
    max_steps: int = 0                # 0 = as many as `epochs` passes give
    batch_size: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 2e-5
    min_lr_ratio: float = 0.0
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 1337
    # LoRA (peft) and quantised loading (bitsandbytes, CUDA only)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=list)  # [] = the architecture's defaults (LORA_TARGETS)
    merge_lora: bool = True           # save the merged model (an ordinary HF folder); false: the adapter only
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # system
    device: str = "auto"
    dtype: str = "auto"               # auto (bf16 autocast on cuda, else fp32) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto | flash_attention_2 | sdpa | eager (HF models)
    gradient_checkpointing: bool = False
    compile: bool = False
    # output, evaluation, checkpoints
    out_dir: str = "out/sft"
    log_interval: int = 10
    eval_interval: int = 100          # steps between eval losses (0 = only at the end)
    save_interval: int = 0            # steps between checkpoints (0 = only at the end)
    save_total_limit: int = 0         # keep the newest N checkpoints (0 = all)
    resume: Optional[str] = None      # latest | a checkpoint path
    stop_after_step: int = -1         # end this invocation after this step with a checkpoint, as if preempted
    gen_eval: bool = True             # generation accuracy on the eval split at the end (classification, math)
    gen_max_new_tokens: int = 256
    gen_batch_size: int = 32
    tensorboard: bool = True


PROMPT_FORMATS = ("auto", "chat_template", "user_assistant", "plain")
# LoRA's default target modules per architecture (HF model_type); others: every linear layer but the head
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2",
                 "phi3", "olmo", "olmo2", "smollm3")},
}


def check_config(cfg):
    """Mistakes that need no model or data to spot."""
    if not cfg.model:
        raise common.ConfigError("model= is required (a native checkpoint, RUN/latest, an HF folder or hub id)")
    for name in cfg.datasets:
        sft_sets.get_set(name)  # an unknown name lists the registry
    if not cfg.datasets:
        raise common.ConfigError("datasets= is empty")
    for key in ("data_paths", "eval_data_paths"):
        if getattr(cfg, key) and len(getattr(cfg, key)) != len(cfg.datasets):
            raise common.ConfigError(f"{key} needs one entry per dataset ({len(cfg.datasets)}), "
                                     f"got {len(getattr(cfg, key))}")
    sft_sets.check_rates(cfg.datasets, cfg.mixture_rates)
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise common.ConfigError(f"prompt_format '{cfg.prompt_format}' is not one of {', '.join(PROMPT_FORMATS)}")
    common.resolve_dtype(cfg.dtype, "cpu")
    for key in ("max_length", "batch_size", "grad_accum_steps", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise common.ConfigError(f"config key '{key}' must be positive, got {getattr(cfg, key)}")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not torch.cuda.is_available():
        raise common.ConfigError("load_in_4bit / load_in_8bit need CUDA (bitsandbytes quantises on the GPU)")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise common.ConfigError("choose load_in_4bit or load_in_8bit, not both")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.lora:
        raise common.ConfigError("a quantised model trains only through LoRA adapters: set lora=true")


# -----------------------------------------------------------------------------
# tokenizers: the native one (common.Tokenizer, exactly as in pretraining) or the model's HF tokenizer


class NativeTok:
    """common.Tokenizer for SFT. Prompts are encoded as eval encodes them (products become multiplication tokens
    when the tokenizer has them); assistant replies only with inject_mul_tokens, else as plain text."""
    chat_template = None

    def __init__(self, tok, inject_mul_tokens, tokenizer_file=None):
        self.tok, self.eos_id, self.pad_id, self.vocab_size = tok, tok.eot_id, tok.eot_id, tok.vocab_size
        # the same tokenizer without multiplication tokens: the other ids are identical
        self.plain = common.Tokenizer(tok.kind, tok.extra_tokens, None, tokenizer_file) if tok.mul_range else tok
        self.reply_tok = tok if inject_mul_tokens else self.plain

    def encode(self, text, first=False):
        return self.tok.encode(text)

    def encode_reply(self, text):
        return self.reply_tok.encode(text)


class HFTok:
    """An HF tokenizer. The first piece of a sequence gets the BOS the model wants (as eval's encode_prompt)."""

    def __init__(self, tok):
        self.tok = tok
        self.chat_template = getattr(tok, "chat_template", None)
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise common.ConfigError("the model's tokenizer has no EOS token: replies could never end")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)

    def encode(self, text, first=False):
        return self.tok(text, add_special_tokens=first, verbose=False)["input_ids"]

    def encode_reply(self, text):
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def has_mul_tokens(tok):
    if isinstance(tok, NativeTok):
        return bool(tok.tok.mul_ids)
    return "2*3=6" in tok.tok.get_vocab()


# -----------------------------------------------------------------------------
# examples -> token ids with a completion mask


def render_segments(messages, fmt, tok):
    """A chat as [(text, is_completion)], with the EOS closing each reply implied by is_completion (added by
    encode_example). chat_template: the template's own text, each assistant turn (with its end-of-turn marker)
    found as the difference between the rendering with and without it."""
    if fmt == "chat_template":
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tok.tok.apply_chat_template(messages[:i + 1], tokenize=False)
            if not full.startswith(prompt) or not prompt.startswith(done):
                raise common.ConfigError("the model's chat template does not render turns as prefixes; use "
                                         "prompt_format=user_assistant")
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return segments
    segments, pending = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segments += [(pending, False), (" " + m["content"].strip(), True)]
            pending = "\n"
        elif fmt == "plain":
            pending += m["content"]
        else:
            pending += f"{'User' if m['role'] == 'user' else 'System'}: {m['content'].strip()}\n" + (
                "Assistant:" if m["role"] == "user" else "")
    return segments


def encode_example(messages, fmt, tok, max_length):
    """-> (ids, target mask, cut): the mask is True on the tokens that carry loss (replies and their EOS).
    Longer than max_length: the tokens on the left go (the prompt first) and `cut` says so."""
    ids, target = [], []
    for text, is_reply in render_segments(messages, fmt, tok):
        piece = tok.encode_reply(text) if is_reply else tok.encode(text, first=not ids)
        if is_reply and fmt != "chat_template":
            piece = piece + [tok.eos_id]
        ids += piece
        target += [is_reply] * len(piece)
    cut = len(ids) > max_length
    if cut:
        ids, target = ids[-max_length:], target[-max_length:]
    return ids, target, cut


def prompt_ids(messages, fmt, tok):
    """The prompt a model continues to answer the chat's last reply (generation accuracy)."""
    head = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    if fmt == "chat_template":
        return tok.encode(tok.tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True))
    text = "".join(t for t, _ in render_segments(head + [{"role": "assistant", "content": ""}], fmt, tok)[:-1])
    return tok.encode(text, first=True)


def stop_strings(fmt):
    return {"user_assistant": ["\nUser:"], "plain": ["\n\n"]}.get(fmt, [])


# -----------------------------------------------------------------------------
# rows: each example is (inputs, targets) shifted by one; rows hold one example, or several when packing


def example_pairs(ids, target):
    """Inputs ids[:-1] and targets ids[1:], a target ignored (-100) unless it is a completion token."""
    x = ids[:-1]
    y = [t if keep else -100 for t, keep in zip(ids[1:], target[1:])]
    return x, y


def build_rows(examples, max_length, packing):
    """Lists of example indices, in stream order: one per row, or packed greedily (an example that does not fit
    the row's remaining room starts the next row; examples are never split)."""
    if not packing:
        return [[i] for i in range(len(examples))]
    rows, row, used = [], [], 0
    for i, (x, _) in enumerate(examples):
        if row and used + len(x) > max_length:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += len(x)
    if row:
        rows.append(row)
    return rows


def collate(rows, examples, pad_id, packing, length=0):
    """Rows -> x, y, position ids and (packing) doc ids, padded on the right to the longest row (or to `length`).
    Padding has its own doc id and ignored targets; with causal attention right padding never reaches a real token."""
    T = max([length] + [sum(len(examples[i][0]) for i in row) for row in rows])
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), -100, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for j, i in enumerate(row):
            xi, yi = examples[i]
            n = len(xi)
            x[b, t:t + n], y[b, t:t + n] = torch.tensor(xi), torch.tensor(yi)
            pos[b, t:t + n] = torch.arange(n)
            doc[b, t:t + n] = j
            t += n
        pos[b, t:] = torch.arange(T - t)
    return x, y, pos, (doc if packing else None)


# -----------------------------------------------------------------------------
# models


def is_native(name):
    if os.path.isfile(name):
        return name.endswith(".pt")
    return os.path.basename(name) == "latest" or (os.path.isdir(name) and bool(common.list_checkpoints(name)))


def exported_spec(name):
    """The native tokenizer spec of a folder written by export_hf.py / sft.py from a native model, else None."""
    import json
    path = os.path.join(name, "export_info.json")
    if os.path.isdir(name) and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("tokenizer")
    return None


def resolve_attn(cfg, d):
    """The attention kernel to ask an HF model for: flash-attn 2 when installed on CUDA, else SDPA; eager on MPS
    (SDPA gives NaN there on some models)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if d.device_type == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "eager" if d.device_type == "mps" else "sdpa"


def load_model(cfg, d, dtype):
    """-> (model, tokenizer wrapper, kind 'native'|'hf', attention implementation, source info)."""
    spec = None if is_native(cfg.model) else exported_spec(cfg.model)
    if is_native(cfg.model) or spec:
        if is_native(cfg.model):
            gpt, tok, ckpt = model_lib.from_checkpoint(cfg.model, cfg.tokenizer_file or None)
            source = {"checkpoint": ckpt["path"], "step": ckpt.get("step")}
            tokenizer_file = cfg.tokenizer_file or model_lib.run_tokenizer_file(ckpt)
        else:  # an exported folder: the same GPT-2 weights, trained natively with the run's own tokenizer
            gpt = model_lib.from_hf(cfg.model)
            tok = common.Tokenizer.from_spec(spec, cfg.tokenizer_file or None)
            source = {"hf_folder": cfg.model}
            tokenizer_file = cfg.tokenizer_file or None
        if tok.vocab_size > gpt.config.vocab_size:
            raise common.ConfigError(f"{cfg.model}: tokenizer has {tok.vocab_size} ids, the model only "
                                     f"{gpt.config.vocab_size} rows")
        ntok = NativeTok(tok, cfg.inject_mul_tokens, tokenizer_file)
        if not cfg.lora:
            attn = "flash_attn (varlen when packing)" if (d.device_type == "cuda" and model_lib.flash_attn_func
                                                          and dtype != torch.float32) else "sdpa"
            return gpt.train(), ntok, "native", attn, source
        hf = model_lib.to_hf(gpt, tok)  # LoRA goes through peft on the equivalent HF GPT-2
        hf.config._attn_implementation = "sdpa"
        return hf.train(), ntok, "hf", "sdpa", source
    from transformers import AutoModelForCausalLM, AutoTokenizer
    attn = resolve_attn(cfg, d)
    kwargs = {"dtype": torch.float32}
    if cfg.load_in_4bit or cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig
        kwargs = {"dtype": torch.bfloat16, "device_map": {"": d.local_rank},
                  "quantization_config": BitsAndBytesConfig(
                      load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")}
    try:
        hf = AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation=attn, **kwargs)
    except (ValueError, ImportError) as e:  # this architecture has no such kernel: fall back to eager
        if attn == "eager":
            raise
        print(f"warning: attn_implementation={attn} unavailable for {cfg.model} ({str(e).splitlines()[0][:120]}); "
              f"using eager", file=sys.stderr)
        hf = AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation="eager", **kwargs)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    return hf.train(), HFTok(tok), "hf", hf.config._attn_implementation, {"hf_model": cfg.model}


def add_lora(cfg, model):
    """Wrap `model` with peft LoRA adapters on the architecture's target modules (checked to exist)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    arch = model.config.model_type
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if type(m).__name__ in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt") and name}
    wanted = list(cfg.lora_target_modules) or [t for t in LORA_TARGETS.get(arch, sorted(present - {"lm_head"}))
                                               if t in present]
    missing = [t for t in wanted if t not in present]
    if missing or not wanted:
        raise common.ConfigError(f"LoRA target modules {missing or wanted} are not in this {arch} model; its linear "
                                 f"layers are: {', '.join(sorted(present))}")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=wanted,
                      task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")  # GPT-2's Conv1D stores (in, out)
    return get_peft_model(model, lora), wanted


def checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model, kind):
    """Recompute each block's activations in the backward pass instead of keeping them."""
    if kind == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    for block in model.transformer.h:  # an instance attribute: nn.Module.__call__ finds it, state_dict is unchanged
        block.forward = functools.partial(checkpointed, block.forward)


def summed_loss(model, kind, x, y, pos, doc, attn):
    """Sum of the cross-entropies of the targets that are not -100 (the caller divides by their count)."""
    if kind == "native":
        return model(x, y, position_ids=pos, doc_ids=doc, loss_reduction="sum")[1]
    kwargs = {}
    if doc is not None and attn != "flash_attention_2":  # flash-attn 2 finds the documents from the position ids
        allowed = model_lib.packed_causal_mask(doc)  # SDPA takes the boolean mask; eager wants it additive
        kwargs["attention_mask"] = allowed if attn != "eager" else torch.zeros(
            allowed.shape, device=x.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    logits = model(input_ids=x, position_ids=pos, use_cache=False, **kwargs).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")


# -----------------------------------------------------------------------------
# data: every set's train and eval examples, the mixture stream, the rows of each step


def load_examples(cfg, tok, fmt, master):
    """-> each set's encoded train examples [(x, y)], eval sets {name: (encoded, raw examples)}, counts."""
    per_set, evals, counts = [], {}, {"cut": 0, "examples": 0}
    for k, name in enumerate(cfg.datasets):
        entry = sft_sets.get_set(name)
        sft_sets.check_labels(entry, tok.encode_reply)
        path = cfg.data_paths[k] if cfg.data_paths else ""
        eval_path = cfg.eval_data_paths[k] if cfg.eval_data_paths else (path if entry.eval_split is None else "")
        train = sft_sets.load_split(name, "train", path, cfg.max_samples, cfg.seed, cfg.dataset_options)
        held = sft_sets.load_split(name, "eval", eval_path, cfg.eval_samples, cfg.seed,
                                   cfg.dataset_options) if cfg.eval_samples > 0 else []
        encoded = []
        for ex in train:
            ids, target, cut = encode_example(ex["messages"], fmt, tok, cfg.max_length)
            counts["cut"] += cut
            encoded.append(example_pairs(ids, target))
        per_set.append(encoded)
        evals[name] = ([example_pairs(*encode_example(ex["messages"], fmt, tok, cfg.max_length)[:2]) for ex in held],
                       held)
        if master:
            print(f"dataset {name}: {len(train)} train / {len(held)} eval examples", flush=True)
    counts["examples"] = sum(len(s) for s in per_set)
    return per_set, evals, counts


def make_rows(cfg, per_set, per_step):
    """The training stream (mixture draws, `epochs` passes, or as many as max_steps needs) and its rows."""
    rates = sft_sets.check_rates(cfg.datasets, cfg.mixture_rates)
    n_draws = max(1, math.ceil(cfg.epochs * sum(len(s) for s in per_set)))
    while True:
        stream = sft_sets.Mixture([len(s) for s in per_set], rates, cfg.seed).stream(n_draws)
        examples = [per_set[k][i] for k, i in stream]
        rows = build_rows(examples, cfg.max_length, cfg.packing)
        if not cfg.max_steps or len(rows) >= cfg.max_steps * per_step:
            return examples, rows
        n_draws *= 2


def step_rows(rows, step, micro, cfg, d):
    """The rows of one micro batch of one rank: step blocks of batch*accum*world rows, rank r every world-th."""
    per_step = cfg.batch_size * cfg.grad_accum_steps * d.world_size
    mine = rows[step * per_step:(step + 1) * per_step][d.rank::d.world_size]
    return mine[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]


def fingerprint(rows, examples):
    """A hash of the token stream: a resume with other data or settings is refused, not silently mixed."""
    h = hashlib.sha256()
    for row in rows[:2000]:
        for i in row:
            h.update(str(examples[i][0][:64]).encode())
    h.update(str(len(rows)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def eval_loss(model, kind, encoded, cfg, d, pad_id, attn, autocast):
    """Mean completion-token loss over the eval examples (each rank its share, summed over ranks)."""
    model.eval()
    total = torch.zeros(2, device=d.device)
    mine = list(range(len(encoded)))[d.rank::d.world_size]
    for start in range(0, len(mine), cfg.batch_size):
        rows = [[i] for i in mine[start:start + cfg.batch_size]]
        x, y, pos, _ = collate(rows, encoded, pad_id, False)
        x, y, pos = x.to(d.device), y.to(d.device), pos.to(d.device)
        with autocast:
            total[0] += summed_loss(model, kind, x, y, pos, None, attn).float()
        total[1] += (y != -100).sum()
    model.train()
    total = common.all_reduce(total, "sum", d)
    return (total[0] / total[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------
# saving: training checkpoints (exact resume) and the final HF folder


def trainable_state(model, lora):
    """The weights a checkpoint must hold: everything, or with LoRA only the adapters (the base is frozen)."""
    if lora:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def save_hf(cfg, model, kind, tok, folder, info):
    """out_dir/hf: native GPT -> model.save_hf_folder; HF -> save_pretrained + tokenizer + generation config."""
    import shutil
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora and cfg.merge_lora and not (cfg.load_in_4bit or cfg.load_in_8bit):
        model = model.merge_and_unload()
    elif cfg.lora:
        info["note"] = "LoRA adapter only (merge_lora=false or a quantised base): load it with peft on " + cfg.model
    if isinstance(tok, NativeTok) and kind == "native":
        model_lib.save_hf_folder(model, tok.tok, tmp, {**info, "tokenizer": tok.tok.spec})
    elif isinstance(tok, NativeTok) and not (cfg.lora and not cfg.merge_lora):  # merged LoRA on a native model
        model_lib.save_hf_folder(model_lib.from_hf(model), tok.tok, tmp, {**info, "tokenizer": tok.tok.spec})
    else:
        from transformers import GenerationConfig
        model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(tok, NativeTok):
            common.hf_tokenizer(tok.tok, cfg.max_length).save_pretrained(tmp)
        else:
            tok.tok.save_pretrained(tmp)
        if not (cfg.lora and not cfg.merge_lora):
            gen = getattr(model, "generation_config", None) or GenerationConfig()
            gen.eos_token_id, gen.pad_token_id = tok.eos_id, tok.pad_id
            gen.save_pretrained(tmp)
        common.atomic_write_json(os.path.join(tmp, "export_info.json"), info)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def generation_accuracy(cfg, folder, evals, fmt, tok, d, logger):
    """Greedy generation on each scored eval set through engine.py from the saved folder; the label word (or
    the number) parsed from each reply; unparseable replies count as wrong and are counted."""
    import engine
    lm = engine.load_model(folder, device=d.device, dtype=common.resolve_dtype(cfg.dtype, d.device))
    gen = engine.Engine(lm, batch_size=cfg.gen_batch_size)
    results = {}
    for name, (_, raw) in evals.items():
        entry = sft_sets.get_set(name)
        if not entry.scoring or not raw:
            continue
        prompts = [prompt_ids(ex["messages"], fmt, tok) for ex in raw]
        room = (lm.max_positions or 10**9) - cfg.gen_max_new_tokens  # long prompts lose their left end
        prompts = [p[-room:] if room > 0 else p for p in prompts]
        outs = gen.generate(prompts, cfg.gen_max_new_tokens, temperature=0.0, stop=stop_strings(fmt))
        scored = [sft_sets.score_generation(entry, ex, o[0].text) for ex, o in zip(raw, outs)]
        n = len(scored)
        results[name] = {"accuracy": sum(s["correct"] for s in scored) / n, "n": n,
                         "unparseable": sum(not s["parsed"] for s in scored),
                         "examples": [{"reply": o[0].text[:200], **s} for o, s in zip(outs[:5], scored[:5])]}
        logger.log({"type": "gen_eval", "step": -1, "dataset": name, "accuracy": results[name]["accuracy"], "n": n,
                    "unparseable": results[name]["unparseable"]})
    return results


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    cfg = common.load_config(Config, argv)
    check_config(cfg)
    d = common.setup_dist(cfg.device)
    try:
        with common.preemption_handlers() as stop:
            return train(cfg, d, stop)
    finally:
        common.cleanup_dist(d)


def train(cfg, d, stop):
    ckpt = common.start_or_resume(cfg.out_dir, cfg.resume, kind="sft")
    common.seed_everything(cfg.seed, d.device_type)
    dtype = common.resolve_dtype(cfg.dtype, d.device)
    autocast = common.autocast(d.device_type, dtype)

    # ---- model and tokenizer
    model, tok, kind, attn, source = load_model(cfg, d, dtype)
    fmt = cfg.prompt_format
    if fmt == "auto":
        fmt = "chat_template" if tok.chat_template else "user_assistant"
    if fmt == "chat_template" and not tok.chat_template:
        raise common.ConfigError(f"prompt_format=chat_template but {cfg.model} has no chat template")
    if cfg.inject_mul_tokens and not has_mul_tokens(tok):
        raise common.ConfigError(f"inject_mul_tokens=true needs a tokenizer with multiplication tokens; {cfg.model}'s "
                                 f"has none (pretrain on mul_tokens data, or set inject_mul_tokens=false)")
    positions = (model.config.block_size if kind == "native" else getattr(model.config, "n_positions", None)
                 or getattr(model.config, "max_position_embeddings", None))
    if positions and cfg.max_length > positions:
        raise common.ConfigError(f"max_length {cfg.max_length} exceeds the {positions} positions of {cfg.model}")
    lora_targets = None
    if cfg.lora:
        model, lora_targets = add_lora(cfg, model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, kind)
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        model.to(d.device)

    # ---- data: the whole stream, fixed from the seed
    per_set, evals, counts = load_examples(cfg, tok, fmt, d.master)
    per_step = cfg.batch_size * cfg.grad_accum_steps * d.world_size
    examples, rows = make_rows(cfg, per_set, per_step)
    steps_in_data = len(rows) // per_step  # a last partial step is left out
    if cfg.max_steps:
        steps_in_data = min(steps_in_data, cfg.max_steps)
    max_steps = steps_in_data
    if max_steps <= 0:
        raise common.ConfigError(f"{len(rows)} rows make no full step of {per_step} rows (batch_size x "
                                 f"grad_accum_steps x world size); lower them or add data")
    used_rows = rows[:max_steps * per_step]
    used = [i for row in used_rows for i in row]
    completion_tokens = sum(sum(t != -100 for t in examples[i][1]) for i in used)
    budget = {"steps": max_steps, "examples": len(used), "tokens": sum(len(examples[i][0]) for i in used),
              "completion_tokens": completion_tokens, "rows": len(used_rows), "cut_examples": counts["cut"]}
    data_id = fingerprint(used_rows, examples)

    # ---- optimizer, and where to start
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2))
    start_step = 0
    if ckpt:
        if ckpt.get("data_fingerprint") != data_id:
            raise common.ConfigError(f"{ckpt['path']} was trained on another token stream (datasets, seed, max_length "
                                     f"or packing changed); resume with the same settings or use a new out_dir")
        _, unexpected = model.load_state_dict(ckpt["model"], strict=not cfg.lora)  # LoRA: the adapters only
        if unexpected:
            raise common.ConfigError(f"{ckpt['path']} does not fit this model ({unexpected[:3]})")
        optimizer.load_state_dict(ckpt["optimizer"])
        common.set_rng_state(ckpt["rng"])
        start_step = ckpt["step"] + 1
        if start_step >= max_steps and os.path.isfile(os.path.join(cfg.out_dir, "hf", "config.json")):
            if d.master:
                print(f"{ckpt['path']} is step {ckpt['step']}: the run already finished {max_steps} steps")
            return {"status": "already_finished", "step": ckpt["step"]}
        # a run stopped between its last checkpoint and its HF folder: the loop is empty, the folder is written
    raw_model = model
    model = common.wrap_model(model, d, cfg.compile)
    warmup_steps = int(cfg.warmup_ratio * max_steps)

    # ---- logging: config.json, log.jsonl/log.txt, TensorBoard, the run's metadata at step 0
    if ckpt and d.master:
        common.trim_log(cfg.out_dir, ckpt["step"])
    logger = common.Logger(cfg.out_dir, d.master, resume=ckpt is not None)
    n_total = sum(p.numel() for p in raw_model.parameters())
    n_trainable = sum(p.numel() for p in params)
    meta = {"type": "meta", "step": 0, "model": cfg.model, "model_kind": kind, "source": str(source),
            "total_params": n_total, "trainable_params": n_trainable, "trainable_ratio": n_trainable / n_total,
            "attn_implementation": attn, "device": f"{d.device} x{d.world_size}",
            "precision": str(dtype).replace("torch.", "") + (" autocast" if dtype != torch.float32 else ""),
            "prompt_format": fmt, "datasets": ",".join(cfg.datasets),
            "mixture_rates": ",".join(f"{r:g}" for r in (cfg.mixture_rates or [])) or "concatenated",
            "packing": cfg.packing, "lora_targets": ",".join(lora_targets or []),
            **{f"budget_{k}": v for k, v in budget.items()}}
    tb = None
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
        if not ckpt:
            logger.log(meta)
        if cfg.tensorboard:
            tb = open_tensorboard(cfg.out_dir, meta)
    if ckpt:
        logger.info(f"resumed from {ckpt['path']} at step {start_step}")

    def save(step):
        state = {"kind": "sft", "model": trainable_state(raw_model, cfg.lora), "step": step,
                 "model_config": {"model": cfg.model, "kind": kind, "lora": cfg.lora},
                 "config": common.config_dict(cfg), "optimizer": optimizer.state_dict(), "rng": common.rng_state(),
                 "data_fingerprint": data_id}
        return common.save_training_checkpoint(cfg.out_dir, step, state, d, cfg.save_total_limit)

    def train_step(step):
        """One optimizer step; returns (summed loss / completion tokens, grad norm, lr, completion tokens)."""
        pad_to = cfg.max_length - 1 if cfg.pad_to_max_length else 0
        micro_batches = [collate(step_rows(rows, step, m, cfg, d), examples, tok.pad_id, cfg.packing, pad_to)
                         for m in range(cfg.grad_accum_steps)]
        n_tokens = torch.tensor(float(sum((b[1] != -100).sum() for b in micro_batches)), device=d.device)
        n_global = common.all_reduce(n_tokens.clone(), "sum", d).clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=d.device)
        for m, (x, y, pos, doc) in enumerate(micro_batches):
            x, y, pos = x.to(d.device), y.to(d.device), pos.to(d.device)
            doc = doc.to(d.device) if doc is not None else None
            with model.no_sync() if d.ddp and m < cfg.grad_accum_steps - 1 else contextlib.nullcontext():
                with autocast:
                    loss = summed_loss(model, kind, x, y, pos, doc, attn)
                # DDP averages gradients over ranks: scale by world size so the sum over ranks / n_global remains
                (loss * d.world_size / n_global).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = common.lr_at(step, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, warmup_steps, max_steps,
                          cfg.lr_schedule)
        common.set_lr(optimizer, lr)
        optimizer.step()
        return common.all_reduce(loss_sum, "sum", d) / n_global, grad_norm, lr, n_global

    # ---- the loop
    watch = common.NonFiniteWatch(d.device)
    run_t0, t0, tokens_since = time.time(), time.time(), 0
    timed_tokens, timed_seconds = 0.0, 0.0
    train_loss = eval_losses = None
    status, step = "done", start_step - 1
    bar = common.progress(total=max_steps, initial=start_step, master=d.master, desc="sft", unit="step")
    for step in range(start_step, max_steps):
        last_step = step == max_steps - 1
        loss, grad_norm, lr, n_tok = train_step(step)
        watch.update(step, loss, grad_norm)
        tokens_since += n_tok
        bar.update(1)
        eval_now = last_step or (cfg.eval_interval > 0 and (step + 1) % cfg.eval_interval == 0)
        save_now = last_step or (cfg.save_interval > 0 and (step + 1) % cfg.save_interval == 0)
        user_stop = step == cfg.stop_after_step
        log_now = (step + 1) % cfg.log_interval == 0 or step == start_step or eval_now or save_now or user_stop
        signal_stop = stop.check(d, sync=log_now)
        if not (log_now or signal_stop):
            continue
        bad = watch.first_bad_step(d)
        if bad is not None:
            bar.close()
            raise common.TrainingDiverged(common.diverged_message(cfg.out_dir, bad))
        common.synchronize(d.device_type)
        seconds = time.time() - t0
        tok_s = float(tokens_since) / seconds
        if step != start_step:  # the first step pays for warm-up
            timed_tokens, timed_seconds = timed_tokens + float(tokens_since), timed_seconds + seconds
        train_loss = loss.item()
        record = {"type": "train", "step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                  "completion_tokens_per_sec": tok_s}
        if eval_now:
            eval_losses = {name: eval_loss(raw_model, kind, enc, cfg, d, tok.pad_id, attn, autocast)
                           for name, (enc, _) in evals.items() if enc}
            record.update({f"eval_loss_{n}": v for n, v in eval_losses.items()})
            if eval_losses:
                record["eval_loss"] = sum(eval_losses.values()) / len(eval_losses)
        logger.log(record, echo=False)
        if d.master:
            bar.write(common.format_record(record))
            if tb:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        tb.add_scalar(f"{'eval' if k.startswith('eval') else 'train'}/{k}", v, step)
        if save_now or user_stop or signal_stop:
            path = save(step)
        if (signal_stop or user_stop) and not last_step:
            status = "preempted" if signal_stop else "stopped"
            bar.close()
            logger.info(f"{'received ' + str(stop.signal) if signal_stop else 'stop_after_step'}: saved {path} at "
                        f"step {step}; exiting (continue with resume=latest)")
            break
        t0, tokens_since = time.time(), 0

    bar.close()
    results = {"status": status, "steps": step + 1, "final_train_loss": train_loss, "eval_loss": eval_losses,
               "completion_tokens_per_sec": timed_tokens / timed_seconds if timed_seconds else None,
               "seconds": time.time() - run_t0, "attn_implementation": attn, "prompt_format": fmt, **budget}
    if status == "done":
        folder = os.path.join(cfg.out_dir, "hf")
        if d.master:
            save_hf(cfg, raw_model, kind, tok, folder, {"source": source, "sft_config": common.config_dict(cfg),
                                                        "step": step, "eval_loss": eval_losses})
            logger.info(f"saved {folder}")
            results["hf_folder"] = folder
            if cfg.gen_eval and not (cfg.lora and not cfg.merge_lora):
                results["generation"] = generation_accuracy(cfg, folder, evals, fmt, tok, d, logger)
        common.barrier(d)
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
        common.plot_log_curves(cfg.out_dir, [("sft " + ",".join(cfg.datasets), "loss (nats/completion token)",
                                              [("train", "loss", "train"), ("train", "eval_loss", "eval")])])
        if tb:
            tb.close()
    return results


def open_tensorboard(out_dir, meta):
    """A SummaryWriter under out_dir/tb with the run's metadata at step 0 (scalars and a text table)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: tensorboard is not installed; logging to log.jsonl only", file=sys.stderr)
        return None
    tb = SummaryWriter(os.path.join(out_dir, "tb"))
    for k in ("budget_tokens", "budget_completion_tokens", "total_params", "trainable_params", "trainable_ratio"):
        tb.add_scalar(f"meta/{k}", meta[k], 0)
    tb.add_text("meta", "\n".join(f"    {k}: {v}" for k, v in meta.items()), 0)
    return tb


if __name__ == "__main__":
    common.run_main(main, expected=(common.TrainingDiverged,))

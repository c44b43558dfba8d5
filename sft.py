"""
Supervised fine-tuning in one file, nanochat chat_sft style: read it top to bottom.

    python sft.py configs/sft_demo.yaml                                  # one process: cuda, mps or cpu
    torchrun --nproc_per_node=4 sft.py configs/sft_gsm8k.yaml model=out/sft_tulu/hf
    python sft.py configs/sft_lora_qwen.yaml resume=latest              # continue exactly where it stopped
    python sft.py configs/sft_t5_small.yaml                              # an encoder-decoder model (T5, BART, Switch)
    python sft.py configs/lm_wikitext2.yaml                              # objective=lm: continued pretraining on text

Model in: a native checkpoint (ckpt_N.pt, a run folder, RUN/latest), a folder exported by export_hf.py (trained
as the native GPT, its own tokenizer), any HF causal LM, or an HF encoder-decoder (T5, BART, Switch; hub id or
folder). Which kind is read from the HF config before any weight is loaded; encoder-only models (BERT, RoBERTa)
are refused: they have no generation head. Model out: out_dir/hf, an HF folder (weights, tokenizer, generation
config) that eval_gsm8k.py and grpo.py load as they are (causal models). Without out_dir= the run folder is
out/<timestamp>_<experiment name> (run_name: model, datasets with their rates, objective, batch, max length).

Data: the registry of tasks/sft_sets.py (datasets=[gsm8k] or a mixture: datasets=[imdb,sst2]
mixture_rates=[0.7,0.3]). Each example is a chat; the user/system turns are the prompt and only the assistant
turns (and the EOS closing each) carry loss. How turns become text: the model's chat template when it has one,
else `User: ...\\nAssistant: ...` (what eval_gsm8k.py's zero-shot chat mode scores); prompt_format= overrides.
An example longer than max_length loses tokens from the left (its prompt first); such cuts are counted.
DialoGPT-style models (no chat template) get prompt_format=eos_turns: every turn's text closed by the EOS token.
Encoder-decoder models: the prompt, as plain text, is the encoder's input and the last reply (closed by EOS) the
decoder's labels; generation accuracy at the end through HF generate (engine.py is decoder-only).

objective=lm: plain causal-LM training (continued pretraining) on the text sets of tasks/text_sets.py. Documents,
each opened by the EOS token (the separator of prepare_data.py's shards), are joined into one stream and cut into
full rows of max_length tokens; inside a row each document piece attends only to itself with positions from 0
(as packed SFT examples), so a row's loss is the sum of its pieces' losses alone. Every token is a target; eval
logs the loss and bits per byte.

What happens in a step: grad_accum_steps micro batches of micro_batch_size rows per rank go through the model (bf16
autocast on cuda); the loss is the sum of the completion tokens' cross-entropies divided by the step's completion
token count over all ranks, so every completion token weighs the same however the rows are cut. Gradients are
clipped, AdamW steps at a warmup + cosine (or linear) learning rate. With packing=true the rows are filled with
whole examples back to back; attention never crosses an example (native GPT: model.py's doc_ids; HF models: a
block-diagonal mask, or flash-attn varlen through position ids on CUDA) and positions restart per example, so
the packed loss is the unpacked loss of the same examples.

The whole token stream (which example lands in which row of which step) is fixed before the first step from
the seed, so a checkpoint's data position is its step; resume=latest restores model, optimizer, step and RNG and
the resumed losses equal the uninterrupted run's. A longer run's stream begins with a shorter one's, so a larger
max_steps continues a run; another model, data or loss setting is refused naming the key (identity()).
SIGTERM / SIGUSR1 (SLURM preemption or time limit) only set a flag: at the next step boundary the run saves a
checkpoint and exits 0; from process start to exit (during start-up: exit 0 before the first step, nothing to save).
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import contextlib
import functools
import glob
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import engine as engine_lib
import model as model_lib
from tasks import sft_sets, text_sets
from tasks.chat import prompt_text, render_segments, stop_strings  # the one chat format (eval prompts too)


@dataclass
class Config:
    # model in
    model: str = ""                   # a native checkpoint / RUN/latest, an exported HF folder, an HF hub id or folder
    objective: str = "sft"            # sft: prompt/completion pairs (tasks/sft_sets.py) | lm: text (tasks/text_sets.py)
    tokenizer_file: str = ""          # GPT-2 ranks for native checkpoints offline (default: the run's, else tiktoken's)
    # data: registry names (tasks/sft_sets.py; objective=lm: tasks/text_sets.py), one local copy per dataset
    # ("" = the hub), mixture rates
    datasets: List[str] = field(default_factory=lambda: ["gsm8k"])  # registry names (objective=lm: text sets)
    dataset_configs: List[str] = field(default_factory=list)  # hub configs, one per dataset, as the seed types them
    data_paths: List[str] = field(default_factory=list)       # train split copies, one per dataset
    eval_data_paths: List[str] = field(default_factory=list)  # eval split copies, one per dataset
    mixture_rates: List[float] = field(default_factory=list)  # per-draw rates summing to 1; [] = concatenate
    dataset_options: dict = field(default_factory=dict)       # e.g. synthetic: {max_steps: 1, max_value: 20}
    max_samples: int = 0              # train examples (documents) per dataset (a seeded subset; 0 = all)
    eval_samples: int = 200           # eval examples (documents) per dataset (eval loss, generation accuracy; 0 = none)
    # auto (the chat template if the model has one; DialoGPT: eos_turns; encoder-decoder: plain; else
    # user_assistant) | chat_template | user_assistant | plain | eos_turns
    prompt_format: str = "auto"       # auto | chat_template | user_assistant | plain | eos_turns
    inject_mul_tokens: bool = False   # encode assistant replies with the multiplication tokens (mul_tokens condition)
    max_length: int = 1024            # tokens per example (and per packed row; encoder-decoder: per side)
    packing: bool = False             # (decoder-only models; objective=lm rows are always full)
    pad_to_max_length: bool = False   # unpacked rows padded to max_length, not to the batch's longest (fixed shapes)
    # optimisation: one step = micro_batch_size rows x grad_accum_steps x world size
    epochs: float = 1.0               # passes over the training stream (when max_steps is 0)
    max_steps: int = 0                # 0 = as many as `epochs` passes give
    micro_batch_size: int = 8         # rows per forward pass per rank
    grad_accum_steps: int = 1         # micro batches per optimizer step
    learning_rate: float = 2e-5       # peak learning rate (after warmup)
    min_lr_ratio: float = 0.0         # the schedule decays to learning_rate * min_lr_ratio
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup_ratio: float = 0.03        # linear warmup over this fraction of max_steps
    weight_decay: float = 0.0         # AdamW weight decay (matrices only)
    beta1: float = 0.9                # AdamW beta1
    beta2: float = 0.999              # AdamW beta2
    grad_clip: float = 1.0            # gradient norm clip
    seed: int = 1337                  # data order (subsets, mixture, holdout) and initialisation
    # LoRA (peft) and quantised loading (bitsandbytes, CUDA only)
    lora: bool = False                # train LoRA adapters (peft) instead of every weight
    lora_r: int = 16                  # LoRA rank
    lora_alpha: int = 32              # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05        # dropout on the LoRA branch
    lora_target_modules: List[str] = field(default_factory=list)  # [] = the architecture's defaults (engine.LORA_TARGETS)
    merge_lora: bool = True           # save the merged model (an ordinary HF folder); false: the adapter only
    load_in_4bit: bool = False        # 4-bit NF4 base weights (bitsandbytes, CUDA; needs lora=true)
    load_in_8bit: bool = False        # 8-bit base weights (bitsandbytes, CUDA; needs lora=true)
    # system
    device: str = "auto"              # auto | cuda | mps | cpu
    dtype: str = "auto"               # auto (bf16 autocast on cuda, else fp32) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto | flash_attention_2 | sdpa | eager (HF models)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    fsdp: bool = False                # shard weights, gradients and AdamW state over the torchrun ranks (FSDP2)
    cpu_offload: bool = False         # fsdp: keep the sharded weights, gradients and optimizer state in CPU memory
    estimate_memory: bool = False     # print the GB per GPU (weights / grads / optimizer / activations) and exit
    trust_remote_code: bool = False   # run the model repository's own code (DeepSeek-MoE, Arctic): an explicit opt-in
    compile: bool = False             # torch.compile on cuda
    # output, evaluation, checkpoints
    out_dir: str = ""                 # "" = out/<run_name(): timestamp, model, datasets, objective, batch, length>
    log_interval: int = 10            # steps between train-loss records
    eval_interval: int = 100          # steps between eval losses (0 = only at the end)
    ckpt_interval: int = 0            # steps between checkpoints (0 = only at the end)
    keep_last_k: int = 0              # keep the newest k checkpoints (0 = all)
    resume: Optional[str] = None      # latest | a checkpoint path
    stop_after_step: int = -1         # end this invocation after this step with a checkpoint, as if preempted
    load_best_model_at_end: bool = False  # the HF folder gets the weights of the lowest eval loss (out_dir/best.pt)
    gen_eval: bool = True             # generation accuracy on the eval split at the end (classification, math)
    gen_max_new_tokens: int = 256     # reply length limit of the generation accuracy
    gen_batch_size: int = 32          # prompts per generation batch
    tensorboard: bool = True          # also log to out_dir/tensorboard (tags <record type>/<key>)
    wandb_project: Optional[str] = None  # also log to this W&B project (wandb imported only when set)


PROMPT_FORMATS = ("auto", "chat_template", "user_assistant", "plain", "eos_turns")
OBJECTIVES = ("sft", "lm")


def check_config(cfg):
    """Mistakes that need no model or data to spot."""
    if not cfg.model:
        raise common.ConfigError("model= is required (a native checkpoint, RUN/latest, an HF folder or hub id)")
    if cfg.objective not in OBJECTIVES:
        raise common.ConfigError(f"objective '{cfg.objective}' is not one of {', '.join(OBJECTIVES)}")
    registry = text_sets if cfg.objective == "lm" else sft_sets
    if cfg.dataset_configs and len(cfg.dataset_configs) != len(cfg.datasets):
        raise common.ConfigError(f"dataset_configs needs one entry per dataset ({len(cfg.datasets)}), "
                                 f"got {len(cfg.dataset_configs)}")
    if cfg.objective == "sft":  # hub ids and configs as the seed types them -> registry names
        configs = cfg.dataset_configs or [None] * len(cfg.datasets)
        cfg.datasets = [sft_sets.registry_name(n, c) for n, c in zip(cfg.datasets, configs)]
    for name in cfg.datasets:
        registry.get_set(name)  # an unknown name lists the registry
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
    for key in ("max_length", "micro_batch_size", "grad_accum_steps", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise common.ConfigError(f"config key '{key}' must be positive, got {getattr(cfg, key)}")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not torch.cuda.is_available():
        raise common.ConfigError("load_in_4bit / load_in_8bit need CUDA (bitsandbytes quantises on the GPU)")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise common.ConfigError("choose load_in_4bit or load_in_8bit, not both")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.lora:
        raise common.ConfigError("a quantised model trains only through LoRA adapters: set lora=true")
    if cfg.cpu_offload and not cfg.fsdp:
        raise common.ConfigError("cpu_offload=true offloads FSDP's shards: set fsdp=true too")
    if cfg.load_best_model_at_end and (cfg.fsdp or cfg.eval_samples == 0):
        raise common.ConfigError("load_best_model_at_end=true keeps the weights of the best eval loss: it needs "
                                 "eval_samples > 0 and fsdp=false")
    if cfg.fsdp and (cfg.load_in_4bit or cfg.load_in_8bit):
        raise common.ConfigError("fsdp=true shards full-precision weights; a 4/8-bit model trains with DDP (fsdp=false)")


# -----------------------------------------------------------------------------
# examples -> token ids with a completion mask


def encode_example(messages, fmt, tok, max_length):
    """-> (ids, target mask, cut): the mask is True on the tokens that carry loss (replies and their EOS).
    Longer than max_length: the tokens on the left go (the prompt first) and `cut` says so."""
    ids, target = [], []
    for text, is_reply in render_segments(messages, fmt, tok):
        piece = tok.encode_reply(text) if is_reply else tok.encode(text, first=not ids)
        if fmt == "eos_turns" or (is_reply and fmt != "chat_template"):
            piece = piece + [tok.eos_id]
        ids += piece
        target += [is_reply] * len(piece)
    cut = len(ids) > max_length
    if cut:
        ids, target = ids[-max_length:], target[-max_length:]
    return ids, target, cut


def last_reply(messages):
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def prompt_ids(messages, fmt, tok):
    """The prompt a model continues to answer the chat's last reply (generation accuracy)."""
    head = messages[:last_reply(messages)]
    if fmt == "chat_template":
        return tok.encode(tok.tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True))
    if fmt == "eos_turns":
        return [t for i, m in enumerate(head) for t in tok.encode(m["content"].strip(), first=i == 0) + [tok.eos_id]]
    return tok.encode(prompt_text(head, fmt, tok), first=True)


def encode_seq2seq(messages, fmt, tok, max_length, start_id):
    """An encoder-decoder example -> ((encoder ids, labels, decoder inputs), cut). The turns before the last reply,
    as text, are the encoder's input; the last reply is the decoder's labels, always closed by EOS. The tokenizer
    adds the special tokens its model was pretrained with (T5: </s> closing each side; BART: <s> ... </s>). The
    decoder's inputs are the labels shifted right behind the decoder start token. Longer than max_length: the
    prompt loses its left end, the reply its right end; such cuts are counted."""
    i = last_reply(messages)
    source = tok.encode(prompt_text(messages[:i], fmt, tok), first=True)
    labels = tok.encode(messages[i]["content"].strip(), first=True)
    if not labels or labels[-1] != tok.eos_id:
        labels = labels + [tok.eos_id]
    cut = len(source) > max_length or len(labels) > max_length
    source, labels = source[-max_length:], labels[:max_length]
    return (source, labels, [start_id] + labels[:-1]), cut


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


def pad_right(seqs, value):
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for b, seq in enumerate(seqs):
        out[b, :len(seq)] = torch.as_tensor(seq)
    return out


def collate_seq2seq(rows, examples, pad_id):
    """Encoder-decoder rows (one example each) -> encoder ids, labels (-100 on padding), decoder inputs and the
    encoder's attention mask, each side padded on the right to its longest."""
    sources, labels, decoder_inputs = zip(*(examples[row[0]] for row in rows))
    mask = pad_right([[1] * len(src) for src in sources], 0)
    return pad_right(sources, pad_id), pad_right(labels, -100), pad_right(decoder_inputs, pad_id), mask


def collate_batch(kind, rows, examples, pad_id, packing, length=0):
    """One micro batch, inputs and targets first: causal (x, y, position ids, doc ids) or encoder-decoder
    (x, y, decoder inputs, encoder mask)."""
    if kind == "seq2seq":
        return collate_seq2seq(rows, examples, pad_id)
    return collate(rows, examples, pad_id, packing, length)


# objective=lm: documents -> one token stream -> full rows


def encode_document(text, tok):
    """A document of the LM stream: the EOS token that separates it from the one before (as in prepare_data.py's
    shards), then its tokens."""
    return np.array([tok.eos_id] + tok.encode(text), dtype=np.int32)


def pack_documents(docs, max_length, eos_id, keep_tail=False):
    """The documents back to back, closed by one more EOS, cut into rows of max_length inputs whose targets are
    the next tokens (rows overlap by one token, as train_gpt.py's windows: every token but the first is a target
    exactly once). A row's document pieces are its examples, so collate with packing keeps attention inside each
    piece and restarts its positions. The last partial row is left out unless keep_tail (eval: every token scored).
    -> (examples [(x, y)], rows [[example indices]])."""
    if not docs:
        return [], []
    stream = np.concatenate(list(docs) + [np.array([eos_id], dtype=np.int32)])
    starts = np.cumsum([0] + [len(doc) for doc in docs[:-1]])  # where each document's EOS sits
    n_inputs = len(stream) - 1
    n_rows = n_inputs // max_length + int(keep_tail and n_inputs % max_length > 0)
    examples, rows = [], []
    for r in range(n_rows):
        a, b = r * max_length, min((r + 1) * max_length, n_inputs)
        inside = starts[np.searchsorted(starts, a, "right"):np.searchsorted(starts, b, "left")]
        cuts = [a, *inside.tolist(), b]
        rows.append(list(range(len(examples), len(examples) + len(cuts) - 1)))
        examples += [(stream[i:j], stream[i + 1:j + 1]) for i, j in zip(cuts, cuts[1:])]
    return examples, rows


def summed_loss(model, kind, x, y, pos, doc, attn, router_aux=False):
    """Sum of the cross-entropies of the targets that are not -100 (the caller divides by their count). An MoE
    that returns its router's load-balancing loss (Mixtral, Qwen-MoE) adds it as transformers does, coefficient
    times the loss on top of the mean cross-entropy (so times the target count in this sum), when router_aux."""
    if kind == "native":
        return model(x, y, position_ids=pos, doc_ids=doc, loss_reduction="sum")[1]
    kwargs = {}
    if doc is not None and attn != "flash_attention_2":  # flash-attn 2 finds the documents from the position ids
        allowed = model_lib.packed_causal_mask(doc)  # SDPA takes the boolean mask; eager wants it additive
        kwargs["attention_mask"] = allowed if attn != "eager" else torch.zeros(
            allowed.shape, device=x.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = model(input_ids=x, position_ids=pos, use_cache=False, **kwargs)
    loss = summed_cross_entropy(out.logits, y)
    if router_aux and getattr(out, "aux_loss", None) is not None:
        coef = getattr(getattr(model, "module", model).config, "router_aux_loss_coef", 0.0)  # DDP wraps the model
        loss = loss + coef * out.aux_loss * (y != -100).sum()
    return loss


def summed_cross_entropy(logits, y):
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")


def batch_loss(model, kind, batch, attn, router_aux=False):
    """summed_loss of a collate_batch batch; encoder-decoder: the labels' cross-entropies, teacher-forced."""
    if kind == "seq2seq":
        x, y, decoder_x, mask = batch
        logits = model(input_ids=x, attention_mask=mask, decoder_input_ids=decoder_x, use_cache=False).logits
        return summed_cross_entropy(logits, y)
    return summed_loss(model, kind, *batch, attn, router_aux)


# -----------------------------------------------------------------------------
# data: every set's train and eval examples, the mixture stream, the rows of each step


def encode_chat(messages, fmt, tok, max_length, kind, start_id):
    """One registry example -> (training example, cut): (x, y) for causal models, (encoder ids, labels, decoder
    inputs) for encoder-decoders."""
    if kind == "seq2seq":
        return encode_seq2seq(messages, fmt, tok, max_length, start_id)
    ids, target, cut = encode_example(messages, fmt, tok, max_length)
    return example_pairs(ids, target), cut


def load_examples(cfg, tok, fmt, kind, start_id, master):
    """-> each set's encoded train examples, eval sets {name: (encoded, raw examples)}, counts."""
    per_set, evals, counts = [], {}, {"cut": 0, "examples": 0}
    for k, name in enumerate(cfg.datasets):
        entry = sft_sets.get_set(name)
        sft_sets.check_labels(entry, tok.encode_reply)
        path = cfg.data_paths[k] if cfg.data_paths else ""
        eval_path = cfg.eval_data_paths[k] if cfg.eval_data_paths else (path if entry.eval_split is None else "")
        train = sft_sets.load_split(name, "train", path, cfg.max_samples, cfg.seed, cfg.dataset_options)
        held = sft_sets.load_split(name, "eval", eval_path, cfg.eval_samples, cfg.seed,
                                   cfg.dataset_options) if cfg.eval_samples > 0 else []
        if not train:
            raise common.ConfigError(f"dataset '{name}' has no train examples ({path or 'the hub copy'}"
                                     f"{', after its eval holdout' if entry.eval_split is None else ''})")
        encoded = []
        for ex in train:
            example, cut = encode_chat(ex["messages"], fmt, tok, cfg.max_length, kind, start_id)
            counts["cut"] += cut
            encoded.append(example)
        per_set.append(encoded)
        evals[name] = ([encode_chat(ex["messages"], fmt, tok, cfg.max_length, kind, start_id)[0] for ex in held], held)
        if master:
            print(f"dataset {name}: {len(train)} train / {len(held)} eval examples", flush=True)
    counts["examples"] = sum(len(s) for s in per_set)
    return per_set, evals, counts


def load_documents(cfg, tok, master):
    """objective=lm: each text set's train documents as token arrays (encode_document), and its eval documents
    packed whole into pieces {name: (pieces, UTF-8 bytes of their text)} (bits per byte)."""
    per_set, evals = [], {}
    for k, name in enumerate(cfg.datasets):
        path = cfg.data_paths[k] if cfg.data_paths else ""
        eval_path = cfg.eval_data_paths[k] if cfg.eval_data_paths else ""
        train, held = text_sets.load_documents(name, path, eval_path, cfg.max_samples, cfg.eval_samples, cfg.seed)
        if not train:
            raise common.ConfigError(f"text dataset '{name}' has no train documents ({path or 'the hub copy'})")
        per_set.append([encode_document(text, tok) for text in train])
        pieces, _ = pack_documents([encode_document(text, tok) for text in held], cfg.max_length, tok.eos_id,
                                   keep_tail=True)
        evals[name] = (pieces, sum(len(text.encode("utf-8")) for text in held))
        if master:
            print(f"text dataset {name}: {len(train)} train documents ({sum(map(len, per_set[-1]))} tokens) / "
                  f"{len(held)} eval documents", flush=True)
    return per_set, evals


def bits_per_byte(mean_loss, pieces, n_bytes):
    """Mean nats per target token -> bits per UTF-8 byte of the text (EOS targets count no bytes)."""
    return mean_loss * sum(len(y) for _, y in pieces) / math.log(2) / max(1, n_bytes)


def make_rows(cfg, per_set, per_step, arrange):
    """The training stream (mixture draws, `epochs` passes, or as many as max_steps needs) and its rows:
    arrange(items in stream order) -> (examples, rows)."""
    rates = sft_sets.check_rates(cfg.datasets, cfg.mixture_rates)
    n_draws = max(1, math.ceil(cfg.epochs * sum(len(s) for s in per_set)))
    while True:
        stream = sft_sets.Mixture([len(s) for s in per_set], rates, cfg.seed).stream(n_draws)
        examples, rows = arrange([per_set[k][i] for k, i in stream])
        if not cfg.max_steps or len(rows) >= cfg.max_steps * per_step:
            return examples, rows
        n_draws *= 2


def step_rows(rows, step, micro, cfg, d):
    """The rows of one micro batch of one rank: step blocks of batch*accum*world rows, rank r every world-th."""
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * d.world_size
    mine = rows[step * per_step:(step + 1) * per_step][d.rank::d.world_size]
    return mine[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]


@torch.no_grad()
def eval_loss(model, kind, encoded, cfg, d, pad_id, attn, autocast):
    """Mean completion-token loss over the eval examples (each rank its share, summed over ranks; under FSDP every
    rank scores every example, since each forward is a collective the ranks must all call)."""
    model.eval()
    total = torch.zeros(2, device=d.device)
    mine = list(range(len(encoded)))[slice(None) if cfg.fsdp else slice(d.rank, None, d.world_size)]
    for start in range(0, len(mine), cfg.micro_batch_size):
        rows = [[i] for i in mine[start:start + cfg.micro_batch_size]]
        batch = [t.to(d.device) if t is not None else None for t in collate_batch(kind, rows, encoded, pad_id, False)]
        with autocast:
            total[0] += batch_loss(model, kind, batch, attn).float()
        total[1] += (batch[1] != -100).sum()
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


def keep_if_best(out_dir, model, lora, step, loss):
    """out_dir/best.pt: the trained weights of the lowest eval loss so far (it survives a resume)."""
    path = os.path.join(out_dir, "best.pt")
    if os.path.isfile(path) and common.load_checkpoint(path)["eval_loss"] <= loss:
        return
    common.save_checkpoint(path, {"kind": "sft_best", "model": trainable_state(model, lora), "model_config": {},
                                  "step": step, "eval_loss": loss})


def memory_estimate(cfg, model, kind, d):
    """GB per GPU of this run under DDP and FSDP (common.estimate_memory); printed with estimate_memory=true, and
    a run that obviously cannot fit its GPU is a one-line error before it starts."""
    config = model.config if kind == "native" else (model.get_base_model().config if cfg.lora else model.config)
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0)  # noqa: E731
    shape = dict(n_params=sum(p.numel() for p in model.parameters()),
                 n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 n_layer=get("n_layer", "num_hidden_layers", "num_layers"), d_model=get("n_embd", "hidden_size", "d_model"),
                 vocab_size=get("vocab_size"), micro_batch_size=cfg.micro_batch_size, seq_len=cfg.max_length,
                 world_size=d.world_size, weight_bytes=0.5 if cfg.load_in_4bit else 1 if cfg.load_in_8bit else 4,
                 activation_checkpointing=cfg.gradient_checkpointing)
    modes = {"ddp": common.estimate_memory(**shape),
             "fsdp": common.estimate_memory(**shape, fsdp=True, cpu_offload=cfg.cpu_offload)}
    if cfg.estimate_memory and d.master:
        print(f"estimated GB per GPU, {shape['n_params'] / 1e6:.1f}M params ({shape['n_trainable'] / 1e6:.1f}M "
              f"trained), {d.world_size} rank(s), micro batch {cfg.micro_batch_size} x {cfg.max_length} tokens:")
        for mode, gb in modes.items():
            print(f"  {mode:5s} " + " | ".join(f"{k} {v:.2f}" for k, v in gb.items()))
    if not cfg.estimate_memory:
        common.check_memory_fits(modes["fsdp" if cfg.fsdp else "ddp"], d.device_type)
    return modes


def unsharded_copy(cfg, model, kind, full_state):
    """Rank 0: the FSDP-trained model as an ordinary module on CPU (for the HF folder and its LoRA merge), built
    on the meta device and given the gathered weights."""
    from transformers import AutoModelForCausalLM
    config = model.get_base_model().config if cfg.lora else model.config
    with torch.device("meta"):
        plain = model_lib.GPT(config) if kind == "native" else AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.trust_remote_code)
        if cfg.lora:
            plain, _ = engine_lib.add_lora(plain, **lora_settings(cfg))
    plain.load_state_dict(full_state, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    return plain


def adapter_only(cfg):
    """out_dir/hf holds the LoRA adapter, not a whole model: merge_lora=false, or a 4/8-bit base (a merge into
    quantised weights would lose the adapter's precision)."""
    return cfg.lora and (not cfg.merge_lora or cfg.load_in_4bit or cfg.load_in_8bit)


def save_hf(cfg, model, kind, tok, folder, info):
    """out_dir/hf: native GPT -> model.save_hf_folder; HF -> save_pretrained + tokenizer + generation config."""
    import shutil
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora and not adapter_only(cfg):
        model = model.merge_and_unload()
    elif cfg.lora:
        info["note"] = "LoRA adapter only (merge_lora=false or a quantised base): load it with peft on " + cfg.model
    if isinstance(tok, engine_lib.NativeTokenizer) and kind == "native":
        model_lib.save_hf_folder(model, tok.tok, tmp, {**info, "tokenizer": tok.tok.spec})
    elif isinstance(tok, engine_lib.NativeTokenizer) and not adapter_only(cfg):  # merged LoRA on a native model
        model_lib.save_hf_folder(model_lib.from_hf(model), tok.tok, tmp, {**info, "tokenizer": tok.tok.spec})
    else:
        from transformers import GenerationConfig
        model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(tok, engine_lib.NativeTokenizer):
            common.hf_tokenizer(tok.tok, cfg.max_length).save_pretrained(tmp)
        else:
            tok.tok.save_pretrained(tmp)
        if not adapter_only(cfg):
            gen = getattr(model, "generation_config", None) or GenerationConfig()
            gen.eos_token_id, gen.pad_token_id = tok.eos_id, tok.pad_id
            gen.save_pretrained(tmp)
        common.atomic_write_json(os.path.join(tmp, "export_info.json"), info)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def engine_replies(cfg, folder, fmt, tok, d):
    """Greedy replies of the saved causal model through engine.py: a function raw examples -> reply texts."""
    lm = engine_lib.load_model(folder, device=d.device, dtype=common.resolve_dtype(cfg.dtype, d.device))
    gen = engine_lib.Engine(lm, batch_size=cfg.gen_batch_size)
    room = (lm.max_positions or 10**9) - cfg.gen_max_new_tokens  # long prompts lose their left end

    def replies(raw):
        prompts = [prompt_ids(ex["messages"], fmt, tok) for ex in raw]
        prompts = [p[-room:] if room > 0 else p for p in prompts]
        outs = gen.generate(prompts, cfg.gen_max_new_tokens, temperature=0.0, stop=stop_strings(fmt))
        return [o[0].text for o in outs]
    return replies


def seq2seq_replies(cfg, folder, fmt, tok, d):
    """Greedy replies of the saved encoder-decoder through HF generate (engine.py's KV cache is decoder-only)."""
    lm = engine_lib.load_model(folder, device=d.device).model

    @torch.no_grad()
    def replies(raw):
        texts = []
        for start in range(0, len(raw), cfg.gen_batch_size):
            sources = [encode_seq2seq(ex["messages"], fmt, tok, cfg.max_length, 0)[0][0]
                       for ex in raw[start:start + cfg.gen_batch_size]]
            mask = pad_right([[1] * len(src) for src in sources], 0).to(d.device)
            out = lm.generate(input_ids=pad_right(sources, tok.pad_id).to(d.device), attention_mask=mask,
                              max_new_tokens=cfg.gen_max_new_tokens, do_sample=False, num_beams=1)
            texts += tok.tok.batch_decode(out, skip_special_tokens=True)
        return texts
    return replies


def generation_accuracy(replies, evals, logger):
    """Greedy replies (engine_replies / seq2seq_replies) on each scored eval set; the label word (or the number)
    parsed from each reply; unparseable replies count as wrong and are counted."""
    results = {}
    for name, (_, raw) in evals.items():
        entry = sft_sets.get_set(name)
        if not entry.scoring or not raw:
            continue
        texts = replies(raw)
        scored = [sft_sets.score_generation(entry, ex, text) for ex, text in zip(raw, texts)]
        n = len(scored)
        results[name] = {"accuracy": sum(s["correct"] for s in scored) / n, "n": n,
                         "unparseable": sum(not s["parsed"] for s in scored),
                         "examples": [{"reply": text[:200], **s} for text, s in zip(texts[:5], scored[:5])]}
        logger.log({"type": "gen_eval", "step": -1, "dataset": name, "accuracy": results[name]["accuracy"], "n": n,
                    "unparseable": results[name]["unparseable"]})
    return results


# -----------------------------------------------------------------------------
# the run


# the seed pipeline's experiment names: what each dataset is for, from its label words (else its scoring)
TASK_WORDS = [({"positive", "bullish"}, "sentiment"), ({"acceptable"}, "grammar"),
              ({"equivalent", "duplicate"}, "paraphrase"), ({"entailment"}, "nli"), ({"A"}, "choice")]
STAMP_FORMAT, STAMP_RE = "%Y-%m-%d_%Hh%Mm%Ss", re.compile(r"^\d{4}-\d\d-\d\d_\d\dh\d\dm\d\ds_")


def task_word(cfg, name):
    entry = sft_sets.get_set(name)
    words = [task for labels, task in TASK_WORDS if labels & set(entry.labels)]
    return words[0] if words else {"number": "math", "label": "classification"}.get(
        entry.scoring, "chat" if entry.messages else "qa")


def run_name(cfg, world_size):
    """The experiment name, as the seed's users know it: model, datasets (a mixture with its rates in percent:
    mix_imdb-sentiment-70_sst2-sentiment-30), objective, batch, max length, then _accN, _lora, _multigpu when they
    apply; e.g. gpt2_mix_imdb-sentiment-70_sst2-sentiment-30_sft_bs8_len256. The run folder adds a timestamp."""
    path = cfg.model.rstrip("/")
    while os.path.basename(path) in ("latest", "hf") or path.endswith(".pt"):  # RUN/latest, RUN/hf, RUN/ckpt_N.pt
        path = os.path.dirname(path)
    model = os.path.basename(path) or "model"
    sets = [name if cfg.objective == "lm" else f"{name}-{task_word(cfg, name)}" for name in cfg.datasets]
    if cfg.mixture_rates:
        data = "mix_" + "_".join(f"{s}-{100 * r:.4g}" for s, r in zip(sets, cfg.mixture_rates))
    else:
        data = ("cat_" if len(sets) > 1 else "") + "_".join(sets)
    name = f"{model}_{data}_{cfg.objective}_bs{cfg.micro_batch_size}_len{cfg.max_length}"
    name += (f"_acc{cfg.grad_accum_steps}" if cfg.grad_accum_steps > 1 else "") + ("_lora" if cfg.lora else "")
    name += "_multigpu" if world_size > 1 else ""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", name)


def resolve_out_dir(cfg, d):
    """out_dir as given, else out/<timestamp>_<run_name> (the timestamp rank 0's, so that every rank agrees). With
    resume=latest: the newest such folder of the same run name, if there is one."""
    if cfg.out_dir:
        return cfg.out_dir
    name = run_name(cfg, d.world_size)
    if cfg.resume == "latest":
        earlier = sorted(p for p in glob.glob(os.path.join("out", f"*_{name}"))
                         if STAMP_RE.sub("", os.path.basename(p), count=1) == name)
        if earlier:
            return earlier[-1]
    now = common.all_reduce(torch.tensor(int(time.time()) if d.master else 0, device=d.device), "max", d)
    return os.path.join("out", f"{time.strftime(STAMP_FORMAT, time.localtime(int(now)))}_{name}")


def main(argv=None):
    cfg = common.load_config(Config, argv)
    check_config(cfg)
    d = common.setup_dist(cfg.device)
    try:
        cfg.out_dir = resolve_out_dir(cfg, d)
        with common.preemption_handlers() as stop:
            return train(cfg, d, stop)
    finally:
        common.cleanup_dist(d)


def resolve_format(cfg, tok, kind):
    """prompt_format=auto: the chat template when the tokenizer has one; DialoGPT (no template: its turns are
    joined by EOS) eos_turns; encoder-decoders plain text (the seed's '...\nSentiment:' -> 'positive');
    else user_assistant. Formats that cannot work with the model are refused."""
    fmt = cfg.prompt_format
    if fmt == "auto":
        fmt = ("plain" if kind == "seq2seq" else "chat_template" if tok.chat_template else
               "eos_turns" if "dialogpt" in cfg.model.lower() else "user_assistant")
    if fmt == "chat_template" and (kind == "seq2seq" or not tok.chat_template):
        raise common.ConfigError(f"prompt_format=chat_template but {cfg.model} has no chat template for its prompts")
    if fmt == "eos_turns" and kind == "seq2seq":
        raise common.ConfigError("prompt_format=eos_turns is for decoder-only chat models; an encoder-decoder reads "
                                 "the prompt as plain text (plain or user_assistant)")
    return fmt


# what defines a run besides its base model and data files: a resume that changes one is refused naming it. The
# rest (max_steps, epochs, the lr and its schedule, intervals, eval settings) may change: the token stream of a
# longer run begins with a shorter one's, so a larger max_steps continues the run
IDENTITY_KEYS = ("objective", "datasets", "dataset_options", "mixture_rates", "max_samples", "seed", "prompt_format",
                 "inject_mul_tokens", "max_length", "packing", "lora", "lora_r", "lora_alpha", "lora_target_modules")


def identity(cfg, world_size):
    """The run's identity: IDENTITY_KEYS, the base model (a path however spelled), the content of the local data
    copies (objective=lm: also whether eval has copies of its own, which decides the train holdout), and the rows
    of a step (a checkpoint's data position is its step)."""
    data = [common.fingerprint(p) if p else "" for p in cfg.data_paths]
    if cfg.objective == "lm":
        data.append(f"own eval copies: {bool(cfg.eval_data_paths)}")
    return common.run_identity(cfg, IDENTITY_KEYS, model=os.path.normpath(cfg.model), data=data,
                               rows_per_step=cfg.micro_batch_size * cfg.grad_accum_steps * world_size)


def lora_settings(cfg):
    """engine.add_lora's settings from the config, or None without lora=true."""
    return {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules} if cfg.lora else None


def setup_model(cfg, d, dtype):
    """The model to train, through engine.load_model -> (LoadedModel, prompt format, attention kernel). What kind
    of model it is is read from its config first, so a mismatch is refused before any weight is loaded."""
    if cfg.trust_remote_code and d.master:
        print(f"trust_remote_code=true: running the Python code that ships with {cfg.model}", file=sys.stderr)
    kind = engine_lib.model_kind(cfg.model, cfg.trust_remote_code, exported_as_native=True)
    if kind == "seq2seq" and cfg.packing:
        raise common.ConfigError(f"packing=true is for decoder-only models; {cfg.model} is an encoder-decoder (each "
                                 f"row holds one prompt and its reply): set packing=false")
    if kind == "seq2seq" and cfg.objective == "lm":
        raise common.ConfigError(f"objective=lm trains a causal LM on plain text; {cfg.model} is an encoder-decoder")
    quantize = "4bit" if cfg.load_in_4bit else "8bit" if cfg.load_in_8bit else ""
    # fp32 master weights (autocast runs the forward pass in `dtype`)
    lm = engine_lib.load_model(cfg.model, cfg.tokenizer_file, d.device, torch.float32, train=True,
                               lora=lora_settings(cfg), attn_implementation=cfg.attn_implementation,
                               quantize=quantize, trust_remote_code=cfg.trust_remote_code,
                               inject_mul_tokens=cfg.inject_mul_tokens,
                               gradient_checkpointing=cfg.gradient_checkpointing)
    if lm.tok.eos_id is None:
        raise common.ConfigError(f"{cfg.model}'s tokenizer has no EOS token: replies could never end")
    fmt = resolve_format(cfg, lm.tok, lm.kind) if cfg.objective == "sft" else "text"
    if cfg.inject_mul_tokens and not lm.tok.has_mul_tokens:
        raise common.ConfigError(f"inject_mul_tokens=true needs a tokenizer with multiplication tokens; {cfg.model}'s "
                                 f"has none (pretrain on mul_tokens data, or set inject_mul_tokens=false)")
    if lm.max_positions and cfg.max_length > lm.max_positions:
        raise common.ConfigError(f"max_length {cfg.max_length} exceeds the {lm.max_positions} positions of {cfg.model}")
    attn = lm.attn
    if lm.kind == "native":  # model.attention's dispatch
        fast = d.device_type == "cuda" and model_lib.flash_attn_func and dtype != torch.float32
        attn = "flash_attn (varlen when packing)" if fast else "sdpa"
    return lm, fmt, attn


def build_data(cfg, lm, fmt, d):
    """The whole stream of training rows, fixed from the seed -> (examples, rows, evals, max_steps, budget)."""
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * d.world_size
    if cfg.objective == "lm":
        per_set, evals = load_documents(cfg, lm.tok, d.master)
        counts = {"cut": 0}
        examples, rows = make_rows(cfg, per_set, per_step, functools.partial(
            pack_documents, max_length=cfg.max_length, eos_id=lm.tok.eos_id))
    else:
        start_id = getattr(lm.model.config, "decoder_start_token_id", None) if lm.kind == "seq2seq" else None
        if lm.kind == "seq2seq" and start_id is None:
            raise common.ConfigError(f"{cfg.model}'s config has no decoder_start_token_id: its decoder cannot start")
        per_set, evals, counts = load_examples(cfg, lm.tok, fmt, lm.kind, start_id, d.master)
        examples, rows = make_rows(cfg, per_set, per_step,
                                   lambda items: (items, build_rows(items, cfg.max_length, cfg.packing)))
    max_steps = len(rows) // per_step  # a last partial step is left out
    if cfg.max_steps:
        max_steps = min(max_steps, cfg.max_steps)
    if max_steps <= 0:
        raise common.ConfigError(f"{len(rows)} rows make no full step of {per_step} rows (micro_batch_size x "
                                 f"grad_accum_steps x world size); lower them or add data")
    used_rows = rows[:max_steps * per_step]
    used = [i for row in used_rows for i in row]
    completion_tokens = sum(int(np.count_nonzero(np.asarray(examples[i][1]) != -100)) for i in used)
    budget = {"steps": max_steps, "examples": len(used), "tokens": sum(len(examples[i][0]) for i in used),
              "completion_tokens": completion_tokens, "rows": len(used_rows), "cut_examples": counts["cut"]}
    return examples, rows, evals, max_steps, budget


def make_optimizer(cfg, model):
    """AdamW over the trainable parameters (weight decay on matrices only) -> (optimizer, those parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2))
    return optimizer, params


def resume_from(ckpt, cfg, model, optimizer, d):
    """Load a checkpoint's weights, optimizer and RNG -> the step to start at (0 without one)."""
    if not ckpt:
        return 0
    if ckpt.get("sharded"):  # torch.distributed.checkpoint: re-cut for this world size, or whole
        common.load_sharded_checkpoint(ckpt["path"], model, optimizer, d.rank)
    elif cfg.fsdp:
        raise common.ConfigError(f"{ckpt['path']} is a single-file checkpoint of a run without fsdp: resume it with "
                                 "fsdp=false (a sharded run writes and resumes ckpt_*.dcp folders)")
    else:
        _, unexpected = model.load_state_dict(ckpt["model"], strict=not cfg.lora)  # LoRA: the adapters only
        if unexpected:
            raise common.ConfigError(f"{ckpt['path']} does not fit this model ({unexpected[:3]})")
        optimizer.load_state_dict(ckpt["optimizer"])
        common.set_rng_state(ckpt["rng"])
    return ckpt["step"] + 1


def run_meta(cfg, d, lm, attn, fmt, params, dtype, budget):
    """The run's step-0 record: the model, its trainable share, the kernels, the data and the budget."""
    n_total = sum(p.numel() for p in lm.model.parameters())
    n_trainable = sum(p.numel() for p in params)
    return {"type": "meta", "step": 0, "model": cfg.model, "model_kind": lm.kind, "source": str(lm.info),
            "total_params": n_total, "trainable_params": n_trainable, "trainable_ratio": n_trainable / n_total,
            "attn_implementation": attn, "device": f"{d.device} x{d.world_size}",
            "precision": str(dtype).replace("torch.", "") + (" autocast" if dtype != torch.float32 else ""),
            "prompt_format": fmt, "datasets": ",".join(cfg.datasets),
            "mixture_rates": ",".join(f"{r:g}" for r in (cfg.mixture_rates or [])) or "concatenated",
            "packing": cfg.packing or cfg.objective == "lm", "lora_targets": ",".join(lm.lora_targets or []),
            **{f"budget_{k}": v for k, v in budget.items()}}


def save_checkpoint(cfg, d, step, model, optimizer, kind, run_identity):
    """ckpt_<step>.pt (the trainable weights, optimizer, RNG), or under fsdp a ckpt_<step>.dcp folder of shards."""
    about = {"kind": "sft", "model_config": {"model": cfg.model, "kind": kind, "lora": cfg.lora},
             "config": common.config_dict(cfg), "identity": run_identity}
    if cfg.fsdp:  # every rank writes its shards
        return common.save_sharded_checkpoint(cfg.out_dir, step, model, optimizer, about, d, cfg.keep_last_k)
    state = {**about, "model": trainable_state(model, cfg.lora), "step": step,
             "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
    return common.save_training_checkpoint(cfg.out_dir, step, state, d, cfg.keep_last_k)


def step_batches(cfg, d, rows, examples, step, kind, pad_id):
    """This rank's grad_accum_steps micro batches of one optimizer step."""
    pad_to = cfg.max_length - 1 if cfg.pad_to_max_length else 0
    packed = cfg.packing or cfg.objective == "lm"  # lm rows hold document pieces: collated as packed examples
    return [collate_batch(kind, step_rows(rows, step, m, cfg, d), examples, pad_id, packed, pad_to)
            for m in range(cfg.grad_accum_steps)]


def train_step(cfg, d, model, optimizer, params, micro_batches, lr, kind, attn, autocast):
    """One optimizer step -> (summed loss / completion tokens over all ranks, grad norm, completion tokens)."""
    n_tokens = torch.tensor(float(sum((b[1] != -100).sum() for b in micro_batches)), device=d.device)
    n_global = common.all_reduce(n_tokens.clone(), "sum", d).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=d.device)
    for m, batch in enumerate(micro_batches):
        batch = [t.to(d.device) if t is not None else None for t in batch]
        sync = m == cfg.grad_accum_steps - 1  # gradients are reduced over ranks on the last micro batch only
        if cfg.fsdp:
            model.set_requires_gradient_sync(sync)
        with model.no_sync() if d.ddp and not cfg.fsdp and not sync else contextlib.nullcontext():
            with autocast:
                loss = batch_loss(model, kind, batch, attn, router_aux=True)
            # DDP averages gradients over ranks: scale by world size so the sum over ranks / n_global remains
            (loss * d.world_size / n_global).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
        grad_norm = grad_norm.full_tensor()
    common.set_lr(optimizer, lr)
    optimizer.step()
    return common.all_reduce(loss_sum, "sum", d) / n_global, grad_norm, n_global


def evaluate(cfg, d, step, model, kind, evals, pad_id, attn, autocast):
    """The eval sets' losses (objective=lm: also bits per byte) -> (log record, losses, bits per byte)."""
    losses = {name: eval_loss(model, kind, enc, cfg, d, pad_id, attn, autocast)
              for name, (enc, _) in evals.items() if enc}
    record = {"type": "eval", "step": step, **{f"eval_loss_{n}": v for n, v in losses.items()}}
    if losses:
        record["eval_loss"] = sum(losses.values()) / len(losses)
    bpb = None
    if cfg.objective == "lm":  # text: also in bits per byte, comparable across tokenizers
        bpb = {n: bits_per_byte(v, *evals[n]) for n, v in losses.items()}
        record.update({f"eval_bpb_{n}": v for n, v in bpb.items()})
    return record, losses, bpb


def write_hf_folder(cfg, d, model, lm, fmt, step, eval_losses, evals, logger):
    """out_dir/hf from the trained weights (under fsdp gathered to rank 0; the best eval step's with
    load_best_model_at_end), then generation accuracy on the eval sets -> results to add."""
    results, folder, export = {}, os.path.join(cfg.out_dir, "hf"), model
    if cfg.load_best_model_at_end and d.master:  # the best eval checkpoint's weights, as HF Trainer does
        best = common.load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), expected_kind="sft_best")
        model.load_state_dict(best["model"], strict=not cfg.lora)
        results.update(best_step=best["step"], best_eval_loss=best["eval_loss"])
    if cfg.fsdp:  # the weights gathered from every rank, then an ordinary copy on rank 0
        full = common.full_model_state(model)
        export = unsharded_copy(cfg, model, lm.kind, full) if d.master else None
    if d.master:
        save_hf(cfg, export, lm.kind, lm.tok, folder, {"source": lm.info, "sft_config": common.config_dict(cfg),
                                                       "step": step, "eval_loss": eval_losses})
        logger.info(f"saved {folder}")
        results["hf_folder"] = folder
        if cfg.gen_eval and cfg.objective == "sft" and not adapter_only(cfg):
            replies = (seq2seq_replies if lm.kind == "seq2seq" else engine_replies)(cfg, folder, fmt, lm.tok, d)
            results["generation"] = generation_accuracy(replies, evals, logger)
    common.barrier(d)
    return results


def train(cfg, d, stop):
    run_identity = identity(cfg, d.world_size)
    ckpt = common.restore(cfg.out_dir, cfg.resume, "sft", run_identity, d.master)
    common.seed_everything(cfg.seed, d.device_type)
    dtype = common.resolve_dtype(cfg.dtype, d.device)
    autocast = common.autocast(d.device_type, dtype)

    # ---- model, data, optimizer, and where to start
    lm, fmt, attn = setup_model(cfg, d, dtype)
    memory = memory_estimate(cfg, lm.model, lm.kind, d)
    if cfg.estimate_memory:
        return memory
    if cfg.fsdp:  # before the optimizer is built: the parameters become this rank's shards
        common.shard_model(lm.model, d, dtype, cfg.cpu_offload)
    examples, rows, evals, max_steps, budget = build_data(cfg, lm, fmt, d)
    optimizer, params = make_optimizer(cfg, lm.model)
    start_step = resume_from(ckpt, cfg, lm.model, optimizer, d)
    if ckpt and start_step >= max_steps and os.path.isfile(os.path.join(cfg.out_dir, "hf", "config.json")):
        if d.master:
            print(f"{ckpt['path']} is step {ckpt['step']}: the run already finished {max_steps} steps")
        return {"status": "already_finished", "step": ckpt["step"]}
    # (a run stopped between its last checkpoint and its HF folder: the loop is empty, the folder is written)
    raw_model = lm.model
    model = raw_model if cfg.fsdp else common.wrap_model(raw_model, d, cfg.compile)
    warmup_steps = int(cfg.warmup_ratio * max_steps)

    # ---- logging: config.json, log.jsonl/log.txt, TensorBoard / W&B, the run's metadata at step 0
    logger = common.Logger(cfg.out_dir, d.master, resume=ckpt is not None, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=common.config_dict(cfg))
    meta = run_meta(cfg, d, lm, attn, fmt, params, dtype, budget)
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
    if not ckpt:
        logger.log(meta, echo=False)  # its numbers are TensorBoard's meta/* scalars at step 0
        if logger.tb is not None:  # and the whole record as a text table beside them
            logger.tb.add_text("meta", "\n".join(f"    {k}: {v}" for k, v in meta.items()), 0)
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * d.world_size
    logger.info(f"model {cfg.model} ({lm.kind}, {attn}): {meta['trainable_params']:,} of {meta['total_params']:,} "
                f"params trained | {max_steps} steps of {per_step} rows = {cfg.micro_batch_size} x "
                f"{cfg.grad_accum_steps} accum x {d.world_size} ranks | {budget['completion_tokens']:,} completion "
                f"tokens | {fmt}")
    if ckpt:
        logger.info(f"resumed from {ckpt['path']} at step {start_step}")
    stopped = common.stopped_before_start(stop, d, logger, start_step)
    if stopped:
        return stopped

    # ---- the loop
    watch = common.NonFiniteWatch(d.device)  # NaN/Inf in loss or gradients, remembered without a host sync
    timer = common.StepTimer(d.device_type, world_size=d.world_size)  # counts completion tokens
    run_t0 = time.time()
    train_loss = eval_losses = eval_bpb = None
    save = functools.partial(save_checkpoint, cfg, d, model=raw_model, optimizer=optimizer, kind=lm.kind,
                             run_identity=run_identity)
    status, step = "done", start_step - 1
    logger.progress(total=max_steps, initial=start_step, desc=cfg.objective)
    for step in range(start_step, max_steps):
        lr = common.lr_at(step, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, warmup_steps, max_steps,
                          cfg.lr_schedule)
        batches = step_batches(cfg, d, rows, examples, step, lm.kind, lm.tok.pad_id)
        loss, grad_norm, n_tok = train_step(cfg, d, model, optimizer, params, batches, lr, lm.kind, attn, autocast)
        timer.step(n_tok)
        watch.update(step, loss, grad_norm)
        logger.bar.update(1)
        due = common.due(step, max_steps, cfg.log_interval, cfg.ckpt_interval, cfg.eval_interval,
                         cfg.stop_after_step, first_step=start_step)
        # a signal stops the run at a step boundary; under DDP the ranks agree on it at log points
        signal_stop = stop.check(d, sync=due.log)
        if not (due.log or signal_stop):
            continue

        train_loss = loss.item()  # already the sum over ranks / the step's completion tokens
        common.stop_if_diverged(watch, d, logger, cfg.out_dir)
        speed = timer.lap()
        speed["completion_tokens_per_sec"] = speed.pop("tokens_per_sec", None)
        logger.log({"type": "train", "step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                    **speed})
        logger.postfix(loss=f"{train_loss:.4f}")
        if due.eval:
            record, eval_losses, eval_bpb = evaluate(cfg, d, step, raw_model, lm.kind, evals, lm.tok.pad_id, attn,
                                                     autocast)
            logger.log(record)
            if cfg.load_best_model_at_end and d.master and eval_losses:
                keep_if_best(cfg.out_dir, raw_model, cfg.lora, step, record["eval_loss"])
        status = common.save_or_exit(due, signal_stop, stop, step, save, logger) or status
        if status != "done":
            break
        timer.restart()  # evaluation and saving are not training time

    speed = timer.summary()
    results = {"status": status, "steps": step + 1, "final_train_loss": train_loss, "eval_loss": eval_losses,
               **({"eval_bpb": eval_bpb} if cfg.objective == "lm" else {}),
               "completion_tokens_per_sec": speed["tokens_per_sec"], "peak_mem_gb": speed["peak_mem_gb"],
               "memory_estimate_gb": memory, "fsdp": cfg.fsdp, "world_size": d.world_size,
               "seconds": time.time() - run_t0, "attn_implementation": attn, "prompt_format": fmt,
               "resumed_from_step": start_step - 1 if ckpt else None, **budget}
    if status == "done":
        results.update(write_hf_folder(cfg, d, raw_model, lm, fmt, step, eval_losses, evals, logger))
    common.finish(cfg.out_dir, results, d, logger)
    if d.master:
        unit = "nats/token" if cfg.objective == "lm" else "nats/completion token"
        common.plot_log_curves(cfg.out_dir, [(f"{cfg.objective} " + ",".join(cfg.datasets), f"loss ({unit})",
                                              [("train", "loss", "train"), ("eval", "eval_loss", "eval")])])
    return results


if __name__ == "__main__":
    common.run_main(main, preemptible=True)

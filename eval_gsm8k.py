"""
One evaluation tool for every model the repository makes or loads: a native checkpoint (file, run folder,
RUN/latest) of train_gpt.py, train_bd3lm.py (sampled block by block: engine.BlockDiffusionEngine, bd3lm_options=)
or train_sigmagpt.py (read left to right), a folder written by export_hf.py, or any HF causal LM (hub id or folder).

    python eval_gsm8k.py task=gsm8k model=out/run/latest out_dir=out/eval/run limit=200 \
        data_path=../shared/data/gsm8k/test.jsonl tokenizer_file=../shared/data/tokenizers/gpt2.tiktoken

Tasks
  gsm8k      GSM8K test (1,319; limit= for a subset): k-shot (exemplars from the train split) for base models,
             or zero-shot in sft.py's chat format `User: ...\nAssistant:` with fewshot=0. Two protocols:
             protocol=project (default): 8-shot, one fixed exemplar set (fewshot_seed), as many whole exemplars
               as fit in the model's positions - max_new_tokens (never a cut one; fewshot_k per item in
               predictions.jsonl, the spread in results.json, a warning below k), stops at "\n\n" and
               "Question:"; scored `strict` (the number after ####) and `flexible` (the last number), numbers
               normalised ('$', commas, spaces, trailing and leading zeros ignored).
             protocol=lm_eval: lm-evaluation-harness's gsm8k task (gsm8k.yaml v3.0) exactly: 5-shot, a new
               exemplar set per question from one generator seeded 1234, stops at "Question:", "</s>",
               "<|im_end|>", prompts cut from the left if too long; gsm8k_lm_eval_strict_match and
               gsm8k_lm_eval_flexible_extract (the harness's regex filters and exact_match), reported beside the
               project's strict/flexible on the same completions. results.json's metric_protocols names the
               protocol of every number.
  svamp      SVAMP, same prompts and scoring (k-shot exemplars come from GSM8K train, as in the CoT papers).
  synthetic  1,000 synthetic word problems (tasks/synthetic.py, a fixed test stream), same prompts and scoring;
             k-shot exemplars come from the synthetic train stream; synthetic_options= the generator's knobs
             (e.g. {max_steps: 1, max_value: 20}: the CPU demo's one-step problems).
  probes     deterministic arithmetic suites: 12x12 multiplication table, two-digit x one-digit, addition,
             subtraction; accuracy per suite. A multiplication token counts as the text it decodes to.
  hellaswag  acc (summed loss), acc_norm (mean loss per token, build-nanogpt) and acc_norm_char (loss per
             character, lm-evaluation-harness's acc_norm) of the ending, tasks/hellaswag.py.
  bpb        bits per byte on math-heavy held-out text (seed 003: "lower perplexity on math-heavy text"):
             bpb_text=gsm8k (default: the GSM8K test questions with their worked solutions, gsm8k_path) or a
             text set of tasks/text_sets.py (openwebmath, wikitext103, text: a local file in bpb_path); each
             document starts after the tokenizer's BOS (else its end of text, the pretraining separator) and is
             scored in non-overlapping windows of the model's positions. Nats over UTF-8 bytes: comparable
             across tokenizers (the mul_tokens condition's extra ids), unlike per-token loss.
  sweep      every checkpoint of a run folder -> checkpoint_results.json and a learning curve PNG per metric;
             val loss and bits per byte at each checkpoint's step from the run's log.jsonl (the numbers the
             report's curves use).
  compare    several conditions (runs=[a,b], the first the baseline; each a results folder, or one with
             pretrain/ sft/ grpo/ stage folders and sweep/; train_runs= their pretraining runs) ->
             comparison_report.json (accuracies with 95% Wilson intervals and counts, McNemar's exact test
             per task on the same questions, tokens per answer, val bits per byte and HellaSwag curves) and
             comparison.png, the whole comparison on one page.

Generation (engine.py): vLLM when it is installed and a GPU is present (engine=auto|vllm), else batched
greedy decoding with a KV cache in plain PyTorch (engine=hf): native checkpoints run as model.GPT with its own
KV cache, HF models with transformers' cache. Every run writes config.json, log.jsonl/log.txt, results.json and
predictions.jsonl to out_dir.
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import List

import torch

import engine as engine_lib
from tasks import gsm8k, hellaswag, probes, synthetic, text_sets

TASKS = ("gsm8k", "svamp", "synthetic", "probes", "hellaswag", "bpb", "sweep", "compare")
LOSS_TASKS = ("hellaswag", "bpb")  # scored from logits, no generation


@dataclasses.dataclass
class Config:
    task: str = "gsm8k"              # gsm8k | svamp | synthetic | probes | hellaswag | bpb | sweep | compare
    model: str = ""                  # native ckpt / run folder / RUN/latest, an exported folder, or an HF id
    out_dir: str = "out/eval"
    limit: int = 0                   # first N items (per suite for probes); 0 = all
    protocol: str = "project"        # project | lm_eval (gsm8k only: lm-evaluation-harness's gsm8k task exactly)
    fewshot: int = -1                # k-shot exemplars for base models; 0 = zero-shot chat format (SFT models);
                                     # -1 = the protocol's k: 8 (project), 5 (lm_eval)
    fewshot_path: str = ""           # GSM8K train jsonl for exemplars; default: train.jsonl beside the data, else the hub
    fewshot_seed: int = 1234         # project: one exemplar set for the whole run; lm_eval: the seed of the one
                                     # generator that draws a new set per question (the harness's default 1234)
    batch_size: int = 8
    max_new_tokens: int = 256
    data_path: str = ""              # local data file for this task (wins over the per-task paths below)
    gsm8k_path: str = ""             # local files per task, so one config serves every task; empty or the
    svamp_path: str = ""             # hub id (openai/gsm8k, ChilleD/SVAMP, Rowan/hellaswag) = the HF hub
    hellaswag_path: str = ""         # through `datasets`
    tokenizer_file: str = ""         # GPT-2 ranks for native checkpoints (default: the run's, else tiktoken's cache)
    engine: str = "auto"             # auto (vLLM if installed and on CUDA, else hf) | vllm | hf
    device: str = "auto"
    dtype: str = "auto"              # auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    probe_n: int = 100               # items per sampled probe suite (the 12x12 table is always complete)
    synthetic_options: dict = dataclasses.field(default_factory=dict)  # task=synthetic: the generator's knobs for
                                     # test problems and exemplars (tasks/synthetic.py SyntheticMath: max_value,
                                     # min_steps, max_steps, templates, ops), e.g. {max_steps: 1, max_value: 20}
    probe_max_new_tokens: int = 16
    bpb_text: str = "gsm8k"          # task=bpb: gsm8k (test questions + worked solutions) | a tasks/text_sets.py
                                     # name (openwebmath, wikitext103, text, ...)
    bpb_path: str = ""               # task=bpb with a text set: a local copy (.txt/.jsonl/.parquet); "" = the hub
    bpb_docs: int = 1000             # task=bpb with a text set: documents read (a stream's first ones); limit= cuts
    sweep_tasks: List[str] = dataclasses.field(default_factory=lambda: ["gsm8k", "probes"])
    sweep_isolate: str = "auto"      # sweep: one subprocess per checkpoint: auto (when vLLM generates: it keeps
                                     # its GPU memory until its process ends) | true | false
    runs: List[str] = dataclasses.field(default_factory=list)        # compare: results folders, baseline first
    labels: List[str] = dataclasses.field(default_factory=list)      # compare: names for the runs
    train_runs: List[str] = dataclasses.field(default_factory=list)  # compare: their pretraining runs (curves)
    stages: List[str] = dataclasses.field(default_factory=lambda: ["pretrain", "sft", "grpo"])  # compare
    gpu_memory_utilization: float = 0.85  # vLLM
    bd3lm_options: dict = dataclasses.field(default_factory=dict)  # a train_bd3lm.py model's sampling (keys of
                                     # BD3LM_OPTIONS): sampler (first_hitting | ancestral), sample_steps, top_p,
                                     # top_p_rule (hf | reference), temperature (0: greedy, the default), kv_cache,
                                     # seed, use_ema (true: the EMA weights)


# -----------------------------------------------------------------------------
# data: each task's local file, else the hub (loading, prompts, scoring and the probe suites live in tasks/)


def task_data_path(cfg, task):
    return cfg.data_path or getattr(cfg, f"{task}_path", "")


def task_data_key(cfg, task):
    """The setting that gives a task's data: data_path when set, else the task's own *_path."""
    if cfg.data_path or task == "gsm8k" and not cfg.gsm8k_path:
        return "data_path"
    return f"{task}_path"


HUB_SOURCES = (gsm8k.GSM8K_HUB, gsm8k.SVAMP_HUB, hellaswag.HUB)  # a *_path naming one of these reads the hub
LOCAL_EXAMPLES = {"data_path": "../shared/data/gsm8k/test.jsonl", "gsm8k_path": "../shared/data/gsm8k/test.jsonl",
                  "svamp_path": "../shared/data/svamp/SVAMP.json", "fewshot_path": "../shared/data/gsm8k/train.jsonl",
                  "hellaswag_path": "../shared/data/hellaswag/hellaswag_val_full.txt"}


def local_or_hub(path, load, key):
    """load() of a task's data. With no local file (path empty, or a hub id such as openai/gsm8k) it reads the
    HF hub; where that fails (offline), say which setting takes a local file."""
    try:
        return load()
    except OSError as e:  # tasks' HubUnreachable, datasets' ConnectionError
        if path and path not in HUB_SOURCES:
            raise
        reason = getattr(e, "reason", " ".join(str(e).split()))
        what = f"names the hub ({path})" if path else "is not set"
        raise common.ConfigError(f"{key} {what}, and the HF hub did not answer ({reason}): pass a local "
                                 f"file, e.g. {key}={LOCAL_EXAMPLES[key]}") from None


# -----------------------------------------------------------------------------
# models and generation: engine.py (native checkpoints through model.GPT's KV cache, HF models, vLLM)


def resolve_device(device):
    return common.autodetect_device() if device == "auto" else device


# the checkpoints of this repository that are not a left-to-right LM this script evaluates, by the kind they
# record, and what evaluates them ({ckpt}: the model= given, {run}: its run folder)
OTHER_KINDS = {
    "sft": ("a training checkpoint of sft.py", "the HF folder the finished run writes: model={run}/hf"),
    "grpo": ("a training checkpoint of grpo.py", "the HF folder the finished run writes: model={run}/hf"),
}


def checkpoint_kind(name):
    """(kind, path) of the native checkpoint `name` points to (a file, run folder, RUN/latest or checkpoint-N
    folder), read without its tensors; (None, None) where it holds none."""
    path = os.path.join(name, "model.pt") if os.path.isfile(os.path.join(name, "model.pt")) else name
    try:
        path = common.resolve_checkpoint(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint of ours: the loader's own error stands
        return None, None
    return (ckpt.get("kind", "gpt"), path) if isinstance(ckpt, dict) else (None, None)


def hf_config_file(path):
    """False only for a readable config.json without model_type: a training run's own config, not an HF model's."""
    try:
        with open(path) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return True


BD3LM_OPTIONS = {"sampler": str, "sample_steps": int, "top_p": float, "top_p_rule": str, "temperature": float,
                 "kv_cache": bool, "seed": int, "use_ema": bool}


def bd3lm_options(cfg):
    """bd3lm_options= checked: {key: value} of BD3LM_OPTIONS."""
    opts = dict(cfg.bd3lm_options or {})
    unknown = sorted(set(opts) - set(BD3LM_OPTIONS))
    if unknown:
        raise common.ConfigError(f"bd3lm_options {unknown} unknown; the keys are {', '.join(BD3LM_OPTIONS)}")
    for key, kind in BD3LM_OPTIONS.items():
        if key in opts and not isinstance(opts[key], kind) and not (kind is float and isinstance(opts[key], int)):
            raise common.ConfigError(f"bd3lm_options {key}={opts[key]!r} is not a {kind.__name__}")
    if opts.get("sampler", "first_hitting") not in ("first_hitting", "ancestral"):
        raise common.ConfigError(f"bd3lm_options sampler={opts['sampler']!r} is not first_hitting or ancestral")
    if opts.get("top_p_rule", "hf") not in ("hf", "reference"):
        raise common.ConfigError(f"bd3lm_options top_p_rule={opts['top_p_rule']!r} is not hf or reference")
    return opts


def load_model(name, cfg, device, dtype):
    """engine.load_model, or a train_bd3lm.py checkpoint (engine.load_block_diffusion_model); a checkpoint of
    another trainer or a run folder without checkpoints is named for what it is, with what evaluates it."""
    kind = checkpoint_kind(name)[0]
    if kind == "bd3lm":
        return engine_lib.load_block_diffusion_model(name, cfg.tokenizer_file, device, dtype,
                                                     bd3lm_options(cfg).get("use_ema", True))
    if kind == "sigmagpt":  # read left to right (its orders' perplexities: train_sigmagpt.py mode=eval)
        return engine_lib.load_sigmagpt_model(name, cfg.tokenizer_file, device, dtype)
    try:  # (engine.from_pretrained refuses a pickled weights file that builds other objects)
        return engine_lib.load_model(name, cfg.tokenizer_file, device, dtype)
    except (ValueError, OSError):
        kind, path = checkpoint_kind(name)
        if kind in OTHER_KINDS:
            what, how = OTHER_KINDS[kind]
            run = os.path.dirname(path)
            run = os.path.dirname(run) if common.SEED_CKPT_RE.match(os.path.basename(run)) else run
            raise common.ConfigError(f"model={name} is {what}, kind '{kind}' in {path}; eval_gsm8k.py evaluates "
                                     f"left-to-right LMs (train_gpt.py checkpoints, HF models): evaluate it with "
                                     f"{how.format(ckpt=name, run=run)}") from None
        if kind is None and not hf_config_file(os.path.join(name, "config.json")):
            raise common.ConfigError(f"model={name} is neither an HF model folder (its config.json has no "
                                     f"model_type: a training run's config?) nor a run folder with checkpoints "
                                     f"(ckpt_*.pt, checkpoint-N/model.pt)") from None
        raise


def make_engine(cfg, lm, dtype):
    if cfg.engine not in ("auto", "vllm", "hf"):
        raise common.ConfigError(f"engine must be auto, vllm or hf, got {cfg.engine!r}")
    if lm.kind == "bd3lm":  # block diffusion: its own sampler (engine.BlockDiffusionEngine), in plain PyTorch
        if cfg.engine == "vllm":
            raise common.ConfigError("engine=vllm cannot sample a BD3-LM (block diffusion); use engine=auto or hf")
        opts = bd3lm_options(cfg)
        sampling = engine_lib.BlockSampling(**{k: opts[k] for k in ("sampler", "sample_steps", "top_p", "top_p_rule",
                                                                    "temperature") if k in opts})
        return engine_lib.BlockDiffusionEngine(lm, cfg.batch_size, sampling, opts.get("kv_cache", True),
                                               opts.get("seed", 0))
    if cfg.engine == "vllm" and not common.vllm_available():
        raise common.ConfigError("engine=vllm needs the vllm package and a CUDA GPU; use engine=hf (plain PyTorch) here")
    if lm.info.get("source_kind") == "sigmagpt":  # two position codes: no HF architecture holds them
        if cfg.engine == "vllm":
            raise common.ConfigError("engine=vllm cannot run a sigma-GPT (double position encoding); use engine=hf")
        return engine_lib.Engine(lm, cfg.batch_size)
    if cfg.engine == "vllm" or (cfg.engine == "auto" and common.vllm_available()):
        return engine_lib.VLLMEngine(lm, dtype, max(cfg.batch_size, 512), cfg.gpu_memory_utilization)
    return engine_lib.Engine(lm, cfg.batch_size)


# -----------------------------------------------------------------------------
# tasks


PROTOCOLS = ("project", "lm_eval")
DEFAULT_FEWSHOT = {"project": 8, "lm_eval": gsm8k.LM_EVAL_FEWSHOT}


def prompt_room(lm, max_new_tokens):
    """Tokens a prompt may take so that max_new_tokens still fit in the model's positions (None: no limit)."""
    if not lm.max_positions:
        return None
    room = lm.max_positions - max_new_tokens
    if room < 1:
        raise common.ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                                 f"{lm.max_positions} positions")
    return room


def truncate_prompt(ids, lm, max_new_tokens):
    """Keep the end of prompts that would not leave room for max_new_tokens (as lm-evaluation-harness)."""
    room = prompt_room(lm, max_new_tokens)
    return (ids[-room:], True) if room is not None and len(ids) > room else (ids, False)


def run_generation(items, lm, engine, max_new_tokens, stop, score_fn, desc):
    """Generate for every item (sorted by prompt length to waste little padding), score, keep the order.
    Returns (records, seconds, truncated)."""
    encoded, truncated = [], 0
    for it in items:
        ids, cut = truncate_prompt(lm.tok.encode_prompt(it["prompt"]), lm, max_new_tokens)
        encoded.append(ids)
        truncated += cut
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
    records = [None] * len(items)
    n_correct = n_done = 0
    t0 = time.time()
    bar = common.progress(total=len(items), desc=desc)
    for start in range(0, len(order), engine.batch_size):
        chunk = order[start:start + engine.batch_size]
        outs = engine.generate([encoded[i] for i in chunk], max_new_tokens, stop=stop)
        for i, (out,) in zip(chunk, outs):
            rec = {"id": items[i]["id"], "prompt": items[i]["prompt"], "completion": out.text,
                   "gold": items[i]["gold"], "new_tokens": len(out.content_ids), **score_fn(items[i], out.text),
                   **getattr(out, "record", {})}  # a hierarchical BD3-LM's plan (engine.SegmentCompletion)
            if "fewshot_k" in items[i]:
                rec["fewshot_k"] = items[i]["fewshot_k"]
            records[i] = rec
            n_correct += int(rec["correct"]["flexible"] if isinstance(rec["correct"], dict) else rec["correct"])
            n_done += 1
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{n_correct / n_done:.3f}", refresh=False)  # shown at the next refresh
    bar.close()
    return records, time.time() - t0, truncated


def fewshot_k(cfg):
    if cfg.protocol not in PROTOCOLS:
        raise common.ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    return DEFAULT_FEWSHOT[cfg.protocol] if cfg.fewshot < 0 else cfg.fewshot


def exemplar_pool(cfg, task):
    """The train examples exemplars are drawn from: the synthetic train stream, else GSM8K train."""
    if task == "synthetic":
        return synthetic_task(cfg).examples("train")
    return local_or_hub(cfg.fewshot_path, lambda: gsm8k.fewshot_pool(cfg.fewshot_path, near=(
        task_data_path(cfg, task), cfg.gsm8k_path)), "fewshot_path")


def synthetic_task(cfg):
    """The synthetic problems with the config's generator knobs (a bad knob is a config error)."""
    try:
        return synthetic.SyntheticMath(**cfg.synthetic_options)
    except (ValueError, TypeError) as e:
        raise common.ConfigError(f"synthetic_options {cfg.synthetic_options}: {e}") from None


def math_task(cfg, task):
    """The Task of gsm8k / svamp / synthetic and protocol=project's one fixed set of k exemplars."""
    path = task_data_path(cfg, task)
    problems = {"synthetic": lambda: synthetic_task(cfg), "gsm8k": lambda: gsm8k.GSM8K(path),
                "svamp": lambda: gsm8k.SVAMP(path)}[task]()
    k = fewshot_k(cfg)
    if k == 0 or cfg.protocol != "project":
        return problems, []
    pool = exemplar_pool(cfg, task)
    if k > len(pool):
        raise common.ConfigError(f"fewshot={k} but only {len(pool)} train exemplars to draw from")
    return problems, random.Random(cfg.fewshot_seed).sample(pool, k)


def build_prompts(cfg, lm, problems, exemplars, data, task):
    """Each item's prompt, with its exemplars as the protocol draws them. project: the one fixed set for every
    question, as many whole exemplars as fit beside max_new_tokens (fewshot_k records how many); lm_eval: a new
    set of k per question from one seeded generator, a too-long prompt cut from the left, as the harness does."""
    k = fewshot_k(cfg)
    if k == 0:
        for it in data:
            it["prompt"] = problems.prompt(it, ())
    elif cfg.protocol == "lm_eval":
        for it, shots in zip(data, gsm8k.lm_eval_exemplars(exemplar_pool(cfg, task), data, k, cfg.fewshot_seed)):
            it["prompt"], it["fewshot_k"] = gsm8k.fewshot_prompt(it["question"], shots), len(shots)
    else:
        room = prompt_room(lm, cfg.max_new_tokens)
        for it in data:
            it["prompt"], it["fewshot_k"] = gsm8k.fit_fewshot(it["question"], exemplars,
                                                              lambda text: len(lm.tok.encode_prompt(text)), room)


def task_math(cfg, lm, engine, task):
    """gsm8k / svamp / synthetic: k-shot or zero-shot chat prompts; strict and flexible accuracy (and with
    protocol=lm_eval the harness's strict-match and flexible-extract on the same completions)."""
    if cfg.protocol == "lm_eval" and task != "gsm8k":
        raise common.ConfigError(f"protocol=lm_eval reproduces lm-evaluation-harness's gsm8k task; task={task} "
                                 f"has only protocol=project")
    problems, exemplars = math_task(cfg, task)
    data = local_or_hub(task_data_path(cfg, task), lambda: problems.examples("test"), task_data_key(cfg, task))
    if cfg.limit:
        data = data[:cfg.limit]
    k = fewshot_k(cfg)
    build_prompts(cfg, lm, problems, exemplars, data, task)
    stop = problems.stop(exemplars) if cfg.protocol == "project" else gsm8k.LM_EVAL_STOP
    def score_fn(it, text):  # the project's scores always; the harness's beside them under protocol=lm_eval
        scores = problems.evaluate(it, text)
        return {**scores, "lm_eval": gsm8k.score_lm_eval(text, it["answer"])} if cfg.protocol == "lm_eval" else scores
    records, seconds, truncated = run_generation(data, lm, engine, cfg.max_new_tokens, stop, score_fn, task)
    n = len(records)
    strict = sum(r["correct"]["strict"] for r in records)
    flexible = sum(r["correct"]["flexible"] for r in records)
    metrics = {f"{task}_strict": strict / n, f"{task}_flexible": flexible / n}
    used = [r.get("fewshot_k", 0) for r in records]
    counts = {"n": n, "strict_correct": strict, "flexible_correct": flexible,
              "no_number": sum(r["extracted"]["flexible"] is None for r in records),
              "truncated_prompts": truncated, "fewshot": k, "fewshot_requested": k,
              "fewshot_used_mean": sum(used) / n, "fewshot_used_min": min(used),
              "fewshot_below_requested": sum(u < k for u in used),
              "prompt_format": "fewshot" if k else "chat",
              "generated_tokens": sum(r["new_tokens"] for r in records)}
    protocols = {f"{task}_strict": "project: the number after the first '####', normalised, numeric equality",
                 f"{task}_flexible": "project: the last number, normalised, numeric equality"}
    if cfg.protocol == "lm_eval":
        if k != gsm8k.LM_EVAL_FEWSHOT:
            print(f"warning: protocol=lm_eval with fewshot={k}: the harness's gsm8k task is "
                  f"{gsm8k.LM_EVAL_FEWSHOT}-shot, so these numbers are not comparable with published ones",
                  file=sys.stderr)
        for name in ("strict_match", "flexible_extract"):
            hits = sum(r["lm_eval"]["correct"][name] for r in records)
            metrics[f"{task}_lm_eval_{name}"] = hits / n
            counts[f"lm_eval_{name}_correct"] = hits
            protocols[f"{task}_lm_eval_{name}"] = (f"lm_eval: lm-evaluation-harness gsm8k.yaml v3.0 "
                                                   f"{name.replace('_', '-')} filter + exact_match, {k}-shot")
    if counts["fewshot_below_requested"]:
        print(f"warning: {counts['fewshot_below_requested']} of {n} {task} prompts hold fewer than the "
              f"{k} requested exemplars (min {counts['fewshot_used_min']}, mean {counts['fewshot_used_mean']:.2f}): "
              f"whole exemplars only, within {lm.max_positions} positions - max_new_tokens={cfg.max_new_tokens}",
              file=sys.stderr)
    if truncated:
        print(f"warning: {truncated} of {n} {task} prompts were cut from the left to fit {lm.max_positions} "
              f"positions - max_new_tokens={cfg.max_new_tokens}", file=sys.stderr)
    counts["metric_protocols"] = protocols
    return metrics, counts, records, seconds


def task_probes(cfg, lm, engine):
    suites = probes.Probes(cfg.probe_n, limit=cfg.limit)
    items = suites.examples()
    records, seconds, truncated = run_generation(items, lm, engine, cfg.probe_max_new_tokens, suites.stop(),
                                                 suites.evaluate, "probes")
    metrics, counts = {}, {"truncated_prompts": truncated}
    for suite in probes.PROBE_OPS:
        rs = [r for r in records if r["suite"] == suite]
        metrics[f"probe_{suite}"] = sum(r["correct"] for r in rs) / len(rs)
        counts[suite] = {"n": len(rs), "correct": sum(r["correct"] for r in rs)}
    metrics["probes_mean"] = sum(metrics[f"probe_{s}"] for s in probes.PROBE_OPS) / len(probes.PROBE_OPS)
    counts["n"] = len(records)
    return metrics, counts, records, seconds


HELLASWAG_PROTOCOLS = {
    "hellaswag_acc": "least summed loss of the ending",
    "hellaswag_acc_norm": "build-nanogpt: least mean loss per token of the ending",
    "hellaswag_acc_norm_char": "lm_eval: lm-evaluation-harness acc_norm, least summed loss per character of "
                               "the ending (len(choice), without the leading space)"}


@torch.no_grad()
def task_hellaswag(cfg, lm):
    """acc, acc_norm (per token) and acc_norm_char (per character), batch_size items per forward."""
    path = task_data_path(cfg, "hellaswag")
    items = local_or_hub(path, lambda: hellaswag.load_hellaswag(path, cfg.limit or None),
                         task_data_key(cfg, "hellaswag"))
    if not items:
        raise ValueError(f"{path or hellaswag.HUB}: no HellaSwag items (an empty data file)")
    encoded = hellaswag.encode_items(lm.tok, items, max_len=lm.max_positions)
    records, hits = [], {"correct": 0, "correct_norm": 0, "correct_norm_char": 0}
    t0 = time.time()
    bar = common.progress(total=len(items), desc="hellaswag")
    for start in range(0, len(items), cfg.batch_size):
        batch = encoded[start:start + cfg.batch_size]
        summed, n_tokens = hellaswag.score_encoded(lm.logits, batch, lm.device)
        for i, e, s, t in zip(range(start, start + len(batch)), batch, summed, n_tokens):
            preds = dict(zip(hits, hellaswag.predictions(s, t, e["chars"])))
            for key, pred in preds.items():
                hits[key] += pred == e["label"]
            records.append({"id": i, "ctx": items[i]["ctx"], "label": e["label"], "pred": preds["correct"],
                            "pred_norm": preds["correct_norm"], "pred_norm_char": preds["correct_norm_char"],
                            "sum_loss": s.tolist(), "mean_loss": (s / t).tolist(), "ending_chars": e["chars"],
                            **{key: pred == e["label"] for key, pred in preds.items()}})
        bar.update(len(batch))
        bar.set_postfix(acc_norm=f"{hits['correct_norm'] / len(records):.3f}", refresh=False)
    bar.close()
    n = len(records)
    metrics = {"hellaswag_acc": hits["correct"] / n, "hellaswag_acc_norm": hits["correct_norm"] / n,
               "hellaswag_acc_norm_char": hits["correct_norm_char"] / n}
    return metrics, {"n": n, **hits, "metric_protocols": HELLASWAG_PROTOCOLS}, records, time.time() - t0


def bpb_documents(cfg):
    """task=bpb's text: the GSM8K test questions with their worked solutions (calculator annotations kept, as
    the dataset has them), or the documents of a text set (its eval split where it has one)."""
    if cfg.bpb_text == "gsm8k":
        path = task_data_path(cfg, "gsm8k")
        rows = local_or_hub(path, lambda: gsm8k.load_gsm8k(path, "test"), task_data_key(cfg, "gsm8k"))
        docs = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    else:
        entry = text_sets.get_set(cfg.bpb_text)
        docs = local_or_hub(cfg.bpb_path, lambda: text_sets.read_documents(
            entry, cfg.bpb_path, entry.eval_split or entry.train_split, cfg.bpb_docs), "bpb_path")
        docs = docs[:cfg.bpb_docs] if cfg.bpb_docs else docs
    docs = docs[:cfg.limit] if cfg.limit else docs
    if not docs:
        raise ValueError(f"task=bpb: no documents in bpb_text={cfg.bpb_text} {cfg.bpb_path or ''}".rstrip())
    return docs


def bpb_windows(lm, docs):
    """(document index, ids) windows: each document after a start token, cut into pieces of at most the model's
    positions + 1 ids that overlap by one (each token after the start is predicted exactly once)."""
    start = lm.tok.encode_prompt("") or [min(lm.tok.eos_ids)]  # BOS where the model wants one, else end of text
    span = lm.max_positions or 1024
    windows = []
    for i, doc in enumerate(docs):
        ids = start[-1:] + lm.tok.encode(doc)
        windows += [(i, ids[lo:lo + span + 1]) for lo in range(0, len(ids) - 1, span)]
    return windows


@torch.no_grad()
def task_bpb(cfg, lm):
    """Summed next-token loss (nats) of every document token over the documents' UTF-8 bytes, in bits."""
    docs = bpb_documents(cfg)
    windows = sorted(bpb_windows(lm, docs), key=lambda w: len(w[1]))  # similar lengths together: little padding
    nats, tokens = [0.0] * len(docs), [0] * len(docs)
    t0 = time.time()
    bar = common.progress(total=len(windows), desc="bpb")
    for lo in range(0, len(windows), cfg.batch_size):
        batch = windows[lo:lo + cfg.batch_size]
        width = max(len(ids) for _, ids in batch)
        x = torch.full((len(batch), width), lm.tok.pad_id, dtype=torch.long)
        for j, (_, ids) in enumerate(batch):
            x[j, :len(ids)] = torch.tensor(ids)
        x = x.to(lm.device)
        logits = lm.logits(x[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        lengths = torch.tensor([len(ids) - 1 for _, ids in batch], device=lm.device)  # right padding: a row's
        real = torch.arange(width - 1, device=lm.device) < lengths[:, None]        # real targets come first
        for (i, _), row_nats, n in zip(batch, (loss * real).sum(1).tolist(), lengths.tolist()):  # one sync a batch
            nats[i] += row_nats
            tokens[i] += n
        bar.update(len(batch))
    bar.close()
    nbytes = [len(doc.encode("utf-8")) for doc in docs]
    records = [{"id": i, "bytes": b, "tokens": t, "nats": n, "bpb": n / math.log(2) / b if b else None}
               for i, (b, t, n) in enumerate(zip(nbytes, tokens, nats))]
    metrics = {f"bpb_{cfg.bpb_text}": sum(nats) / math.log(2) / sum(nbytes)}
    counts = {"n": len(docs), "bytes": sum(nbytes), "tokens": sum(tokens), "nats": sum(nats),
              "nll_per_token": sum(nats) / sum(tokens), "windows": len(windows),
              "window_positions": lm.max_positions or 1024, "text": cfg.bpb_text,
              "bytes_per_token": sum(nbytes) / sum(tokens)}
    return metrics, counts, records, time.time() - t0


def evaluate(cfg, lm, task, out_dir, engine=None):
    """Run one task on a loaded model and write config.json, results.json, predictions.jsonl, logs."""
    os.makedirs(out_dir, exist_ok=True)
    common.atomic_write_json(os.path.join(out_dir, "config.json"), {**dataclasses.asdict(cfg), "task": task})
    logger = common.Logger(out_dir)
    if task in LOSS_TASKS:
        metrics, counts, records, seconds = (task_hellaswag if task == "hellaswag" else task_bpb)(cfg, lm)
        engine_name = "loss"
    else:
        engine = engine or make_engine(cfg, lm, lm.dtype)
        engine_name = engine.name
        if task in ("gsm8k", "svamp", "synthetic"):
            metrics, counts, records, seconds = task_math(cfg, lm, engine, task)
        elif task == "probes":
            metrics, counts, records, seconds = task_probes(cfg, lm, engine)
        else:
            raise common.ConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    with open(os.path.join(out_dir, "predictions.jsonl.tmp"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out_dir, "predictions.jsonl.tmp"), os.path.join(out_dir, "predictions.jsonl"))
    metric_protocols = counts.pop("metric_protocols", {m: "project" for m in metrics})
    results = {"task": task, "model": lm.name, "model_kind": lm.kind, **lm.info, "engine": engine_name,
               "protocol": cfg.protocol, "metric_protocols": metric_protocols, "metrics": metrics, "counts": counts, "n": counts["n"], "seconds": round(seconds, 3),
               "samples_per_s": counts["n"] / seconds if seconds > 0 else None,
               "data": data_source(cfg, task),
               "config": {**dataclasses.asdict(cfg), "task": task}}
    common.atomic_write_json(os.path.join(out_dir, "results.json"), results)
    logger.log({"task": task, **metrics, "n": counts["n"], "seconds": round(seconds, 2),
                "samples_per_s": results["samples_per_s"]})
    return results


def data_source(cfg, task):
    if task in ("synthetic", "probes"):
        return "generated"
    if task == "bpb":
        return task_data_path(cfg, "gsm8k") or "hub" if cfg.bpb_text == "gsm8k" else cfg.bpb_path or "hub"
    return task_data_path(cfg, task) or "hub"


# -----------------------------------------------------------------------------
# sweep and compare


def plot_curves(rows, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = sorted({k for r in rows for k in r["metrics"]})
    paths = []
    for m in metrics:
        pts = [(r["step"], r["metrics"][m]) for r in rows if r["metrics"].get(m) is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        ax.set_title(f"{m} over training")
        ax.grid(alpha=0.3)
        path = os.path.join(out_dir, f"curve_{m}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def sweep_checkpoints(cfg):
    """[(step, path)] a sweep evaluates: every checkpoint of a run folder (or RUN/latest's folder), or one file."""
    if os.path.isfile(cfg.model):
        here = os.path.dirname(os.path.abspath(cfg.model))
        ckpts = [(s, p) for s, p in common.list_checkpoints(here) if os.path.samefile(p, cfg.model)]
        if not ckpts:
            raise common.ConfigError(f"model={cfg.model}: a sweep needs a run folder or a ckpt_NNNNNN.pt file")
        return here, ckpts
    run_dir = os.path.dirname(cfg.model) if os.path.basename(cfg.model) == "latest" else cfg.model
    ckpts = common.list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints (ckpt_*.pt) in {run_dir}")
    return run_dir, ckpts


def sweep_isolated(cfg, tasks):
    """Whether each checkpoint runs in its own process: vLLM does not give its GPU memory back when an engine
    is closed, so a second engine in the same process can run out of memory."""
    if cfg.sweep_isolate not in ("auto", "true", "false"):
        raise common.ConfigError(f"sweep_isolate must be auto, true or false, got {cfg.sweep_isolate!r}")
    if cfg.sweep_isolate != "auto":
        return cfg.sweep_isolate == "true"
    generates = any(t not in LOSS_TASKS for t in tasks)
    return generates and (cfg.engine == "vllm" or (cfg.engine == "auto" and common.vllm_available()))


def logged_val(run_dir, step):
    """{val_loss, val_bpb} the pretraining run logged at `step` (its log.jsonl), or {} where it has none."""
    log = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log):
        return {}
    rows = [r for r in common.read_jsonl(log) if r.get("type") == "val" and r.get("step") == step]
    return {k: rows[-1][k] for k in ("val_loss", "val_bpb") if rows and rows[-1].get(k) is not None}


def sweep_checkpoint(cfg, step, path, tasks, device, dtype):
    """Evaluate one checkpoint on the sweep's tasks in this process: its row of checkpoint_results.json. Val loss
    and bits per byte come from the run's log at the checkpoint's step (what the report's curves read), else the
    val loss the checkpoint stores (measured at the last val step before it)."""
    lm = load_model(path, cfg, device, dtype)
    metrics = logged_val(os.path.dirname(os.path.abspath(path)), step)
    if "val_loss" not in metrics and lm.info.get("val_loss") is not None:
        metrics["val_loss"] = lm.info["val_loss"]
    engine = None  # one generation engine per checkpoint, shared by its tasks
    for task in tasks:
        sub = dataclasses.replace(cfg, task=task)
        if task not in LOSS_TASKS and engine is None:
            engine = make_engine(sub, lm, dtype)
        res = evaluate(sub, lm, task, os.path.join(cfg.out_dir, f"step_{step:06d}", task), engine)
        metrics.update(res["metrics"])
    if engine is not None:
        engine.close()
    return {"step": step, "checkpoint": path, "metrics": metrics}


def config_args(cfg, **overrides):
    """The config as key=value arguments for a child eval_gsm8k.py (lists in YAML's [a,b] form)."""
    values = {**dataclasses.asdict(cfg), **overrides}
    return [f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={json.dumps(v)}" if isinstance(v, dict)
            else f"{k}={v}" for k, v in values.items()]


def sweep_checkpoint_in_subprocess(cfg, step, path):
    """The same evaluation in a child process (task=sweep on this one file), which frees all of its GPU
    memory when it exits; its row is read back from the checkpoint_results.json it writes."""
    import subprocess
    args = config_args(cfg, task="sweep", model=path, sweep_isolate="false", runs=[], labels=[])
    rc = subprocess.run([sys.executable, os.path.abspath(__file__)] + args).returncode
    if rc != 0:
        raise ValueError(f"evaluating {path} failed in its subprocess (exit code {rc}; its error is above)")
    with open(os.path.join(cfg.out_dir, "checkpoint_results.json")) as f:
        return json.load(f)["checkpoints"][0]


def run_sweep(cfg):
    """Evaluate every checkpoint of a run folder on sweep_tasks; learning curves per metric."""
    run_dir, ckpts = sweep_checkpoints(cfg)
    device = resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)
    per_model = [t for t in TASKS if t not in ("sweep", "compare")]
    if not cfg.sweep_tasks or any(t not in per_model for t in cfg.sweep_tasks):
        raise common.ConfigError(f"sweep_tasks must be some of {', '.join(per_model)}; got {cfg.sweep_tasks}")
    if cfg.data_path:
        raise common.ConfigError("a sweep runs several tasks: give gsm8k_path/svamp_path/hellaswag_path, not data_path")
    tasks = sorted(cfg.sweep_tasks, key=lambda t: t not in LOSS_TASKS)  # loss tasks first: vLLM may take the GPU after
    isolate = sweep_isolated(cfg, tasks)
    os.makedirs(cfg.out_dir, exist_ok=True)
    common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
    rows, t0 = [], time.time()
    for step, path in ckpts:
        if isolate:
            row = sweep_checkpoint_in_subprocess(cfg, step, path)
        else:
            row = sweep_checkpoint(cfg, step, path, tasks, device, dtype)
        rows.append(row)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()), flush=True)
    if isolate:  # the children wrote theirs over it
        common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
    plots = plot_curves(rows, cfg.out_dir)
    report = {"run": run_dir, "tasks": list(cfg.sweep_tasks), "checkpoints": rows, "isolated": isolate,
              "plots": [os.path.basename(p) for p in plots], "seconds": round(time.time() - t0, 2)}
    common.atomic_write_json(os.path.join(cfg.out_dir, "checkpoint_results.json"), report)
    return report


def folder_metrics(folder):
    """Metrics of a results folder: its results.json and those one level down (one per task), or the
    last checkpoint of a sweep's checkpoint_results.json."""
    metrics = {}
    for path in task_results(folder):
        with open(path) as f:
            metrics.update(result_metrics(json.load(f)))
    sweep = os.path.join(folder, "checkpoint_results.json")
    if not metrics and os.path.isfile(sweep):
        with open(sweep) as f:
            metrics.update(json.load(f)["checkpoints"][-1]["metrics"])
    if not metrics:
        raise FileNotFoundError(f"no results.json or checkpoint_results.json in {folder}")
    return metrics


def result_metrics(res):
    """The comparable figures of one results.json: its metrics, the generation speed of a task that generates
    (<task>_samples_per_s), and for train_bd3lm.py's ppl_eval its NELBO per token, the perplexity bound and the
    NELBO of each segment (question, plan, execution)."""
    metrics = dict(res.get("metrics", {}))
    if res.get("task") and res["task"] not in LOSS_TASKS and res.get("samples_per_s") is not None:
        metrics[f"{res['task']}_samples_per_s"] = res["samples_per_s"]
    if res.get("mode") == "ppl_eval":
        metrics.update({"nelbo": res["nelbo"], "ppl_bound": res["ppl_bound"]})
        metrics.update({f"nelbo_{seg}": v for seg, v in (res.get("segments") or {}).items()})
    return metrics


def task_results(folder):
    """results.json of a folder and of its task subfolders."""
    candidates = [os.path.join(folder, "results.json")]
    if os.path.isdir(folder):
        candidates += [os.path.join(folder, d, "results.json") for d in sorted(os.listdir(folder))]
    return [p for p in candidates if os.path.isfile(p)]


# statistics for the comparison: a 95% interval for each accuracy, and a paired test between two models
# answering the same questions (the one a reviewer asks for: their accuracies are not independent samples)

def wilson_interval(k, n, confidence=0.95):
    """Wilson score interval of a proportion k/n (scipy.stats): stays inside [0, 1] and is sound at k = 0 or n
    (where the normal approximation gives a zero-width interval)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (0.0 if k == 0 else float(ci.low), 1.0 if k == n else float(ci.high))


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value: b, c = the questions only the first / only the second model got right.
    Under no difference each discordant pair goes either way with probability 1/2: a binomial test on b of b+c."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest
    return float(binomtest(b, b + c, 0.5).pvalue)


def scored_outcomes(folder):
    """Per-question outcomes of every task under a results folder, from predictions.jsonl:
    {metric: {question id: correct}}, and {task: mean generated tokens per answer}."""
    outcomes, tokens = {}, {}
    for path in task_results(folder):
        preds = os.path.join(os.path.dirname(path), "predictions.jsonl")
        if not os.path.isfile(preds):
            continue
        with open(path) as f:
            task = json.load(f)["task"]
        if task == "bpb":  # a loss over documents, not answers: its figure is in the metrics table
            continue
        records = common.read_jsonl(preds)
        for r in records:
            if "correct_norm" in r:  # hellaswag: correct, correct_norm, ... -> hellaswag_acc, hellaswag_acc_norm, ...
                for key in (k for k in r if k.startswith("correct")):
                    outcomes.setdefault("hellaswag_acc" + key[len("correct"):], {})[r["id"]] = bool(r[key])
            elif isinstance(r["correct"], dict):  # gsm8k, svamp, synthetic: strict and flexible
                for how, ok in r["correct"].items():
                    outcomes.setdefault(f"{task}_{how}", {})[r["id"]] = bool(ok)
            else:  # probes: one suite per record
                outcomes.setdefault(f"probe_{r['suite']}", {})[r["id"]] = bool(r["correct"])
        if records and "new_tokens" in records[0]:
            tokens[task] = sum(r["new_tokens"] for r in records) / len(records)
    return outcomes, tokens


def pool_seeds(scored):
    """The outcomes of one condition's seeds as one set, a question of seed s keyed (s, id), and the mean
    tokens per answer over the seeds."""
    outcomes, tokens = {}, {}
    for s, (out, tok) in enumerate(scored):
        for m, by_id in out.items():
            outcomes.setdefault(m, {}).update({(s, i): ok for i, ok in by_id.items()})
        for task, t in tok.items():
            tokens.setdefault(task, []).append(t)
    return outcomes, {task: sum(ts) / len(ts) for task, ts in tokens.items()}


def accuracy_with_ci(outcome):
    """Accuracy, counts and the Wilson interval of (seed, question) outcomes, and each seed's accuracy."""
    k, n = sum(outcome.values()), len(outcome)
    lo, hi = wilson_interval(k, n)
    seeds = sorted({s for s, _ in outcome})
    per_seed = [sum(ok for (s, _), ok in outcome.items() if s == seed) /
                sum(1 for (s, _) in outcome if s == seed) for seed in seeds]
    return {"accuracy": k / n if n else None, "correct": k, "n": n, "ci95": [lo, hi], "per_seed": per_seed}


def paired_test(base, other):
    """McNemar's exact test on the questions both models answered (with seeds: the pairs seed s of each
    condition makes on each question)."""
    ids = sorted(set(base) & set(other), key=str)
    b = sum(base[i] and not other[i] for i in ids)
    c = sum(other[i] and not base[i] for i in ids)
    return {"n_paired": len(ids), "only_baseline_correct": b, "only_other_correct": c,
            "p_value": mcnemar_exact(b, c)}


def mean_metrics(many):
    """The mean of each metric over a condition's seeds."""
    names = sorted({m for ms in many for m in ms})
    return {m: sum(ms[m] for ms in many if m in ms) / sum(m in ms for ms in many) for m in names}


def run_stages(run, stages):
    """{stage: folder}: the stage subfolders of a run folder (pretrain/sft/grpo), or the folder itself."""
    found = {s: os.path.join(run, s) for s in stages if task_results(os.path.join(run, s))}
    return found or {"eval": run}


def pretraining_curves(train_run, sweep_dir):
    """Val loss and bits per byte, and HellaSwag acc_norm, over steps: from the pretraining run's log.jsonl,
    else from the checkpoint sweep; with the run's final figures from results.json."""
    curves = {"val_loss": [], "val_bpb": [], "hellaswag_acc_norm": []}
    final = {}
    log = os.path.join(train_run, "log.jsonl") if train_run else ""
    if log and os.path.isfile(log):
        for r in common.read_jsonl(log):
            if r.get("type") == "val":
                curves["val_loss"].append([r["step"], r["val_loss"]])
                if r.get("val_bpb") is not None:
                    curves["val_bpb"].append([r["step"], r["val_bpb"]])
            elif r.get("type") == "hellaswag":
                curves["hellaswag_acc_norm"].append([r["step"], r["acc_norm"]])
        results = os.path.join(train_run, "results.json")
        if os.path.isfile(results):
            with open(results) as f:
                res = json.load(f)
            final = {k: res.get(k) for k in ("steps", "final_train_loss", "final_val_loss", "final_val_bpb",
                                              "hellaswag_acc_norm", "tokens_seen", "tokens_per_sec")}
    sweep = os.path.join(sweep_dir, "checkpoint_results.json")
    if os.path.isfile(sweep):
        with open(sweep) as f:
            rows = json.load(f)["checkpoints"]
        for key in curves:
            if not curves[key]:
                curves[key] = [[r["step"], r["metrics"][key]] for r in rows if r["metrics"].get(key) is not None]
    return curves, final


def run_compare(cfg):
    """Several conditions (the first is the baseline) -> comparison_report.json + comparison.png.
    Each run folder holds results folders per task, directly or per stage (pretrain/, sft/, grpo/), and
    optionally sweep/; train_runs names the pretraining run folders, for the curves. Runs that share a label
    are seeds of one condition: the report pools them (accuracies and intervals over every seed's answers,
    McNemar over the pairs seed s of two conditions make on each question, metrics averaged over seeds)."""
    labels = list(cfg.labels) or [os.path.basename(os.path.normpath(r)) for r in cfg.runs]
    if len(labels) != len(cfg.runs):
        raise common.ConfigError(f"{len(labels)} labels for {len(cfg.runs)} runs")
    conditions = list(dict.fromkeys(labels))
    if len(conditions) < 2:
        raise common.ConfigError("compare needs runs=[baseline_dir,other_dir,...] (two or more results folders "
                                 "with different labels)")
    if cfg.train_runs and len(cfg.train_runs) != len(cfg.runs):
        raise common.ConfigError(f"{len(cfg.train_runs)} train_runs for {len(cfg.runs)} runs")
    base = conditions[0]
    seeds_of = {c: [j for j, lab in enumerate(labels) if lab == c] for c in conditions}
    stages_of = [run_stages(run, cfg.stages) for run in cfg.runs]
    stages = [s for s in list(cfg.stages) + ["eval"] if any(s in st for st in stages_of)]

    # every metric per run (a stage's metrics are named stage/metric when the runs have stages), then per
    # condition (the mean over its seeds)
    per_run = []
    for found in stages_of:
        metrics = {}
        for stage, folder in found.items():
            prefix = "" if stage == "eval" else f"{stage}/"
            metrics.update({prefix + m: v for m, v in folder_metrics(folder).items()})
        per_run.append(metrics)
    per_condition = {c: mean_metrics([per_run[j] for j in seeds_of[c]]) for c in conditions}
    names = sorted({m for ms in per_condition.values() for m in ms})
    table = {m: {c: per_condition[c].get(m) for c in conditions} for m in names}
    delta = {m: {c: (v - table[m][base]) if v is not None and table[m][base] is not None else None
                 for c, v in table[m].items() if c != base} for m in names}

    # accuracies with intervals, paired tests against the baseline, tokens per answer: per stage
    accuracy, mcnemar, tokens = {}, {}, {}
    for stage in stages:
        scored = {c: pool_seeds([scored_outcomes(stages_of[j][stage]) for j in seeds_of[c] if stage in stages_of[j]])
                  for c in conditions if any(stage in stages_of[j] for j in seeds_of[c])}
        accuracy[stage] = {c: {m: accuracy_with_ci(o) for m, o in sorted(out.items())} for c, (out, _) in scored.items()}
        tokens[stage] = {c: tok for c, (_, tok) in scored.items()}
        if base in scored:
            mcnemar[stage] = {c: {m: paired_test(scored[base][0][m], o) for m, o in sorted(out.items())
                                  if m in scored[base][0]}
                              for c, (out, _) in scored.items() if c != base}

    pretraining = {c: [] for c in conditions}
    for j, (lab, run) in enumerate(zip(labels, cfg.runs)):
        train_run = cfg.train_runs[j] if cfg.train_runs else ""
        curves, final = pretraining_curves(train_run, os.path.join(run, "sweep"))
        pretraining[lab].append({"train_run": train_run, "final": final, "curves": curves})

    # bits per byte on held-out text (task=bpb): lower is better; comparable across the conditions' tokenizers
    text_bpb = {m: table[m] for m in names if m.split("/")[-1].startswith("bpb_")}

    os.makedirs(cfg.out_dir, exist_ok=True)
    chart = os.path.join(cfg.out_dir, "comparison.png")
    plot_report(chart, conditions, stages, accuracy, mcnemar, tokens, pretraining, text_bpb)
    report = {"baseline": base, "conditions": conditions, "seeds": {c: len(seeds_of[c]) for c in conditions},
              "runs": [{"label": lab, "path": r, "metrics": m} for lab, r, m in zip(labels, cfg.runs, per_run)],
              "metrics": table, "delta_vs_baseline": delta, "stages": stages,
              "accuracy": accuracy, "mcnemar": mcnemar, "tokens_per_answer": tokens, "pretraining": pretraining,
              "text_bpb": text_bpb,
              "notes": {"ci95": "Wilson score interval (over every seed's answers when seeds are pooled)",
                        "mcnemar": "exact two-sided, on the questions both conditions answered (seed s with seed s)",
                        "val_bpb": "validation bits per byte: comparable across tokenizers, unlike per-token loss",
                        "text_bpb": "task=bpb: bits per byte of held-out text (bpb_gsm8k: GSM8K test questions and "
                                    "solutions; bpb_openwebmath: OpenWebMath pages); lower is better"},
              "chart": os.path.basename(chart)}
    common.atomic_write_json(os.path.join(cfg.out_dir, "comparison_report.json"), report)
    return report


def main_accuracies(accuracy):
    """The metrics the page shows as bars: the math task (flexible), the probe suites, HellaSwag acc_norm."""
    names = sorted({m for by_lab in accuracy.values() for ms in by_lab.values() for m in ms})
    math_names = [m for m in names if m.endswith("_flexible")]
    probe_names = [m for m in names if m.startswith("probe_")]
    return math_names + [m for m in names if m == "hellaswag_acc_norm"], probe_names


def plot_report(path, labels, stages, accuracy, mcnemar, tokens, pretraining, text_bpb=None):
    """One page: pretraining curves (val bits per byte or loss, HellaSwag), accuracies per stage with 95%
    intervals and sample counts, probe suites, tokens per answer, the paired tests, and bits per byte on
    held-out text where task=bpb ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4 if text_bpb else 3, figsize=(24 if text_bpb else 18, 10))
    if text_bpb:
        plot_text_bpb(axes[0, 3], labels, text_bpb)
        axes[1, 3].axis("off")
    colors = {lab: f"C{j}" for j, lab in enumerate(labels)}

    # pretraining curves
    for ax, keys, title in ((axes[0, 0], ("val_bpb", "val_loss"), "validation"),
                            (axes[0, 1], ("hellaswag_acc_norm",), "HellaSwag acc_norm")):
        for lab in labels:
            for s, seed_run in enumerate(pretraining[lab]):  # one line per seed, the legend names the first
                curves = seed_run["curves"]
                key = next((k for k in keys if curves.get(k)), None)
                if key:
                    ax.plot(*zip(*curves[key]), marker=".", color=colors[lab],
                            label=f"{lab} ({key})" if s == 0 else None)
        ax.set_title(f"pretraining: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no curves", ha="center", transform=ax.transAxes)

    main_names, probe_names = main_accuracies(accuracy)
    bar_groups(axes[0, 2], labels, colors, [(s, m) for m in main_names for s in stages], accuracy,
               "accuracy per stage (95% Wilson CI, k/n)")
    bar_groups(axes[1, 0], labels, colors, [(s, m) for s in stages for m in probe_names], accuracy,
               "arithmetic probes per stage (95% Wilson CI)")

    ax = axes[1, 1]  # generated tokens per answer
    groups = [(s, t) for s in stages for t in sorted({t for tok in tokens[s].values() for t in tok})]
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [tokens[s].get(lab, {}).get(t, 0.0) for s, t in groups], width, color=colors[lab], label=lab)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{t}" for s, t in groups], fontsize=7)
    ax.set_title("generated tokens per answer")
    ax.legend(fontsize=8)

    ax = axes[1, 2]  # the paired tests as a table
    ax.axis("off")
    rows = [[s, lab, m, f"{t['only_baseline_correct']}/{t['only_other_correct']}", str(t["n_paired"]),
             f"{t['p_value']:.3g}"]
            for s in stages for lab, tests in mcnemar.get(s, {}).items() for m, t in tests.items()
            if not m.endswith("_strict") and m != "hellaswag_acc"]
    if rows:
        table = ax.table(cellText=rows[:28], colLabels=["stage", "vs", "metric", "b/c", "n", "p"],
                         colWidths=[0.13, 0.17, 0.34, 0.12, 0.1, 0.14], loc="upper center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    ax.set_title(f"McNemar exact test vs {labels[0]}\n(b: only {labels[0]} right, c: only the other right)")
    fig.suptitle(" vs ".join(labels))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_text_bpb(ax, labels, text_bpb):
    """Bars of bits per byte on held-out text, one group per (stage/)text, one bar per condition."""
    names = sorted(text_bpb)
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [text_bpb[m].get(lab) or 0.0 for m in names], width, color=f"C{j}", label=lab)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([m.replace("/", "\n") for m in names], fontsize=7)
    ax.set_title("bits per byte on held-out text (lower is better)")
    ax.legend(fontsize=8)


def bar_groups(ax, labels, colors, groups, accuracy, title):
    """Grouped bars of accuracies (one bar per run) with Wilson intervals and k/n in each bar."""
    groups = [(s, m) for s, m in groups if any(m in by_metric for by_metric in accuracy.get(s, {}).values())]
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        xs, ys, errs, counts = [], [], [[], []], []
        for i, (stage, m) in enumerate(groups):
            a = accuracy.get(stage, {}).get(lab, {}).get(m)
            if a is None or a["n"] == 0:
                continue
            xs.append(i + (j - (len(labels) - 1) / 2) * width)
            ys.append(a["accuracy"])
            errs[0].append(a["accuracy"] - a["ci95"][0])
            errs[1].append(a["ci95"][1] - a["accuracy"])
            counts.append(f"{a['correct']}/{a['n']}")
        ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colors[lab], label=lab)
        for x, count in zip(xs, counts):  # the sample count at the foot of each bar
            ax.text(x, 0.01, count, rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = common.load_config(Config, argv)
    if cfg.task not in TASKS:
        raise common.ConfigError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
    if cfg.task == "compare":
        report = run_compare(cfg)
        for m, vals in report["metrics"].items():
            print(f"{m}: " + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in vals.items()))
        return report
    if cfg.task == "sweep":
        return run_sweep(cfg)
    device = resolve_device(cfg.device)
    t0 = time.time()
    lm = load_model(cfg.model, cfg, device, common.resolve_dtype(cfg.dtype, device))
    load_seconds = time.time() - t0
    results = evaluate(cfg, lm, cfg.task, cfg.out_dir)
    results["load_seconds"] = round(load_seconds, 2)
    common.atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
    print(f"{cfg.task} on {cfg.model}: " + ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items())
          + f" (n={results['n']}, {results['seconds']:.1f}s, {results['samples_per_s']:.3f} samples/s, "
            f"engine {results['engine']}) -> {cfg.out_dir}")
    return results


if __name__ == "__main__":
    common.run_main(main)

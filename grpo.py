"""
GRPO (Group Relative Policy Optimization, DeepSeekMath, arXiv 2402.03300) on verifiable tasks, in one file:
read it top to bottom. Names and defaults follow TRL's GRPOConfig, so a user moves between the two easily
(TRL's per_device_train_batch_size / logging_steps / save_steps are accepted for micro_batch_size /
log_interval / ckpt_interval); where we differ, docs/grpo.md says so.

    python grpo.py configs/grpo_demo.yaml                       # tiny CPU run: one-step arithmetic
    python grpo.py configs/grpo_gsm8k.yaml                      # the 124M model after sft_gsm8k, on GSM8K
    torchrun --nproc_per_node=4 grpo.py configs/grpo_qwen.yaml  # Qwen2.5-0.5B-Instruct
    torchrun --nproc_per_node=8 grpo.py configs/grpo_qwen.yaml fsdp=true  # the policy sharded (FSDP2)
    python grpo.py configs/grpo_demo.yaml resume=latest         # continue exactly where it stopped

What happens in a step (on every rank, for its own prompts; a group never spans two ranks):
  1. rollout: each prompt gets num_generations (G) completions from the current policy through engine.py
     (one prefill per prompt, KV cache; vLLM on CUDA when use_vllm);
  2. rewards: every reward function of tasks/rewards.py scores every completion; their weighted sum is the
     reward, and within each group of G the advantage is (reward - group mean) / (std + 1e-4);
  3. update: num_iterations optimizer steps on this batch, each over gradient_accumulation_steps micro
     batches of micro_batch_size completions. Per token, the ratio r = pi / pi_old is clipped to
     [1 - epsilon, 1 + epsilon_high], the loss is -min(r A, clip(r) A) + beta * KL(pi || pi_ref) (the k3
     estimator), summed over the completion's tokens and normalised as loss_type says.
The model in is an HF folder (sft.py, export_hf.py), an HF hub id or a native checkpoint (engine.load_model);
the model out is an HF folder (out_dir/hf) plus resumable checkpoints. SIGTERM / SIGUSR1 (SLURM preemption or
time limit) only set a flag: at the next step boundary the run saves a checkpoint and exits with code 0.
"""
import common  # first: its import installs the stop-signal handlers, before torch is imported

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import engine as engine_lib
import model as model_lib
import tasks
from tasks import rewards as rewards_lib

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class Config:
    # model: an HF folder / hub id, or a native checkpoint (file, run folder, RUN/latest)
    model: str = ""  # the policy to start from: an HF folder or hub id, or a native checkpoint
    tokenizer_file: Optional[str] = None  # GPT-2 ranks file for native checkpoints on offline machines
    ref_model: str = ""  # the frozen reference for the KL term; "" = the starting model (beta > 0 only)
    # task and rewards (tasks/ and tasks/rewards.py)
    task: str = "gsm8k"  # a name in tasks.TASKS: gsm8k | svamp | synthetic | arithmetic | ..., or sft:NAME
    task_args: dict = field(default_factory=dict)  # keyword arguments of the task, e.g. {train_path: ...}
    reward_funcs: List[str] = field(default_factory=lambda: ["gsm8k"])  # names in tasks.rewards.REWARDS
    reward_model: str = ""  # an HF sequence-classification model (folder or id) added as one more reward
    reward_weights: Optional[List[float]] = None  # one per reward (reward_funcs, then reward_model); None = 1.0 each
    # generation
    num_generations: int = 8  # G: completions per prompt
    max_prompt_length: int = 512  # longer prompts keep their last tokens, as TRL
    max_completion_length: int = 256  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature (the log-probs are those of logits / temperature, as TRL)
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # 0 = off (TRL: None)
    stop: Optional[List[str]] = None  # None = the task's stop strings
    generation_batch_size: int = 64  # rows per batch of the PyTorch sampler
    use_vllm: bool = False  # colocated vLLM on the training GPU (CUDA only)
    vllm_gpu_memory_utilization: float = 0.3  # the share of GPU memory vLLM may take
    # batch: completions per rank per step = micro_batch_size * gradient_accumulation_steps
    micro_batch_size: int = 8  # completions per forward pass per rank (TRL: per_device_train_batch_size)
    gradient_accumulation_steps: int = 1  # micro batches per optimizer step
    # the GRPO loss
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # None = epsilon (DAPO's clip-higher sets it above)
    num_iterations: int = 1  # mu: optimizer steps per batch of rollouts (old log-probs kept for all of them)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length leave the loss
    # optimisation (AdamW, HF TrainingArguments' defaults)
    learning_rate: float = 1e-6  # peak learning rate of AdamW
    lr_scheduler_type: str = "linear"  # linear (to 0) | cosine | constant
    warmup_ratio: float = 0.0  # share of the optimizer steps spent warming up linearly
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    max_grad_norm: float = 1.0  # gradient clipping norm
    max_steps: int = 500  # rollout steps (each one takes num_iterations optimizer steps)
    seed: int = 42  # seeds the prompt order and the sampling of every step
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 autocast on cuda, else fp32) | float32 | bfloat16 (weights stay fp32)
    fsdp: bool = False  # shard the policy (and the reference) over the torchrun ranks (FSDP2); rollouts sample
    #                     from a plain copy of the policy that gathers the weights after each optimizer step
    cpu_offload: bool = False  # fsdp: keep the sharded weights, gradients and optimizer state in CPU memory
    # output, evaluation, checkpoints
    out_dir: str = "out/grpo"  # the run's folder: checkpoints, logs, results.json, hf/
    log_interval: int = 1  # steps between train records (TRL: logging_steps)
    eval_steps: int = 50  # test accuracy (greedy) every eval_steps steps and at the end; 0 = only at the end
    eval_examples: int = 200  # the fixed subset: the first eval_examples of the task's test split
    ckpt_interval: int = 100  # steps between checkpoints, and one at the end (0 = only at the end; TRL: save_steps)
    keep_last_k: int = 2  # keep only the newest k checkpoints (0 = keep all)
    resume: Optional[str] = None  # latest (newest in out_dir, or a fresh start if none) | a checkpoint path
    stop_after_step: int = -1  # end this invocation after this step with a checkpoint, as if preempted
    tensorboard: bool = True  # also log to out_dir/tensorboard (tags <record type>/<key>)
    wandb_project: Optional[str] = None  # also log to this W&B project (wandb imported only when set)


def check_config(cfg, world_size=1):
    """Mistakes that need no model: one-line errors naming the setting."""
    if not cfg.model:
        raise common.ConfigError("model= is required (an HF folder or hub id, or a native checkpoint)")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise common.ConfigError(f"out_dir={cfg.out_dir} is a file; out_dir is the run's folder")
    for key in ("max_steps", "num_iterations", "max_completion_length", "max_prompt_length", "log_interval",
                "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, key) <= 0:
            raise common.ConfigError(f"config key '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.num_generations < 2:
        raise common.ConfigError(f"num_generations must be at least 2 (a group needs a spread), got {cfg.num_generations}")
    per_rank = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    if per_rank % cfg.num_generations:
        raise common.ConfigError(
            f"num_generations={cfg.num_generations} does not divide the completions per rank per step, "
            f"micro_batch_size * gradient_accumulation_steps = {cfg.micro_batch_size} * "
            f"{cfg.gradient_accumulation_steps} = {per_rank} (each group stays whole on one rank)")
    if cfg.temperature <= 0:
        raise common.ConfigError(f"temperature must be > 0 (GRPO learns from sampled groups), got {cfg.temperature}")
    if cfg.loss_type not in LOSS_TYPES:
        raise common.ConfigError(f"loss_type '{cfg.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise common.ConfigError(f"scale_rewards '{cfg.scale_rewards}' is not one of {', '.join(SCALE_REWARDS)}")
    if cfg.task not in tasks.TASKS:  # sft:NAME: a scored set of the SFT registry (tasks/sft_sets.py SFTSetTask)
        try:
            tasks.check_task(cfg.task)
        except ValueError as e:
            raise common.ConfigError(f"task '{cfg.task}': {e}") from e
        try:
            rewards_lib.check_fit(cfg.task, cfg.reward_funcs)
        except ValueError as e:
            raise common.ConfigError(str(e)) from e
    for name in cfg.reward_funcs:
        if name not in rewards_lib.REWARDS:
            raise common.ConfigError(f"reward_funcs: '{name}' is not in the rewards registry; choose from "
                                     f"{', '.join(rewards_lib.REWARDS)} (or give reward_model=)")
    n_rewards = len(cfg.reward_funcs) + bool(cfg.reward_model)
    if n_rewards == 0:
        raise common.ConfigError("no reward: give reward_funcs= and/or reward_model=")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != n_rewards:
        raise common.ConfigError(f"reward_weights has {len(cfg.reward_weights)} weights for {n_rewards} rewards "
                                 f"({', '.join(reward_names(cfg))})")
    if cfg.beta < 0 or cfg.epsilon < 0 or (cfg.epsilon_high is not None and cfg.epsilon_high < 0):
        raise common.ConfigError("beta, epsilon and epsilon_high must be >= 0")
    if cfg.beta > 0 and not reference_available(cfg.ref_model or cfg.model):
        raise common.ConfigError(f"beta={cfg.beta} needs a reference model, but '{cfg.ref_model or cfg.model}' is not "
                                 f"there; set ref_model= to the starting model, or beta=0")
    if cfg.use_vllm and not torch.cuda.is_available():
        raise common.ConfigError("use_vllm=true needs a CUDA GPU; none is visible (use_vllm=false samples in PyTorch)")
    if cfg.use_vllm and not common.vllm_available():
        raise common.ConfigError("use_vllm=true but vllm is not installed (pip install -r requirements-gpu.txt)")
    if cfg.cpu_offload and not cfg.fsdp:
        raise common.ConfigError("cpu_offload=true offloads FSDP's shards: set fsdp=true too")
    if cfg.lr_scheduler_type not in ("linear", "cosine", "constant"):
        raise common.ConfigError(f"lr_scheduler_type '{cfg.lr_scheduler_type}' is not one of linear, cosine, constant")
    common.resolve_dtype(cfg.dtype, "cpu")


def reward_names(cfg):
    return list(cfg.reward_funcs) + (["reward_model"] if cfg.reward_model else [])


def reference_available(name):
    """A local path must exist; a name like 'org/model' or 'gpt2' that is not here is taken for a hub id."""
    if os.path.exists(name):
        return True
    return not (name.startswith((".", "/", "~")) or name.endswith(".pt") or name.count("/") > 1)


# what defines a run: the task, the rewards and the loss (these settings), and the model it starts from, the
# reference and the task's data files (compared by content, not by the path's spelling). A resumed run cannot
# change them; max_steps, the lr, the intervals and the generation budget it may
RUN_KEYS = ("task", "reward_funcs", "reward_model", "reward_weights", "num_generations", "temperature", "loss_type",
            "beta", "epsilon", "epsilon_high", "num_iterations", "scale_rewards", "mask_truncated_completions")


def content_id(name):
    """A model or data path by what it holds (common.fingerprint; an HF folder file by file, since a folder's
    fingerprint compares sizes only); anything else (a hub id, a number) by its value."""
    if not isinstance(name, str) or not name:
        return name
    if engine_lib.is_native(name):
        try:
            return common.fingerprint(common.resolve_checkpoint(name))
        except FileNotFoundError:  # engine.load_model says what is missing
            return name
    if os.path.isdir(name):
        h = hashlib.sha256()
        for sub in sorted(os.listdir(name)):
            if os.path.isfile(os.path.join(name, sub)):
                h.update(f"{sub}:{common.fingerprint(os.path.join(name, sub))};".encode())
        return h.hexdigest()[:16]
    return common.fingerprint(name) if os.path.isfile(name) else name


def identity(cfg):
    # the content entries have names of their own: a checkpoint written before identities compares the rest
    return common.run_identity(cfg, RUN_KEYS, model_files=content_id(cfg.model),
                               ref_model_files=content_id(cfg.ref_model),
                               task_data={k: content_id(v) for k, v in sorted(cfg.task_args.items())})


# -----------------------------------------------------------------------------
# the math of GRPO, as small functions on tensors (tests/test_grpo.py checks each against a direct computation)


def group_advantages(rewards, num_generations, scale_rewards="group", batch_std=None):
    """rewards (N,), group after group of num_generations -> advantages (N,): reward minus its group's mean,
    divided (scale_rewards group) by the group's std, (batch) by the std of the whole batch over all ranks
    (batch_std), or (none, Dr. GRPO) not at all. std is the unbiased one and gets + 1e-4, as TRL: a group of
    equal rewards has advantage 0, never NaN."""
    grouped = rewards.view(-1, num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = rewards.std() if batch_std is None else batch_std
    else:
        return advantages
    return advantages / (std + 1e-4)


def global_std(x, d):
    """Unbiased std of x over all ranks (same count on each)."""
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    total, squares, n = common.all_reduce(stats, "sum", d).tolist()
    return torch.tensor(math.sqrt(max(squares - total * total / n, 0.0) / max(n - 1, 1)), device=x.device)


def k3_kl(logp, ref_logp):
    """Per-token KL(pi || pi_ref), the k3 estimator (Schulman): exp(q - p) - (q - p) - 1 >= 0, 0 where equal."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp, old_logp, advantages, mask, loss_type="dapo", epsilon=0.2, epsilon_high=None, beta=0.0,
                ref_logp=None, max_completion_length=None, num_items=None):
    """The clipped GRPO objective on (B, L) per-token log-probs of B completions (mask: 1 on real tokens).
    loss_type normalises the summed per-token loss as TRL does: grpo = mean over each sequence's tokens, then
    over sequences; bnpo = over this batch's tokens; dr_grpo = over B * max_completion_length; dapo = over
    num_items (the active tokens of the whole step over all micro batches and ranks, per rank; default: this
    batch's). Returns (loss, stats of device tensors)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = {}
    if beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = (kl * mask).sum().detach() / mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)  # the clip is active: the gradient is cut there
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
    n = mask.sum().clamp(min=1)
    stats.update(clip_low=(low * mask).sum().detach() / n, clip_high=(high * mask).sum().detach() / n,
                 clip_ratio=((low + high) * mask).sum().detach() / n)
    return loss, stats


def completion_mask(lengths, truncated, max_len, mask_truncated=False):
    """(B, max_len) float mask: 1 on each completion's tokens; all 0 for a truncated one if mask_truncated."""
    mask = (torch.arange(max_len)[None, :] < torch.as_tensor(lengths)[:, None]).float()
    if mask_truncated:
        mask = mask * (~torch.as_tensor(truncated, dtype=torch.bool))[:, None].float()
    return mask


# -----------------------------------------------------------------------------
# log-probs of completions under a model: one full forward pass over prompt + completion


def pack_sequences(prompts, completions, pad_id):
    """Each row: prompt then completion, right-padded (causal attention needs no mask for pads at the end;
    positions start at 0 in every row). Returns ids (B, T), attention mask (B, T) and, per row, the index of
    each completion token's logits in the (B, T - 1) shifted layout, as (B, L) (L = longest completion)."""
    B = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    L = max(1, max(len(c) for c in completions))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    where = torch.zeros((B, L), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, :len(seq)] = 1
        # the logits at position t predict token t + 1: completion token j is predicted at len(p) - 1 + j
        where[i] = torch.clamp(torch.arange(L) + len(p) - 1, max=T - 2)
    return ids, attention, where


def sequence_logits(model, ids, attention, native):
    if native:
        return model(ids)[0]
    return model(input_ids=ids, attention_mask=attention).logits


def completion_logprobs(model, ids, attention, where, native, temperature=1.0):
    """(B, L) log-probs of the completion tokens under the policy that sampled them: fp32 log-softmax of
    logits / temperature over the model's whole output (TRL's definition; at temperature 1 exactly what engine.py
    reports), one row at a time: an fp32 (T, V) at a time, not (B, T, V)."""
    logits = sequence_logits(model, ids, attention, native)
    targets = ids[:, 1:].gather(1, where)
    rows = []
    for i in range(ids.size(0)):
        row = logits[i, :-1].index_select(0, where[i]).float() / temperature
        rows.append(row.gather(-1, targets[i][:, None])[:, 0] - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def frozen_logprobs(model, native, micro, temperature, autocast):
    """Log-probs of each micro batch's completions under a model that is not trained on them (pi_old, pi_ref)."""
    out = []
    for mb in micro:
        with autocast:
            out.append(completion_logprobs(model, mb["ids"], mb["attention"], mb["where"], native, temperature))
    return out


# -----------------------------------------------------------------------------
# data: prompts in a fixed order per epoch (seeded), so the position is a function of the step


def prompt_indices(n_examples, step, prompts_per_step, seed):
    """The example indices of one step over all ranks: epoch after epoch of seeded permutations."""
    out, start = [], step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        out += perm[offset:offset + prompts_per_step - len(out)]
    return out


def encode_prompts(lm, task, examples, max_prompt_length):
    texts = [task.prompt(e) for e in examples]
    return texts, [lm.tok.encode_prompt(t)[-max_prompt_length:] for t in texts]


def load_rewards(cfg, device):
    """[(name, fn)], weights: the registry's functions, then the reward model if any."""
    funcs = [(name, rewards_lib.get_reward(name)) for name in cfg.reward_funcs]
    if cfg.reward_model:
        funcs.append(("reward_model", rewards_lib.RewardModel(cfg.reward_model, device)))
    weights = cfg.reward_weights if cfg.reward_weights is not None else [1.0] * len(funcs)
    return funcs, weights


def score(funcs, examples, prompts, completions):
    """(N, F) rewards: each function on every completion."""
    columns = [torch.tensor(fn(examples, prompts, completions), dtype=torch.float32) for _, fn in funcs]
    return torch.stack(columns, dim=1)


@torch.no_grad()
def evaluate(lm, sampler, task, examples, cfg, prompt_budget, stop, d, autocast):
    """Greedy accuracy (the task's reward > 0, e.g. GSM8K strict) on the fixed subset, split over ranks."""
    if not examples:
        return None, 0
    mine = examples[d.rank::d.world_size]
    correct = 0.0
    if mine:
        _, prompt_ids = encode_prompts(lm, task, mine, prompt_budget)
        with autocast:
            outs = sampler.generate(prompt_ids, cfg.max_completion_length, temperature=0.0, stop=stop, seed=0)
        correct = sum(float(task.reward(e, o[0].text) > 0) for e, o in zip(mine, outs))
    t = common.all_reduce(torch.tensor([correct, float(len(mine))], device=d.device), "sum", d)
    return t[0].item() / max(t[1].item(), 1.0), int(t[1].item())


def save_hf(lm, raw_model, folder, info):
    """The policy as an HF folder: a native GPT through model.save_hf_folder (GPT2LMHeadModel), else as is."""
    if lm.kind == "native":
        model_lib.save_hf_folder(raw_model, lm.tok.tok, folder, info)
    else:
        raw_model.save_pretrained(folder, safe_serialization=True)
        lm.tok.tok.save_pretrained(folder)
        common.atomic_write_json(os.path.join(folder, "export_info.json"), info)


# -----------------------------------------------------------------------------
# set-up: the task's data, the policy, the reference, the sampler


def load_task(cfg):
    """The task, its training examples, the fixed evaluation subset and the stop strings."""
    try:
        task = tasks.get_task(cfg.task, **cfg.task_args)
    except TypeError as e:  # a keyword the task does not take
        raise common.ConfigError(f"task_args {cfg.task_args} do not fit task '{cfg.task}': {e}") from e
    train_examples = task.examples("train")
    if not train_examples:
        where = cfg.task_args.get("train_path")
        raise common.ConfigError(f"task '{cfg.task}' has no training examples"
                                 + (f" (train_path={where} holds none)" if where else "") + ": GRPO needs prompts")
    eval_examples = task.examples("test")[:cfg.eval_examples]
    stop = list(task.stop() if cfg.stop is None else cfg.stop)
    return task, train_examples, eval_examples, stop


def load_policy(cfg, d, ckpt, dtype):
    """The policy in fp32 (its weights from the checkpoint when resuming), DDP-wrapped or (fsdp) sharded, its
    AdamW, and the model the rollouts sample from: the policy itself, or under FSDP a plain copy in `dtype` that
    gather_weights refreshes (each forward of a sharded model is a collective all ranks must call, and the
    ranks generate different lengths, so sampling cannot run on the shards; TRL hands the weights to vLLM)."""
    try:
        lm = engine_lib.load_model(cfg.model, cfg.tokenizer_file, device=d.device, dtype=torch.float32)
    except ValueError as e:
        if "holds a '" not in str(e):
            raise
        raise common.ConfigError(f"model={cfg.model}: {e}; grpo.py trains causal LMs: a GPT checkpoint "
                                 f"(train_gpt.py), an HF folder or an HF hub id") from e
    sharded = bool(ckpt and ckpt.get("sharded"))
    if ckpt and cfg.fsdp and not sharded:
        raise common.ConfigError(f"{ckpt['path']} is a single-file checkpoint of a run without fsdp: resume it with "
                                 "fsdp=false (a sharded run writes and resumes ckpt_*.dcp folders)")
    if ckpt and not sharded:
        lm.model.load_state_dict(ckpt["model"])
    lm.model.eval()  # dropout off throughout: rollouts, old and new log-probs see the same function
    rollout_lm = lm
    if cfg.fsdp:  # the copy first, then the parameters become this rank's shards (before the optimizer is built)
        plain = copy.deepcopy(lm.model).requires_grad_(False)
        rollout_lm = dataclasses.replace(lm, model=plain.to(dtype) if not cfg.use_vllm else plain)
        common.shard_model(lm.model, d, dtype, cfg.cpu_offload)
        model = lm.model
    else:
        model = common.wrap_model(lm.model, d, compile=False)  # varying shapes every step: no torch.compile
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    if sharded:  # torch.distributed.checkpoint: re-cut for this world size, or loaded whole without fsdp
        common.load_sharded_checkpoint(ckpt["path"], lm.model, optimizer, d.rank)
    elif ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if cfg.fsdp:
        gather_weights(lm.model, rollout_lm.model, d)
    return lm, rollout_lm, model, optimizer


@torch.no_grad()
def gather_weights(sharded, plain, d):
    """Every rank: the sharded policy's current weights into its plain rollout copy, one parameter at a time (a
    whole gathered state dict would hold every weight twice at once). The names are the same: FSDP2 keeps them."""
    params = dict(plain.named_parameters())
    for name, p in sharded.named_parameters():
        if hasattr(p, "full_tensor"):
            p = (p if p.device.type == d.device_type else p.to(d.device)).full_tensor()  # cpu_offload: shards on CPU
        params[name].copy_(p)


def load_reference(cfg, d, dtype):
    """The frozen reference of the KL term (beta > 0), sharded as the policy under fsdp, else None."""
    if cfg.beta <= 0:
        return None
    ref = engine_lib.load_model(cfg.ref_model or cfg.model, cfg.tokenizer_file, device=d.device, dtype=dtype)
    ref.model.requires_grad_(False)
    if cfg.fsdp:
        common.shard_model(ref.model, d, dtype, cfg.cpu_offload)
    return ref



def make_sampler(cfg, lm, d, dtype):
    if not cfg.use_vllm:
        return engine_lib.Engine(lm, batch_size=cfg.generation_batch_size)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # load_weights reaches the in-process runner
    sampler = engine_lib.VLLMEngine(lm, dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    if not cfg.fsdp:  # VLLMEngine moves the PyTorch copy away; training needs it back (fsdp: a rollout copy)
        lm.model.to(d.device)
    sampler.load_weights(lm.model)  # the policy of the checkpoint, not the folder's weights
    return sampler


def prompt_budget(cfg, lm):
    """Prompts keep their last tokens, so that prompt + completion fit the model's positions."""
    if not lm.max_positions:
        return cfg.max_prompt_length
    if cfg.max_completion_length >= lm.max_positions:
        raise common.ConfigError(f"max_completion_length={cfg.max_completion_length} leaves no room for a prompt "
                                 f"in the model's {lm.max_positions} positions")
    return min(cfg.max_prompt_length, lm.max_positions - cfg.max_completion_length)


# -----------------------------------------------------------------------------
# one step: rollouts, then num_iterations optimizer steps on them


def rollout(cfg, step, lm, sampler, task, examples, budget, stop, rewards, d, autocast):
    """This rank's prompts of the step, G completions each, their rewards and advantages."""
    G = cfg.num_generations
    per_rank = cfg.micro_batch_size * cfg.gradient_accumulation_steps // G
    idx = prompt_indices(len(examples), step, per_rank * d.world_size, cfg.seed)
    mine = [examples[i] for i in idx[d.rank * per_rank:(d.rank + 1) * per_rank]]
    prompt_texts, prompt_ids = encode_prompts(lm, task, mine, budget)
    common.synchronize(d.device_type)
    t0 = time.time()
    with autocast:
        outs = sampler.generate(prompt_ids, cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k, stop=stop, num_samples=G,
                                seed=cfg.seed * 1000003 + step * 1009 + d.rank)
    common.synchronize(d.device_type)
    seconds = time.time() - t0
    completions = [c for group in outs for c in group]  # group after group
    examples_rep = [e for e in mine for _ in range(G)]
    funcs, weights = rewards
    per_func = score(funcs, examples_rep, [p for p in prompt_texts for _ in range(G)], [c.text for c in completions])
    total = rewards_lib.combine(per_func, weights)
    batch_std = global_std(total.to(d.device), d).cpu() if cfg.scale_rewards == "batch" else None
    return dict(prompt_ids=[p for p in prompt_ids for _ in range(G)], completions=completions, examples=examples_rep,
                per_func=per_func, rewards=total, advantages=group_advantages(total, G, cfg.scale_rewards, batch_std),
                rollout_seconds=seconds)


def micro_batches(cfg, batch, pad_id, device):
    """The step's completions in micro batches of micro_batch_size rows, packed for one forward pass each."""
    lengths = [len(c.ids) for c in batch["completions"]]
    truncated = [c.finish_reason == "length" for c in batch["completions"]]
    B = cfg.micro_batch_size
    micro = []
    for s in range(0, len(lengths), B):
        rows = range(s, s + B)
        ids, attention, where = pack_sequences([batch["prompt_ids"][i] for i in rows],
                                               [batch["completions"][i].ids for i in rows], pad_id)
        mask = completion_mask([lengths[i] for i in rows], [truncated[i] for i in rows], where.size(1),
                               cfg.mask_truncated_completions)
        micro.append(dict(ids=ids.to(device), attention=attention.to(device), where=where.to(device),
                          mask=mask.to(device), advantages=batch["advantages"][s:s + B].to(device)))
    return micro


def update(cfg, step, batch, lm, model, optimizer, ref, watch, d, autocast):
    """num_iterations optimizer steps on the batch; returns summed stats (device tensors) and the tokens seen."""
    native = lm.kind == "native"
    micro = micro_batches(cfg, batch, lm.tok.pad_id, d.device)
    # dapo: the summed loss over the active tokens of the whole step (all micro batches, all ranks);
    # DDP averages gradients over ranks, so each rank divides by the global count / world size
    active = torch.tensor(sum(m["mask"].sum().item() for m in micro), device=d.device)
    num_items = (common.all_reduce(active, "sum", d) / d.world_size).clamp(min=1)
    old = frozen_logprobs(model, native, micro, cfg.temperature, autocast) if cfg.num_iterations > 1 else None
    refs = frozen_logprobs(ref.model, ref.kind == "native", micro, cfg.temperature, autocast) if ref else None
    epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    total_updates = cfg.max_steps * cfg.num_iterations
    totals, tokens = {}, 0
    for it in range(cfg.num_iterations):
        lr = common.lr_at(step * cfg.num_iterations + it, cfg.learning_rate, 0.0, int(cfg.warmup_ratio * total_updates),
                          total_updates, cfg.lr_scheduler_type)
        common.set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        for k, mb in enumerate(micro):
            # gradients are reduced over ranks on the last micro batch only (DDP: no_sync covers the forward too)
            sync = k == len(micro) - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            with model.no_sync() if d.ddp and not cfg.fsdp and not sync else contextlib.nullcontext():
                with autocast:
                    logp = completion_logprobs(model, mb["ids"], mb["attention"], mb["where"], native, cfg.temperature)
                old_logp = old[k] if old is not None else logp.detach()  # mu = 1: ratio 1, clip inert
                loss, stats = policy_loss(
                    logp, old_logp, mb["advantages"], mb["mask"], cfg.loss_type, cfg.epsilon, epsilon_high, cfg.beta,
                    refs[k] if refs is not None else None, cfg.max_completion_length, num_items)
                if cfg.loss_type != "dapo":  # dapo's normaliser already counts every micro batch
                    loss = loss / len(micro)
                loss.backward()
            tokens += int(mb["attention"].sum())
            for key, v in {"loss": loss.detach(), **stats}.items():
                totals[key] = totals.get(key, 0.0) + v / (len(micro) if key != "loss" else 1) / cfg.num_iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(lm.model.parameters(), cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
            grad_norm = grad_norm.full_tensor()
        watch.update(step, totals["loss"], grad_norm)
        optimizer.step()
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm.detach() / cfg.num_iterations
    totals["lr"] = lr
    return totals, tokens


def step_record(step, batch, totals, task, names, G, d, rollout_tps, update_tps):
    """The step's train record: metrics averaged (max for the longest completion) over ranks."""
    comps = batch["completions"]
    lengths = torch.tensor([float(len(c.ids)) for c in comps])
    truncated = torch.tensor([float(c.finish_reason == "length") for c in comps])
    accuracy = torch.tensor([float(task.reward(e, c.text) > 0) for e, c in zip(batch["examples"], comps)])
    groups = batch["rewards"].view(-1, G)
    means = {"reward": batch["rewards"].mean(), "reward_std": batch["rewards"].std(),
             "frac_reward_zero_std": (groups.std(dim=1) < 1e-6).float().mean(),
             "accuracy": accuracy.mean(), "completion_length": lengths.mean(), "truncated_share": truncated.mean(),
             "rollout_tokens_per_s": torch.tensor(rollout_tps), "update_tokens_per_s": torch.tensor(update_tps)}
    for j, name in enumerate(names):
        means[f"rewards/{name}/mean"] = batch["per_func"][:, j].mean()
        means[f"rewards/{name}/std"] = batch["per_func"][:, j].std()
    for k, v in totals.items():
        means[k] = torch.as_tensor(v, dtype=torch.float32)
    keys = list(means)
    avg = common.all_reduce(torch.stack([means[k].float().to(d.device) for k in keys]), "avg", d).tolist()
    longest = common.all_reduce(lengths.max().to(d.device), "max", d).item()
    return {"type": "train", "step": step, **dict(zip(keys, avg)), "completion_length_max": longest}


def save(cfg, step, lm, optimizer, run_identity, d):
    about = {"kind": "grpo", "source_model": cfg.model, "config": common.config_dict(cfg), "identity": run_identity,
             "model_config": dataclasses.asdict(lm.model.config) if lm.kind == "native" else lm.model.config.to_dict()}
    if cfg.fsdp:  # every rank writes its shards (torch.distributed.checkpoint, a ckpt_N.dcp folder)
        return common.save_sharded_checkpoint(cfg.out_dir, step, lm.model, optimizer, about, d, cfg.keep_last_k)
    return common.save_training_checkpoint(cfg.out_dir, step, {
        **about, "model": lm.model.state_dict(), "step": step, "optimizer": optimizer.state_dict(),
        "rng": common.rng_state()}, d, cfg.keep_last_k)


def plot_curves(out_dir, names):
    common.plot_log_curves(out_dir, [
        ("reward", "mean reward", [("train", "reward", "reward")] + [("train", f"rewards/{n}/mean", n) for n in names]),
        ("accuracy", "accuracy", [("train", "accuracy", "train samples"), ("eval", "accuracy", "test (greedy)")]),
        ("policy", "value", [("train", "kl", "KL"), ("train", "clip_ratio", "clip fraction")]),
        ("completions", "tokens", [("train", "completion_length", "mean length"),
                                   ("train", "completion_length_max", "max length")]),
    ], filename="grpo.png")


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    cfg = common.load_config(Config, argv)
    check_config(cfg)
    return common.launch(train, cfg)


def train(cfg, d, stop):
    # ---- where to start: fresh, or from a checkpoint (policy, optimizer, step, RNG; the prompts and the
    # sampling seeds follow from the step)
    run_identity = identity(cfg)
    ckpt = common.restore(cfg.out_dir, cfg.resume, "grpo", run_identity, d.master)
    start_step = ckpt["step"] + 1 if ckpt else 0
    finished = common.already_finished(ckpt, cfg.max_steps, d)
    if finished:
        return finished
    common.seed_everything(cfg.seed, d.device_type)
    dtype = common.resolve_dtype(cfg.dtype, d.device)
    autocast = common.autocast(d.device_type, dtype)

    task, train_examples, eval_examples, stop_strings = load_task(cfg)
    rewards = load_rewards(cfg, d.device)
    names = [n for n, _ in rewards[0]]
    lm, rollout_lm, model, optimizer = load_policy(cfg, d, ckpt, dtype)
    if ckpt and "rng" in ckpt:  # a sharded checkpoint's RNG state is restored by load_sharded_checkpoint
        common.set_rng_state(ckpt["rng"])
    ref = load_reference(cfg, d, dtype)
    sampler = make_sampler(cfg, rollout_lm, d, dtype)
    budget = prompt_budget(cfg, lm)

    logger = common.Logger(cfg.out_dir, d.master, resume=ckpt is not None, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=common.config_dict(cfg))
    if d.master:
        common.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
    G = cfg.num_generations
    logger.info(f"policy {cfg.model} ({lm.kind}, {sum(p.numel() for p in lm.model.parameters()) / 1e6:.2f}M params)"
                f" | reference {(cfg.ref_model or cfg.model) if ref else 'none (beta=0)'} | sampler {sampler.name} | "
                f"task {cfg.task} ({len(train_examples)} train prompts) | rewards "
                f"{', '.join(f'{n} x{w:g}' for n, w in zip(names, rewards[1]))} | "
                f"{cfg.micro_batch_size * cfg.gradient_accumulation_steps // G} prompts x G={G} per rank x "
                f"{d.world_size} ranks | loss {cfg.loss_type}, beta {cfg.beta}, eps [{cfg.epsilon}, "
                f"{cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high}], mu {cfg.num_iterations} | "
                f"device {d.device}" + (f" | fsdp over {d.world_size} ranks" if cfg.fsdp else ""))
    if ckpt:
        logger.info(f"resumed from {ckpt['path']} at step {start_step}")

    stopped = common.stopped_before_start(stop, d, logger, start_step)
    if stopped:
        sampler.close()
        return stopped

    # ---- the loop
    watch = common.NonFiniteWatch(d.device)  # NaN/Inf in loss or gradients, remembered without a host sync
    timer = common.StepTimer(d.device_type, world_size=d.world_size)  # trained tokens/s of whole steps
    phase_seconds, phase_tokens = [0.0, 0.0], [0, 0]  # rollout, update: after the first step (warm-up)
    status, step, accuracy = "done", start_step - 1, None
    logger.progress(total=cfg.max_steps, initial=start_step, desc="grpo")
    if start_step == 0 and eval_examples:  # where the policy starts
        accuracy, n_eval = evaluate(lm, sampler, task, eval_examples, cfg, budget, stop_strings, d, autocast)
        logger.log({"type": "eval", "step": -1, "accuracy": accuracy, "n": n_eval})
    timer.restart()
    for step in range(start_step, cfg.max_steps):
        batch = rollout(cfg, step, lm, sampler, task, train_examples, budget, stop_strings, rewards, d, autocast)
        t0 = time.time()
        totals, tokens = update(cfg, step, batch, lm, model, optimizer, ref, watch, d, autocast)
        common.synchronize(d.device_type)
        update_seconds = time.time() - t0
        if cfg.fsdp:
            gather_weights(lm.model, rollout_lm.model, d)  # the next rollouts sample from the updated policy
        if cfg.use_vllm:
            sampler.load_weights(rollout_lm.model)
        generated = sum(len(c.ids) for c in batch["completions"])
        if step > start_step:
            phase_seconds = [phase_seconds[0] + batch["rollout_seconds"], phase_seconds[1] + update_seconds]
            phase_tokens = [phase_tokens[0] + generated, phase_tokens[1] + tokens]
        timer.step(tokens * d.world_size)  # ranks train about equal batches
        logger.bar.update(1)
        due = common.due(step, cfg.max_steps, cfg.log_interval, cfg.ckpt_interval, cfg.eval_steps,
                         cfg.stop_after_step, first_step=start_step)
        # a signal stops the run at a step boundary; under DDP the ranks agree on it at log points
        signal_stop = stop.check(d, sync=due.log)
        if not (due.log or signal_stop):
            continue

        common.stop_if_diverged(watch, d, logger, cfg.out_dir)
        record = step_record(step, batch, totals, task, names, G, d, generated / batch["rollout_seconds"],
                             tokens / update_seconds)
        logger.log({**record, **timer.lap()})
        logger.postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
        if due.eval and eval_examples:
            accuracy, n_eval = evaluate(lm, sampler, task, eval_examples, cfg, budget, stop_strings, d, autocast)
            logger.log({"type": "eval", "step": step, "accuracy": accuracy, "n": n_eval})
        status = common.save_or_exit(due, signal_stop, stop, step,
                                     lambda s: save(cfg, s, lm, optimizer, run_identity, d), logger) or status
        if status != "done":
            break
        timer.restart()  # evaluation and saving are not training time

    speed = timer.summary()
    results = {"status": status, "step": step, "eval_accuracy": accuracy, "eval_examples": len(eval_examples),
               "rollout_tokens_per_s": phase_tokens[0] / phase_seconds[0] if phase_seconds[0] else None,
               "update_tokens_per_s": phase_tokens[1] / phase_seconds[1] if phase_seconds[1] else None,
               "tokens_per_sec": speed["tokens_per_sec"], "peak_mem_gb": speed["peak_mem_gb"],
               "device": d.device, "world_size": d.world_size, "fsdp": cfg.fsdp, "sampler": sampler.name,
               "resumed_from_step": start_step - 1 if ckpt else None}
    export = lm.model
    if status == "done" and cfg.fsdp:  # the fp32 weights gathered on rank 0, into the rollout copy (done with)
        full = common.full_model_state(lm.model)
        export = rollout_lm.model.to("cpu", torch.float32) if d.master else None
        if d.master:
            export.load_state_dict(full)
    if status == "done" and d.master:
        results["hf_folder"] = os.path.join(cfg.out_dir, "hf")
        save_hf(lm, export, results["hf_folder"], {"source_model": cfg.model, "stage": "grpo", "step": step,
                                                     "task": cfg.task, "eval_accuracy": accuracy})
    common.finish(cfg.out_dir, results, d, logger)
    if status == "done" and d.master:
        plot_curves(cfg.out_dir, names)
    sampler.close()
    common.barrier(d)
    return results


if __name__ == "__main__":
    common.run_main(main, preemptible=True)

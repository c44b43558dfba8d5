"""grpo.py and tasks/rewards.py: the GRPO math against direct computations written out here, the rewards on
hand-written completions, the sampler's log-probs against a full forward pass, a tiny SFT-warmed model whose
reward rises under GRPO, exact resume, and the one-line errors for bad settings."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import engine as engine_lib
import grpo
import model as model_lib
import tasks
from conftest import shared_path
from tasks import rewards as rewards_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# the math


def test_group_advantages_against_direct_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 3.0, 0.0])
    G = 4
    got = {s: grpo.group_advantages(rewards, G, s) for s in ("group", "batch", "none")}
    values = rewards.tolist()
    overall_mean = sum(values) / len(values)
    batch_std = (sum((v - overall_mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    for g in range(3):
        group = values[g * G:(g + 1) * G]
        mean = sum(group) / G
        std = (sum((v - mean) ** 2 for v in group) / (G - 1)) ** 0.5  # unbiased, as TRL
        for j, v in enumerate(group):
            i = g * G + j
            assert got["none"][i].item() == pytest.approx(v - mean, abs=1e-6)
            assert got["group"][i].item() == pytest.approx((v - mean) / (std + 1e-4), abs=1e-5)
            assert got["batch"][i].item() == pytest.approx((v - mean) / (batch_std + 1e-4), abs=1e-5)
    # the group of equal rewards: zero advantage, no NaN, whatever the scaling
    for s, adv in got.items():
        assert torch.isfinite(adv).all(), s
        assert adv[4:8].abs().max().item() == 0.0, s
    # batch scaling under DDP takes the std over all ranks; one process: the same as rewards.std()
    d = common.Dist(False, 0, 0, 1, "cpu")
    assert grpo.global_std(rewards, d).item() == pytest.approx(batch_std, rel=1e-6)


def direct_loss(logp, old, adv, mask, loss_type, eps_low, eps_high, beta=0.0, ref=None, max_len=None, num_items=None):
    """The GRPO loss written out token by token with Python floats."""
    import math
    B, L = len(logp), len(logp[0])
    per_seq, total, active = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(L):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            rc = min(max(r, 1 - eps_low), 1 + eps_high)
            term = -min(r * adv[i], rc * adv[i])
            if beta:
                q = ref[i][t] - logp[i][t]
                term += beta * (math.exp(q) - q - 1)
            s, n = s + term, n + 1
        per_seq.append(s / max(n, 1))
        total, active = total + s, active + n
    if loss_type == "grpo":
        return sum(per_seq) / B
    if loss_type == "bnpo":
        return total / max(active, 1)
    if loss_type == "dr_grpo":
        return total / (B * max_len)
    return total / (num_items if num_items is not None else max(active, 1))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss_matches_direct_computation(loss_type):
    torch.manual_seed(0)
    B, L = 3, 5
    logp = -torch.rand(B, L) * 2
    old = logp + torch.randn(B, L) * 0.4  # ratios well outside [0.8, 1.3]: both clips bite somewhere
    ref = logp + torch.randn(B, L) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.3])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    for beta, num_items in ((0.0, None), (0.05, 11.0)):
        loss, stats = grpo.policy_loss(logp, old, adv, mask, loss_type, 0.2, 0.3, beta, ref if beta else None,
                                       max_completion_length=7, num_items=num_items)
        want = direct_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), loss_type, 0.2, 0.3, beta,
                           ref.tolist(), 7, num_items)
        assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # clip statistics, as TRL counts them: low = ratio < 1 - eps with A < 0, high = ratio > 1 + eps_high with A > 0
    ratio = torch.exp(logp - old)
    low = [(ratio[i, t] < 0.8 and adv[i] < 0) for i in range(B) for t in range(L) if mask[i, t]]
    high = [(ratio[i, t] > 1.3 and adv[i] > 0) for i in range(B) for t in range(L) if mask[i, t]]
    assert stats["clip_low"].item() == pytest.approx(sum(low) / len(low))
    assert stats["clip_high"].item() == pytest.approx(sum(high) / len(high))
    assert sum(low) + sum(high) > 0  # the case above does exercise the clip


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.log_softmax(torch.randn(4, 6), -1)
    assert grpo.k3_kl(logp, logp).abs().max().item() == 0.0
    other = torch.log_softmax(torch.randn(4, 6), -1)
    kl = grpo.k3_kl(logp, other)
    q = (other - logp).double()
    assert torch.allclose(kl.double(), q.exp() - q - 1, atol=1e-6) and (kl >= 0).all()
    # in the loss: a policy equal to its reference adds nothing, whatever beta
    adv, mask = torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.ones(4, 6)
    a, _ = grpo.policy_loss(logp, logp, adv, mask, "grpo", beta=0.0)
    b, stats = grpo.policy_loss(logp, logp, adv, mask, "grpo", beta=0.5, ref_logp=logp)
    assert a.item() == b.item() and stats["kl"].item() == 0.0


def test_one_iteration_has_ratio_one_and_clipping_inert():
    """num_iterations=1: old log-probs are the current ones (detached), so the gradient is the plain policy
    gradient -A * grad(log p) per token, even with a zero-width clip range."""
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 10, requires_grad=True)
    tokens = torch.randint(0, 10, (2, 4))
    adv, mask = torch.tensor([0.8, -1.3]), torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]

    lp = logp()
    loss, stats = grpo.policy_loss(lp, lp.detach(), adv, mask, "bnpo", epsilon=0.0, epsilon_high=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    plain = -(adv[:, None] * logp() * mask).sum() / mask.sum()
    (want,) = torch.autograd.grad(plain, logits)
    assert torch.allclose(grad, want, atol=1e-7)
    assert stats["clip_ratio"].item() == 0.0
    assert torch.exp(lp - lp.detach()).eq(1).all()


def test_mask_truncated_completions():
    mask = grpo.completion_mask([3, 5, 2], [False, True, False], 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    masked = grpo.completion_mask([3, 5, 2], [False, True, False], 5, mask_truncated=True)
    assert masked.tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    # a truncated completion then contributes nothing to the loss or its gradient
    logp = torch.zeros(3, 5, requires_grad=True)
    loss, _ = grpo.policy_loss(logp, logp.detach(), torch.tensor([1.0, 5.0, -1.0]), masked, "dapo")
    loss.backward()
    assert logp.grad[1].abs().max().item() == 0.0 and logp.grad[0].abs().max().item() > 0


# -----------------------------------------------------------------------------
# rewards


def test_rewards_on_hand_written_completions():
    ex = [{"gold": "18"}] * 5
    completions = [" 16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18", " #### 18.00", " The answer is 18.", " #### 17\n#### 18",
                   " #### $18"]
    assert rewards_lib.get_reward("gsm8k")(ex, None, completions) == [1.0, 1.0, 0.0, 0.0, 1.0]  # strict: first ####
    assert rewards_lib.get_reward("format")(ex, None, completions) == [1.0, 1.0, 0.0, 1.0, 1.0]
    synth = tasks.get_task("synthetic", n=2).examples("train")
    assert rewards_lib.get_reward("synthetic")(synth, None, [p["answer"] for p in synth]) == [1.0, 1.0]
    arith = tasks.get_task("arithmetic", n=3, max_operand=5, ops="+-*").examples("test")
    assert rewards_lib.get_reward("arithmetic")(arith, None, [" " + e["answer"] for e in arith]) == [1.0] * 3
    assert rewards_lib.get_reward("arithmetic")(arith, None, [" #### 1000"] * 3) == [0.0] * 3
    labels = [{"label": "positive"}, {"label": ["yes", "true"]}, {"label": "No"}, {"label": "entailment"}]
    got = rewards_lib.get_reward("label")(labels, None, [" Positive.", "TRUE, because", " no-one", "neutral"])
    assert got == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="label"):
        rewards_lib.get_reward("label")([{"gold": "1"}], None, ["1"])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards_lib.get_reward("nope")
    per_func = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert rewards_lib.combine(per_func, [1.0, 0.5]).tolist() == [1.0, 1.5, 0.5]


def test_reward_model_scores_prompt_plus_completion(tmp_path):
    """A tiny HF sequence-classification model: batched (padded) scores equal one-at-a-time forward passes."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    tok = common.Tokenizer("byte")
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                                  n_head=2, num_labels=1, pad_token_id=tok.eot_id))
    rm.save_pretrained(tmp_path / "rm")
    common.hf_tokenizer(tok, 64).save_pretrained(tmp_path / "rm")
    scorer = rewards_lib.RewardModel(str(tmp_path / "rm"), batch_size=2)
    prompts, completions = ["Q: 2+2?\nA:", "Q: 3+5?\nA:", "Hi"], [" 4", " eight, I think", " there"]
    got = scorer([{}] * 3, prompts, completions)
    rm.eval()
    for p, c, g in zip(prompts, completions, got):
        ids = torch.tensor([tok.encode(p + c)])
        assert g == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), abs=1e-5)


# -----------------------------------------------------------------------------
# the sampler's log-probs and a whole run


def sft_warm(run_dir, steps=25, max_operand=2, seed=0, task=None):
    """A tiny byte-level GPT taught the arithmetic task's answer format (or another task's replies) by a few
    plain supervised steps (loss on the answer only), saved as a native checkpoint."""
    tok = common.Tokenizer("byte")
    torch.manual_seed(seed)
    cfg = model_lib.model_config("tiny", common.padded_vocab_size(tok.vocab_size), 64 if task is None else 128)
    gpt = model_lib.GPT(cfg)
    task = task or tasks.get_task("arithmetic", max_operand=max_operand, n=500)
    rows = [(tok.encode(task.prompt(e)), tok.encode(" " + e["answer"]) + [tok.eot_id]) for e in task.examples("train")]
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (32,), generator=g)]
        T = max(len(p) + len(c) for p, c in batch)
        x, y = torch.full((32, T), tok.eot_id), torch.full((32, T), -100)
        for i, (p, c) in enumerate(batch):
            x[i, :len(p) + len(c)] = torch.tensor(p + c)
            y[i, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
        _, loss = gpt(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    common.save_checkpoint(os.path.join(run_dir, "ckpt_000000.pt"), {
        "kind": "gpt", "model": gpt.state_dict(), "model_config": dataclasses.asdict(cfg), "tokenizer": tok.spec,
        "config": {}, "step": 0})
    return run_dir


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    return sft_warm(str(tmp_path_factory.mktemp("grpo") / "sft"))


def test_sampler_logprobs_equal_a_full_forward_pass(warm_run, tmp_path):
    native = engine_lib.load_model(warm_run)
    model_lib.save_hf_folder(native.model, native.tok.tok, str(tmp_path / "hf"), {})
    hf = engine_lib.load_model(str(tmp_path / "hf"))
    texts = ["User: What is 1 + 2?\nAssistant:", "Hi", "User: What is 10 + 2?\nAssistant: #"]
    for lm in (native, hf):
        prompts = [lm.tok.encode_prompt(t) for t in texts]
        outs = engine_lib.Engine(lm).generate(prompts, 8, temperature=1.0, num_samples=3, seed=0, logprobs=True)
        comps = [c for o in outs for c in o]
        assert {c.finish_reason for c in comps} >= {"length"} and len({len(c.ids) for c in comps}) > 1
        ids, attention, where = grpo.pack_sequences([p for p in prompts for _ in range(3)], [c.ids for c in comps],
                                                    lm.tok.pad_id)
        with torch.no_grad():
            full = grpo.completion_logprobs(lm.model, ids, attention, where, lm.kind == "native")
        for i, c in enumerate(comps):
            assert torch.allclose(full[i, :len(c.ids)], torch.tensor(c.logprobs), atol=1e-4), lm.kind


def test_logprobs_at_a_temperature_are_those_of_the_sampling_distribution():
    """TRL's _get_per_token_logps divides the logits by the sampling temperature: the policy whose ratio GRPO
    takes is the one the completions were drawn from, softmax(logits / T)."""
    torch.manual_seed(0)
    model = model_lib.GPT(model_lib.GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    model.eval()
    ids, attention, where = grpo.pack_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    with torch.no_grad():
        logits = model(ids)[0].float()
        for T in (1.0, 0.6, 2.0):
            got = grpo.completion_logprobs(model, ids, attention, where, native=True, temperature=T)
            want = torch.log_softmax(logits[:, :-1] / T, dim=-1)
            targets = ids[:, 1:].gather(1, where)
            expected = want.gather(1, where[:, :, None].expand(-1, -1, 50)).gather(-1, targets[:, :, None])[..., 0]
            assert torch.allclose(got, expected, atol=1e-5), T
        assert not torch.allclose(grpo.completion_logprobs(model, ids, attention, where, True, 0.6),
                                  grpo.completion_logprobs(model, ids, attention, where, True, 1.0))


def run_args(model, out_dir, *extra):
    return [f"model={model}", "task=arithmetic", "task_args={max_operand: 2, n: 500}",
            "reward_funcs=arithmetic,format", "num_generations=8", "micro_batch_size=32",
            "max_completion_length=8", "eval_examples=16", f"out_dir={out_dir}", "learning_rate=2e-3",
            "warmup_ratio=0.2", "tensorboard=true", "log_interval=1", *extra]


def train_rewards(out_dir):
    return [r["reward"] for r in common.read_jsonl(os.path.join(out_dir, "log.jsonl")) if r["type"] == "train"]


def test_grpo_raises_the_reward_of_an_sft_warmed_tiny_model(warm_run, tmp_path):
    """25 supervised steps leave the answer format partly learned (the first step's mean reward is about 0.35);
    20 GRPO steps on the arithmetic + format reward must raise the mean sampled reward of the last 5 steps
    clearly above the first step's (by 0.4-0.55 over three seeds of the SFT warm-up)."""
    out = str(tmp_path / "rl")
    results = grpo.main(run_args(warm_run, out, "max_steps=20", "eval_steps=0", "ckpt_interval=0"))
    rewards = train_rewards(out)
    assert len(rewards) == 20
    start, end = rewards[0], sum(rewards[-5:]) / 5
    assert end > start + 0.25, rewards
    for name in ("hf/config.json", "hf/model.safetensors", "grpo.png", "results.json", "config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "tensorboard"))
    rec = [r for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r["type"] == "train"][-1]
    for key in ("rewards/arithmetic/mean", "rewards/format/std", "accuracy", "clip_ratio", "completion_length_max",
                "truncated_share", "rollout_tokens_per_s", "update_tokens_per_s"):
        assert key in rec, key
    assert results["rollout_tokens_per_s"] > 0 and results["update_tokens_per_s"] > 0
    # the HF folder loads as an ordinary causal LM and generates
    lm = engine_lib.load_model(os.path.join(out, "hf"))
    assert lm.kind == "hf"


def test_resume_is_exact(warm_run, tmp_path):
    """4 steps in one go == 2 steps, a stop, and 2 more with resume=latest (beta > 0 and mu = 2 included)."""
    extra = ["max_steps=4", "num_generations=4", "micro_batch_size=4", "gradient_accumulation_steps=2",
             "num_iterations=2", "beta=0.04", "eval_steps=0", "eval_examples=4", "ckpt_interval=0", "tensorboard=false"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    grpo.main(run_args(warm_run, straight, *extra))
    grpo.main(run_args(warm_run, split, *extra, "stop_after_step=1"))
    assert [s for s, _ in common.list_checkpoints(split)] == [1]
    grpo.main(run_args(warm_run, split, *extra, "resume=latest"))
    a = common.load_checkpoint(common.checkpoint_path(straight, 3))
    b = common.load_checkpoint(common.checkpoint_path(split, 3))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert train_rewards(straight) == train_rewards(split)



def gsm8k_args(model, data, out_dir, *extra):
    """A tiny run on a local GSM8K-format file (train and test split: the same file)."""
    return [f"model={model}", "task=gsm8k", f"task_args={{train_path: {data}, test_path: {data}}}",
            "reward_funcs=gsm8k,format", "num_generations=4", "micro_batch_size=4", "max_completion_length=4",
            "max_prompt_length=48", "eval_examples=0", "max_steps=3", "tensorboard=false", "device=cpu",
            f"out_dir={out_dir}", *extra]


def test_resume_refuses_another_task_reward_loss_or_model_and_compares_files_by_content(warm_run, tmp_path):
    """What defines a GRPO run (the starting model, the task's data, the rewards, the loss settings) is stored
    in its checkpoints; resume refuses a change naming the key. A data file is compared by its bytes: another
    spelling of the same path continues, new contents under the same name do not."""
    rows = common.read_jsonl(shared_path("gsm8k", "train.jsonl"))[:24]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other_data = tmp_path / "b.jsonl"
    other_data.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    other_model = sft_warm(str(tmp_path / "other_sft"), steps=1, seed=1)
    out = str(tmp_path / "run")
    assert grpo.main(gsm8k_args(warm_run, data, out, "stop_after_step=0"))["status"] == "stopped"
    for change, key in [("loss_type=grpo", "loss_type"), ("num_generations=2", "num_generations"),
                        ("epsilon=0.3", "epsilon"), ("reward_funcs=gsm8k", "reward_funcs"),
                        (f"model={other_model}", "model_files"), ("task=svamp", "task")]:
        with pytest.raises(common.ConfigError, match=f"another run: {key}=.* in the checkpoint but"):
            grpo.main(gsm8k_args(warm_run, data, out, "resume=latest", change))
    with pytest.raises(common.ConfigError, match="another run: task_data=.* in the checkpoint but"):
        grpo.main(gsm8k_args(warm_run, other_data, out, "resume=latest"))
    data_copy = data.read_bytes()
    data.write_bytes(other_data.read_bytes())  # the same name, other rows
    with pytest.raises(common.ConfigError, match="another run: task_data=.* in the checkpoint but"):
        grpo.main(gsm8k_args(warm_run, data, out, "resume=latest"))
    data.write_bytes(data_copy)
    respelled = f"{tmp_path}/./a.jsonl"
    assert grpo.main(gsm8k_args(warm_run, respelled, out, "resume=latest"))["status"] == "done"
    # the settings that do not define the run may change: a larger max_steps continues it
    assert grpo.main(gsm8k_args(warm_run, data, out, "resume=latest", "max_steps=4", "learning_rate=1e-5",
                                "max_completion_length=3"))["status"] == "done"
    assert [s for s, _ in common.list_checkpoints(out)][-1] == 3


def test_trl_setting_names_are_accepted_and_the_shipped_configs_load():
    cfg = common.load_config(grpo.Config, ["per_device_train_batch_size=4", "logging_steps=2", "save_steps=7"])
    assert (cfg.micro_batch_size, cfg.log_interval, cfg.ckpt_interval) == (4, 2, 7)
    for name in ("grpo_demo", "grpo_gsm8k", "grpo_labels_demo", "grpo_qwen", os.path.join("demo", "grpo")):
        cfg = common.load_config(grpo.Config, [os.path.join(ROOT, "configs", f"{name}.yaml")])
        assert cfg.micro_batch_size * cfg.gradient_accumulation_steps % cfg.num_generations == 0, name

def headline_rows(n):
    """adaptllm_headline rows in the hub schema (id, input, options, gold_index, class_id); the verb decides."""
    verbs = [("rises", 1), ("falls", 0), ("jumps", 1), ("drops", 0), ("soars", 1), ("slips", 0)]
    return [{"id": i, "input": f"gold {verbs[i % 6][0]}", "options": ["No", "Yes"], "gold_index": verbs[i % 6][1],
             "class_id": 0} for i in range(n)]


def test_grpo_on_a_label_set_of_the_sft_registry(tmp_path):
    """task=sft:adaptllm_headline, a label set of tasks/sft_sets.py through SFTSetTask, on the sft_set + label
    rewards (each 1 for the right word: the reward is 0 to 2). 40 supervised steps teach the ' Yes' / ' No'
    replies but leave the answer partly a guess; 30 GRPO steps must raise the mean sampled reward of the last 5
    steps 0.1 above the first 5 steps' and the greedy accuracy on the 24 held-out rows (over four warm-up seeds:
    +0.18 to +0.36 sampled; greedy 0.46 -> 0.67, 0.62 -> 0.79, 0.67 -> 1.0, and 1.0 -> 1.0 where the warm-up had
    already learned it; seed 3 here). Also: the logged train accuracy is the sft_set reward, and the final greedy
    accuracy equals one computed here from the raw rows (each greedy reply's first word against
    options[gold_index])."""
    rows = headline_rows(240)
    path = tmp_path / "headline.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tasks.get_task("sft:adaptllm_headline", train_path=str(path))
    warm = sft_warm(str(tmp_path / "sft"), steps=40, seed=3, task=task)
    out = str(tmp_path / "rl")
    results = grpo.main([f"model={warm}", "task=sft:adaptllm_headline", f"task_args={{train_path: {path}}}",
                         "reward_funcs=sft_set,label", "num_generations=8", "micro_batch_size=32",
                         "max_completion_length=6", "eval_examples=24", "learning_rate=2e-3", "warmup_ratio=0.2",
                         "max_steps=30", "eval_steps=0", "ckpt_interval=0", "tensorboard=false", f"out_dir={out}"])
    log = common.read_jsonl(os.path.join(out, "log.jsonl"))
    records = [r for r in log if r["type"] == "train"]
    assert len(records) == 30
    for r in records:
        assert r["accuracy"] == pytest.approx(r["rewards/sft_set/mean"]) and 0 <= r["rewards/label/mean"] <= 1
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    before, after = [r["accuracy"] for r in log if r["type"] == "eval"]
    assert after > before, (before, after)
    gold = {r["input"]: r["options"][r["gold_index"]] for r in rows}
    held = task.examples("test")[:24]
    assert len(held) == 24 and not {e["question"] for e in held} - set(gold)
    lm = engine_lib.load_model(os.path.join(out, "hf"))
    outs = engine_lib.Engine(lm).generate([lm.tok.encode_prompt(task.prompt(e)) for e in held], 6, temperature=0.0,
                                          stop=task.stop())
    first_words = [(o[0].text.split() or [""])[0].strip(".,!") for o in outs]
    mine = sum(w == gold[e["question"]] for w, e in zip(first_words, held)) / len(held)
    assert results["eval_accuracy"] == pytest.approx(mine) == after and results["eval_examples"] == 24


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("args, message", [
    (["num_generations=3", "micro_batch_size=8"], "num_generations=3 does not divide"),
    (["reward_funcs=gsm8k,nope"], "reward_funcs: 'nope' is not in the rewards registry"),
    (["beta=0.04", "ref_model=./no/such/model"], "beta=0.04 needs a reference model"),
    (["reward_weights=[1.0]", "reward_funcs=gsm8k,format"], "reward_weights has 1 weights for 2 rewards"),
    (["task=sft:sujet_finance_vision"], "task 'sft:sujet_finance_vision': dataset .* is a vision set"),
    (["task=sft:fiqa_qa"], "dataset 'fiqa_qa' has free-form answers"),
    (["task=nope"], "unknown task 'nope'.* or sft:NAME"),
    (["temperature=0"], "temperature must be > 0"),
    (["task=sft:sst2"], r"reward_funcs ['gsm8k'] cannot score sft:sst2 \(scored by label\); use sft_set"),
    (["task=sft:gsm8k_socratic", "reward_funcs=label"], "reward_funcs ['label'] cannot score sft:gsm8k_socratic"),
])
def test_bad_settings_raise_a_config_error_naming_them(args, message, warm_run):
    with pytest.raises(common.ConfigError, match=message.replace("[", r"\[")):
        grpo.check_config(common.load_config(grpo.Config, [f"model={warm_run}", *args]))



@pytest.fixture(scope="module")
def bad_files(warm_run, tmp_path_factory):
    """A malformed and an empty JSONL file, a BD3-LM checkpoint, a truncated one, a crafted pickle, a file."""
    root = tmp_path_factory.mktemp("grpo_bad")
    (root / "broken.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "ans\n')
    (root / "empty.jsonl").write_text("")
    (root / "a_file").write_text("not a folder")
    ckpt = common.load_checkpoint(warm_run)
    del ckpt["path"]
    common.save_checkpoint(str(root / "bd3lm" / "ckpt_000000.pt"), {**ckpt, "kind": "bd3lm"})
    whole = open(common.resolve_checkpoint(warm_run), "rb").read()
    (root / "truncated.pt").write_bytes(whole[:len(whole) // 2])

    class Crafted:  # unpickling it would run a command
        def __reduce__(self):
            return (os.system, (f"touch {root / 'ran'}",))

    torch.save({"model": Crafted(), "model_config": {}}, str(root / "crafted.pt"))
    return root


BAD_INPUTS = [  # (arguments, words the one error line must hold)
    (lambda f, m: [f"model={m}", "task=gsm8k", f"task_args={{train_path: {f / 'broken.jsonl'}}}",
                   "reward_funcs=gsm8k"], "broken.jsonl:2: not a JSON line"),
    (lambda f, m: [f"model={m}", "task=gsm8k", f"task_args={{train_path: {f / 'empty.jsonl'}}}",
                   "reward_funcs=gsm8k"], "empty.jsonl: no rows (an empty data file)"),
    (lambda f, m: [f"model={m}", "task=arithmetic", "task_args={max_operand: 2, n: 0}"],
     "task 'arithmetic' has no training examples"),
    (lambda f, m: [f"model={m}", "task=arithmetic", "task_args={nope: 1}"], "task_args {'nope': 1} do not fit"),
    (lambda f, m: [f"model={f / 'bd3lm'}"], "holds a 'bd3lm' model, expected a 'gpt' checkpoint; grpo.py trains"),
    (lambda f, m: [f"model={f / 'truncated.pt'}"], "could not read checkpoint"),
    (lambda f, m: [f"model={f / 'crafted.pt'}"], "refusing to load it"),
    (lambda f, m: [f"model={m}", f"out_dir={f / 'a_file'}"], "is a file; out_dir is the run's folder"),
    (lambda f, m: [f"model={m}", "micro_batch_size=0"], "'micro_batch_size' must be positive"),
    (lambda f, m: [f"model={f / 'no' / 'such' / 'run'}"], "no such checkpoint, run folder or HF folder"),
]


@pytest.mark.parametrize("args, words", BAD_INPUTS)
def test_bad_inputs_end_in_one_line(args, words, bad_files, warm_run, tmp_path, capsys):
    """Through common.run_main, as `python grpo.py ...` runs: exit 1, one `error:` line, no traceback."""
    argv = ["task=arithmetic", "task_args={max_operand: 2, n: 50}", "reward_funcs=arithmetic,format",
            "num_generations=4", "micro_batch_size=4", "max_completion_length=4", "eval_examples=0", "max_steps=1",
            "device=cpu", "tensorboard=false", f"out_dir={tmp_path / 'run'}", *args(bad_files, warm_run)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: grpo.main(argv), preemptible=True)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and words in lines[0], err
    assert not (bad_files / "ran").exists()  # the crafted pickle was refused, not run

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of use_vllm on a machine without CUDA")
def test_vllm_without_cuda_is_a_one_line_error(warm_run):
    proc = subprocess.run([sys.executable, "grpo.py", f"model={warm_run}", "use_vllm=true"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: use_vllm=true needs a CUDA GPU; none is visible (use_vllm=false samples in PyTorch)"]


@pytest.mark.skipif(not common.vllm_available(), reason="the vLLM rollout path needs CUDA and vllm installed")
def test_vllm_rollouts_train_and_push_weights(warm_run, tmp_path):
    out = str(tmp_path / "vllm")
    results = grpo.main(run_args(warm_run, out, "max_steps=3", "eval_steps=0", "ckpt_interval=0", "use_vllm=true",
                                 "vllm_gpu_memory_utilization=0.2", "device=cuda"))
    assert results["sampler"] == "vllm" and len(train_rewards(out)) == 3
    assert results["rollout_tokens_per_s"] > 0

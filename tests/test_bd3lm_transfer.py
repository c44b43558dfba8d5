"""The transfer experiment (seed 001, experiment 3) at tiny scale: the shipped configs run end to end (source
models, frozen-plan and full fine-tuning, the flat model, ppl_eval, eval_gsm8k.py's synthetic task and compare), freeze=plan leaves the
plan module bit-identical (weights and EMA) while the execution module moves, and configs/svamp_transfer.yaml runs
on gen_plans.py-format plans with the GPT-2 tokenizer."""
import json
import os

import torch

import common
import eval_gsm8k as ev
import train_bd3lm as bd
from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = os.path.join(ROOT, "tests", "fixtures", "plans_small.json")
SOURCE = os.path.join(ROOT, "configs", "bd3lm_transfer_source_demo.yaml")
TARGET = os.path.join(ROOT, "configs", "bd3lm_transfer_demo.yaml")
TINY = dict(n_embd=32, question_len=48, plan_len=48, exec_len=32, seq_len=128, batch_size=4, micro_batch_size=4,
            max_steps=3, warmup_steps=1, log_interval=1, val_interval=0, val_batches=1, ckpt_interval=0,
            eval_batch_size=4, device="cpu")
FLAT = dict(flat_plans="true", exec_len=80, exec_layers=0, freeze="none")


def run(config, out_dir, **overrides):
    args = {**TINY, **overrides, "out_dir": out_dir}
    return bd.main([config] + [f"{k}={v}" for k, v in args.items()])


def evaluate(model, out_dir, **overrides):
    """eval_gsm8k.py task=synthetic on the target's held-out families, zero-shot (the question segment)."""
    args = {"task": "synthetic", "model": model, "fewshot": 0, "max_new_tokens": 128, "batch_size": 4,
            "synthetic_options": "{max_steps: 2, templates: [sharing, reading, classroom, time]}", "device": "cpu",
            "dtype": "float32", "out_dir": out_dir, **overrides}
    return ev.main([f"{k}={v}" for k, v in args.items()])


def test_transfer_demo_configs_run_end_to_end_and_freeze_plan_keeps_the_plan_module(tmp_path):
    out = str(tmp_path)
    run(SOURCE, f"{out}/source_hier", synthetic_plans=40)
    run(SOURCE, f"{out}/source_flat", synthetic_plans=40, **{k: v for k, v in FLAT.items() if k != "freeze"})
    run(TARGET, f"{out}/frozen_plan", synthetic_plans=40, init_from=f"{out}/source_hier/latest", max_lr=1e-2)
    run(TARGET, f"{out}/full", synthetic_plans=40, init_from=f"{out}/source_hier/latest", freeze="none")
    run(TARGET, f"{out}/flat", synthetic_plans=40, init_from=f"{out}/source_flat/latest", **FLAT)

    # freeze=plan: the plan module (everything but transformer.h_exec) is bit-identical to where it started, in the
    # weights and in their EMA (which evaluation uses); every matrix of the execution module has moved
    source = common.load_checkpoint(f"{out}/source_hier/latest")["ema"]
    for name in ("model", "ema"):
        tuned = common.load_checkpoint(f"{out}/frozen_plan/latest")[name]
        plan = {k: v for k, v in tuned.items() if not k.startswith("transformer.h_exec.")}
        assert plan.keys() == source.keys()
        assert all(torch.equal(plan[k], source[k]) for k in plan), name
        exec_matrices = [k for k in tuned if k.startswith("transformer.h_exec.") and tuned[k].dim() == 2]
        top = {k: source[k.replace("h_exec.0", "h.1")] for k in exec_matrices}  # it started as the top layer
        assert exec_matrices and all(not torch.equal(tuned[k], top[k]) for k in exec_matrices), name
    full = common.load_checkpoint(f"{out}/full/latest")["model"]
    assert not torch.equal(full["transformer.wte.weight"], source["transformer.wte.weight"])  # full: all moves

    for label in ("frozen_plan", "full", "flat"):
        run(TARGET, f"{out}/{label}/ppl", mode="ppl_eval", checkpoint=f"{out}/{label}/latest")
        evaluate(f"{out}/{label}/latest", f"{out}/{label}/gsm8k", limit=4,
                 bd3lm_options="{sampler: ancestral, sample_steps: 2, temperature: 1.0, top_p: 0.9}")
    report = ev.main(["task=compare", f"runs=[{out}/frozen_plan,{out}/full,{out}/flat]",
                      "labels=[frozen_plan,full_finetune,flat]", f"out_dir={out}/compare"])
    table = {c: {m: v[c] for m, v in report["metrics"].items()} for c in report["conditions"]}
    assert set(table) == {"frozen_plan", "full_finetune", "flat"}
    for figures in table.values():
        assert figures["nelbo"] > 0 and 0.0 <= figures["synthetic_strict"] <= 1.0
    segments = lambda c: {m for m, v in table[c].items() if m.startswith("nelbo_") and v is not None}  # noqa: E731
    assert segments("frozen_plan") == {"nelbo_question", "nelbo_plan", "nelbo_execution"}
    assert segments("flat") == {"nelbo_question", "nelbo_execution"}
    with open(f"{out}/frozen_plan/gsm8k/results.json") as f:  # the target: the held-out problem families
        target = json.load(f)
    assert target["config"]["synthetic_options"]["templates"] == ["sharing", "reading", "classroom", "time"]
    assert common.load_checkpoint(target["checkpoint"])["config"]["synthetic_templates"] == \
        target["config"]["synthetic_options"]["templates"]
    plans = common.read_jsonl(f"{out}/frozen_plan/gsm8k/predictions.jsonl")
    assert len(plans) == 4 and all("plan" in p for p in plans)  # hierarchical: the plan kept beside the answer
    assert not any("plan" in p for p in common.read_jsonl(f"{out}/flat/gsm8k/predictions.jsonl"))
    assert os.path.isfile(f"{out}/compare/comparison.png")


def test_svamp_transfer_config_runs_on_plans_json_with_the_gpt2_tokenizer(tmp_path):
    """configs/svamp_transfer.yaml as shipped, with the paths pointed at a gen_plans.py-format file and a tiny
    GPT-2-vocabulary hierarchical source model in place of the GSM8K run."""
    gpt2 = dict(plans_path=PLANS, val_plans_path=PLANS, tokenizer_file=shared_path("tokenizers", "gpt2.tiktoken"),
                model="tiny", n_embd=32, batch_size=2, micro_batch_size=2, max_steps=1, warmup_steps=1)
    config = os.path.join(ROOT, "configs", "svamp_transfer.yaml")
    run(config, f"{tmp_path}/gsm8k_hier", init_from="scratch", exec_layers=0, freeze="none", **gpt2)
    results = run(config, f"{tmp_path}/svamp", init_from=f"{tmp_path}/gsm8k_hier/latest", exec_layers=1, **gpt2)
    assert results["final_train_loss"] > 0
    ckpt = common.load_checkpoint(f"{tmp_path}/svamp/latest")
    assert ckpt["config"]["freeze"] == "plan" and ckpt["model_config"]["exec_layers"] == 1

"""train_sigmagpt.py on CPU with tiny models: the double position code against the plain GPT, the
permutation bookkeeping, fair-mode scoring, learning, resume, infilling, rejection sampling, bad input."""
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import train_sigmagpt as sg
import conftest
from conftest import shared_path
from model import GPT, GPTConfig, from_hf, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_sigmagpt.py")


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    """tinyshakespeare as byte-token shards (common.write_shard), independent of prepare_data.py."""
    text = open(shared_path("tinyshakespeare", "input.txt"), encoding="utf-8").read()
    tok = common.Tokenizer("byte")
    ids = np.array(tok.encode(text[:120_000]))
    data_dir = str(tmp_path_factory.mktemp("shakespeare"))
    common.write_shard(os.path.join(data_dir, "train_000000.bin"), ids[:100_000], tok.vocab_size)
    common.write_shard(os.path.join(data_dir, "val_000000.bin"), ids[100_000:], tok.vocab_size)
    common.atomic_write_json(os.path.join(data_dir, "meta.json"), {
        "source": "tinyshakespeare", "tokenizer": tok.spec, "vocab_size": tok.vocab_size})
    return data_dir


def tiny_args(data_dir, out_dir, **overrides):
    args = dict(data_dir=data_dir, out_dir=out_dir, init_from="scratch", model="tiny", n_embd=32, block_size=32,
                micro_batch_size=8, grad_accum_steps=2, max_steps=6, warmup_steps=2, learning_rate=3e-3,
                dtype="fp32", device="cpu", log_interval=1, val_interval=3, val_batches=2, eval_orders=2,
                ckpt_interval=0, seed=7)
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def hf_tiny(folder, vocab=101, positions=24):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=positions,
                                    bos_token_id=vocab - 1, eos_token_id=vocab - 1)).eval()
    hf.save_pretrained(folder)
    return hf


# ---------------------------------------------------------------------------- the model


def test_identity_order_gives_the_plain_gpt_logits_and_other_orders_do_not(tmp_path):
    """The stated rule (model.double_position_table): with sigma = identity the converted model computes the
    HF GPT-2 logits exactly, up to float rounding."""
    hf = hf_tiny(tmp_path / "hf")
    sigma = sg.sigma_from_ar(from_hf(str(tmp_path / "hf"))).eval()
    seq = torch.randint(0, 101, (3, 24))
    identity = torch.arange(24).expand(3, 24)
    x, pos, next_pos, _ = sg.sigma_batch(seq, identity, 23)
    with torch.no_grad():
        ours = sigma(x, position_ids=pos, target_position_ids=next_pos)[0]
        ref = hf(seq[:, :-1]).logits
        assert (ours - ref).abs().max().item() < 1e-5
        # a shuffled order is another computation: the next-position half of the code matters
        perm = sg.draw_orders(3, 24, 1.0, torch.Generator().manual_seed(0))
        x, pos, next_pos, _ = sg.sigma_batch(seq, perm, 23)
        other = sigma(x, position_ids=pos, target_position_ids=next_pos)[0]
        assert (other - ref).abs().max().item() > 1e-2


def test_permutation_bookkeeping_against_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 50, (4, 12), generator=g)
    perm = sg.draw_orders(4, 12, 1.0, g)
    assert all(sorted(row.tolist()) == list(range(12)) for row in perm)
    for n_scored in (11, 5):
        x, pos, next_pos, y = sg.sigma_batch(seq, perm, n_scored)
        for b in range(4):
            for t in range(11):
                assert x[b, t] == seq[b, perm[b, t]] and pos[b, t] == perm[b, t]
                assert next_pos[b, t] == perm[b, t + 1]
                assert y[b, t] == (seq[b, perm[b, t + 1]] if t >= 11 - n_scored else -100)
    # the left-to-right share: 0 gives identities, 1 gives (here) no identity at all
    assert torch.equal(sg.draw_orders(4, 12, 0.0, g), torch.arange(12).expand(4, 12))


def test_curriculum_share_rises_linearly_to_one():
    cfg = sg.Config(order="curriculum", curriculum_start=0.2, curriculum_steps=100)
    assert [sg.random_share(cfg, s, 1000) for s in (0, 50, 100, 500)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert sg.random_share(dataclasses.replace(cfg, order="left_to_right"), 50, 1000) == 0.0


def test_curriculum_granularity_per_sequence_mixes_per_batch_is_one_kind(shakespeare_dir, tmp_path, monkeypatch):
    """sequence (default): each sequence draws its kind, so a micro batch holds the scheduled mix; batch (the
    reference's get_batch): one draw per micro batch, every batch all random or all left to right."""
    identity = torch.arange(12)

    def left_to_right(per_batch):  # (200 micro batches, 8 sequences): which sequences kept the identity
        return torch.stack([(sg.draw_orders(8, 12, 0.5, torch.Generator().manual_seed(i), per_batch) == identity)
                            .all(1) for i in range(200)])
    seq, batch = left_to_right(False), left_to_right(True)
    assert (batch.all(1) | (~batch).all(1)).all() and 0.35 < (~batch[:, 0]).float().mean() < 0.65
    assert (seq.any(1) & ~seq.all(1)).float().mean() > 0.9 and 0.4 < (~seq).float().mean() < 0.6
    assert sg.Config().curriculum_granularity == "sequence"
    # the training loop passes it on, only under order=curriculum; a resume refuses a change
    seen = []
    original = sg.draw_orders
    monkeypatch.setattr(sg, "draw_orders", lambda *a, **k: ("per_batch" in k and seen.append(k["per_batch"]))
                        or original(*a, **k))  # the training draws (validation's fixed orders pass no granularity)
    run = str(tmp_path / "run")
    res = sg.main(tiny_args(shakespeare_dir, run, order="curriculum", curriculum_granularity="batch", max_steps=2,
                            val_interval=0))
    assert seen == [True] * 4 and res["curriculum_granularity"] == "batch"  # 2 steps x 2 micro batches
    with pytest.raises(common.ConfigError, match="curriculum_granularity='batch' in the checkpoint but 'sequence'"):
        sg.main(tiny_args(shakespeare_dir, run, order="curriculum", max_steps=4, val_interval=0, resume="latest"))
    seen.clear()
    sg.main(tiny_args(shakespeare_dir, str(tmp_path / "random"), curriculum_granularity="batch", max_steps=1,
                      val_interval=0))
    assert seen == [False] * 2  # order=random: every sequence its own uniform order, whatever the granularity
    with pytest.raises(common.ConfigError, match="curriculum_granularity 'step' is not one of sequence, batch"):
        sg.main(tiny_args(shakespeare_dir, str(tmp_path / "x"), curriculum_granularity="step"))


def test_fair_mode_scores_exactly_the_evaluation_tokens():
    """Conditioning tokens come first in the order; the loss is the cross-entropy of the evaluation tokens
    alone (round(0.4 * T) of them), computed by hand from the logits."""
    cfg = sg.Config(mode="fair", scored_share=0.4)
    T = 20
    n = sg.num_scored(cfg, T)
    assert n == 8 and sg.num_scored(sg.Config(mode="full"), T) == 19
    assert sg.num_scored(dataclasses.replace(cfg, scored_share=1.0), T) == 19  # the first token is always given
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(model_config("tiny", 64, T), double_position=True)).eval()
    seq = torch.randint(0, 64, (2, T))
    perm = sg.draw_orders(2, T, 1.0, torch.Generator().manual_seed(3))
    x, pos, next_pos, y = sg.sigma_batch(seq, perm, n)
    for b in range(2):
        evaluation = set(perm[b, T - n:].tolist())
        scored_positions = {int(next_pos[b, t]) for t in range(T - 1) if y[b, t] != -100}
        assert scored_positions == evaluation  # exactly the evaluation tokens, each once
    with torch.no_grad():
        logits, loss = model(x, y, position_ids=pos, target_position_ids=next_pos)
        by_hand = [-torch.log_softmax(logits[b, t], -1)[seq[b, next_pos[b, t]]]
                   for b in range(2) for t in range(T - 1) if int(next_pos[b, t]) in set(perm[b, T - n:].tolist())]
    assert len(by_hand) == 2 * n
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------- training


def records(out_dir, kind):
    return [r for r in common.read_jsonl(os.path.join(out_dir, "log.jsonl")) if r["type"] == kind]


@pytest.fixture(scope="module")
def trained_run(shakespeare_dir, tmp_path_factory):
    """40 steps of a tiny model in random orders, full mode: shared by the learning and eval/sample tests."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    results = sg.main(tiny_args(shakespeare_dir, out, max_steps=40, learning_rate=1e-2, val_interval=20,
                                log_interval=10, keep_last_k=1, ckpt_interval=20))
    return out, results


def test_loss_falls_on_tinyshakespeare_in_random_orders(trained_run):
    out, results = trained_run
    val = records(out, "val")
    assert val[-1]["val_loss_random"] < math.log(257) - 2.0  # from ~5.6 (uniform over bytes) to below 3.6
    assert val[-1]["val_loss_random"] < val[0]["val_loss_random"]
    assert results["status"] == "done" and results["scored_tokens_per_step"] == 8 * 2 * 31
    # the guide's layout: config, CSV log, checkpoint-N/model.pt pruned to keep_last_k, and the PNG
    # checkpoint-N holds the weights after N optimizer steps (the guide's checkpoint-5000 at save_steps=5000)
    assert [os.path.relpath(p, out) for _, p in common.list_checkpoints(out)] == ["checkpoint-40/model.pt"]
    assert common.load_checkpoint(out)["step"] == 39  # the 0-based index of the last step done
    for name in ("config.json", "logs/training_log.csv", "log.jsonl", "loss.png", "results.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = open(os.path.join(out, "logs", "training_log.csv")).read().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr,scored_tokens,tokens_per_sec,val_loss_l2r")
    assert len(rows) == 1 + 5  # steps 0, 9, 19, 29, 39


def test_eval_mode_reproduces_the_final_validation_and_sample_mode_infills(shakespeare_dir, trained_run, capsys):
    out, _ = trained_run
    results = sg.main(tiny_args(shakespeare_dir, "", mode="eval", ckpt=out))
    final = records(out, "val")[-1]
    for key in ("val_loss_l2r", "val_loss_random", "val_loss_fair"):  # the same batches and the same fixed orders
        assert results[key] == pytest.approx(final[key], rel=1e-6)
    assert results["val_ppl_random"] == pytest.approx(math.exp(results["val_loss_random"]))
    # bytes: one per byte token, so bits per byte is nats / ln 2 (no end-of-text in these rows)
    assert results["val_bpb_l2r"] == pytest.approx(results["val_loss_l2r"] / math.log(2), rel=1e-6)
    for sampler in ("rejection", "sequential"):
        res = sg.main(tiny_args(shakespeare_dir, "", mode="sample", ckpt=out, sampler=sampler, num_samples=3,
                                prompt="ROMEO:<missing>6</missing> the <missing>4</missing>!"))
        known = sg.parse_prompt("ROMEO:<missing>6</missing> the <missing>4</missing>!", common.Tokenizer("byte"), 0)
        assert len(known) == 22
        for sample in res["samples"]:
            assert len(sample["tokens"]) == 22 and None not in sample["tokens"]
            assert all(f == k for f, k in zip(sample["tokens"], known) if k is not None)
            assert sample["text"].startswith("ROMEO:") and sample["text"].endswith("!")
        assert res["summary"]["generated_tokens"] == 30
        if sampler == "sequential":
            assert res["summary"]["model_calls_per_token"] == 1.0
    with pytest.raises(common.ConfigError, match="make 41 positions; the position table has 32"):
        sg.main(tiny_args(shakespeare_dir, "", mode="sample", ckpt=out, prompt="A<missing>40</missing>"))


def test_eval_on_the_test_split_that_prepare_data_writes(tmp_path):
    """WikiText (here WikiText-2's test file cut in two, byte tokens): prepare_data writes train, val and test;
    mode=eval split=test scores the test split's own rows, checked against a direct computation."""
    import prepare_data
    lines = open(shared_path("wikitext-2-raw", "wiki.test.raw"), encoding="utf-8", newline="").read().splitlines(True)
    cut = next(i for i in range(1500, len(lines)) if lines[i].startswith(" = ") and not lines[i].startswith(" = = "))
    (tmp_path / "train.raw").write_text("".join(lines[:cut]), encoding="utf-8", newline="")
    (tmp_path / "test.raw").write_text("".join(lines[cut:]), encoding="utf-8", newline="")
    data = str(tmp_path / "data")
    prepare_data.main([f"out_dir={data}", "source=wikitext", f"data_path={tmp_path / 'train.raw'}",
                       f"test_path={tmp_path / 'test.raw'}", "tokenizer=byte", "val_tokens=5000", "num_proc=1"])
    out = str(tmp_path / "run")
    sg.main(tiny_args(data, out, max_steps=4, val_interval=0))
    with pytest.raises(common.ConfigError, match="eval_rows must be >= 0"):
        sg.main(tiny_args(data, "", mode="eval", ckpt=out, split="test", eval_rows=-1))
    test = sg.main(tiny_args(data, "", mode="eval", ckpt=out, split="test", eval_rows=4))
    val = sg.main(tiny_args(data, "", mode="eval", ckpt=out, split="val", eval_rows=4))
    assert test["split"] == "test" and test["rows"] == 4 and "val_loss_l2r" not in test
    assert test["test_loss_l2r"] != pytest.approx(val["val_loss_l2r"])  # other text
    # directly: the first 4 windows of 32 bytes (stride 31) of the test articles, left to right
    articles = list(prepare_data.text_sets.wikitext_articles(lines[cut:]))
    ids = common.Tokenizer("byte").encode(articles[0])[:4 * 31 + 1]  # (the first article is longer)
    rows = torch.tensor([ids[31 * i:31 * i + 32] for i in range(4)])
    model = GPT(GPTConfig(**common.load_checkpoint(out)["model_config"]))
    model.load_state_dict(common.load_checkpoint(out)["model"])
    with torch.no_grad():
        logits = model.eval()(rows[:, :-1], position_ids=torch.arange(31), target_position_ids=torch.arange(1, 32))[0]
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    assert test["test_loss_l2r"] == pytest.approx(direct, rel=1e-5)
    whole = sg.main(tiny_args(data, "", mode="eval", ckpt=out, split="test", eval_orders=1))  # eval_rows=0: all
    n_test = common.load_meta(data)["test_tokens"]
    assert whole["rows"] == len(range(0, n_test - 31, 31)) > 100
    # a data folder without a test split says how to make one
    bare = tmp_path / "no_test"
    bare.mkdir()
    for name in os.listdir(data):
        if name == "meta.json" or name.startswith(("train_", "val_")):
            shutil.copy(os.path.join(data, name), bare)
    with pytest.raises(common.ConfigError, match="has no test split.*test_split=test"):
        sg.main(tiny_args(str(bare), "", mode="eval", ckpt=out, split="test"))


def test_compare_fair_and_full_runs(shakespeare_dir, tmp_path, capsys):
    """mode=compare: both runs scored on the same rows (= mode=eval of each), tokens seen vs scored (fair: 13 of
    the 31 targets of each sequence, full: all), and the val curves; comparison.json and comparison.png."""
    runs = {}
    for mode in ("fair", "full"):
        runs[mode] = str(tmp_path / mode)
        sg.main(tiny_args(shakespeare_dir, runs[mode], mode=mode, max_steps=6, val_interval=3))
    out = str(tmp_path / "cmp")
    report = sg.main(tiny_args(shakespeare_dir, out, mode="compare", runs=f"[{runs['fair']},{runs['full']}]",
                               labels="[fair,full]"))
    assert json.load(open(os.path.join(out, "comparison.json"))) == json.loads(json.dumps(report))
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 10_000
    fair, full = report["runs"]
    assert (fair["label"], fair["mode"], full["label"], full["mode"]) == ("fair", "fair", "full", "full")
    assert fair["learning_efficiency"] == pytest.approx(13 / 31) and full["learning_efficiency"] == 1.0
    assert fair["tokens_seen"] == full["tokens_seen"] == 6 * 16 * 31
    assert (fair["tokens_scored"], full["tokens_scored"]) == (6 * 16 * 13, 6 * 16 * 31)
    assert [p["step"] for p in fair["val_curve"]] == [3, 6] and fair["steps"] == full["steps"] == 6
    for entry, mode in ((fair, "fair"), (full, "full")):
        alone = sg.main(tiny_args(shakespeare_dir, "", mode="eval", ckpt=runs[mode]))
        for key in ("val_loss_l2r", "val_loss_random", "val_loss_fair", "val_ppl_fair"):
            assert entry[key] == pytest.approx(alone[key], rel=1e-6), (mode, key)
        # the final point of the curve is the training's own last validation: the same rows and orders
        assert entry["val_curve"][-1]["val_loss_random"] == pytest.approx(entry["val_loss_random"], rel=1e-6)
    assert fair["val_loss_fair"] != full["val_loss_fair"]
    assert "fair" in capsys.readouterr().out
    with pytest.raises(common.ConfigError, match="two or more"):
        sg.main(tiny_args(shakespeare_dir, out, mode="compare", runs=f"[{runs['fair']}]"))
    with pytest.raises(common.ConfigError, match="1 labels for 2 runs"):
        sg.main(tiny_args(shakespeare_dir, out, mode="compare", runs=f"[{runs['fair']},{runs['full']}]", labels="[a]"))


def test_configs_and_sbatch_scripts():
    configs = {name: common.load_config(sg.Config, [os.path.join(ROOT, "configs", f"sigmagpt_{name}.yaml")])
               for name in ("quick", "fair", "full", "demo")}
    for cfg in configs.values():
        sg.check_config(cfg)
    quick, fair, full = configs["quick"], configs["fair"], configs["full"]
    assert (quick.max_samples, quick.epochs, quick.micro_batch_size, quick.grad_accum_steps) == (1000, 1, 4, 2)
    for cfg in (fair, full):
        assert (cfg.max_samples, cfg.epochs, cfg.micro_batch_size, cfg.grad_accum_steps) == (2_000_000, 50, 8, 64)
        assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip) == (2.5e-4, 0.1, 10000, 1.0)
        assert (cfg.init_from, cfg.block_size) == ("distilgpt2", 1024)
    assert (fair.mode, fair.scored_share, full.mode) == ("fair", 0.4, "full")
    for name in ("quick", "fair", "full"):
        path = os.path.join(ROOT, "slurm", f"sigmagpt_{name}.sbatch")
        subprocess.run(["bash", "-n", path], check=True)
        text = open(path).read()
        for needed in (f"configs/sigmagpt_{name}.yaml", "resume=latest", "#SBATCH --requeue", "scancel --signal=USR1"):
            assert needed in text, (name, needed)


def test_resume_is_exact_in_fair_mode_with_a_curriculum(shakespeare_dir, tmp_path):
    common_args = dict(mode="fair", order="curriculum", curriculum_start=0.3, max_samples=32, max_steps=0,
                       epochs=3, val_interval=0)  # 2 steps an epoch: the loader restarts twice
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    sg.main(tiny_args(shakespeare_dir, straight, **common_args))
    first = sg.main(tiny_args(shakespeare_dir, split, stop_after_step=2, **common_args))
    assert first["status"] == "stopped"
    with pytest.raises(common.ConfigError, match="scored_share=0.4 in the checkpoint but 0.5 now"):
        sg.main(tiny_args(shakespeare_dir, split, resume="latest", **dict(common_args, scored_share=0.5)))
    sg.main(tiny_args(shakespeare_dir, split, resume="latest", **common_args))
    a, b = records(straight, "train"), records(split, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    wa, wb = sg.load_any_checkpoint(straight)["model"], sg.load_any_checkpoint(split)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a[0]["scored_tokens"] == 8 * 2 * round(0.4 * 32)


def test_init_from_a_train_gpt_checkpoint_starts_as_the_ar_model(shakespeare_dir, tmp_path):
    torch.manual_seed(0)
    ar = GPT(model_config("tiny", 320, 32, n_embd=32)).eval()
    path = str(tmp_path / "ar" / "ckpt_000000.pt")
    common.save_checkpoint(path, {"kind": "gpt", "model": ar.state_dict(), "model_config": dataclasses.asdict(ar.config),
                                  "tokenizer": common.Tokenizer("byte").spec, "step": 0})
    # train_gpt.py's run folder holds config.json beside its checkpoints: a run, not an HF folder
    common.atomic_write_json(str(tmp_path / "ar" / "config.json"), {"model": "tiny"})
    x = torch.randint(0, 257, (2, 31))
    for init_from in (path, str(tmp_path / "ar"), str(tmp_path / "ar" / "latest")):
        cfg = common.load_config(sg.Config, tiny_args(shakespeare_dir, str(tmp_path / "x"), init_from=init_from))
        sigma = sg.build_model(cfg, common.load_meta(shakespeare_dir)).eval()
        with torch.no_grad():
            assert torch.allclose(sigma(x, position_ids=torch.arange(31), target_position_ids=torch.arange(1, 32))[0],
                                  ar(x)[0], atol=1e-5), init_from


def test_init_from_a_sigmagpt_run_takes_its_newest_checkpoint(shakespeare_dir, trained_run, tmp_path):
    out, _ = trained_run
    saved = common.load_checkpoint(out)["model"]
    for init_from in (out, os.path.join(out, "latest"), os.path.join(out, "checkpoint-40")):
        cfg = common.load_config(sg.Config, tiny_args(shakespeare_dir, str(tmp_path / "x"), init_from=init_from))
        weights = sg.build_model(cfg, common.load_meta(shakespeare_dir)).state_dict()
        assert all(torch.equal(weights[k], saved[k]) for k in saved), init_from


def test_fp16_trains_with_a_grad_scaler_that_the_checkpoint_keeps(shakespeare_dir, tmp_path):
    out = str(tmp_path / "fp16")
    results = sg.main(tiny_args(shakespeare_dir, out, dtype="fp16", max_steps=3, val_interval=0))
    assert math.isfinite(results["final_train_loss"])
    scaler = sg.load_any_checkpoint(out)["scaler"]
    assert scaler["scale"] > 1.0 and scaler["_growth_tracker"] == 3  # dynamic loss scaling ran every step


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(shakespeare_dir, tmp_path):
    out = str(tmp_path / "run")
    sg.main(tiny_args(shakespeare_dir, out, max_steps=30, stop_after_step=1, val_interval=0))
    with pytest.raises(common.TrainingDiverged) as e:  # an absurd learning rate: the weights blow up
        sg.main(tiny_args(shakespeare_dir, out, max_steps=30, learning_rate=1e9, resume="latest", val_interval=0,
                          log_interval=4))
    bad_step = records(out, "error")[0]["step"]
    assert bad_step >= 2 and f"at step {bad_step}" in str(e.value) and "checkpoint-2" in str(e.value)
    assert [s for s, _ in common.list_checkpoints(out)] == [2]  # nothing non-finite was saved


def test_sigterm_saves_a_checkpoint_and_exits_zero(shakespeare_dir, tmp_path):
    out = str(tmp_path / "run")
    args = tiny_args(shakespeare_dir, out, max_steps=100_000, val_interval=0, log_interval=5)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, SCRIPT] + args, cwd=ROOT, stdout=stdout, stderr=stderr,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            log = os.path.join(out, "log.jsonl")
            for _ in range(600):
                if proc.poll() is not None or (os.path.exists(log) and records(out, "train")):
                    break
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
    assert "received SIGTERM" in (tmp_path / "stdout").read_text()
    step, _ = common.list_checkpoints(out)[-1]
    # checkpoint-N: after N steps, the last one logged (0-based step N-1)
    assert records(out, "train")[-1]["step"] + 1 == step == common.load_checkpoint(out)["step"] + 1


# ---------------------------------------------------------------------------- bad input


def one_line_error(argv, capsys):
    """sg.main(argv) as the script's entry point runs it (common.run_main): exit 1 and one `error:` line."""
    return conftest.one_line_error(sg.main, argv, capsys, preemptible=True)


ENTRY_CASES = {  # name: (arguments from (data, a trained run, tmp_path), words the error line must hold)
    "out_dir is a file": (lambda data, run, tmp: tiny_args(data, str(tmp / "a_file")), "is a file, not a folder"),
    "name escapes out_root": (lambda data, run, tmp: tiny_args(data, "", out_root=str(tmp / "root"), name="../../x"),
                              "must be a plain folder name"),
    "name with a slash": (lambda data, run, tmp: tiny_args(data, "", out_root=str(tmp / "root"), name="a/b"),
                          "must be a plain folder name"),
    "init_from RUN/latest without checkpoints": (
        lambda data, run, tmp: tiny_args(data, str(tmp / "o"), init_from=str(tmp / "empty_run" / "latest")),
        "no checkpoints"),
    "init_from RUN/latest of no run": (
        lambda data, run, tmp: tiny_args(data, str(tmp / "o"), init_from=str(tmp / "nowhere" / "latest")),
        "checkpoint not found"),
    "resume with another order": (
        lambda data, run, tmp: tiny_args(data, run, max_steps=40, resume="latest", order="left_to_right"),
        "order='random' in the checkpoint but 'left_to_right' now"),
    "resume with another curriculum": (
        lambda data, run, tmp: tiny_args(data, run, max_steps=40, resume="latest", curriculum_steps=5),
        "curriculum_steps=0 in the checkpoint but 5 now"),
    "scored_share above 1": (lambda data, run, tmp: tiny_args(data, str(tmp / "o"), scored_share=2),
                             "scored_share must be in (0, 1], got 2.0"),
}


@pytest.mark.parametrize("case", ENTRY_CASES)
def test_bad_inputs_at_the_entry_point_are_one_line_errors(case, shakespeare_dir, trained_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text("{}")
    before = sorted(os.listdir(trained_run[0]))
    args, words = ENTRY_CASES[case]
    assert words in one_line_error(args(shakespeare_dir, trained_run[0], tmp_path), capsys)
    assert sorted(os.listdir(trained_run[0])) == before  # a refused resume writes nothing
    assert not os.path.exists(tmp_path.parent / "x") and not os.path.exists(tmp_path / "root")


def test_bad_inputs_stop_with_one_line_errors(shakespeare_dir, tmp_path):
    for share in ("0", "1.5"):
        with pytest.raises(common.ConfigError, match="scored_share must be in"):
            sg.main(tiny_args(shakespeare_dir, str(tmp_path / "a"), scored_share=share))
    hf_tiny(tmp_path / "hf", vocab=101, positions=24)
    with pytest.raises(common.ConfigError, match="another vocabulary"):  # byte data, a GPT-2-vocabulary model
        sg.main(tiny_args(shakespeare_dir, str(tmp_path / "b"), init_from=str(tmp_path / "hf")))
    torch.manual_seed(0)
    short = GPT(dataclasses.replace(model_config("tiny", 320, 16, n_embd=32), double_position=True))
    path = str(tmp_path / "short" / "ckpt_000000.pt")
    common.save_checkpoint(path, {"kind": "sigmagpt", "model": short.state_dict(), "step": 0,
                                  "model_config": dataclasses.asdict(short.config),
                                  "tokenizer": common.Tokenizer("byte").spec})
    with pytest.raises(common.ConfigError, match="block_size 32 is longer than the position table"):
        sg.main(tiny_args(shakespeare_dir, str(tmp_path / "c"), init_from=path))
    other = common.Tokenizer("byte", extra_tokens=["<|user|>"]).spec
    common.save_checkpoint(path, {"kind": "sigmagpt", "model": short.state_dict(), "step": 0,
                                  "model_config": dataclasses.asdict(short.config), "tokenizer": other})
    with pytest.raises(common.ConfigError, match="another vocabulary"):
        sg.main(tiny_args(shakespeare_dir, str(tmp_path / "d"), init_from=path, block_size=16))
    # at the entry point: one line on stderr, exit code 1, no traceback
    proc = subprocess.run([sys.executable, SCRIPT] + tiny_args(shakespeare_dir, str(tmp_path / "e"), scored_share=2),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: scored_share must be in (0, 1], got 2.0"]


# ---------------------------------------------------------------------------- generation


def sharp_tiny_model(vocab=4, scale=5.0):
    """A random tiny sigma-GPT whose matrices are scaled up: peaked, strongly dependent conditionals, so that
    drafts get rejected and a wrong sampler shows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, double_position=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


def test_infilling_keeps_every_known_token(shakespeare_dir, tmp_path):
    tok = common.Tokenizer("byte")
    tokens = sg.parse_prompt("ab<missing>3</missing>c<missing>2</missing>d", tok, 5)
    assert tokens == [97, 98, None, None, None, 99, None, None, 100]
    assert sg.parse_prompt("xy", tok, 3) == [120, 121, None, None, None]
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(model_config("tiny", 320, 16, n_embd=32), double_position=True)).eval()
    g = torch.Generator().manual_seed(0)
    for sampler in ("rejection", "sequential", "left_to_right"):
        for _ in range(3):
            if sampler == "rejection":
                filled, stats = sg.sample_rejection(model, tokens, 1.0, g, tok.vocab_size)
            else:
                how = "random" if sampler == "sequential" else "left_to_right"
                filled, stats = sg.sample_sequential(model, tokens, how, 1.0, g, tok.vocab_size)
            assert all(f == t for f, t in zip(filled, tokens) if t is not None)
            assert all(f is not None and 0 <= f < tok.vocab_size for f in filled)
            assert sum(stats["accepted_per_step"]) == 5 and min(stats["accepted_per_step"]) >= 1


def exact_random_order_distribution(model, t0, unknown, vocab):
    """p(x_1..x_U | x_0 = t0) of sequential sampling in a uniformly random order, enumerated exactly:
    the mean over the U! orders of the product of the model's conditionals along the order."""
    outcomes = list(itertools.product(range(vocab), repeat=unknown))
    orders = list(itertools.permutations(range(1, unknown + 1)))
    total = torch.zeros(len(outcomes), dtype=torch.float64)
    for order in orders:
        order = (0,) + order
        seqs = torch.tensor([[t0] + [o[p - 1] for p in order[1:]] for o in outcomes])
        pos = torch.tensor(order).expand(len(outcomes), -1)
        with torch.no_grad():
            logits, _ = model(seqs[:, :-1], position_ids=pos[:, :-1], target_position_ids=pos[:, 1:])
        logp = torch.log_softmax(logits.double(), -1).gather(2, seqs[:, 1:, None])[..., 0].sum(1)
        total += logp.exp() / len(orders)
    return outcomes, total


def chi_square(counts, expected, min_expected=5.0):
    """Pearson's statistic with the cells expected below min_expected pooled; (statistic, degrees of freedom)."""
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def chi_square_quantile(df, z=3.09):
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_rejection_sampling_matches_random_order_sequential_sampling_in_distribution():
    """On a tiny sharp model (vocab 4, one known token, 3 unknown: 64 outcomes), 2,000 rejection-sampled
    draws pass a chi-square test (p > 0.001) against the exact distribution of sequential sampling in a
    uniformly random order; the same test throws out the drafts' independent product (what accepting
    every draft would give), so it can fail. Every step accepts at least one token, and some reject."""
    model = sharp_tiny_model()
    outcomes, exact = exact_random_order_distribution(model, 1, 3, 4)
    index = {o: i for i, o in enumerate(outcomes)}
    g = torch.Generator().manual_seed(0)
    n, counts, steps = 2000, np.zeros(len(outcomes)), []
    for _ in range(n):
        filled, stats = sg.sample_rejection(model, [1, None, None, None], 1.0, g)
        counts[index[tuple(filled[1:])]] += 1
        steps += stats["accepted_per_step"]
    assert min(steps) >= 1 and 1.0 < np.mean(steps) < 3.0  # some drafts rejected, more than one token a step
    stat, df = chi_square(counts, n * exact.numpy())
    assert stat < chi_square_quantile(df), (stat, df)
    q = sg.propose(model, [1, None, None, None], [0], [1, 2, 3], 1.0).double()
    independent = np.array([float(q[0, a] * q[1, b] * q[2, c]) for a, b, c in outcomes])
    stat_wrong, df_wrong = chi_square(counts, n * independent)
    assert stat_wrong > 10 * chi_square_quantile(df_wrong)

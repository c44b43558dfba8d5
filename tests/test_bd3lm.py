"""train_bd3lm.py on CPU with tiny models: the block-diffusion mask against its definition, the objective
against autoregression, clean-copy independence, cached vs uncached sampling, learning on GSM8K text,
deterministic ppl_eval, the hierarchical layout, resume exactness and the bad inputs; and what follows the
reference (kuleshov-group/bd3lms): resampling, the clip search's grid and statistic, the top-p rules, ppl_eval's
rows and strata, the EMA warm-up."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import engine
import eval_gsm8k as ev
import train_bd3lm as bd
import conftest
from conftest import shared_path
from model import GPT, GPTConfig, block_diffusion_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = os.path.join(ROOT, "tests", "fixtures", "plans_small.json")


@pytest.fixture(scope="module")
def gsm8k_files(tmp_path_factory):
    """The first GSM8K rows from ../shared/data (train 300, test 40): enough text, quick to tokenize."""
    folder = tmp_path_factory.mktemp("gsm8k")
    paths = []
    for split, n in (("train", 300), ("test", 40)):
        rows = common.read_jsonl(shared_path("gsm8k", f"{split}.jsonl"))[:n]
        path = str(folder / f"{split}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths.append(path)
    return paths


def gsm8k_args(files, out_dir, **overrides):
    """A tiny byte-level flat run: 2 layers, 32 wide, rows of 64 tokens in blocks of 8."""
    args = dict(data="gsm8k", data_path=files[0], val_data_path=files[1], wrap="true", tokenizer="byte",
                seq_len=64, block_size=8, model="tiny", n_embd=32, batch_size=16, micro_batch_size=8, max_steps=6,
                warmup_steps=2, max_lr=3e-3, log_interval=1, val_interval=0, val_batches=2, ckpt_interval=0,
                device="cpu", dtype="fp32", ema=0.9, seed=3, out_dir=out_dir)
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def plans_args(out_dir, **overrides):
    """A tiny hierarchical run on the fixture plans: segments 48 | 48 | 32 bytes, blocks of 16."""
    args = dict(data="hierarchical", plans_path=PLANS, val_plans_path=PLANS, tokenizer="byte", seq_len=128,
                question_len=48, plan_len=48, exec_len=32, block_size=16, model="tiny", n_embd=32, batch_size=4,
                micro_batch_size=2, max_steps=6, warmup_steps=1, max_lr=3e-3, log_interval=1, val_interval=3,
                val_batches=1, ckpt_interval=3, device="cpu", dtype="fp32", ema=0.9, seed=5, out_dir=out_dir)
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def records(out_dir, kind):
    return [r for r in common.read_jsonl(os.path.join(out_dir, "log.jsonl")) if r["type"] == kind]


def tiny_model(vocab=40, positions=64, tie=False):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=positions, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32,
                         tie_embeddings=tie)).eval()


# ---------------------------------------------------------------------------- the mask


def brute_force_mask(L, block_size):
    """The BD3-LM attention mask written from its definition, one (query, key) pair at a time."""
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_clean, k_clean = q >= L, k >= L
            bq, bk = (q % L) // block_size, (k % L) // block_size
            if not q_clean and not k_clean:
                mask[q, k] = bq == bk  # a noisy block sees itself
            elif not q_clean and k_clean:
                mask[q, k] = bk < bq  # and the clean copy of earlier blocks only
            elif q_clean and k_clean:
                mask[q, k] = bk <= bq  # the clean copy is block-causal
    return mask


@pytest.mark.parametrize("L,block_size", [(8, 1), (8, 2), (12, 4), (16, 16), (24, 8)])
def test_mask_equals_brute_force_construction(L, block_size):
    ids = bd.make_block_ids([L], block_size)
    assert torch.equal(block_diffusion_mask(ids), brute_force_mask(L, block_size))


def test_hierarchical_blocks_restart_at_segments_and_segments_are_causal():
    ids = bd.make_block_ids([6, 4, 6], 4)  # question 6 | plan 4 | execution 6, blocks of 4 inside each
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]
    m, L = block_diffusion_mask(ids), 16
    plan_q = 6  # the first noisy plan token
    assert m[plan_q, L:L + 6].all() and not m[plan_q, L + 6:].any()  # all clean question, no clean plan/exec
    assert m[plan_q, 6:10].all() and not m[plan_q, 10:L].any()  # its own noisy block only
    exec_q = 14  # the second execution block
    assert m[exec_q, L:L + 14].all() and not m[exec_q, L + 14:].any()
    assert not m[L:, :L].any()  # the clean copy never reads noisy tokens


# ---------------------------------------------------------------------------- the objective


def test_block_size_one_at_t_one_is_the_autoregressive_cross_entropy():
    """Every token masked, blocks of one: token i is predicted from clean tokens < i and a [MASK] at i,
    which is what a causal pass over (x_0[:i], [MASK]) computes."""
    model, L, n_vocab, mask_id = tiny_model(), 10, 38, 38
    x0 = torch.randint(0, n_vocab, (3, L), generator=torch.Generator().manual_seed(1))
    ids = bd.make_block_ids([L], 1)
    with torch.no_grad():
        terms = bd.nelbo_terms(model, x0, ids, block_diffusion_mask(ids), mask_id, n_vocab, 1.0, 1.0, True)
        ar = []
        for i in range(L):
            inp = torch.cat([x0[:, :i], torch.full((3, 1), mask_id)], dim=1)
            logits, _ = model(inp)  # plain causal attention
            ar.append(torch.nn.functional.cross_entropy(logits[:, -1, :n_vocab], x0[:, i], reduction="none"))
    assert torch.allclose(terms, torch.stack(ar, dim=1), atol=1e-5)


def test_clean_copy_never_depends_on_the_noisy_half():
    model, L = tiny_model(), 16
    ids = bd.make_block_ids([L], 4)
    mask = block_diffusion_mask(ids)
    g = torch.Generator().manual_seed(2)
    x0, xt1, xt2 = (torch.randint(0, 39, (2, L), generator=g) for _ in range(3))
    pos = torch.cat([torch.arange(L), torch.arange(L)])
    with torch.no_grad():
        a, _ = model(torch.cat([xt1, x0], 1), position_ids=pos, attn_mask=mask)
        b, _ = model(torch.cat([xt2, x0], 1), position_ids=pos, attn_mask=mask)
    assert torch.equal(a[:, L:], b[:, L:])
    assert not torch.allclose(a[:, :L], b[:, :L])  # the noisy half does read x_t


def test_two_pass_reference_gives_the_same_loss_as_the_vectorized_pass():
    model, L = tiny_model(), 24
    ids = bd.make_block_ids([L], 8)
    x0 = torch.randint(0, 38, (2, L), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        one = bd.nelbo_terms(model, x0, ids, block_diffusion_mask(ids), 38, 38, 0.1, 0.9, True,
                             torch.Generator().manual_seed(9))
        two = bd.nelbo_terms(model, x0, ids, None, 38, 38, 0.1, 0.9, True, torch.Generator().manual_seed(9),
                             two_pass=True)
    assert one.sum() > 0 and torch.allclose(one, two, atol=1e-5)


def test_mask_rates_are_stratified_and_clipped():
    rates = bd.sample_mask_rates(8, 4, 0.3, 0.8, True, "cpu", torch.Generator().manual_seed(0))
    u = ((rates.flatten() - 0.3) / 0.5).sort().values
    assert (rates >= 0.3).all() and (rates <= 0.8).all()
    assert torch.equal((u * 32).floor().long(), torch.arange(32))  # one draw in each of the 32 slices


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["first_hitting", "ancestral"])
@pytest.mark.parametrize("segments", [[32], [12, 8, 12]])
def test_kv_cached_sampling_gives_the_same_tokens(sampler, segments):
    model, L = tiny_model(), sum(segments)
    cfg = bd.Config(sampler=sampler, sample_steps=4, top_p=0.95)
    ids = bd.make_block_ids(segments, 4)
    ends = [sum(segments[:i + 1]) for i in range(len(segments))]
    prompt = torch.randint(0, 38, (3, L), generator=torch.Generator().manual_seed(5))
    fixed = torch.zeros(3, L, dtype=torch.bool)
    fixed[0, :5], fixed[1, :9] = True, True  # prompts of different lengths, not on block boundaries
    out = {}
    for cache in (True, False):
        out[cache] = engine.block_diffusion_generate(model, prompt, fixed.clone(), ids, ends, 38, 38, 37, cfg,
                                                     torch.Generator().manual_seed(11), cache)
    (a, nfe_a), (b, nfe_b) = out[True], out[False]
    assert torch.equal(a, b) and nfe_a == nfe_b > 0
    assert torch.equal(a[fixed], prompt[fixed]) and not (a == 38).any()  # prompt kept, nothing left masked
    if sampler == "first_hitting":
        assert nfe_a <= L  # one network call per revealed token at most


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(engine.top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(engine.top_p_filter(probs, 1.0), probs)


# ---------------------------------------------------------------------------- end to end


def test_loss_falls_on_gsm8k_and_ppl_eval_is_deterministic(gsm8k_files, tmp_path):
    out = str(tmp_path / "run")
    res = bd.main(gsm8k_args(gsm8k_files, out, max_steps=25, log_interval=5, val_interval=25))
    losses = [r["loss"] for r in records(out, "train")]
    assert losses[-1] < 0.75 * losses[0], losses
    assert res["final_val_loss"] is not None and os.path.isfile(os.path.join(out, "loss.png"))
    ckpt = common.load_checkpoint(out, expected_kind="bd3lm")
    assert ckpt["ema"] is not None and ckpt["bd3lm"]["mask_id"] == 257
    ev_ppl = dict(mode="ppl_eval", checkpoint=f"{out}/latest", eval_batch_size=8, eval_batches=2)
    first = bd.main(gsm8k_args(gsm8k_files, f"{out}/ppl", **ev_ppl))
    again = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "e2"), **ev_ppl))
    other = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "e3"), **{**ev_ppl, "seed": 4}))
    assert first["nelbo"] == again["nelbo"] and first["nelbo"] != other["nelbo"]
    assert first["ppl_bound"] < 257  # better than uniform over the bytes
    # generation: GSM8K questions as prompts, through eval_gsm8k.py (engine.BlockDiffusionEngine)
    g = ev.main(eval_args(gsm8k_files, f"{out}/gsm8k", model=out, limit=3, batch_size=3))
    preds = common.read_jsonl(f"{out}/gsm8k/predictions.jsonl")
    assert g["n"] == 3 and "gsm8k_strict" in g["metrics"] and len(preds) == 3 and g["counts"]["generated_tokens"] > 0
    assert g["engine"] == "bd3lm" and g["model_kind"] == "bd3lm" and g["bd3lm"]["mask_id"] == 257
    assert all({"prompt", "gold", "completion", "correct", "extracted"} <= set(p) for p in preds)
    # the compare report (eval_gsm8k.py task=compare): this run against an autoregressive one (block size 1)
    ar = str(tmp_path / "ar")
    bd.main(gsm8k_args(gsm8k_files, ar, block_size=1, max_steps=3, val_interval=3))
    ar_ppl = bd.main(gsm8k_args(gsm8k_files, f"{ar}/ppl", **{**ev_ppl, "checkpoint": ar}))
    report = ev.main(["task=compare", f"runs=[{out},{ar}]", "labels=[bd3lm,ar]", f"out_dir={tmp_path / 'cmp'}"])
    table = report["metrics"]
    assert table["nelbo"]["bd3lm"] == first["nelbo"] and ar_ppl["block_size"] == 1
    assert table["gsm8k_strict"]["bd3lm"] == g["metrics"]["gsm8k_strict"] and table["gsm8k_strict"]["ar"] is None
    assert os.path.isfile(str(tmp_path / "cmp" / "comparison.png"))


def eval_args(files, out_dir, **overrides):
    """eval_gsm8k.py on the test rows of `files`, CPU, 32 new tokens (a flat model of 64 positions)."""
    args = dict(task="gsm8k", data_path=files[1], fewshot_path=files[0], max_new_tokens=32, device="cpu",
                dtype="float32", out_dir=out_dir)
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.mark.parametrize("retired, names", [("gsm8k_eval", "python eval_gsm8k.py model=RUN/latest"),
                                            ("compare", "python eval_gsm8k.py task=compare")])
def test_retired_modes_name_the_eval_gsm8k_command(retired, names, tmp_path):
    with pytest.raises(common.ConfigError, match="moved to eval_gsm8k.py") as e:
        bd.main([f"mode={retired}", "runs=[a,b]", "limit=3", f"out_dir={tmp_path}"])
    assert names in str(e.value) and "\n" not in str(e.value)


def test_hierarchical_training_logs_segment_losses_and_resumes_exactly(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    bd.main(plans_args(full))
    bd.main(plans_args(split, stop_after_step=2))
    bd.main(plans_args(split, resume="latest"))
    a, b = records(full, "train"), records(split, "train")
    assert a[-1]["step"] == b[-1]["step"] == 5 and a[-1]["loss"] == b[-1]["loss"]
    assert {"loss_question", "loss_plan", "loss_execution"} <= set(a[-1])
    assert [r["val_loss"] for r in records(full, "val")] == [r["val_loss"] for r in records(split, "val")]
    with pytest.raises(common.ConfigError, match="block_size=16 in the checkpoint but 8 now"):
        bd.main(plans_args(split, resume="latest", block_size=8, max_steps=9))
    s = bd.main(plans_args(str(tmp_path / "s"), mode="sample", checkpoint=full, num_samples=2))
    sample = common.read_jsonl(str(tmp_path / "s" / "samples.jsonl"))[0]
    assert set(sample["segments"]) == {"question", "plan", "execution"} and s["nfe"] > 0


def test_init_from_a_train_gpt_checkpoint(gsm8k_files, tmp_path):
    gpt = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=2, n_head=2, n_embd=32))
    common.save_checkpoint(str(tmp_path / "gpt" / "ckpt_000001.pt"), {
        "kind": "gpt", "model": gpt.state_dict(), "model_config": vars(gpt.config), "step": 1})
    out = str(tmp_path / "run")
    bd.main(gsm8k_args(gsm8k_files, out, init_from=str(tmp_path / "gpt"), max_steps=1))
    ckpt = common.load_checkpoint(out)
    assert ckpt["model_config"]["tie_embeddings"] is False
    # the untied input embedding starts as GPT-2's tied matrix (and moved one step from it)
    start = gpt.transformer.wte.weight
    assert (ckpt["model"]["transformer.wte.weight"] - start).abs().max() < 0.01
    # a GPT checkpoint is not a BD3-LM for evaluation
    with pytest.raises(common.ConfigError, match="holds a 'gpt' model"):
        bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "e"), mode="ppl_eval", checkpoint=str(tmp_path / "gpt")))


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_with_the_setting_named(gsm8k_files, tmp_path):
    with pytest.raises(common.ConfigError, match="seq_len 60 is not divisible by block_size 8"):
        bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "a"), seq_len=60))
    with pytest.raises(common.ConfigError, match="do not sum to seq_len 128"):
        bd.main(plans_args(str(tmp_path / "b"), exec_len=40))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"id": "x", "question": "q?", "execution": "1 + 1 = 2"}]))
    with pytest.raises(common.ConfigError, match="record 0 lacks the field"):
        bd.main(plans_args(str(tmp_path / "c"), plans_path=str(broken)))
    with pytest.raises(common.ConfigError, match="needs checkpoint="):
        bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "d"), mode="sample"))


def one_line_error(argv, capsys):
    """bd.main(argv) as the script's entry point runs it (common.run_main): exit 1 and one `error:` line."""
    return conftest.one_line_error(bd.main, argv, capsys)


class RunsCode:
    def __reduce__(self):  # unpickling this would call os.makedirs(marker): the load must refuse it first
        return (os.makedirs, (self.marker,))


def crafted(path, marker, **entries):
    """A torch file whose unpickling would run code (it creates `marker`)."""
    evil = RunsCode()
    evil.marker = marker
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({**entries, "model": {"transformer.wte.weight": evil}}, path)
    return path


def test_bad_inputs_end_in_one_line_through_the_entry_point(gsm8k_files, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "ans\n')
    assert "broken.jsonl:2: not a JSON line" in one_line_error(
        gsm8k_args(gsm8k_files, str(tmp_path / "a"), data_path=str(broken)), capsys)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert "is a file" in one_line_error(gsm8k_args(gsm8k_files, str(a_file)), capsys)
    marker = str(tmp_path / "the_payload_ran")
    # a published-BD3-LM folder whose pytorch_model.bin is a crafted pickle
    folder = tmp_path / "published"
    crafted(str(folder / "pytorch_model.bin"), marker)
    (folder / "config.json").write_text(json.dumps({"n_heads": 2, "model_length": 64, "block_size": 8}))
    assert "refusing to load it" in one_line_error(
        gsm8k_args(gsm8k_files, str(tmp_path / "b"), init_from=str(folder)), capsys)
    # a crafted checkpoint to resume, to start from and to evaluate
    ckpt = crafted(str(tmp_path / "evil" / "ckpt_000001.pt"), marker, kind="bd3lm", model_config={}, step=1)
    for args in (dict(resume=ckpt), dict(init_from=ckpt), dict(mode="ppl_eval", checkpoint=ckpt)):
        assert "refusing to load it" in one_line_error(gsm8k_args(gsm8k_files, str(tmp_path / "c"), **args), capsys)
    assert not os.path.exists(marker)


def test_resume_refuses_another_loss_or_data_naming_the_key_and_continues_a_longer_run(gsm8k_files, tmp_path):
    import re
    import shutil
    out = str(tmp_path / "run")
    bd.main(gsm8k_args(gsm8k_files, out, max_steps=2, val_interval=0))
    for change, words in ((dict(noise_beta=0.2), "noise_beta=0.001 in the checkpoint but 0.2 now"),
                          (dict(noise_omega=0.9), "noise_omega=1.0 in the checkpoint but 0.9 now"),
                          (dict(antithetic="false"), "antithetic=True in the checkpoint but False now"),
                          (dict(two_pass="true"), "two_pass=False"),
                          (dict(clip_search_interval=2), "clip_search_interval=0"),
                          (dict(wrap="false"), "wrap=True"),
                          (dict(tokenizer="gpt2"), "tokenizer='byte'"),
                          (dict(n_embd=64), "n_embd=32")):
        with pytest.raises(common.ConfigError, match=re.escape(words)):
            bd.main(gsm8k_args(gsm8k_files, out, max_steps=4, resume="latest", **change))
    # the data by content: other rows in a file of the same name are refused, the same rows elsewhere continue
    edited = tmp_path / "edited" / "train.jsonl"
    edited.parent.mkdir()
    rows = common.read_jsonl(gsm8k_files[0])
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(common.ConfigError, match="train_data="):
        bd.main(gsm8k_args(gsm8k_files, out, max_steps=4, resume="latest", data_path=str(edited)))
    same = tmp_path / "same" / "train.jsonl"
    same.parent.mkdir()
    shutil.copy(gsm8k_files[0], same)
    res = bd.main(gsm8k_args(gsm8k_files, out, max_steps=4, resume="latest", data_path=str(same), val_interval=0))
    assert res["status"] == "done" and res["resumed_from_step"] == 1 and res["steps"] == 4


def test_entry_point_prints_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_bd3lm.py"), "data=hierarchical",
                        f"plans_path={PLANS}", "seq_len=512", "question_len=128", "plan_len=128", "exec_len=128",
                        f"out_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: segment lengths") and len(r.stderr.strip().splitlines()) == 1


def test_shipped_configs_load():
    for name in ("gsm8k_bd3lm", "gsm8k_hierarchical", "gsm8k_flat", "owt_bd3lm_small", "bd3lm_demo", "svamp_transfer"):
        cfg = common.load_config(bd.Config, [os.path.join(ROOT, "configs", f"{name}.yaml")])
        bd.check_config(cfg)
    big = common.load_config(bd.Config, [os.path.join(ROOT, "configs", "gsm8k_bd3lm.yaml"), "block_size=4"])
    assert (big.seq_len, big.batch_size, big.micro_batch_size, big.max_steps, big.max_lr) == (512, 128, 32, 50000, 3e-4)


def test_clip_search_picks_the_lowest_variance_range_and_resumes_with_it(tmp_path):
    assert bd.clip_candidates([0.5, 1.0]) == [(0.0, 0.5), (0.0, 1.0), (0.1, 0.6), (0.2, 0.7), (0.3, 0.8),
                                              (0.4, 0.9), (0.5, 1.0)]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    args = dict(clip_search_interval=2, clip_search_widths="[0.3,1.0]", clip_search_batches=1, val_interval=0)
    bd.main(plans_args(full, **args))
    searches = records(full, "clip_search")
    assert [r["step"] for r in searches] == [1, 3, 5] and all(r["candidates"] == 9 for r in searches)
    assert all(r["omega"] - r["beta"] in (pytest.approx(0.3), pytest.approx(1.0)) for r in searches)
    bd.main(plans_args(split, stop_after_step=3, **args))
    # the checkpoint carries the moved range, its identity the configured one (which the resume compares)
    ckpt = common.load_checkpoint(split)
    assert ckpt["noise_range"] != [1e-3, 1.0] and ckpt["identity"]["noise_beta"] == 1e-3
    bd.main(plans_args(split, resume="latest", **args))
    assert records(full, "train")[-1]["loss"] == records(split, "train")[-1]["loss"]


def test_transfer_execution_module_starts_as_a_copy_and_freeze_plan_trains_only_it(tmp_path):
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    bd.main(plans_args(base, max_steps=2, val_interval=0, ckpt_interval=0))
    # a new execution module is a copy of the top layer: the same network function as the base model
    cfg = common.load_config(bd.Config, plans_args(str(tmp_path / "x"), init_from=base, exec_layers=1))
    split = bd.build_model(cfg, 320, common.Dist(False, 0, 0, 1, "cpu")).eval()
    plain = common.load_checkpoint(base)
    one = GPT(GPTConfig(**plain["model_config"])).eval()
    one.load_state_dict(plain["ema"])
    lens = bd.segment_lengths(cfg)
    ids, ex = bd.make_block_ids(lens, 16), bd.exec_positions_of(lens, 1)
    x0 = torch.randint(0, 257, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = bd.nelbo_terms(one, x0, ids, block_diffusion_mask(ids), 257, 257, 0.2, 0.9, True,
                           torch.Generator().manual_seed(1))
        b = bd.nelbo_terms(split, x0, ids, block_diffusion_mask(ids), 257, 257, 0.2, 0.9, True,
                           torch.Generator().manual_seed(1), exec_positions=ex)
    assert torch.allclose(a, b, atol=1e-5)
    # freeze=plan: every weight outside the execution module stays where it was
    bd.main(plans_args(tuned, init_from=base, exec_layers=1, freeze="plan", max_steps=3, val_interval=0,
                       ckpt_interval=0, max_lr=1e-2))
    after = common.load_checkpoint(tuned)["model"]
    start = split.state_dict()
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert moved and all(k.startswith("transformer.h_exec.") for k in moved)
    # sampling through the execution module: cached and uncached agree
    model = GPT(GPTConfig(**common.load_checkpoint(tuned)["model_config"])).eval()
    model.load_state_dict(after)
    fixed = torch.zeros(2, 128, dtype=torch.bool)
    fixed[:, :48] = True
    outs = [engine.block_diffusion_generate(model, x0, fixed.clone(), ids, [48, 96, 128], 257, 257, 256, bd.Config(),
                                            torch.Generator().manual_seed(3), cache, ex)[0] for cache in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_synthetic_plans_have_no_numbers_in_the_plan_and_all_of_them_in_the_execution(tmp_path):
    import re
    from tasks.synthetic import synthetic_math_problems, synthetic_plans
    problems, plans = synthetic_math_problems(200, seed=3, max_steps=6), synthetic_plans(200, seed=3, max_steps=6)
    for problem, rec in zip(problems, plans):
        assert set(bd.PLAN_FIELDS) <= set(rec) and rec["question"] == problem["question"]
        assert not re.search(r"\d", rec["plan"]), rec["plan"]
        numbers = re.findall(r"\d+", " ".join(re.findall(r"<<([^>]*)>>", problem["answer"])))
        found = set(re.findall(r"\d+", rec["execution"]))
        assert numbers and set(numbers) <= found  # every operand and result of every calculation
        assert rec["execution"].rstrip().endswith(f"#### {rec['answer_numerical']}")
    # and the hierarchical model trains on them offline, with no plans file
    out = bd.main(plans_args(str(tmp_path / "run"), synthetic_plans=40, plans_path="", val_plans_path="", max_steps=1,
                             val_interval=1, ckpt_interval=0, bench=True, bench_steps=1, bench_warmup=0))
    assert out["bench"] and math_finite(out["final_train_loss"])


def math_finite(x):
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------------------- fidelity to kuleshov-group/bd3lms


def block_shares(masked, block_size):
    """(B, n_blocks) masked share of every block of a (B, L) mask."""
    return masked.float().view(masked.size(0), -1, block_size).mean(-1)


def test_resampling_keeps_every_block_of_a_clipped_range_inside_it():
    """The reference's training.resample: at block 4 with [0.45, 0.95], a block's share must be 2/4 or 3/4. Without
    resampling a large part of the blocks falls outside (some entirely unmasked: they cost no loss at all)."""
    B, L, bs, beta, omega = 512, 64, 4, 0.45, 0.95
    ids = bd.make_block_ids([L], bs)
    rates = bd.sample_mask_rates(B, L // bs, beta, omega, True, "cpu", torch.Generator().manual_seed(0))
    t = rates[:, ids]
    plain = block_shares(bd.draw_masks(t, ids, beta, omega, False, torch.Generator().manual_seed(1)), bs)
    assert ((plain < beta) | (plain > omega)).float().mean() > 0.3 and (plain == 0).any()
    shares = block_shares(bd.draw_masks(t, ids, beta, omega, True, torch.Generator().manual_seed(1)), bs)
    assert not ((shares < beta) | (shares > omega)).any() and not (shares == 0).any()
    assert set(shares.unique().tolist()) == {0.5, 0.75}
    # a bound at its unclipped value is not enforced (the reference's rule): [1e-3, 0.5] caps only from above
    low = bd.sample_mask_rates(B, L // bs, 1e-3, 0.5, True, "cpu", torch.Generator().manual_seed(2))[:, ids]
    capped = block_shares(bd.draw_masks(low, ids, 1e-3, 0.5, True, torch.Generator().manual_seed(3)), bs)
    assert (capped <= 0.5).all() and (capped == 0).any()
    # an unclipped range draws exactly what it drew before (the same random numbers, no resampling)
    full = bd.sample_mask_rates(B, L // bs, 1e-3, 1.0, True, "cpu", torch.Generator().manual_seed(4))[:, ids]
    a = bd.draw_masks(full, ids, 1e-3, 1.0, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, torch.rand(B, L, generator=torch.Generator().manual_seed(5)) < full)
    # a block too short for any share in the range (one token against [0.45, 0.95]) is kept, and the loop ends
    ids = bd.make_block_ids([6, 1], 3)
    t = torch.full((8, 7), 0.7)
    masked = bd.draw_masks(t, ids, beta, omega, True, torch.Generator().manual_seed(6))
    assert (masked[:, :6].float().view(8, 2, 3).mean(-1) >= beta).all()


def test_resampling_is_on_by_default_and_listed_among_the_differences_when_off(gsm8k_files, tmp_path):
    assert bd.Config().resample is True
    on = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "on"), noise_beta=0.45, noise_omega=0.95, max_steps=2))
    off = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "off"), noise_beta=0.45, noise_omega=0.95, max_steps=2,
                             resample="false"))
    assert on["resample"] and "resample" not in on["reference_differences"]
    assert not off["resample"] and "resample" in off["reference_differences"]
    assert on["final_train_loss"] != off["final_train_loss"]  # the masks differ
    with pytest.raises(common.ConfigError, match="resample=True in the checkpoint but False now"):
        bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "on"), noise_beta=0.45, noise_omega=0.95, max_steps=4,
                           resample="false", resume="latest"))


def test_validation_is_the_nelbo_over_the_whole_range_whatever_the_training_range(gsm8k_files, tmp_path):
    """As the reference's validation: t over [1e-3, 1]. With lr 0 the weights stay put, so runs that differ only in
    their training range must report the same validation NELBO."""
    common_args = dict(max_steps=2, max_lr=0.0, val_interval=2)
    a = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "a"), **common_args))
    b = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "b"), noise_beta=0.45, noise_omega=0.95, **common_args))
    assert a["final_val_loss"] == b["final_val_loss"] and a["final_train_loss"] != b["final_train_loss"]


def reference_clip_ranges(widths, delta, eps=1e-3):
    """bd3lms' metrics.init_valid_vars, from its definition: (eps, 1), then for each width the betas
    arange(0, 1 - w + delta, delta), beta and omega raised to eps."""
    ranges = {(eps, 1.0)}
    for w in widths:
        for i in torch.arange(0, 1 - w + delta, delta, dtype=torch.float64).tolist():
            ranges.add((round(max(i, eps), 4), round(max(i + w, eps), 4)))
    return sorted(ranges)


def test_clip_search_offers_the_reference_grid_and_never_draws_t_zero(gsm8k_files, tmp_path, capsys):
    ours = bd.clip_candidates([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.05, bd.NOISE_FLOOR)
    assert len(ours) == 36 and ours == reference_clip_ranges([0.5, 0.6, 0.7, 0.8, 0.9], 0.05)
    assert min(b for b, _ in ours) == 1e-3
    with pytest.raises(ValueError, match="must be > 0"):
        bd.sample_mask_rates(2, 2, 0.0, 1.0, True, "cpu")
    assert "0 < beta <= omega <= 1" in one_line_error(gsm8k_args(gsm8k_files, str(tmp_path / "z"), noise_beta=0),
                                                      capsys)
    assert "clip_search_statistic 'x'" in one_line_error(
        gsm8k_args(gsm8k_files, str(tmp_path / "z"), clip_search_statistic="x"), capsys)


def test_block_statistic_is_the_reference_variance_of_per_block_mean_losses():
    """Per batch, torch's (unbiased) variance of nlls.reshape(B, -1, block).mean(-1), summed over the batches: the
    reference's _clipped_schedule_search, recomputed here with the same noise for each candidate."""
    model, L, bs = tiny_model(), 16, 4
    ids = bd.make_block_ids([L], bs)
    mask = block_diffusion_mask(ids)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 38, (3, L), generator=g), torch.ones(3, L, dtype=torch.bool), None) for _ in range(2)]
    d = common.Dist(False, 0, 0, 1, "cpu")
    widths = [0.5, 1.0]
    beta, omega, scores = bd.search_noise_range(model, batches, ids, mask, 38, 38, widths, 11, contextlib.nullcontext(),
                                                d, statistic="block", grid=0.25, resample=True)
    assert set(scores) == set(bd.clip_candidates(widths, 0.25, 1e-3)) and len(scores) == 4
    for (b, o), score in scores.items():
        gen = torch.Generator().manual_seed(11)
        expected = 0.0
        with torch.no_grad():
            for x0, valid, _ in batches:
                nlls = bd.nelbo_terms(model, x0, ids, mask, 38, 38, b, o, True, gen, resample=True) * valid
                expected += nlls.reshape(nlls.shape[0], -1, bs).mean(-1).var().item()
        assert score == pytest.approx(expected, rel=1e-5)
    assert scores[(beta, omega)] == min(scores.values())
    # the per-sequence statistic is another number (what the search minimised before, still the default)
    _, _, seq = bd.search_noise_range(model, batches, ids, mask, 38, 38, widths, 11, contextlib.nullcontext(), d,
                                      grid=0.25)
    assert set(seq) == set(scores) and all(seq[k] != pytest.approx(scores[k]) for k in seq)


def test_a_run_with_the_reference_search_scores_its_36_ranges(tmp_path):
    out = str(tmp_path / "run")
    res = bd.main(plans_args(out, max_steps=2, val_interval=0, ckpt_interval=0, clip_search_interval=2,
                             clip_search_batches=1, clip_search_statistic="block", clip_search_delta=0.05,
                             clip_search_widths="[0.5,0.6,0.7,0.8,0.9,1.0]"))
    (search,) = records(out, "clip_search")
    assert search["candidates"] == 36 and search["statistic"] == "block" and search["beta"] >= 1e-3
    assert res["noise_range"] == [search["beta"], search["omega"]]
    assert "clip_search" in res["reference_differences"]  # the cadence and the shared noise still differ


def test_top_p_rules_on_a_hand_made_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.5, 0.15, 0.3]])  # the second row: the same, shuffled
    hf, ref = (lambda p: engine.top_p_filter(probs, p, "hf")), (lambda p: engine.top_p_filter(probs, p, "reference"))
    # p = 0.7: 0.5 + 0.3 crosses it; HF keeps the crossing token, the reference drops it
    assert torch.allclose(hf(0.7), torch.tensor([[0.625, 0.375, 0, 0], [0, 0.625, 0, 0.375]]))
    assert torch.allclose(ref(0.7), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    # p = 0.85: HF keeps three tokens (0.95), the reference two (0.8)
    assert torch.allclose(hf(0.85), torch.tensor([[0.5, 0.3, 0.15, 0], [0, 0.5, 0.15, 0.3]]) / 0.95)
    assert torch.allclose(ref(0.85), torch.tensor([[0.625, 0.375, 0, 0], [0, 0.625, 0, 0.375]]))
    # p below the top token: both keep it alone; p = 1: both keep everything
    assert torch.equal(ref(0.3), hf(0.3)) and torch.allclose(ref(0.3)[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(ref(1.0), probs) and torch.equal(hf(1.0), probs)
    assert bd.Config().top_p_rule == "hf"


def test_sampling_with_either_top_p_rule_records_it(tmp_path):
    run = str(tmp_path / "run")
    bd.main(plans_args(run, max_steps=2, val_interval=0, ckpt_interval=0))
    hf = bd.main(plans_args(str(tmp_path / "s_hf"), mode="sample", checkpoint=run, num_samples=2, top_p=0.5))
    ref = bd.main(plans_args(str(tmp_path / "s_ref"), mode="sample", checkpoint=run, num_samples=2, top_p=0.5,
                             top_p_rule="reference"))
    assert (hf["top_p_rule"], ref["top_p_rule"]) == ("hf", "reference")
    assert "top_p_rule" in hf["reference_differences"] and "top_p_rule" not in ref["reference_differences"]
    assert json.load(open(tmp_path / "s_ref" / "results.json"))["top_p_rule"] == "reference"


def test_ppl_eval_rows_do_not_depend_on_its_seed_and_its_rates_are_stratified(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    synth = dict(synthetic_plans=40, plans_path="", val_plans_path="")
    bd.main(plans_args(run, max_steps=2, val_interval=0, ckpt_interval=0, **synth))
    seen = []
    original = bd.sample_mask_rates
    monkeypatch.setattr(bd, "sample_mask_rates", lambda *a, **k: seen.append(a[4]) or original(*a, **k))
    ev_ppl = dict(mode="ppl_eval", checkpoint=run, eval_batch_size=2, eval_batches=2, **synth)
    one = bd.main(plans_args(str(tmp_path / "e1"), **{**ev_ppl, "seed": 1}))
    two = bd.main(plans_args(str(tmp_path / "e2"), **{**ev_ppl, "seed": 2}))
    assert one["rows_digest"] == two["rows_digest"] and one["nelbo"] != two["nelbo"]  # same rows, other noise
    assert one["data_seed"] == two["data_seed"] == 5  # the trained run's seed (plans_args' seed=5)
    assert seen and all(seen) and one["antithetic"] is True  # stratified over batch x blocks, as the reference
    # the rows are the trained run's validation problems: the same digest as that run's first rows
    cfg = common.load_config(bd.Config, plans_args(run, **synth))
    x, *_ = bd.build_rows(cfg, common.Tokenizer("byte"), "val")
    import hashlib
    h = hashlib.sha256()
    for i in range(2):
        h.update(x[2 * i:2 * i + 2].numpy().astype("int64").tobytes())
    assert one["rows_digest"] == h.hexdigest()[:16]


def test_ema_warmup_follows_the_reference_schedule():
    """bd3lms' ExponentialMovingAverage: the n-th update (n from 1) uses min(decay, (1 + n) / (10 + n)), so the first
    2/11 (ours was 1/10), the second 3/12."""
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = bd.EMA(net, 0.9999)
    with torch.no_grad():
        net.weight.fill_(12.0)
    ema.update(net, 0)  # 2/11 * 1 + 9/11 * 12 = 10
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 10.0))
    with torch.no_grad():
        net.weight.fill_(22.0)
    ema.update(net, 1)  # 3/12 * 10 + 9/12 * 22 = 19
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 19.0))
    capped = bd.EMA(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(0.0)
    capped.update(net, 0)  # min(0.5, 2/11) = 2/11: 2/11 * 22
    assert torch.allclose(capped.model.weight, torch.full((1, 2), 4.0))
    capped.update(net, 999)  # min(0.5, ...) = 0.5
    assert torch.allclose(capped.model.weight, torch.full((1, 2), 2.0))


def test_train_results_list_the_reference_differences(gsm8k_files, tmp_path):
    res = bd.main(gsm8k_args(gsm8k_files, str(tmp_path / "run"), max_steps=1))
    saved = json.load(open(tmp_path / "run" / "results.json"))["reference_differences"]
    assert saved == res["reference_differences"] and {"backbone", "strata_order", "first_token"} <= set(saved)
    assert "padding" not in saved  # wrapped GSM8K rows have no padding


# ---------------------------------------------------------------------------- the block-diffusion engine


def test_block_diffusion_engine_reproduces_the_direct_sampler_on_the_question_segment(tmp_path):
    """eval_gsm8k's engine on a hierarchical checkpoint: the prompt's last question becomes the question segment
    exactly as in training, and plan and execution are what block_diffusion_generate gives for that row with the
    same generator; the completion is the execution segment, the plan is kept beside it."""
    run = str(tmp_path / "hier")
    bd.main(plans_args(run, max_steps=2, val_interval=0, ckpt_interval=0))
    lm = engine.load_block_diffusion_model(run)
    sampling = engine.BlockSampling(sampler="ancestral", sample_steps=2, top_p=0.9, temperature=1.0)
    eng = engine.BlockDiffusionEngine(lm, batch_size=4, sampling=sampling, seed=7)
    questions = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 6 times 7?"]
    prompts = [lm.tok.encode_prompt(f"Question: an exemplar\nAnswer: 1\n#### 1\n\nQuestion: {q}\nAnswer:")
               for q in questions]
    outs = eng.generate(prompts, max_new_tokens=32, stop=["Question:"])

    info, tok = lm.info["bd3lm"], lm.tok.tok
    lens = info["segment_lens"]
    x = torch.full((2, sum(lens)), tok.eot_id)  # the question segment as train_bd3lm lays it out
    for i, q in enumerate(questions):
        x[i, :lens[0]] = torch.tensor(bd.pad_to(tok.encode(f"Question: {q}\n") + [tok.eot_id], lens[0], tok.eot_id)[0])
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, :lens[0]] = True
    ids = bd.make_block_ids(lens, info["block_size"])
    direct, _ = engine.block_diffusion_generate(lm.model, x, fixed.clone(), ids, [48, 96, 128], info["mask_id"],
                                                info["n_vocab"], tok.eot_id, sampling, torch.Generator().manual_seed(7),
                                                True, temperature=1.0)
    for i, (c,) in enumerate(outs):
        segs = engine.segment_ids(direct[i].tolist(), fixed[i].tolist(), lens, info["segment_names"], {tok.eot_id})
        segs = {k: tok.decode(engine.strip_eos(v, lm.tok)) for k, v in segs.items()}
        assert c.segments["plan"] == segs["plan"] and c.record == {"plan": segs["plan"]}
        assert c.text == segs["execution"].split("Question:")[0] and len(c.content_ids) <= 32
        assert c.finish_reason in ("eos", "stop", "length")


def test_mode_sample_is_the_engine_sampler_at_temperature_one(gsm8k_files, tmp_path):
    """mode=sample samples through engine.BlockDiffusionEngine: a flat row generated whole from all [MASK] with the
    run's seed at temperature 1, each text cut at its first end of text; results.json counts the network calls and
    the positions filled."""
    run, out = str(tmp_path / "flat"), str(tmp_path / "s")
    bd.main(gsm8k_args(gsm8k_files, run, max_steps=2))
    res = bd.main(gsm8k_args(gsm8k_files, out, mode="sample", checkpoint=run, num_samples=3, sampler="ancestral",
                             sample_steps=2, seed=9))
    got = common.read_jsonl(os.path.join(out, "samples.jsonl"))
    lm = engine.load_block_diffusion_model(run)
    eot = lm.tok.tok.eot_id
    direct, nfe = engine.block_diffusion_generate(
        lm.model, torch.full((3, 64), eot), torch.zeros(3, 64, dtype=torch.bool), bd.make_block_ids([64], 8), [64],
        257, 257, eot, bd.Config(sampler="ancestral", sample_steps=2), torch.Generator().manual_seed(9), True)
    texts = [lm.tok.decode(row[:row.index(eot)] if eot in row else row) for row in direct.tolist()]
    assert [r["text"] for r in got] == texts and all(r["prompt"] == "" and r["nfe"] == nfe for r in got)
    assert res["nfe"] == nfe > 0 and res["generated_tokens"] == 3 * 64 and res["num_samples"] == 3
    assert json.load(open(os.path.join(out, "results.json")))["nfe"] == nfe
    with pytest.raises(common.ConfigError, match="'num_samples' must be positive"):
        bd.main(gsm8k_args(gsm8k_files, out, mode="sample", checkpoint=run, num_samples=0))


def test_flat_engine_keeps_the_prompt_and_greedy_is_repeatable(gsm8k_files, tmp_path):
    """A flat checkpoint: at most max_new_tokens per sample, num_samples per prompt, and at temperature 0 (the
    evaluator's default) the same engine seed gives the same tokens; bad settings are refused in one line."""
    out = str(tmp_path / "flat")
    bd.main(gsm8k_args(gsm8k_files, out, max_steps=2))
    lm = engine.load_block_diffusion_model(f"{out}/latest")
    assert lm.kind == "bd3lm" and lm.max_positions == 64 and lm.info["ema"] is True
    prompts = [lm.tok.encode_prompt("Question: 2+2?\nAnswer:"), lm.tok.encode_prompt("Q")]
    a = engine.BlockDiffusionEngine(lm, seed=1).generate(prompts, 20, num_samples=2)
    b = engine.BlockDiffusionEngine(lm, seed=1).generate(prompts, 20, num_samples=2)
    assert [[c.ids for c in row] for row in a] == [[c.ids for c in row] for row in b]
    assert all(len(row) == 2 and all(len(c.ids) <= 20 for c in row) for row in a)
    with pytest.raises(ValueError, match="no room"):
        engine.BlockDiffusionEngine(lm).generate([[65] * 64], 8)
    with pytest.raises(common.ConfigError, match="engine=vllm cannot sample a BD3-LM"):
        ev.make_engine(ev.Config(engine="vllm"), lm, torch.float32)
    with pytest.raises(common.ConfigError, match="bd3lm_options"):
        ev.make_engine(ev.Config(bd3lm_options={"smapler": "ancestral"}), lm, torch.float32)

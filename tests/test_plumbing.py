"""common.py's loop plumbing: start-or-resume, safe checkpoints, preemption, divergence watch, schedules, plots."""
import json
import os
import signal

import pytest
import torch

import common

SINGLE = common.Dist(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")


def state(step, weight=1.0):
    return {"kind": "gpt", "model": {"w": torch.full((2,), weight)}, "model_config": {}, "step": step,
            "rng": common.rng_state()}


class RunsCode:
    def __reduce__(self):  # unpickling this would call os.makedirs(marker): the load must refuse it first
        return (os.makedirs, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    evil = RunsCode()
    evil.marker = str(tmp_path / "the_payload_ran")
    torch.save({"kind": "gpt", "model": {"w": evil}, "model_config": {}}, tmp_path / "ckpt_000001.pt")
    with pytest.raises(ValueError, match="refusing to load it"):
        common.load_checkpoint(str(tmp_path / "ckpt_000001.pt"))
    assert not os.path.exists(evil.marker)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random
    import numpy as np
    common.seed_everything(3)
    common.save_checkpoint(str(tmp_path / "ckpt_000000.pt"), state(0))
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    common.seed_everything(99)
    common.set_rng_state(common.load_checkpoint(str(tmp_path))["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_start_or_resume(tmp_path):
    out = str(tmp_path)
    assert common.start_or_resume(out, None, "gpt") is None  # empty folder: a fresh start
    assert common.start_or_resume(out, "latest", "gpt") is None
    common.save_training_checkpoint(out, 3, state(3), SINGLE)
    common.save_training_checkpoint(out, 5, state(5), SINGLE)
    with pytest.raises(common.ConfigError, match="resume=latest"):
        common.start_or_resume(out, None, "gpt")
    with pytest.raises(common.ConfigError, match="'gpt' model, expected a 'bd3lm'"):
        common.start_or_resume(out, "latest", "bd3lm")
    assert common.start_or_resume(out, "latest", "gpt")["step"] == 5
    # a newest checkpoint cut short (a full disk, a killed copy) is stepped over, with a warning
    path = common.checkpoint_path(out, 5)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert common.start_or_resume(out, "latest", "gpt")["step"] == 3
    assert common.start_or_resume(out, common.checkpoint_path(out, 3), "gpt")["step"] == 3


def test_checkpoints_never_hold_non_finite_weights_and_keep_last_k(tmp_path):
    out = str(tmp_path)
    for step in range(4):
        common.save_training_checkpoint(out, step, state(step), SINGLE, keep_last_k=2)
    assert [s for s, _ in common.list_checkpoints(out)] == [2, 3]
    with pytest.raises(common.TrainingDiverged, match="non-finite weights in w"):
        common.save_training_checkpoint(out, 4, state(4, weight=float("nan")), SINGLE)
    assert [s for s, _ in common.list_checkpoints(out)] == [2, 3]


def test_non_finite_watch_sees_gradients_as_well_as_the_loss():
    watch = common.NonFiniteWatch("cpu")
    watch.update(0, torch.tensor(1.0), torch.tensor(0.5))
    assert watch.first_bad_step(SINGLE) is None
    watch.update(1, torch.tensor(1.0), torch.tensor(float("inf")))  # finite loss, exploding gradient
    watch.update(2, torch.tensor(float("nan")), torch.tensor(1.0))
    assert watch.first_bad_step(SINGLE) == 1


def test_preemption_flag_is_set_by_sigusr1_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with common.preemption_handlers() as stop:
        assert not stop.check(SINGLE)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.check(SINGLE) and stop.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_lr_schedules():
    cos = [common.lr_at(s, 1.0, 0.1, 10, 100) for s in range(120)]
    lin = [common.lr_at(s, 1.0, 0.1, 10, 100, "linear") for s in range(120)]
    const = [common.lr_at(s, 1.0, 0.1, 10, 100, "constant") for s in range(120)]
    assert cos[9] == lin[9] == const[9] == 1.0 and cos[0] == pytest.approx(0.1)
    assert lin[55] == pytest.approx(0.55) and cos[55] == pytest.approx(0.55)  # both halfway at the middle
    assert lin[30] < cos[30] and cos[100] == lin[100] == pytest.approx(0.1) and const[119] == 1.0
    with pytest.raises(common.ConfigError, match="lr schedule 'step'"):
        common.lr_at(50, 1.0, 0.1, 10, 100, "step")


def test_one_dtype_vocabulary():
    assert common.resolve_dtype("bf16", "cpu") is common.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert common.resolve_dtype("auto", "cpu") is torch.float32 and common.resolve_dtype("auto", "cuda:0") is torch.bfloat16
    with pytest.raises(common.ConfigError, match="dtype 'fp8'"):
        common.resolve_dtype("fp8", "cpu")


def test_mfu_and_curves(tmp_path):
    assert common.mfu(1000.0, 6e9, 1e15, world_size=2) == pytest.approx(1000 * 6e9 / 2e15)
    assert common.mfu(1000.0, 6e9, None) is None
    with open(tmp_path / "log.jsonl", "w") as f:
        for s in range(5):
            f.write(json.dumps({"type": "train", "step": s, "loss": 5.0 - s}) + "\n")
    path = common.plot_log_curves(str(tmp_path), [("run", "loss", [("train", "loss", "train")]),
                                                  ("empty", "acc", [("val", "acc", "val")])])
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_token_byte_lengths_add_up_to_the_text_bytes():
    from conftest import shared_path
    text = "Natalia sold 48 clips in April, café 日本語 🙂 and 7*8=56.\n<|endoftext|>"
    for tok in (common.Tokenizer("gpt2", tokenizer_file=shared_path("tokenizers", "gpt2.tiktoken"), mul_range=(1, 12)),
                common.Tokenizer("byte", mul_range=(1, 12))):
        lengths = common.token_byte_lengths(tok, common.padded_vocab_size(tok.vocab_size))
        ids = tok.encode(text, allow_special=True)
        assert tok.mul_space_ids[(7, 8)] in ids  # the product is one token, counted as the bytes of ' 7*8=56'
        assert int(lengths[ids].sum()) == len(text.replace("<|endoftext|>", "").encode("utf-8"))


def test_loader_position_survives_a_change_of_batch_geometry(tmp_path):
    import numpy as np
    for i, n in enumerate((5000, 200, 5000)):  # the middle shard is too short for a 4 x 64 window
        common.write_shard(str(tmp_path / f"train_{i:06d}.bin"), np.arange(n) % 250, 256)
    small = common.ShardLoader(str(tmp_path), "train", 2, 64)
    for _ in range(39):
        small.next_batch()
    state = small.state()
    assert state["file"] == "train_000001.bin"  # 200 tokens fit a 2 x 64 window, so it is read here
    big = common.ShardLoader(str(tmp_path), "train", 4, 64)
    with pytest.raises(common.ShardError, match="train_000001.bin, which is not a readable shard"):
        big.set_state(state)
    big.set_state({"file": "train_000000.bin", "pos": 4900})  # past the end for this geometry: next file
    assert big.state() == {"file": "train_000002.bin", "pos": 0}


def test_a_shard_whose_header_lies_about_its_ids_is_refused_when_opened(tmp_path):
    import numpy as np
    tokens = np.arange(3000) % 300  # ids up to 299 in a folder whose vocabulary is 257
    common.write_shard(str(tmp_path / "train_000000.bin"), tokens, 512)
    common.write_shard(str(tmp_path / "val_000000.bin"), tokens % 257, 512)
    with open(tmp_path / "train_000000.bin", "r+b") as f:  # the header's id bound says every id is below 257
        f.seek(4 * 4)
        f.write(np.int32(257).tobytes())
    common.atomic_write_json(str(tmp_path / "meta.json"), {"tokenizer": {"kind": "byte"}, "vocab_size": 257})
    with pytest.raises(common.ShardError, match="token id 299 is outside the vocabulary of 257"):
        common.ShardLoader(str(tmp_path), "train", 2, 16)
    assert common.validation_rows(str(tmp_path), 2, 16).max() < 257


def test_orphaned_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    out = str(tmp_path)
    common.save_training_checkpoint(out, 1, state(1), SINGLE)
    dead = subprocess_pid_that_exited()
    for name in (f"ckpt_000002.pt.tmp{dead}", "log.jsonl.tmp", f"results.json.tmp{os.getpid()}"):
        open(os.path.join(out, name), "w").write("half")
    os.makedirs(os.path.join(out, "checkpoint-5"))
    open(os.path.join(out, "checkpoint-5", f"model.pt.tmp{dead}"), "w").write("half")
    alive = os.path.join(out, f"ckpt_000003.pt.tmp{os.getppid()}")  # a live writer's file stays
    open(alive, "w").write("being written")
    ckpt = common.restore(out, "latest", "gpt", {})
    assert ckpt["step"] == 1
    # the seed-layout folder whose only file was the temp goes too
    assert sorted(os.listdir(out)) == ["ckpt_000001.pt", os.path.basename(alive)]


def subprocess_pid_that_exited():
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_restore_refuses_another_run_naming_the_key_and_allows_the_rest(tmp_path):
    out = str(tmp_path)
    identity = {"n_layer": 2, "data": "abc", "order": "random"}
    common.save_training_checkpoint(out, 1, {**state(1), "identity": identity}, SINGLE)
    assert common.restore(out, "latest", "gpt", identity)["step"] == 1
    with pytest.raises(common.ConfigError, match="order='random' in the checkpoint but 'left_to_right' now"):
        common.restore(out, "latest", "gpt", {**identity, "order": "left_to_right"})


def test_due_flags():
    flags = [common.due(s, 10, log_interval=4, ckpt_interval=5, eval_interval=0, stop_after_step=6, first_step=2)
             for s in range(2, 10)]
    assert [f.log for f in flags] == [True, True, True, False, True, True, False, True]
    assert [s for s, f in zip(range(2, 10), flags) if f.ckpt] == [4, 9]
    assert [s for s, f in zip(range(2, 10), flags) if f.eval] == [9]  # eval_interval 0: only at the end
    assert [s for s in range(10) if common.due(s, 10, eval_interval=3).eval] == [2, 5, 8, 9]
    assert [s for s, f in zip(range(2, 10), flags) if f.stop_after] == [6] and flags[-1].last


def test_step_timer_leaves_out_the_first_lap():
    timer = common.StepTimer("cpu", flops_per_token=6.0, peak=1e3)
    timer.step(100)
    first = timer.lap()
    assert first["tokens_per_sec"] > 0 and "peak_mem_gb" not in first  # no CUDA here
    timer.step(50)
    timer.step(torch.tensor(50))  # a device count: summed without a host sync until the lap
    second = timer.lap()
    assert second["mfu"] == pytest.approx(second["tokens_per_sec"] * 6.0 / 1e3)
    assert timer.summary()["tokens_per_sec"] == pytest.approx(100 / (second["dt_ms"] * 2 / 1000), rel=1e-6)


def test_logger_in_a_slurm_log_no_line_per_batch_and_records_in_order(tmp_path):
    """stdout and stderr are files (as in a SLURM log): 300 batches with figures beside the bar give a few bar
    lines, not one per batch, and every record line is on stdout as soon as it is logged."""
    import subprocess
    import sys
    from conftest import ROOT
    script = (
        "import sys, common\n"
        f"logger = common.Logger({str(tmp_path)!r})\n"
        "logger.progress(total=300)\n"
        "for step in range(300):\n"
        "    logger.bar.update(1)\n"
        "    logger.postfix(loss=f'{1 / (step + 1):.4f}')\n"
        "    if step % 100 == 0:\n"
        "        logger.log({'type': 'train', 'step': step, 'loss': 1.0})\n"
        "        print('MARK', step, file=sys.stderr, flush=True)\n"
        "logger.close()\n")
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=out, stderr=err, check=True, timeout=60)
    err_lines = (tmp_path / "err").read_text().splitlines()
    assert len([line for line in err_lines if "MARK" not in line]) <= 4, err_lines
    assert (tmp_path / "out").read_text().count("type train") == 3


def test_logger_writes_wandb_and_tensorboard_with_one_tag_scheme(tmp_path, monkeypatch):
    import sys
    import types
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or fake_run)
    fake_run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", values, step)),
                                     finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = common.Logger(str(tmp_path), tensorboard=True, wandb_project="mathgpt", run_config={"lr": 1.0})
    logger.log({"type": "val", "step": 3, "val_loss": 2.5, "note": "text is not a scalar"})
    logger.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "mathgpt" and calls[0][1]["config"] == {"lr": 1.0}
    assert calls[1] == ("log", {"val/val_loss": 2.5}, 3) and calls[2] == ("finish",)
    assert os.listdir(tmp_path / "tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a one-line config error
    with pytest.raises(common.ConfigError, match="pip install wandb"):
        common.Logger(str(tmp_path / "b"), wandb_project="mathgpt")

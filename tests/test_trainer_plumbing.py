"""The five trainers share one set of plumbing (common.py): the same checks run on each of them.

SIGTERM / SIGUSR1 at start-up, in the middle of training, during a save and after the loop end the process with
exit code 0 and leave only loadable checkpoints; kill -9 leaves only loadable checkpoints and the next start
removes the killed save's temporary files; a resumed run is bit-exact; a change of what defines the run is
refused naming the key; a larger max_steps continues the run; the setting names are the same everywhere;
every stage answers --help."""
import importlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import common
from conftest import ROOT, shared_path

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status (Linux)")

TRAINERS = ("train_gpt", "sft", "grpo", "train_bd3lm", "train_sigmagpt")
STAGES = TRAINERS + ("prepare_data", "export_hf", "eval_gsm8k", "gen_plans")
# one name per setting in every trainer (README: "Settings every trainer shares")
SHARED_KEYS = ("out_dir", "resume", "max_steps", "micro_batch_size", "log_interval", "ckpt_interval", "keep_last_k",
               "stop_after_step", "seed", "tensorboard", "wandb_project")


# ---- one tiny run of each trainer: arguments, what changes its identity, how its checkpoints are read

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The data and base models the tiny runs start from, made once."""
    root = tmp_path_factory.mktemp("plumbing")
    from test_train_gpt import write_arithmetic_data
    from test_grpo import sft_warm
    gpt_data = write_arithmetic_data(str(root / "gpt_data"), train_tokens=20_000, val_tokens=2_000)
    other_data = write_arithmetic_data(str(root / "gpt_data2"), train_tokens=24_000, val_tokens=2_000)
    warm = sft_warm(str(root / "warm"))
    text = open(shared_path("tinyshakespeare", "input.txt"), encoding="utf-8").read()
    tok = common.Tokenizer("byte")
    ids = np.array(tok.encode(text[:60_000]))
    sig_data = str(root / "shakespeare")
    os.makedirs(sig_data)
    common.write_shard(os.path.join(sig_data, "train_000000.bin"), ids[:50_000], tok.vocab_size)
    common.write_shard(os.path.join(sig_data, "val_000000.bin"), ids[50_000:], tok.vocab_size)
    common.atomic_write_json(os.path.join(sig_data, "meta.json"), {"source": "tinyshakespeare", "tokenizer": tok.spec,
                                                                   "vocab_size": tok.vocab_size})
    gsm8k = [shared_path("gsm8k", "train.jsonl"), shared_path("gsm8k", "test.jsonl")]
    return {"gpt_data": gpt_data, "other_data": other_data, "warm": warm, "sig_data": sig_data, "gsm8k": gsm8k}


def kv(**args):
    return [f"{k}={v}" for k, v in args.items()]


def trainer_args(name, inputs, out, max_steps, **overrides):
    """A tiny CPU run of `name` taking a fraction of a second a step, with the shared setting names."""
    shared = dict(out_dir=out, max_steps=max_steps, log_interval=1, ckpt_interval=0, seed=3)
    if name == "train_gpt":
        args = dict(data_dir=inputs["gpt_data"], model="tiny", block_size=32, micro_batch_size=4,
                    total_batch_size=128, warmup_steps=2, max_lr=3e-3, dtype="fp32", device="cpu", val_interval=0,
                    val_steps=1)
    elif name == "sft":
        args = dict(model=f"{inputs['warm']}/latest", datasets="[synthetic]",
                    dataset_options="{max_steps: 1, max_value: 10}", max_samples=200, eval_samples=8,
                    max_length=64, micro_batch_size=4, learning_rate=3e-3, eval_interval=0, gen_eval="false",
                    warmup_ratio=0.2, device="cpu")
    elif name == "grpo":
        args = dict(model=inputs["warm"], task="arithmetic", task_args="{max_operand: 2, n: 200}",
                    reward_funcs="arithmetic,format", num_generations=4, micro_batch_size=8,
                    max_completion_length=6, eval_examples=4, eval_steps=0, learning_rate=2e-3, device="cpu")
    elif name == "train_bd3lm":
        args = dict(data="gsm8k", data_path=inputs["gsm8k"][0], val_data_path=inputs["gsm8k"][1], wrap="true",
                    tokenizer="byte", seq_len=64, block_size=8, model="tiny", n_embd=32, batch_size=8,
                    micro_batch_size=8, warmup_steps=2, max_lr=3e-3, val_interval=0, val_batches=1, device="cpu",
                    dtype="fp32")
    else:
        args = dict(data_dir=inputs["sig_data"], init_from="scratch", model="tiny", n_embd=32, block_size=32,
                    micro_batch_size=4, grad_accum_steps=1, warmup_steps=2, learning_rate=3e-3, dtype="fp32",
                    device="cpu", val_interval=0, val_batches=1, eval_orders=1)
    return kv(**{**shared, **args, **overrides})


# a setting that defines the run (model, data or loss) and another value of it: resume must refuse the change
IDENTITY_CHANGES = {
    "train_gpt": lambda inputs: ("data", {"data_dir": inputs["other_data"]}),
    "sft": lambda inputs: ("datasets", {"datasets": "[arithmetic]"}),
    "grpo": lambda inputs: ("reward_funcs", {"reward_funcs": "arithmetic"}),
    "train_bd3lm": lambda inputs: ("noise_beta", {"noise_beta": 0.2}),
    "train_sigmagpt": lambda inputs: ("order", {"order": "left_to_right"}),
}


def steps_saved(name, out):
    """Every checkpoint of the run (either layout), each loaded (a partial one fails here): their steps."""
    return [common.load_checkpoint(path)["step"] for _, path in common.list_checkpoints(out)]


def train_losses(out):
    return {r["step"]: r["loss"] for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r.get("type") == "train"}


# ---- subprocesses and signals

def start(name, args, tmp_path):
    log = open(tmp_path / f"{name}.stderr", "a")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{name}.py")] + args, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, OMP_NUM_THREADS="1"))


def caught_signals(pid):
    """The signals a process has handlers for (the SigCgt mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    except (FileNotFoundError, ProcessLookupError):
        return set()
    return {s for s in (signal.SIGTERM, signal.SIGUSR1) if mask >> (s - 1) & 1}


def wait_for(condition, proc, tmp_path, name, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode} before the moment to signal: "
                                 + (tmp_path / f"{name}.stderr").read_text()[-2000:])
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the moment to signal never came")


def finish(proc, tmp_path, name, rc=0):
    try:
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == rc, (tmp_path / f"{name}.stderr").read_text()[-3000:]


def trained(out):
    path = os.path.join(out, "log.jsonl")
    return os.path.isfile(path) and any(r.get("type") == "train" for r in common.read_jsonl(path))


@pytest.mark.parametrize("name", TRAINERS)
def test_signals_from_start_to_exit_end_in_exit_0_with_loadable_checkpoints(name, inputs, tmp_path):
    # at start-up: handlers exist before the slow imports; no step taken, so nothing to save
    out = str(tmp_path / "startup")
    proc = start(name, trainer_args(name, inputs, out, 200), tmp_path)
    wait_for(lambda: caught_signals(proc.pid) == {signal.SIGTERM, signal.SIGUSR1}, proc, tmp_path, name)
    proc.send_signal(signal.SIGTERM)
    finish(proc, tmp_path, name)
    assert steps_saved(name, out) == []

    # in the middle of training, during saves (a checkpoint every step, signals every few ms): a clean stop
    out = str(tmp_path / "mid")
    proc = start(name, trainer_args(name, inputs, out, 400, ckpt_interval=1, keep_last_k=2), tmp_path)
    wait_for(lambda: trained(out), proc, tmp_path, name)
    for _ in range(40):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGUSR1 if _ % 2 else signal.SIGTERM)
        time.sleep(0.003)
    finish(proc, tmp_path, name)
    saved = steps_saved(name, out)
    assert saved and max(saved) < 399  # stopped early, at a step boundary, with its checkpoint
    assert not [n for n in os.listdir(out) if common.TEMP_RE.search(n)]

    # after the loop: the final checkpoint is written, results and plots are still to come
    out = str(tmp_path / "after")
    proc = start(name, trainer_args(name, inputs, out, 2), tmp_path)
    wait_for(lambda: os.path.isdir(out) and steps_saved(name, out), proc, tmp_path, name)
    proc.send_signal(signal.SIGTERM)
    finish(proc, tmp_path, name)
    assert steps_saved(name, out) == [1]


@pytest.mark.parametrize("name", TRAINERS)
def test_kill_9_leaves_only_loadable_checkpoints_and_the_next_start_cleans_up(name, inputs, tmp_path):
    out = str(tmp_path / "run")
    proc = start(name, trainer_args(name, inputs, out, 400, ckpt_interval=1, keep_last_k=3), tmp_path)
    wait_for(lambda: trained(out) and common.list_checkpoints(out), proc, tmp_path, name)
    time.sleep(0.2)
    proc.kill()  # somewhere in a step or a save
    proc.wait()
    saved = steps_saved(name, out)
    assert saved
    # the temp file a save killed halfway leaves (named with the dead process's id)
    orphan = os.path.join(out, f"ckpt_{9999:06d}.pt.tmp{proc.pid}")
    open(orphan, "wb").write(b"half a checkpoint")
    resumed = start(name, trainer_args(name, inputs, out, max(saved) + 2, ckpt_interval=1, keep_last_k=3,
                                       resume="latest"), tmp_path)
    finish(resumed, tmp_path, name)
    assert not os.path.exists(orphan)
    assert max(steps_saved(name, out)) == max(saved) + 1


@pytest.mark.parametrize("name", TRAINERS)
def test_resume_is_exact_refuses_another_run_and_extends(name, inputs, tmp_path):
    trainer = importlib.import_module(name)
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    trainer.main(trainer_args(name, inputs, whole, 5))
    stopped = trainer.main(trainer_args(name, inputs, parts, 5, stop_after_step=1))
    assert stopped["status"] == "stopped"
    key, change = IDENTITY_CHANGES[name](inputs)
    with pytest.raises(common.ConfigError, match=key):
        trainer.main(trainer_args(name, inputs, parts, 5, resume="latest", **change))
    assert trainer.main(trainer_args(name, inputs, parts, 5, resume="latest"))["status"] == "done"
    assert train_losses(whole) == train_losses(parts)  # every step's loss, bit for bit
    extended = trainer.main(trainer_args(name, inputs, parts, 7, resume="latest"))
    assert extended["status"] == "done" and max(steps_saved(name, parts)) == 6
    assert sorted(train_losses(parts)) == list(range(7))


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_has_the_shared_setting_names(name):
    import dataclasses
    fields = {f.name for f in dataclasses.fields(importlib.import_module(name).Config)}
    assert not [k for k in SHARED_KEYS if k not in fields]


def test_the_seeds_setting_names_are_accepted_as_aliases():
    import train_sigmagpt
    cfg = common.load_config(train_sigmagpt.Config, ["save_steps=7", "save_total_limit=2"])
    assert cfg.ckpt_interval == 7 and cfg.keep_last_k == 2


@pytest.mark.parametrize("name", STAGES)
def test_help_lists_every_key_with_its_default_and_comment(name):
    run = subprocess.run([sys.executable, os.path.join(ROOT, f"{name}.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: python" in run.stdout and "keys:" in run.stdout
    import dataclasses
    module = importlib.import_module(name)
    for f in dataclasses.fields(module.Config):
        assert f"  {f.name} (" in run.stdout, f.name
    assert run.stdout.count(": ") > len(dataclasses.fields(module.Config)) // 2  # most keys carry their comment


@pytest.mark.parametrize("name", TRAINERS)
def test_tensorboard_in_one_folder_with_one_tag_scheme(name, inputs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    importlib.import_module(name).main(trainer_args(name, inputs, out, 2, tensorboard="true"))
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and [e.step for e in events.Scalars("train/loss")] == [0, 1]
    rows = [r for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r.get("type") == "train"]
    assert {f"train/{k}" for k, v in rows[-1].items() if isinstance(v, float)} <= set(scalars)

"""train_gpt.py on CPU with tiny models: config errors, learning, exact resume, DDP equivalence,
preemption, divergence, results and bench output."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import train_gpt
from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt.py")


def write_arithmetic_data(data_dir, train_tokens=40_000, val_tokens=6_000, seed=0):
    """A byte-tokenized corpus of 'a+b=c' lines written with common.write_shard, independent of
    prepare_data.py, so these tests only depend on the shard format."""
    os.makedirs(data_dir, exist_ok=True)
    tok = common.Tokenizer("byte")
    rng = random.Random(seed)

    def tokens(n):
        ids = []
        while len(ids) < n:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            ids += tok.encode(f"{a}+{b}={a + b}\n")
        return np.array(ids[:n])

    common.write_shard(os.path.join(data_dir, "train_000000.bin"), tokens(train_tokens), tok.vocab_size)
    common.write_shard(os.path.join(data_dir, "val_000000.bin"), tokens(val_tokens), tok.vocab_size)
    common.atomic_write_json(os.path.join(data_dir, "meta.json"), {
        "source": "test_arithmetic", "tokenizer": tok.spec, "vocab_size": tok.vocab_size, "condition": "baseline",
        "train_tokens": train_tokens, "val_tokens": val_tokens, "mul_injections": 0})
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_arithmetic_data(str(tmp_path_factory.mktemp("arith")))


def tiny_args(data_dir, out_dir, **overrides):
    """A tiny fp32 CPU run: 2 layers, 64 wide, 32 tokens, 4 x 32 x 2 accumulation = 256 tokens a step."""
    args = dict(data_dir=data_dir, out_dir=out_dir, model="tiny", block_size=32, micro_batch_size=4,
                total_batch_size=256, max_steps=8, warmup_steps=2, max_lr=3e-3, dtype="fp32", device="cpu",
                log_interval=1, val_interval=4, val_steps=2, ckpt_interval=0, seed=7)
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def records(out_dir, kind):
    return [r for r in common.read_jsonl(os.path.join(out_dir, "log.jsonl")) if r["type"] == kind]


# ---------------------------------------------------------------------------- config


def test_unknown_key_names_it_and_lists_valid_keys(data_dir, tmp_path):
    with pytest.raises(common.ConfigError) as e:
        train_gpt.main(tiny_args(data_dir, str(tmp_path)) + ["learning_rate=1e-3"])
    assert "learning_rate" in str(e.value) and "max_lr" in str(e.value) and "total_batch_size" in str(e.value)


def test_bad_type_and_missing_yaml_and_bad_choice(data_dir, tmp_path):
    with pytest.raises(common.ConfigError, match="max_steps"):
        train_gpt.main(tiny_args(data_dir, str(tmp_path), max_steps="lots"))
    with pytest.raises(common.ConfigError, match="no_such_config.yaml"):
        train_gpt.main([str(tmp_path / "no_such_config.yaml")])
    with pytest.raises(common.ConfigError, match="dtype 'fp8'"):
        train_gpt.main(tiny_args(data_dir, str(tmp_path), dtype="fp8"))
    with pytest.raises(common.ConfigError, match="model 'gpt5'"):
        train_gpt.main(tiny_args(data_dir, str(tmp_path), model="gpt5"))


def test_total_batch_size_must_divide(data_dir, tmp_path):
    # 4 x 32 x 1 rank = 128 tokens a micro step; 300 is not a multiple
    with pytest.raises(common.ConfigError, match="total_batch_size 300 is not divisible"):
        train_gpt.main(tiny_args(data_dir, str(tmp_path), total_batch_size=300))
    assert train_gpt.grad_accum_steps(train_gpt.Config(micro_batch_size=32, block_size=1024), 4) == 4


def test_shipped_configs_load():
    big = common.load_config(train_gpt.Config, [os.path.join(ROOT, "configs", "gpt2_124m_10b.yaml")])
    train_gpt.check_config(big)
    # 4 GPUs x 32 x 1024 x 4 accumulation steps = 524288 tokens a step, as in build-nanogpt
    assert (big.total_batch_size, big.max_steps, big.warmup_steps) == (524288, 19073, 715)
    assert train_gpt.grad_accum_steps(big, 4) == 4 and big.max_lr * big.min_lr_ratio == pytest.approx(6e-5)
    demo = common.load_config(train_gpt.Config, [os.path.join(ROOT, "configs", "demo.yaml")])
    train_gpt.check_config(demo)
    assert train_gpt.grad_accum_steps(demo, 1) >= 1


def test_fresh_run_refuses_a_folder_with_checkpoints(data_dir, tmp_path):
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data_dir, out, max_steps=2, val_interval=0))
    with pytest.raises(common.ConfigError, match="resume=latest"):
        train_gpt.main(tiny_args(data_dir, out, max_steps=2, val_interval=0))


# ---------------------------------------------------------------------------- training


def test_tiny_model_loss_falls_on_the_synthetic_corpus(tmp_path):
    data = str(tmp_path / "synthetic_math")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "source=synthetic_math",
                    f"out_dir={data}", "tokenizer=byte", "target_tokens=60000"], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=120)
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data, out, max_steps=150, warmup_steps=5, log_interval=10, val_interval=75,
                             val_steps=4))
    train = records(out, "train")
    val = records(out, "val")
    first = train[0]["loss"]
    last = np.mean([r["loss"] for r in train[-3:]])
    assert first == pytest.approx(np.log(320), abs=0.3)  # uniform over the padded byte vocab at init
    # below the ~3.4-nat plateau of byte frequencies alone: the model has picked up words and numbers
    assert last < 0.55 * first, f"train loss {first:.3f} -> {last:.3f}"
    assert val[-1]["step"] == 149 and val[-1]["val_loss"] < 0.55 * first


def test_resume_reproduces_the_uninterrupted_run_exactly(data_dir, tmp_path):
    # dropout makes the RNG state matter; val_interval checks validation after the resume too
    common_args = dict(max_steps=8, dropout=0.1, ckpt_interval=0)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_gpt.main(tiny_args(data_dir, straight, **common_args))
    train_gpt.main(tiny_args(data_dir, split, stop_after_step=3, **common_args))
    assert [s for s, _ in common.list_checkpoints(split)] == [3]
    assert json.load(open(os.path.join(split, "results.json")))["status"] == "stopped"
    train_gpt.main(tiny_args(data_dir, split, resume="latest", **common_args))

    loss_a = [(r["step"], r["loss"]) for r in records(straight, "train")]
    loss_b = [(r["step"], r["loss"]) for r in records(split, "train")]
    assert [s for s, _ in loss_a] == list(range(8)) and loss_a == loss_b  # bit for bit
    assert records(straight, "val") == records(split, "val")
    a, b = common.load_checkpoint(straight, "gpt"), common.load_checkpoint(split, "gpt")
    assert a["step"] == b["step"] == 7
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["loader"] == b["loader"]
    # a crash after step 7 was logged but before its checkpoint: resuming from step 3 redoes steps 4-7
    # and the log keeps one record per step
    os.remove(common.checkpoint_path(split, 7))
    train_gpt.main(tiny_args(data_dir, split, resume="latest", **common_args))
    assert [(r["step"], r["loss"]) for r in records(split, "train")] == loss_a
    assert records(straight, "val") == records(split, "val")
    # the checkpoint carries what later stages need
    assert a["kind"] == "gpt" and a["tokenizer"]["kind"] == "byte" and a["model_config"]["vocab_size"] == 320
    assert a["val_loss"] == records(straight, "val")[-1]["val_loss"]


def test_results_json_has_the_promised_fields(data_dir, tmp_path):
    out = str(tmp_path / "run")
    returned = train_gpt.main(tiny_args(data_dir, out, max_steps=6, val_interval=3, ckpt_interval=3,
                                        keep_last_k=1))
    results = json.load(open(os.path.join(out, "results.json")))
    assert results == json.loads(json.dumps(returned))
    assert results["status"] == "done" and results["steps"] == 6
    assert results["tokens_seen"] == 6 * 256
    assert results["final_train_loss"] == records(out, "train")[-1]["loss"]
    assert results["final_val_loss"] == records(out, "val")[-1]["val_loss"]
    assert results["tokens_per_sec"] > 0 and results["seconds"] > 0 and results["mfu"] is None  # no peak on CPU
    assert [s for s, _ in common.list_checkpoints(out)] == [5]  # keep_last_k=1 removed ckpt_000002.pt
    assert json.load(open(os.path.join(out, "config.json")))["max_steps"] == 6
    rec = records(out, "train")[-1]
    assert {"loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec"} <= set(rec)
    assert rec["lr"] == pytest.approx(common.lr_at(5, 3e-3, 3e-4, 2, 6))
    assert os.path.getsize(os.path.join(out, "log.txt")) > 0
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # val_steps=0: a run without validation (no val rows read, no val records)
    quiet = str(tmp_path / "no_val")
    results = train_gpt.main(tiny_args(data_dir, quiet, max_steps=2, val_interval=1, val_steps=0))
    assert results["status"] == "done" and results["final_val_loss"] is None and not records(quiet, "val")


def test_nan_loss_stops_with_the_step_and_last_good_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data_dir, out, max_steps=50, stop_after_step=3, val_interval=0))
    # continue with an absurd learning rate: the weights blow up and the loss becomes NaN
    with pytest.raises(train_gpt.TrainingDiverged) as e:
        train_gpt.main(tiny_args(data_dir, out, max_steps=50, max_lr=1e9, resume="latest", val_interval=0,
                                 log_interval=5))
    bad_step = records(out, "error")[0]["step"]
    assert bad_step >= 4 and f"at step {bad_step}" in str(e.value)
    assert "ckpt_000003.pt" in str(e.value)
    assert [s for s, _ in common.list_checkpoints(out)] == [3]  # nothing non-finite was saved


def test_bench_prints_tokens_per_second_and_writes_results(data_dir, tmp_path, capsys):
    out = str(tmp_path / "bench")
    train_gpt.main(tiny_args(data_dir, out, bench="true", bench_steps=3, bench_warmup=1))
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "MFU n/a" in printed
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["bench"] is True and results["tokens_per_sec"] > 0 and results["mfu"] is None
    assert results["step_ms"] == pytest.approx(256 / results["tokens_per_sec"] * 1000)
    assert common.list_checkpoints(out) == []
    # with a peak given, MFU = achieved FLOP/s / peak, FLOPs per token from the model
    train_gpt.main(tiny_args(data_dir, out, bench="true", bench_steps=2, bench_warmup=1, peak_flops=1e12))
    r = json.load(open(os.path.join(out, "results.json")))
    assert "MFU" in capsys.readouterr().out
    assert r["mfu"] == pytest.approx(r["tokens_per_sec_per_device"] * r["flops_per_token"] / 1e12)
    model = train_gpt.build_model(common.load_config(train_gpt.Config, tiny_args(data_dir, out)), 320)
    assert r["flops_per_token"] == 6 * (model.num_params() + model.lm_head.weight.numel()) + 12 * 2 * 32 * 64


def test_hellaswag_in_the_loop(data_dir, tmp_path):
    path = shared_path("hellaswag", "hellaswag_val_full.txt")
    out = str(tmp_path / "run")
    # byte tokens make contexts longer than the 32-token block: they are cut from the left
    train_gpt.main(tiny_args(data_dir, out, max_steps=2, val_interval=0, hellaswag_file=path,
                             hellaswag_limit=6, hellaswag_interval=1))
    hs = records(out, "hellaswag")
    assert [r["step"] for r in hs] == [0, 1]
    for r in hs:
        assert r["n"] == 6 and round(r["acc_norm"] * 6) == pytest.approx(r["acc_norm"] * 6)
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert json.load(open(os.path.join(out, "results.json")))["hellaswag_acc_norm"] == hs[-1]["acc_norm"]


def test_init_from_an_hf_folder_keeps_its_outputs(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = train_gpt.Config(init_from=str(tmp_path / "hf"), block_size=32)
    model = train_gpt.build_model(cfg, 320).eval()
    assert model.config.vocab_size == 320 and model.config.block_size == 64
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ours = model(idx)[0][..., :300]
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- processes


def test_two_process_ddp_matches_one_process(data_dir, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # same global batch of 4 sequences: 2 ranks x 1 sequence x 2 accumulation steps (DDP's no_sync on
    # the first), or one process x 1 sequence x 4 accumulation steps
    args = dict(micro_batch_size=1, total_batch_size=128, max_steps=4, val_interval=2, val_steps=2)
    # the validation set is fixed whatever the world size: 2 ranks score the same rows as 1
    train_gpt.main(tiny_args(data_dir, one, **args))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           SCRIPT] + tiny_args(data_dir, two, **args),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks x 2 accum" in open(os.path.join(two, "log.txt")).read()  # really two ranks
    a, b = records(one, "train"), records(two, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    for ra, rb in zip(records(one, "val"), records(two, "val")):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-5)
        assert ra["val_bpb"] == pytest.approx(rb["val_bpb"], abs=1e-5)
    wa, wb = common.load_checkpoint(one)["model"], common.load_checkpoint(two)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def wait_for_train_record(out_dir, proc, timeout=60):
    path = os.path.join(out_dir, "log.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with code {proc.returncode}")
        if os.path.exists(path) and any(r["type"] == "train" for r in common.read_jsonl(path)):
            return
        time.sleep(0.2)
    raise AssertionError("no train record appeared")


def test_sigterm_saves_a_checkpoint_and_resume_continues(data_dir, tmp_path):
    out = str(tmp_path / "run")
    args = tiny_args(data_dir, out, max_steps=100_000, val_interval=0, log_interval=50)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:  # no pipe to fill
        proc = subprocess.Popen([sys.executable, SCRIPT] + args, cwd=ROOT, stdout=stdout, stderr=stderr,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            wait_for_train_record(out, proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
    assert "received SIGTERM" in (tmp_path / "stdout").read_text()
    ckpt = common.load_checkpoint(out, expected_kind="gpt")
    step = ckpt["step"]
    # the run stopped at the step boundary after the signal (not on the log_interval grid) and logged it
    assert records(out, "train")[-1]["step"] == step
    assert json.load(open(os.path.join(out, "results.json")))["status"] == "preempted"
    train_gpt.main(args + ["log_interval=1", "resume=latest", f"stop_after_step={step + 2}"])
    assert [r["step"] for r in records(out, "train")][-2:] == [step + 1, step + 2]
    assert common.load_checkpoint(out)["step"] == step + 2


def process_tree(pid):
    """pid and all its descendants (Linux /proc): what scancel reaches through the step's cgroup."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def test_usr1_under_torchrun_as_in_the_sbatch_script(data_dir, tmp_path):
    """slurm/train_gpt.sbatch starts torchrun with USR1 ignored and signals every process of the step
    (scancel --signal=USR1): the workers save and exit 0, so torchrun exits 0 too."""
    out = str(tmp_path / "run")
    cmd = (f"trap '' USR1; exec {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 "
           f"{SCRIPT} " + " ".join(tiny_args(data_dir, out, max_steps=100_000, val_interval=0, micro_batch_size=2,
                                             total_batch_size=128, log_interval=5)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        try:
            wait_for_train_record(out, proc, timeout=90)
            for pid in process_tree(proc.pid):  # like scancel: every process of the step
                os.kill(pid, signal.SIGUSR1)
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:  # a failed test leaves no workers behind
                for pid in process_tree(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert "received SIGUSR1" in (tmp_path / "stdout").read_text()
    assert len(common.list_checkpoints(out)) == 1
    ckpt = common.load_checkpoint(out, expected_kind="gpt")
    assert ckpt["step"] % 5 == 4  # under DDP the ranks agree to stop at a log point
    assert records(out, "train")[-1]["step"] == ckpt["step"]


def test_sbatch_script_parses_and_resumes_latest():
    path = os.path.join(ROOT, "slurm", "train_gpt.sbatch")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for needed in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "resume=latest", "--rdzv_backend=c10d",
                   "scontrol requeue", "scancel --signal=USR1"):
        assert needed in text, needed


def test_corrupt_val_shard_stops_the_run_before_the_first_step(tmp_path):
    data = write_arithmetic_data(str(tmp_path / "data"))
    path = os.path.join(data, "val_000000.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    out = str(tmp_path / "run")
    with pytest.raises(common.ShardError, match="val_000000.bin: header promises"):
        train_gpt.main(tiny_args(data, out, max_steps=4, val_interval=0))
    assert not os.path.exists(os.path.join(out, "log.jsonl")) and common.list_checkpoints(out) == []


def test_val_bits_per_byte_of_byte_tokens_is_the_loss_in_bits(data_dir, tmp_path):
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data_dir, out, max_steps=2, val_interval=2))
    rec = records(out, "val")[-1]
    # byte tokens are one byte each and this corpus has no end-of-text token: bpb = nats / ln 2
    assert rec["val_bpb"] == pytest.approx(rec["val_loss"] / np.log(2), rel=1e-6)
    assert json.load(open(os.path.join(out, "results.json")))["final_val_bpb"] == rec["val_bpb"]


def test_resume_refuses_a_config_that_contradicts_the_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    train_gpt.main(tiny_args(data_dir, out, max_steps=4, stop_after_step=1, val_interval=0))
    with pytest.raises(common.ConfigError, match="model='tiny' in the checkpoint but 'small' now"):
        train_gpt.main(tiny_args(data_dir, out, max_steps=4, val_interval=0, model="small", resume="latest"))
    with pytest.raises(common.ConfigError, match="block_size=32 in the checkpoint but 64 now"):
        train_gpt.main(tiny_args(data_dir, out, max_steps=4, val_interval=0, block_size=64, resume="latest"))
    train_gpt.main(tiny_args(data_dir, out, max_steps=4, val_interval=0, max_lr=1e-3, resume="latest"))  # allowed
    assert common.load_checkpoint(out)["step"] == 3

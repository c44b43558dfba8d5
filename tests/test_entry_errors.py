"""Bad input at every stage's entry point ends in one line `error: ...` and exit code 1, never a traceback
(issue 9, item 10). The tables run in process through common.run_main, the code each script's
`if __name__ == "__main__"` runs; one case per stage also runs as a real subprocess."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest

import common
import eval_gsm8k
import export_hf
import gen_plans
import model as model_lib
import train_gpt
from conftest import ROOT, one_line_error, shared_path
from test_train_gpt import tiny_args, write_arithmetic_data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny byte-tokenizer checkpoint, one whose config contradicts its weights, bad data and YAML files,
    a data folder and a run to resume; a sigma-GPT run folder, a run's config.json alone, an HF folder with a
    crafted pytorch_model.bin, plan files that are not plans."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tok = common.Tokenizer("byte")
    cfg = model_lib.model_config("tiny", common.padded_vocab_size(tok.vocab_size), 64)
    state = {"kind": "gpt", "model": model_lib.GPT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg),
             "tokenizer": tok.spec, "config": {}, "step": 0, "val_loss": None}
    common.save_checkpoint(str(root / "good" / "ckpt_000000.pt"), state)
    common.save_checkpoint(str(root / "mismatch" / "ckpt_000000.pt"),
                           {**state, "model_config": {**state["model_config"], "n_embd": 128}})
    (root / "broken.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "ans\n')
    (root / "fieldless.jsonl").write_text('{"q": "What is 2+2?", "a": "#### 4"}\n')
    (root / "bad.yaml").write_text("max_lr: 0.1\nmodel: [tiny\n")
    (root / "empty.jsonl").write_text("\n")
    os.makedirs(root / "alone")  # a GSM8K test file with no train.jsonl beside it (exemplars: the hub)
    (root / "alone" / "test.jsonl").write_text('{"question": "What is 2+2?", "answer": "#### 4"}\n')
    os.makedirs(root / "run_config_only")
    (root / "run_config_only" / "config.json").write_text(json.dumps({"mode": "fair", "order": "random"}))
    # an HF folder whose weights file builds an object when unpickled (refused, never run)
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=320, n_positions=64, bos_token_id=0,
               eos_token_id=0).save_pretrained(str(root / "crafted"))
    with open(root / "crafted" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Crafted()}, f)
    (root / "plans_dict.json").write_text(json.dumps({"gsm8k_train_0": {"plan": "p"}}))
    (root / "plans_fieldless.json").write_text(json.dumps([{"id": "x", "question": "q"}]))
    data_dir = write_arithmetic_data(str(root / "data"), train_tokens=4_000, val_tokens=1_000)
    train_gpt.main(tiny_args(data_dir, str(root / "run"), max_steps=2, stop_after_step=0, val_interval=0))
    return {"root": root, "good": str(root / "good"), "mismatch": str(root / "mismatch"), "data": data_dir,
            "run": str(root / "run"), "broken": str(root / "broken.jsonl"),
            "fieldless": str(root / "fieldless.jsonl"), "yaml": str(root / "bad.yaml"),
            "empty": str(root / "empty.jsonl"), "alone": str(root / "alone" / "test.jsonl"),
            "run_config_only": str(root / "run_config_only"),
            "crafted": str(root / "crafted"), "plans_dict": str(root / "plans_dict.json"),
            "plans_fieldless": str(root / "plans_fieldless.json")}


class Crafted:
    def __reduce__(self):  # what a malicious pickle does: call something when loaded
        return (os.getcwd, ())


def has_words(line, words):
    return all(w in line for w in ((words,) if isinstance(words, str) else words))


TRAIN_CASES = [  # (arguments, words the error line must hold)
    (lambda f: [f["yaml"]], "not valid YAML"),
    (lambda f: tiny_args(f["data"], str(f["root"] / "lr"), max_lr=-0.1), "'max_lr' must not be negative"),
    (lambda f: tiny_args(f["data"], f["run"], block_size=64, resume="latest"), "block_size=32 in the checkpoint"),
    (lambda f: tiny_args(str(f["root"] / "nowhere"), str(f["root"] / "x")), "nowhere"),
]


@pytest.mark.parametrize("args, words", TRAIN_CASES)
def test_train_gpt_bad_inputs(files, capsys, args, words):
    assert has_words(one_line_error(train_gpt.main, args(files), capsys, (train_gpt.TrainingDiverged,)), words)


EVAL_CASES = [
    (lambda f: ["model=" + str(f["root"] / "no" / "such" / "run")], "no such checkpoint, run folder or HF folder"),
    (lambda f: [f"model={f['good']}", f"data_path={f['broken']}", "limit=1"], "broken.jsonl:2: not a JSON line"),
    (lambda f: [f"model={f['good']}", f"data_path={f['fieldless']}", "limit=1"], "has no question, answer field"),
    (lambda f: [f"model={f['mismatch']}"], "its model_config does not match its weights"),
    (lambda f: [f["yaml"]], "not valid YAML"),
    (lambda f: [f"model={f['good']}", "protocol=harness"], "protocol must be one of project, lm_eval"),
    (lambda f: [f"model={f['good']}", f"data_path={f['empty']}"], "empty.jsonl: no rows (an empty data file)"),
    (lambda f: [f"model={f['good']}", f"data_path={f['empty']}", "task=hellaswag"], "no HellaSwag items"),
    (lambda f: [f"model={f['run_config_only']}"], "neither an HF model folder (its config.json has no model_type"),
    (lambda f: [f"model={f['crafted']}"], "holds objects other than tensors, numbers, strings and lists; refusing"),
]


@pytest.mark.parametrize("args, words", EVAL_CASES)
def test_eval_gsm8k_bad_inputs(files, capsys, tmp_path, args, words):
    argv = args(files) + [f"out_dir={tmp_path}", "max_new_tokens=4", "fewshot=0"]
    assert has_words(one_line_error(eval_gsm8k.main, argv, capsys), words)


EXPORT_CASES = [
    (lambda f: [f"checkpoint={f['mismatch']}"], "its model_config does not match its weights"),
    (lambda f: [f"checkpoint={f['root'] / 'none'}"], "checkpoint not found"),
    (lambda f: [f["yaml"]], "not valid YAML"),
]


@pytest.mark.parametrize("args, words", EXPORT_CASES)
def test_export_hf_bad_inputs(files, capsys, tmp_path, args, words):
    argv = args(files) + [f"output_dir={tmp_path / 'hf'}"]
    assert has_words(one_line_error(export_hf.main, argv, capsys, (export_hf.ExportVerificationError,)), words)


GEN_PLANS_CASES = [
    (lambda f: ["--model", str(f["root"] / "no" / "such" / "model"), "--data_path", shared_path("gsm8k", "test.jsonl"),
                "--num_examples", "2"], "no such checkpoint, run folder or HF folder"),
    (lambda f: ["--data_path", f["broken"]], "broken.jsonl:2: not a JSON line"),
    (lambda f: ["--data_path", f["fieldless"]], "has no question, answer field"),
    (lambda f: [f["yaml"]], "not valid YAML"),
    (lambda f: ["--data_path", f["empty"]], "empty.jsonl: no rows (an empty data file)"),
    (lambda f: ["--model", f["good"], "--data_path", f["alone"]], ("is a checkpoint of this repository",
                                                                   "python export_hf.py checkpoint=")),
    (lambda f: ["--model", f["run"] + "/latest", "--data_path", f["alone"]], "is a checkpoint of this repository"),
    (lambda f: ["--analyze", "--input_path", f["plans_fieldless"]], "row 1 has no plan, execution field"),
    (lambda f: ["--analyze", "--input_path", f["plans_dict"]], "expected a JSON list of plan records"),
    (lambda f: ["--analyze", "--input_path", f["empty"]], "empty.jsonl: no rows"),
]


@pytest.mark.parametrize("args, words", GEN_PLANS_CASES)
def test_gen_plans_bad_inputs(files, capsys, tmp_path, args, words):
    argv = args(files) + ["--output_path", str(tmp_path / "plans.json"), "--backend", "transformers"]
    assert has_words(one_line_error(gen_plans.main, argv, capsys), words)
    assert os.listdir(tmp_path) == []  # no plans file, no sidecar


def offline_hub(*args, **kwargs):
    """datasets.load_dataset on a machine without the hub (what datasets raises with HF_DATASETS_OFFLINE=1)."""
    raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (OfflineModeIsEnabled)")


OFFLINE_CASES = [  # (stage, arguments, words): no local file given, so the data would come from the hub
    (eval_gsm8k, lambda f, out: [f"model={f['good']}", f"out_dir={out}", "fewshot=0"],
     ("data_path is not set, and the HF hub did not answer (openai/gsm8k (test)", "data_path=")),
    (eval_gsm8k, lambda f, out: [f"model={f['good']}", f"out_dir={out}", f"data_path={f['alone']}", "fewshot=1"],
     ("fewshot_path is not set", "openai/gsm8k (train)", "fewshot_path=")),
    (eval_gsm8k, lambda f, out: [f"model={f['good']}", f"out_dir={out}", "task=svamp", "fewshot=0"],
     ("svamp_path is not set", "ChilleD/SVAMP", "svamp_path=")),
    (eval_gsm8k, lambda f, out: [f"model={f['good']}", f"out_dir={out}", "task=hellaswag"],
     ("hellaswag_path is not set", "Rowan/hellaswag", "hellaswag_path=")),
    (gen_plans, lambda f, out: ["--output_path", str(out / "plans.json"), "--num_examples", "2"],
     ("--data_path is not set", "openai/gsm8k (train)", "--data_path ")),
]


@pytest.mark.parametrize("stage, args, words", OFFLINE_CASES)
def test_no_local_file_and_no_hub_names_the_setting_for_a_local_file(files, capsys, tmp_path, monkeypatch,
                                                                    stage, args, words):
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    assert has_words(one_line_error(stage.main, args(files, tmp_path), capsys), words)


def test_each_script_prints_one_line_and_exits_1(files, tmp_path):
    """The real entry points, as a user runs them (in parallel: each pays for its imports)."""
    runs = [  # (script, arguments, words of its last line); offline, as a machine without the hub
        ("train_gpt.py", tiny_args(files["data"], str(tmp_path / "t"), max_lr=-1), "'max_lr' must not be negative"),
        ("eval_gsm8k.py", [f"model={tmp_path / 'no' / 'such' / 'run'}", f"out_dir={tmp_path / 'e'}"],
         "no such checkpoint"),
        ("eval_gsm8k.py", [f"model={files['good']}", f"out_dir={tmp_path / 'e2'}", "fewshot=0"],
         "data_path is not set, and the HF hub did not answer"),
        ("export_hf.py", [f"checkpoint={files['mismatch']}", f"output_dir={tmp_path / 'hf'}"], "does not match"),
        ("gen_plans.py", ["--data_path", files["fieldless"], "--output_path", str(tmp_path / "p.json")],
         "has no question, answer field"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, name)] + args, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, args, _ in runs]
    for (name, _, words), proc in zip(runs, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and words in last, (name, last)

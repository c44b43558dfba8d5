"""eval_gsm8k.py on a train_sigmagpt.py checkpoint: read left to right (target position = own + 1) it is a causal
LM, so the Engine and its KV cache generate with it; greedy decoding equals re-reading the whole sequence each
step, with left padding in the batch."""
import pytest
import torch

import eval_gsm8k as ev
import engine as engine_lib
import train_sigmagpt as sg
from conftest import one_line_error
from test_export_hf import greedy_uncached
from test_sigmagpt import shakespeare_dir, tiny_args  # noqa: F401 (the module fixture)


@pytest.fixture(scope="module")
def sigma_run(shakespeare_dir, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("sigma_eval") / "run")
    sg.main(tiny_args(shakespeare_dir, out, max_steps=8, ckpt_interval=8))
    return out


def test_cached_batched_greedy_equals_the_uncached_model(sigma_run, tmp_path):
    cfg = ev.Config(model=sigma_run)
    lm = ev.load_model(sigma_run, cfg, "cpu", torch.float32)
    assert lm.info["source_kind"] == "sigmagpt" and lm.info["order"] == "left_to_right"
    assert lm.model.config.double_position
    prompts = [lm.tok.encode_prompt("ROMEO:\nWhat"), lm.tok.encode_prompt("To be")]
    engine = ev.make_engine(cfg, lm, torch.float32)
    assert isinstance(engine, engine_lib.Engine)
    outs = engine.generate(prompts, max_new_tokens=10, temperature=0.0)
    for ids, out in zip(prompts, outs):
        expected = greedy_uncached(lm.model, ids, 10)[len(ids):]
        assert out[0].ids == expected[:len(out[0].ids)] and out[0].ids


def test_eval_scores_a_sigmagpt_run_and_refuses_vllm(sigma_run, tmp_path, capsys):
    res = ev.main(["task=probes", f"model={sigma_run}", f"out_dir={tmp_path / 'probes'}", "limit=2",
                   "probe_max_new_tokens=4", "engine=hf"])
    assert res["model_kind"] == "native" and res["source_kind"] == "sigmagpt" and res["n"] > 0
    line = one_line_error(ev.main, ["task=probes", f"model={sigma_run}", f"out_dir={tmp_path / 'v'}",
                                    "engine=vllm"], capsys)
    assert "vllm" in line

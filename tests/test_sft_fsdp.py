"""sft.py fsdp=true on CPU with gloo under torchrun: 2 sharded processes train a tiny Llama as 1 process does,
the sharded checkpoint resumes bit-exact and on 1 process, LoRA under FSDP merges to the same model, a tiny MoE
trains (its router loss counted), and the memory estimate prints before a run."""
import os

import pytest
import torch

import common
import sft
import conftest
from test_sft import hf_byte_tok, tiny_hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama") / "model")
    tiny_hf("llama").save_pretrained(folder)
    hf_byte_tok().tok.save_pretrained(folder)
    return folder


def args(model, out, *extra):
    return [f"model={model}", "datasets=[synthetic]", "dataset_options={max_steps: 1, max_value: 10}",
            "max_samples=200", "eval_samples=8", "max_length=64", "learning_rate=3e-3", "log_interval=1",
            "eval_interval=0", "gen_eval=false", "tensorboard=false", "warmup_ratio=0.2", "device=cpu",
            "prompt_format=user_assistant", "max_steps=6", f"out_dir={out}", *extra]


def torchrun(argv, nproc=2):
    return conftest.torchrun("sft.py", argv, nproc)


def losses(out):
    return {r["step"]: r["loss"] for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r.get("type") == "train"}


def hf_weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def test_two_sharded_ranks_train_as_one_process_and_resume_anywhere(llama, tmp_path):
    one, two, parts, alone = (str(tmp_path / n) for n in ("one", "two", "parts", "alone"))
    sft.main(args(llama, one, "micro_batch_size=4"))
    torchrun(args(llama, two, "micro_batch_size=2", "fsdp=true"))  # the same 4 rows a step, 2 per rank
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(6))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    wa, wb = hf_weights(os.path.join(one, "hf")), hf_weights(os.path.join(two, "hf"))  # gathered on rank 0
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4

    torchrun(args(llama, parts, "micro_batch_size=2", "fsdp=true", "stop_after_step=2"))
    assert [os.path.basename(p) for _, p in common.list_checkpoints(parts)] == ["ckpt_000002.dcp"]
    torchrun(args(llama, parts, "micro_batch_size=2", "fsdp=true", "resume=latest"))
    assert losses(parts) == b  # bit for bit

    torchrun(args(llama, alone, "micro_batch_size=2", "fsdp=true", "stop_after_step=2"))
    sft.main(args(llama, alone, "micro_batch_size=4", "resume=latest"))  # the 2-rank shards read by 1 process
    c = losses(alone)
    assert max(abs(c[s] - a[s]) for s in range(3, 6)) < 1e-5


def test_lora_under_fsdp_merges_to_the_same_model(llama, tmp_path):
    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "sharded")
    lora = ["lora=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0", "learning_rate=1e-2"]
    sft.main(args(llama, plain, "micro_batch_size=4", *lora))
    torchrun(args(llama, sharded, "micro_batch_size=2", "fsdp=true", *lora))
    wa, wb = hf_weights(os.path.join(plain, "hf")), hf_weights(os.path.join(sharded, "hf"))
    assert not [k for k in wa if "lora" in k] and wa.keys() == wb.keys()  # merged: an ordinary Llama folder
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    base = hf_weights(llama)
    assert max((wa[k] - base[k]).abs().max().item() for k in wa) > 1e-3  # the adapters did change the weights


def tiny_mixtral(folder):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     num_local_experts=4, num_experts_per_tok=2, bos_token_id=256,
                                     eos_token_id=256)).save_pretrained(folder)
    hf_byte_tok().tok.save_pretrained(folder)
    return folder


def test_a_tiny_moe_trains_sharded_with_its_router_loss(tmp_path):
    model = tiny_mixtral(str(tmp_path / "mixtral"))
    out = str(tmp_path / "moe")
    torchrun(args(model, out, "micro_batch_size=2", "fsdp=true", "max_steps=12", "learning_rate=1e-2"))
    trained = losses(out)
    assert trained[11] < trained[0] - 0.3, trained
    # the router's load-balancing loss is in the trained loss, as transformers adds it
    from transformers import AutoModelForCausalLM
    moe = AutoModelForCausalLM.from_pretrained(model)
    moe.config.output_router_logits = True
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    pos = torch.arange(16).expand(2, 16)
    ce = sft.summed_loss(moe, "hf", x, y, pos, None, "sdpa")
    both = sft.summed_loss(moe, "hf", x, y, pos, None, "sdpa", router_aux=True)
    aux = moe(input_ids=x, position_ids=pos).aux_loss
    assert aux > 0 and (both - ce).item() == pytest.approx(moe.config.router_aux_loss_coef * aux.item() * y.numel(),
                                                          rel=1e-3)


def test_memory_estimate_prints_ddp_and_fsdp_and_bad_settings_are_refused(llama, tmp_path, capsys):
    memory = sft.main(args(llama, str(tmp_path / "est"), "micro_batch_size=4", "estimate_memory=true"))
    printed = capsys.readouterr().out
    assert "ddp" in printed and "fsdp" in printed and memory["ddp"]["optimizer"] > 0
    assert not os.path.exists(tmp_path / "est" / "log.jsonl")  # nothing ran
    for bad, words in ((["fsdp=true"], "launch with torchrun"), (["cpu_offload=true"], "set fsdp=true too")):
        with pytest.raises(common.ConfigError, match=words):
            sft.main(args(llama, str(tmp_path / "bad"), "micro_batch_size=4", *bad))

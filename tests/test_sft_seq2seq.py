"""sft.py with encoder-decoder models: tiny T5 / BART / Switch built from configs with a byte-level tokenizer
(nothing downloaded). The loss is HF's own seq2seq loss, the models learn, generation accuracy runs through HF
generate, LoRA targets the attention's q/v, and the model kinds sft.py cannot train are refused before any
weight is loaded."""
import os

import pytest
import torch

import common
import engine as engine_lib
import sft
from test_sft import train_losses

VOCAB = 257  # the byte tokenizer: 256 bytes + <|endoftext|> (EOS, pad and decoder start)


def byte_tokenizer():
    return common.hf_tokenizer(common.Tokenizer("byte"), 512)


def tiny_seq2seq(arch):
    from transformers import (BartConfig, BartForConditionalGeneration, SwitchTransformersConfig,
                              SwitchTransformersForConditionalGeneration, T5Config, T5ForConditionalGeneration)
    torch.manual_seed(0)
    ids = {"pad_token_id": 256, "eos_token_id": 256, "decoder_start_token_id": 256}
    if arch == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=4, **ids))
    if arch == "switch":
        return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1, num_heads=4, num_experts=2, **ids))
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        bos_token_id=256, forced_bos_token_id=None, init_std=0.1, **ids))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny T5 and BART saved as HF folders with their tokenizer, as a hub model would be."""
    out = {}
    for arch in ("t5", "bart"):
        path = tmp_path_factory.mktemp(arch)
        tiny_seq2seq(arch).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        out[arch] = str(path)
    return out


QA = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]


def test_prompt_to_encoder_reply_to_decoder_and_the_loss_is_hfs():
    tok = engine_lib.HFTokenizer(byte_tokenizer())
    (source, labels, decoder_in), cut = sft.encode_seq2seq(QA, "plain", tok, 64, start_id=256)
    assert not cut and tok.tok.decode(source) == "What is 2 + 3?"
    assert tok.tok.decode(labels) == "2 + 3 = 5\n#### 5<|endoftext|>" and decoder_in == [256] + labels[:-1]
    long = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y" * 100}]
    (source, labels, _), cut = sft.encode_seq2seq(long, "plain", tok, 32, start_id=256)
    assert cut and len(source) == 32 and len(labels) == 32  # prompt cut on the left, reply on the right
    # a padded batch: our summed loss / target count is what HF computes from labels (its own decoder shift)
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a much longer reply here"}]
    examples = [sft.encode_seq2seq(m, "plain", tok, 64, 256)[0] for m in (QA, other)]
    batch = sft.collate_batch("seq2seq", [[0], [1]], examples, tok.pad_id, False)
    x, y, _, mask = batch
    assert (y == -100).sum() > 0 and mask.sum() == sum(len(e[0]) for e in examples)
    for arch in ("t5", "bart", "switch"):
        model = tiny_seq2seq(arch).eval()
        with torch.no_grad():
            ours = sft.batch_loss(model, "seq2seq", batch, "sdpa") / (y != -100).sum()
            theirs = model(input_ids=x, attention_mask=mask, labels=y, output_router_logits=False).loss \
                if arch == "switch" else model(input_ids=x, attention_mask=mask, labels=y).loss
        assert torch.allclose(ours, theirs, atol=1e-5), arch


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_fine_tunes_on_synthetic_math_and_scores_generations(arch, folders, tmp_path):
    out = tmp_path / "run"
    results = sft.main([f"model={folders[arch]}", "datasets=[synthetic]", "dataset_options={max_steps: 1, max_value: 10}",
                        "max_samples=160", "eval_samples=6", "max_length=96", "micro_batch_size=8",
                        "learning_rate=3e-3", "max_steps=16", "warmup_ratio=0.1", "log_interval=1", "eval_interval=8",
                        f"out_dir={out}", "tensorboard=false", "gen_max_new_tokens=12", "gen_batch_size=4",
                        f"gradient_checkpointing={arch == 'bart'}"])
    losses = list(train_losses(out).values())
    assert results["prompt_format"] == "plain" and len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # the loss falls (from ~5.5 nats)
    gen = results["generation"]["synthetic"]
    assert gen["n"] == 6 and 0 <= gen["unparseable"] <= 6 and len(gen["examples"]) == 5
    assert all(set(e) >= {"reply", "pred", "correct", "parsed"} for e in gen["examples"])
    from transformers import AutoModelForSeq2SeqLM
    saved = AutoModelForSeq2SeqLM.from_pretrained(out / "hf")  # an ordinary HF folder
    assert saved.config.model_type == arch and os.path.isfile(out / "hf" / "tokenizer.json")


@pytest.mark.parametrize("arch", ["t5", "switch", "bart"])
def test_lora_targets_the_attention_q_and_v(arch):
    m = tiny_seq2seq(arch)
    peft_model, targets = engine_lib.add_lora(m, r=4, dropout=0.0)
    assert targets == (["q_proj", "v_proj"] if arch == "bart" else ["q", "v"])
    assert type(peft_model).__name__ == "PeftModelForSeq2SeqLM"
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_refused_before_loading_weights(tmp_path, folders):
    from transformers import BertConfig, RobertaConfig
    for cfg in (BertConfig(architectures=["BertForMaskedLM"]), RobertaConfig()):  # a config only: no weights
        path = tmp_path / cfg.model_type
        cfg.save_pretrained(path)
        with pytest.raises(common.ConfigError, match=r"encoder-only model \(.*no generation head"):
            engine_lib.model_kind(str(path))
    assert engine_lib.model_kind(folders["t5"]) == "seq2seq"
    with pytest.raises(common.ConfigError, match="packing=true is for decoder-only models"):
        sft.main([f"model={folders['bart']}", "datasets=[synthetic]", "packing=true", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(common.ConfigError, match="prompt_format=chat_template"):
        sft.main([f"model={folders['t5']}", "datasets=[synthetic]", "prompt_format=chat_template", "max_samples=20",
                  f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(common.ConfigError, match="cannot read the model config of"):
        engine_lib.model_kind(str(tmp_path / "no_such_model"))


def test_seq2seq_lora_resume_is_exact(folders, tmp_path):
    """Checkpoints of an encoder-decoder with LoRA hold the adapters; a stopped and resumed run gives every step's
    loss of the uninterrupted one, and the merged folder is the same model."""
    args = [f"model={folders['t5']}", "datasets=[synthetic]", "dataset_options={max_steps: 1, max_value: 10}",
            "max_samples=64", "eval_samples=0", "max_length=96", "micro_batch_size=8", "learning_rate=1e-2",
            "max_steps=6", "log_interval=1", "lora=true", "lora_r=4", "lora_dropout=0.0", "gen_eval=false",
            "tensorboard=false"]
    sft.main(args + [f"out_dir={tmp_path / 'whole'}"])
    assert sft.main(args + [f"out_dir={tmp_path / 'parts'}", "stop_after_step=2"])["status"] == "stopped"
    saved = torch.load(tmp_path / "parts" / "ckpt_000002.pt", weights_only=True)["model"]
    assert saved and all("lora_" in k for k in saved)
    sft.main(args + [f"out_dir={tmp_path / 'parts'}", "resume=latest"])
    losses = train_losses(tmp_path / "whole")
    assert losses == train_losses(tmp_path / "parts") and losses[5] < losses[0]
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "hf" / "model.safetensors") for run in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

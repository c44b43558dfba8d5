"""sft.py and tasks/sft_sets.py: loss mask, packing, mixtures, LoRA, resume, label parsing, the registry's
templates, bad input, and a tiny model whose GSM8K-style exact match rises after SFT (measured by eval_gsm8k.py).
Tiny models are built from configs (native GPT, HF GPT-2 / Llama / Qwen2); nothing is downloaded."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import engine as engine_lib
import model as model_lib
import sft
from tasks import sft_sets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "sft_sets.json")


def byte_tok():
    return engine_lib.NativeTokenizer(common.Tokenizer("byte"), False)


def hf_byte_tok(chat_template=None):
    """An HF fast tokenizer over bytes (no download), optionally with a ChatML-like template."""
    tok = common.hf_tokenizer(common.Tokenizer("byte", extra_tokens=["<|im_start|>", "<|im_end|>"]), 512)
    tok.chat_template = chat_template
    return engine_lib.HFTokenizer(tok)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_hf(arch, vocab=260):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=256, eos_token_id=256))
    else:
        cls, conf = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
        m = cls(conf(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=256, bos_token_id=256, eos_token_id=256))
    m.config._attn_implementation = "sdpa"
    return m


def tiny_native(block_size=256, vocab=257, n_embd=64):
    torch.manual_seed(0)
    return model_lib.GPT(model_lib.model_config("tiny", common.padded_vocab_size(vocab), block_size, n_embd=n_embd))


def save_native(path, gpt, tok):
    common.save_checkpoint(path, {"kind": "gpt", "model": gpt.state_dict(), "step": 0, "tokenizer": tok.spec,
                                  "model_config": dataclasses.asdict(gpt.config)})


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2+3 = 5\n#### 5"}, {"role": "user", "content": "And 4*5?"},
        {"role": "assistant", "content": "20"}]


# -----------------------------------------------------------------------------
# the loss mask


def completion_text(ids, target, decode):
    """The text of each maximal run of target tokens."""
    runs, run = [], []
    for i, t in zip(ids, target):
        if t:
            run.append(i)
        elif run:
            runs.append(decode(run))
            run = []
    return runs + ([decode(run)] if run else [])


def test_loss_mask_covers_exactly_the_replies_user_assistant():
    tok = byte_tok()
    ids, target, cut = sft.encode_example(CHAT, "user_assistant", tok, 1024)
    assert not cut
    text = tok.tok.decode(ids)
    assert text == ("System: Be brief.\nUser: What is 2+3?\nAssistant: 2+3 = 5\n#### 5<|endoftext|>\n"
                    "User: And 4*5?\nAssistant: 20<|endoftext|>")
    assert completion_text(ids, target, tok.tok.decode) == [" 2+3 = 5\n#### 5<|endoftext|>", " 20<|endoftext|>"]
    # shifted pairs: a target counts exactly where the predicted token is a reply token
    x, y = sft.example_pairs(ids, target)
    assert sum(t != -100 for t in y) == sum(target[1:]) == len(" 2+3 = 5\n#### 5") + 1 + len(" 20") + 1
    # the prompt it is scored on at eval time is what was trained: 'User: ...\nAssistant:' (eval_gsm8k's chat mode)
    p = sft.prompt_ids(CHAT[1:3], "user_assistant", tok)
    assert tok.tok.decode(p) == "User: What is 2+3?\nAssistant:"


def test_loss_mask_with_a_chat_template():
    tok = hf_byte_tok(CHATML)
    ids, target, _ = sft.encode_example(CHAT, "chat_template", tok, 1024)
    assert tok.tok.decode(ids) == tok.tok.apply_chat_template(CHAT, tokenize=False)
    assert completion_text(ids, target, tok.tok.decode) == ["2+3 = 5\n#### 5<|im_end|>\n", "20<|im_end|>\n"]


def test_long_prompts_are_cut_from_the_left_and_counted():
    tok = byte_tok()
    msgs = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "done"}]
    ids, target, cut = sft.encode_example(msgs, "user_assistant", tok, 64)
    assert cut and len(ids) == 64
    assert tok.tok.decode(ids).endswith("Assistant: done<|endoftext|>") and sum(target) == len(" done") + 1


def test_mul_tokens_only_in_replies_when_asked():
    mul = common.Tokenizer("byte", mul_range=(1, 12))
    msgs = [{"role": "user", "content": "What is 3*4=12?"}, {"role": "assistant", "content": "3*4=12"}]
    plain = sft.encode_example(msgs, "user_assistant", engine_lib.NativeTokenizer(mul, False), 512)[0]
    injected = sft.encode_example(msgs, "user_assistant", engine_lib.NativeTokenizer(mul, True), 512)[0]
    def facts(ids):  # multiplication tokens of 3*4=12 (with or without their leading space)
        return sum(mul.id_to_text.get(i, "").strip() == "3*4=12" for i in ids if i >= 257)
    assert facts(plain) == 1 and facts(injected) == 2  # prompts: as eval encodes them


# -----------------------------------------------------------------------------
# packing: the packed loss is the unpacked loss of the same examples


def random_examples(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(0, vocab, (L,), generator=g).tolist()
        p = int(torch.randint(1, L - 2, (1,), generator=g))
        out.append(sft.example_pairs(ids, [False] * p + [True] * (L - p)))
    return out


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama", "qwen2", "qwen2-eager"])
def test_packed_loss_equals_unpacked_loss(arch):
    examples = random_examples(12, 250)
    m = tiny_native() if arch == "native" else tiny_hf(arch.split("-")[0])
    kind, attn = ("native", "sdpa") if arch == "native" else ("hf", "eager" if "eager" in arch else "sdpa")
    if attn == "eager":
        m.config._attn_implementation = "eager"
    m.eval()
    packed_rows = sft.build_rows(examples, 96, packing=True)
    assert len(packed_rows) < len(examples) and sorted(i for r in packed_rows for i in r) == list(range(12))
    totals = {}
    for packing, rows in ((False, sft.build_rows(examples, 96, False)), (True, packed_rows)):
        x, y, pos, doc = sft.collate(rows, examples, 0, packing)
        assert x.size(1) <= 96
        with torch.no_grad():
            totals[packing] = (sft.summed_loss(m, kind, x, y, pos, doc, attn).item(), int((y != -100).sum()))
    assert totals[True][1] == totals[False][1]
    assert math.isclose(totals[True][0], totals[False][0], rel_tol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    examples = random_examples(4, 250)
    x, y, pos, doc = sft.collate(sft.build_rows(examples, 96, True), examples, 0, True)
    grads = []
    for checkpointing in (False, True):
        m = tiny_native()
        if checkpointing:
            engine_lib.enable_gradient_checkpointing(m, "native")
        sft.summed_loss(m, "native", x, y, pos, doc, "sdpa").backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# -----------------------------------------------------------------------------
# mixtures


def test_mixture_rates_honoured_per_draw():
    draws = sft_sets.Mixture([50, 400], [0.7, 0.3], seed=3).stream(2000)
    first = sum(k == 0 for k, _ in draws)
    sd = math.sqrt(2000 * 0.7 * 0.3)
    assert abs(first - 1400) < 4 * sd
    # each set is walked through a permutation: 50 examples drawn ~1400 times -> every one ~28 times
    counts = [sum(1 for k, i in draws if k == 0 and i == j) for j in range(50)]
    assert max(counts) - min(counts) <= 1


def test_mixture_rates_must_sum_to_one():
    with pytest.raises(common.ConfigError, match="sum to 1"):
        sft_sets.check_rates(["imdb", "sst2"], [0.5, 0.4])
    with pytest.raises(common.ConfigError, match="mixture_rates"):
        sft_sets.check_rates(["imdb", "sst2"], [1.0])


# -----------------------------------------------------------------------------
# label parsing and the registry


def test_label_parsing_on_hand_written_outputs():
    nli = ("entailment", "not_entailment")
    assert sft_sets.parse_label(" not_entailment", nli) == "not_entailment"
    assert sft_sets.parse_label("Entailment.", nli) == "entailment"
    assert sft_sets.parse_label("I think it is not_entailment here", nli) == "not_entailment"
    assert sft_sets.parse_label("banana", nli) is None
    sentiment = ("negative", "neutral", "positive")
    assert sft_sets.parse_label(" positive\nReview: more", sentiment) == "positive"
    assert sft_sets.parse_label("It is neutral, not negative", sentiment) == "neutral"
    assert sft_sets.parse_label("nonpositive", sentiment) is None  # a whole word, not a substring
    mc = tuple("ABCD")
    assert sft_sets.parse_label(" B", mc) == "B"
    assert sft_sets.parse_label("(C) because", mc) == "C"
    assert sft_sets.parse_label("The answer is D", mc) == "D"
    assert sft_sets.parse_label("E", mc) is None and sft_sets.parse_label("", mc) is None
    entry = sft_sets.get_set("gsm8k")
    assert sft_sets.score_generation(entry, {"gold": "72"}, "48+24=72\n#### 72") == {
        "pred": "72", "correct": True, "parsed": True}
    unparsed = sft_sets.score_generation(entry, {"gold": "72"}, "the answer is 72")
    assert unparsed["parsed"] is False and unparsed["correct"] is False  # no '####': counted, and wrong


def test_every_registry_template_renders_from_its_hub_schema():
    with open(FIXTURES) as f:
        rows = json.load(f)
    assert set(rows) == set(sft_sets.REGISTRY), "every registry entry needs a fixture row in its hub schema"
    tok = byte_tok()
    for name, entry in sft_sets.REGISTRY.items():
        ex = sft_sets.to_example(entry, rows[name])
        roles = [m["role"] for m in ex["messages"]]
        assert roles[-1] == "assistant" and "user" in roles, name
        assert all(m["content"].strip() for m in ex["messages"]), name
        assert "{" not in ex["messages"][-2]["content"] or name == "bigcodebench", name  # no unfilled placeholders
        if entry.scoring == "label":
            assert ex["gold"] in entry.labels and ex["messages"][-1]["content"] == ex["gold"], name
            sft_sets.check_labels(entry, tok.encode_reply)
        if entry.scoring == "number":
            assert ex["gold"] is not None, name
        ids, target, _ = sft.encode_example(ex["messages"], "user_assistant", tok, 2048)
        assert sum(target) > 0, name
    assert sft_sets.to_example(sft_sets.get_set("imdb"), rows["imdb"])["gold"] == "positive"
    assert sft_sets.to_example(sft_sets.get_set("fiqa_sentiment"), rows["fiqa_sentiment"])["gold"] == "negative"
    assert sft_sets.to_example(sft_sets.get_set("mmlu"), rows["mmlu"])["gold"] == "B"
    assert sft_sets.to_example(sft_sets.get_set("svamp"), rows["svamp"])["gold"] == "51"


def test_local_copies_and_holdout(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(50)))
    train = sft_sets.load_split("jsonl", "train", str(path))
    held = sft_sets.load_split("jsonl", "eval", str(path))
    assert len(train) + len(held) == 50 and len(held) == 5
    assert not {e["messages"][0]["content"] for e in train} & {e["messages"][0]["content"] for e in held}
    gsm = sft_sets.load_split("gsm8k", "eval", os.path.join(common.SHARED_DATA, "gsm8k", "test.jsonl"), max_samples=7)
    assert len(gsm) == 7 and all(e["gold"] for e in gsm)


# -----------------------------------------------------------------------------
# bad input: one-line errors


class Crafted:
    """Pickles as a call of os.getcwd (harmless, were it ever run): what torch.load(weights_only=True) refuses."""

    def __reduce__(self):
        return os.getcwd, ()


def one_line_error(main, argv, capsys):
    """main(argv) run as sft.py's entry point runs it: exit code 1, no traceback; its one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: main(argv), preemptible=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 1 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(common.ConfigError, match="unknown dataset 'nope'.*gsm8k.*imdb"):
        sft.check_config(sft.Config(model="x", datasets=["nope"]))
    with pytest.raises(common.ConfigError, match="sum to 1"):
        sft.check_config(sft.Config(model="x", datasets=["imdb", "sst2"], mixture_rates=[0.6, 0.6]))
    if not torch.cuda.is_available():
        with pytest.raises(common.ConfigError, match="need CUDA"):
            sft.check_config(sft.Config(model="x", load_in_4bit=True, lora=True))
    with pytest.raises(common.ConfigError, match="tokenizes to nothing"):
        sft_sets.check_labels(sft_sets.SFTSet("x", labels=("yes", "")), byte_tok().encode_reply)
    with pytest.raises(common.ConfigError, match=r"\['q_proj'\] are not in this gpt2 model.*c_attn"):
        engine_lib.add_lora(tiny_hf("gpt2"), target_modules=["q_proj"])
    save_native(str(tmp_path / "base" / "ckpt_000000.pt"), tiny_native(), common.Tokenizer("byte"))
    with pytest.raises(common.ConfigError, match="multiplication tokens"):
        sft.main([f"model={tmp_path / 'base'}/latest", "datasets=[synthetic]", "inject_mul_tokens=true",
                  f"out_dir={tmp_path / 'out'}", "max_samples=20"])
    # bad input reaching the run, through common.run_main as the entry point runs main: one `error:` line, exit 1
    base, empty, one_row, crafted = f"{tmp_path / 'base'}/latest", tmp_path / "empty.jsonl", tmp_path / "one.jsonl", \
        tmp_path / "crafted"
    empty.write_text("")
    one_row.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")  # its one row is the eval holdout
    tiny_hf("gpt2").save_pretrained(crafted)
    os.remove(crafted / "model.safetensors")
    torch.save({"weights": Crafted()}, crafted / "pytorch_model.bin")  # a pickle that would call a function
    small = ["max_length=64", "micro_batch_size=4", "max_samples=20", "eval_samples=0", "gen_eval=false",
             "tensorboard=false"]
    sft.main([f"model={base}", "datasets=[synthetic]", f"out_dir={tmp_path / 'run'}", "max_steps=3",
              "stop_after_step=0", *small])
    for argv, words in [
            ([f"model={base}", "datasets=[jsonl]", f"data_paths=[{empty}]"], "dataset 'jsonl' has no train rows in"),
            ([f"model={base}", "datasets=[jsonl]", f"data_paths=[{one_row}]"], "dataset 'jsonl' has no train examples"),
            ([f"model={crafted}", "datasets=[synthetic]"], "holds objects other than tensors, numbers, strings and lists; refusing to load it"),
            ([f"model={base}", "datasets=[arithmetic]", "resume=latest", f"out_dir={tmp_path / 'run'}"],
             "datasets=['synthetic'] in the checkpoint but ['arithmetic'] now")]:
        assert words in one_line_error(sft.main, [f"out_dir={tmp_path / 'bad'}", *argv, *small], capsys)
    # at the entry point: one line on stderr, exit code 1, no traceback
    r = subprocess.run([sys.executable, "sft.py", "model=x", "datasets=[imdb,nope]"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown dataset 'nope'") and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# LoRA: only adapters change; the merged model gives the adapter model's logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_lora_trains_adapters_only_and_merges_exactly(arch):
    m = tiny_hf(arch)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    peft_model, targets = engine_lib.add_lora(m, r=4, alpha=8, dropout=0.0)
    assert targets == engine_lib.LORA_TARGETS[arch]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    examples = random_examples(4, 250)
    x, y, pos, _ = sft.collate([[i] for i in range(4)], examples, 0, False)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = sft.summed_loss(peft_model, "hf", x, y, pos, None, "sdpa")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    base = peft_model.get_base_model()
    for k, v in base.state_dict().items():  # base weights untouched (adapters live in their own tensors)
        if "lora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()(input_ids=x).logits
        plain = tiny_hf(arch)(input_ids=x).logits
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters did change the model


# -----------------------------------------------------------------------------
# whole runs: resume exactness, and accuracy that rises


def run_args(tmp_path, base, out, *extra):
    return [f"model={base}", "datasets=[synthetic]", "dataset_options={max_steps: 1, max_value: 10}",
            "max_samples=200", "eval_samples=8", "max_length=256", "micro_batch_size=4", "learning_rate=3e-3",
            "log_interval=1", "eval_interval=3", f"out_dir={out}", "gen_eval=false", "tensorboard=false",
            "warmup_ratio=0.2", *extra]


def train_losses(out):
    return {r["step"]: r["loss"] for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r.get("type") == "train"}


def test_resume_is_exact(tmp_path):
    base = tmp_path / "base"
    save_native(str(base / "ckpt_000000.pt"), tiny_native(n_embd=32), common.Tokenizer("byte"))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    sft.main(run_args(tmp_path, f"{base}/latest", whole, "max_steps=6", "packing=true"))
    stopped = sft.main(run_args(tmp_path, f"{base}/latest", parts, "max_steps=6", "packing=true", "stop_after_step=2"))
    assert stopped["status"] == "stopped"
    resumed = sft.main(run_args(tmp_path, f"{base}/latest", parts, "max_steps=6", "packing=true", "resume=latest",
                                "keep_last_k=1"))
    assert resumed["status"] == "done"
    assert train_losses(whole) == train_losses(parts)  # every step's loss, bit for bit
    assert [os.path.basename(p) for _, p in common.list_checkpoints(parts)] == ["ckpt_000005.pt"]
    a = sft_hf_weights(whole / "hf")
    b = sft_hf_weights(parts / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(common.ConfigError, match="already holds checkpoints"):
        sft.main(run_args(tmp_path, f"{base}/latest", whole, "max_steps=6"))


def sft_hf_weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def sums(n, seed):
    """Synthetic two-number sums in GSM8K's format: worked line, then the answer after '####'."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return out


def test_sft_raises_exact_match_measured_by_eval_gsm8k(tmp_path):
    """A tiny byte-level GPT from scratch, a few hundred SFT steps on synthetic sums (a local jsonl through
    the registry's `jsonl` entry): eval_gsm8k.py's zero-shot chat mode (strict: the number after '####') on
    held-out sums goes up from zero."""
    import eval_gsm8k
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n"
                             for r in sums(2000, 0)))
    test.write_text("".join(json.dumps(r) + "\n" for r in sums(50, 1)))
    base = tmp_path / "base"
    save_native(str(base / "ckpt_000000.pt"), tiny_native(n_embd=48), common.Tokenizer("byte"))

    def accuracy(model, out):
        r = eval_gsm8k.main([f"model={model}", "task=gsm8k", f"data_path={test}", "fewshot=0", "max_new_tokens=20",
                             "batch_size=50", f"out_dir={out}", "engine=hf"])
        return r["metrics"]["gsm8k_strict"]

    before = accuracy(f"{base}/latest", tmp_path / "eval_before")
    sft.main([f"model={base}/latest", "datasets=[jsonl]", f"data_paths=[{train}]", "eval_samples=0",
              "max_length=64", "micro_batch_size=16", "learning_rate=1e-2", "max_steps=240",
              "warmup_ratio=0.05", "log_interval=50", "eval_interval=0", f"out_dir={tmp_path / 'sft'}",
              "gen_eval=false", "tensorboard=false"])
    after = accuracy(tmp_path / "sft" / "hf", tmp_path / "eval_after")
    assert before == 0.0 and after >= 0.5, (before, after)


# -----------------------------------------------------------------------------
# DialoGPT-style models and experiment names


def test_dialogpt_turns_joined_by_eos(tmp_path):
    """A tiny GPT-2 saved as 'DialoGPT-tiny' with a byte-level GPT-2-style tokenizer (no chat template):
    prompt_format=auto picks eos_turns, every turn is its bare text closed by <|endoftext|>, only the replies (and
    their EOS) carry loss, and a run's generation accuracy goes through engine.py, stopping at EOS."""
    from transformers import AutoTokenizer
    folder = tmp_path / "DialoGPT-tiny"
    tiny_hf("gpt2", vocab=257).save_pretrained(folder)
    common.hf_tokenizer(common.Tokenizer("byte"), 512).save_pretrained(folder)
    tok = engine_lib.HFTokenizer(AutoTokenizer.from_pretrained(folder))
    assert tok.chat_template is None and tok.eos_id == 256
    assert sft.resolve_format(sft.Config(model=str(folder)), tok, "hf") == "eos_turns"
    assert sft.resolve_format(sft.Config(model="gpt2"), tok, "hf") == "user_assistant"
    ids, target, _ = sft.encode_example(CHAT, "eos_turns", tok, 1024)
    eos = "<|endoftext|>"
    assert tok.tok.decode(ids) == f"Be brief.{eos}What is 2+3?{eos}2+3 = 5\n#### 5{eos}And 4*5?{eos}20{eos}"
    assert completion_text(ids, target, tok.tok.decode) == [f"2+3 = 5\n#### 5{eos}", f"20{eos}"]
    assert tok.tok.decode(sft.prompt_ids(CHAT[1:3], "eos_turns", tok)) == f"What is 2+3?{eos}"
    results = sft.main([f"model={folder}", "datasets=[arithmetic]", "max_samples=64", "eval_samples=4",
                        "max_length=64", "micro_batch_size=8", "max_steps=3", "learning_rate=1e-3", "tensorboard=false",
                        f"out_dir={tmp_path / 'run'}", "gen_max_new_tokens=8"])
    assert results["prompt_format"] == "eos_turns" and results["generation"]["arithmetic"]["n"] == 4


def test_experiment_names_as_the_seed_names_them(tmp_path, monkeypatch):
    cfg = sft.Config(model="Qwen/Qwen2.5-0.5B", datasets=["imdb", "sst2"], mixture_rates=[0.7, 0.3], micro_batch_size=8,
                     max_length=256)
    assert sft.run_name(cfg, 1) == "Qwen2.5-0.5B_mix_imdb-sentiment-70_sst2-sentiment-30_sft_bs8_len256"
    cfg.grad_accum_steps, cfg.lora = 4, True
    assert sft.run_name(cfg, 2).endswith("_sft_bs8_len256_acc4_lora_multigpu")
    assert sft.run_name(sft.Config(model="out/pre/latest", datasets=["gsm8k", "cola", "mmlu"]), 1) == \
        "pre_cat_gsm8k-math_cola-grammar_mmlu-choice_sft_bs8_len1024"
    monkeypatch.chdir(tmp_path)
    d = common.Dist(False, 0, 0, 1, "cpu")
    folder = sft.resolve_out_dir(sft.Config(model="gpt2", datasets=["imdb"]), d)
    assert os.path.dirname(folder) == "out" and sft.STAMP_RE.match(os.path.basename(folder))
    assert sft.STAMP_RE.sub("", os.path.basename(folder)) == "gpt2_imdb-sentiment_sft_bs8_len1024"
    assert sft.resolve_out_dir(sft.Config(model="gpt2", out_dir="mine"), d) == "mine"  # given: used as is


def test_load_best_model_at_end_keeps_the_weights_of_the_lowest_eval_loss(tmp_path):
    """A learning rate high enough that the eval loss does not fall every step: the HF folder holds the weights
    of the eval step with the lowest loss, not the last step's (HF Trainer's load_best_model_at_end)."""
    from safetensors.torch import load_file
    folder = tmp_path / "base"
    tiny_hf("gpt2", vocab=257).save_pretrained(folder)
    common.hf_tokenizer(common.Tokenizer("byte"), 512).save_pretrained(folder)
    out = tmp_path / "run"
    results = sft.main([f"model={folder}", "datasets=[arithmetic]", "max_samples=64", "eval_samples=8",
                        "max_length=64", "micro_batch_size=8", "max_steps=8", "learning_rate=5e-2", "eval_interval=1",
                        "warmup_ratio=0", "lr_schedule=constant", "gen_eval=false", "tensorboard=false",
                        "prompt_format=user_assistant", "load_best_model_at_end=true", f"out_dir={out}"])
    evals = {r["step"]: r["eval_loss"] for r in common.read_jsonl(out / "log.jsonl") if r.get("type") == "eval"}
    best = min(evals, key=evals.get)
    assert results["best_step"] == best and results["best_eval_loss"] == evals[best]
    saved = load_file(out / "hf" / "model.safetensors")
    kept = common.load_checkpoint(str(out / "best.pt"))["model"]
    assert all(torch.equal(saved[k], kept[k]) for k in saved if k in kept)
    assert best != 7  # measured: the lowest eval loss is at step 4 of 0-7, so the last weights differ from the kept
    last = common.load_checkpoint(str(out))["model"]
    assert any(not torch.equal(saved[k], last[k]) for k in saved if k in last)
    with pytest.raises(common.ConfigError, match="load_best_model_at_end"):
        sft.main([f"model={folder}", "load_best_model_at_end=true", "eval_samples=0", f"out_dir={tmp_path / 'x'}"])

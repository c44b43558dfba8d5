import dataclasses
import os
from typing import List, Optional

import numpy as np
import pytest
import torch

import common
from conftest import shared_path
from tasks import gsm8k, hellaswag


@dataclasses.dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    compile: bool = True
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    resume: Optional[str] = None


# -----------------------------------------------------------------------------
# config


def test_config_layers_defaults_yaml_and_cli(tmp_path):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("lr: 3.0e-4\nsteps: 100\nbetas: [0.8, 0.9]\n")
    cfg = common.load_config(Cfg, [str(yaml_path), "steps=7", "--name", "x", "--compile", "false"])
    assert cfg.lr == 3e-4 and cfg.steps == 7 and cfg.name == "x" and cfg.compile is False
    assert cfg.betas == [0.8, 0.9] and cfg.resume is None
    assert common.load_config(Cfg, ["resume=latest", "--compile"]).resume == "latest"


def test_config_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(common.ConfigError) as e:
        common.load_config(Cfg, ["stepz=3"])
    assert "stepz" in str(e.value) and "steps" in str(e.value) and "lr" in str(e.value)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("learning_rate: 1\n")
    with pytest.raises(common.ConfigError, match="learning_rate"):
        common.load_config(Cfg, [str(yaml_path)])


def test_config_bad_type_and_missing_file():
    with pytest.raises(common.ConfigError, match="'steps' expects an int"):
        common.load_config(Cfg, ["steps=ten"])
    with pytest.raises(common.ConfigError, match="'compile' expects a bool"):
        common.load_config(Cfg, ["compile=maybe"])
    with pytest.raises(common.ConfigError, match="not found: nope.yaml"):
        common.load_config(Cfg, ["nope.yaml"])


# -----------------------------------------------------------------------------
# shards


def test_shard_round_trip_both_widths(tmp_path):
    small = np.random.default_rng(0).integers(0, 50257, size=1000)
    common.write_shard(tmp_path / "a.bin", small, vocab_size=50257)
    got = common.read_shard(tmp_path / "a.bin")
    assert got.dtype == np.uint16 and np.array_equal(got, small)
    wide = np.array([0, 70000, 123456])
    common.write_shard(tmp_path / "b.bin", wide, vocab_size=200000)
    got = common.read_shard(tmp_path / "b.bin")
    assert got.dtype == np.uint32 and np.array_equal(got, wide)


def test_corrupt_and_short_shards_are_refused(tmp_path):
    path = tmp_path / "s.bin"
    common.write_shard(path, np.arange(100), vocab_size=256)
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-10])
    with pytest.raises(common.ShardError, match="promises 100 tokens"):
        common.read_shard(tmp_path / "short.bin")
    (tmp_path / "magic.bin").write_bytes(b"\x00" * 4 + data[4:])
    with pytest.raises(common.ShardError, match="bad magic"):
        common.read_shard(tmp_path / "magic.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:100])
    with pytest.raises(common.ShardError, match="shorter than"):
        common.read_shard(tmp_path / "tiny.bin")


def test_shard_loader_ranks_are_disjoint_and_cover_the_window(tmp_path):
    tokens = np.arange(10_000) % 60000
    common.write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=60000)
    B, T, R = 2, 8, 3
    loaders = [common.ShardLoader(str(tmp_path), "train", B, T, r, R) for r in range(R)]
    seen = []
    for _ in range(5):
        for ld in loaders:
            x, y = ld.next_batch()
            assert torch.equal(x[:, 1:], y[:, :-1])
            seen.append(x.flatten())
    seen = torch.cat(seen)
    # the tokens are their own positions here: together the ranks read every position of 5 windows once
    assert sorted(seen.tolist()) == list(range(5 * R * B * T))
    # state round trip: a fresh loader set to a saved state continues identically
    state = loaders[1].state()
    fresh = common.ShardLoader(str(tmp_path), "train", B, T, 1, R)
    fresh.set_state(state)
    assert torch.equal(fresh.next_batch()[0], loaders[1].next_batch()[0])


def test_shard_loader_rolls_over_to_the_next_shard_and_wraps(tmp_path):
    B, T = 2, 4  # a window of 9 tokens: shard 0 (20 tokens) gives 2 batches, shard 1 (12 tokens) 1
    common.write_shard(tmp_path / "train_000000.bin", np.arange(20), vocab_size=1000)
    common.write_shard(tmp_path / "train_000001.bin", np.arange(100, 112), vocab_size=1000)
    loader = common.ShardLoader(str(tmp_path), "train", B, T)
    firsts = [loader.next_batch()[0][0, 0].item() for _ in range(4)]
    assert firsts == [0, 8, 100, 0]


def test_short_and_corrupt_shards_are_found_when_the_loader_starts(tmp_path, capsys):
    common.write_shard(tmp_path / "train_000000.bin", np.arange(100), vocab_size=1000)
    common.write_shard(tmp_path / "train_000001.bin", np.arange(5), vocab_size=1000)  # a short tail
    loader = common.ShardLoader(str(tmp_path), "train", 2, 4)
    assert [os.path.basename(p) for p in loader.shards] == ["train_000000.bin"]
    assert "skipping 1 train shard(s)" in capsys.readouterr().err
    with pytest.raises(common.ShardError, match="every train shard .* is shorter than one batch window"):
        common.ShardLoader(str(tmp_path), "train", 8, 16)
    (tmp_path / "train_000002.bin").write_bytes((tmp_path / "train_000000.bin").read_bytes()[:-7])
    with pytest.raises(common.ShardError, match="train_000002.bin: header promises 100 tokens"):
        common.ShardLoader(str(tmp_path), "train", 2, 4)


# -----------------------------------------------------------------------------
# numbers and GSM8K answers


def test_number_normalisation_and_gsm8k_final_answers():
    assert gsm8k.normalize_number("$1,234.50") == "1234.5" and gsm8k.normalize_number("18.0") == "18"
    assert gsm8k.normalize_number("- 3") == "-3" and gsm8k.normalize_number("5 apples") == "5"
    assert gsm8k.normalize_number("none") is None
    assert gsm8k.final_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert gsm8k.final_answer("#### 1,200 ... #### $-7.50") == "-7.5"  # the last answer line
    assert gsm8k.final_answer("no answer line") is None
    assert gsm8k.same_number("18.00", 18) and gsm8k.same_number("$1,200", "1200")
    assert not gsm8k.same_number("17", 18) and not gsm8k.same_number(None, 18)
    rows = gsm8k.read_gsm8k("test", shared_path("gsm8k", "test.jsonl"))
    assert len(rows) == 1319 and gsm8k.final_answer(rows[0]["answer"]) == "18"


# -----------------------------------------------------------------------------
# tokenizer


SAMPLE = "Hello world! Natalia sold clips to 48 of her friends in April, and 3.5% more.\n  Ünïcode ✓ 12,345"


def test_gpt2_ranks_file_matches_tiktoken_ids():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks_file = shared_path("tokenizers", "gpt2.tiktoken")
    tok = common.Tokenizer("gpt2", tokenizer_file=ranks_file)
    # an independent tiktoken Encoding with GPT-2's published split pattern
    ref = tiktoken.Encoding(name="ref", mergeable_ranks=load_tiktoken_bpe(ranks_file), special_tokens={"<|endoftext|>": 50256},
                            pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(SAMPLE) == ref.encode_ordinary(SAMPLE)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("a<|endoftext|>b", allow_special=True) == tok.encode("a") + [50256] + tok.encode("b")


def test_missing_ranks_file_error_says_how_to_provide_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_file not found"):
        common.Tokenizer("gpt2", tokenizer_file=str(tmp_path / "nope.tiktoken"))


def test_extra_tokens_follow_the_base_vocabulary():
    tok = common.Tokenizer("gpt2", extra_tokens=["<|user|>", "<|assistant|>"], tokenizer_file=shared_path("tokenizers", "gpt2.tiktoken"))
    assert tok.vocab_size == 50259
    ids = tok.encode("<|user|>hi<|assistant|>", allow_special=True)
    assert ids[0] == 50257 and ids[-1] == 50258
    assert tok.decode(ids) == "<|user|>hi<|assistant|>"
    # without allow_special the literal text is ordinary text
    assert 50257 not in tok.encode("<|user|>")


@pytest.mark.parametrize("kind", ["byte", "gpt2"])
def test_mul_token_injection(kind):
    ranks = shared_path("tokenizers", "gpt2.tiktoken") if kind == "gpt2" else None
    tok = common.Tokenizer(kind, mul_range=(1, 12), tokenizer_file=ranks)
    plain = common.Tokenizer(kind, tokenizer_file=ranks)
    assert len(tok.mul_ids) == len(tok.mul_space_ids) == 144 and tok.vocab_size == plain.vocab_size + 2 * 144
    mul_ids = set(tok.mul_ids.values()) | set(tok.mul_space_ids.values())
    for text in ["3*4=12", "3 x 4 = 12", "3 × 4 = 12", "3 times 4 is 12", "12*12=144"]:
        ids = tok.encode(text)
        assert len(ids) == 1 and ids[0] in mul_ids, text
        assert tok.decode(ids) == ("12*12=144" if text.startswith("12") else "3*4=12")
    # wrong products, out-of-range factors and parts of longer numbers stay text
    for text in ["3*4=13", "13*4=52", "3*4=120", "23*4=92", "3*4=12.5", "0*5=0"]:
        ids = tok.encode(text)
        assert not (set(ids) & mul_ids), text
        assert tok.decode(ids) == text
    ids = tok.encode("She buys 7 x 8 = 56 apples, not 7 x 8 = 57.")
    assert sum(i in mul_ids for i in ids) == 1
    assert tok.decode(ids) == "She buys 7*8=56 apples, not 7 x 8 = 57."


def test_spec_rebuilds_the_same_tokenizer():
    tok = common.Tokenizer("byte", extra_tokens=["<|user|>"], mul_range=(2, 5))
    again = common.Tokenizer.from_spec(tok.spec)
    text = "<|user|>2*3=6 and 5 x 5 = 25"
    assert again.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert again.vocab_size == tok.vocab_size == 257 + 1 + 2 * 16
    with pytest.raises(ValueError, match="vocab_size"):
        common.Tokenizer.from_spec({**tok.spec, "vocab_size": 999})
    assert common.padded_vocab_size(50257) == 50304


# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoints_are_atomic_and_resolved_by_latest(tmp_path):
    common.save_checkpoint(common.checkpoint_path(tmp_path, 5), {"model": {}, "model_config": {}, "step": 5})
    common.save_checkpoint(common.checkpoint_path(tmp_path, 12), {"model": {}, "model_config": {}, "step": 12})
    (tmp_path / "ckpt_000099.pt.tmp123").write_bytes(b"half written")  # a crash mid-write is ignored
    assert [s for s, _ in common.list_checkpoints(tmp_path)] == [5, 12]
    assert common.load_checkpoint(str(tmp_path / "latest"))["step"] == 12
    # the writes themselves left no temporary files behind
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000005.pt", "ckpt_000012.pt", "ckpt_000099.pt.tmp123"]


def test_checkpoint_of_another_model_or_not_ours_is_refused(tmp_path):
    path = tmp_path / "ckpt_000001.pt"
    common.save_checkpoint(path, {"kind": "bd3lm", "model": {}, "model_config": {}})
    with pytest.raises(ValueError, match="holds a 'bd3lm' model, expected a 'gpt'"):
        common.load_checkpoint(str(path), expected_kind="gpt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this repository"):
        common.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        common.load_checkpoint(str(tmp_path / "garbage.pt"))
    with pytest.raises(FileNotFoundError):
        common.load_checkpoint(str(tmp_path / "empty_run"))


# -----------------------------------------------------------------------------
# hellaswag file and learning-rate schedule


def test_hellaswag_long_contexts_are_cut_from_the_left():
    tok = common.Tokenizer("byte")
    item = {"ctx": "a long context " * 4, "endings": ["one", "two", "three", "four!"], "label": 0}
    seen = []

    def logits_fn(idx):
        seen.append(idx.shape[1])
        return torch.zeros(idx.shape[0], idx.shape[1], tok.vocab_size)

    summed, mean = hellaswag.hellaswag_scores(logits_fn, tok, item, "cpu", max_len=16)
    assert seen == [16]
    # uniform logits: each ending's summed loss is its length times log(V), whatever was cut
    lengths = torch.tensor([len(" " + e) for e in item["endings"]], dtype=torch.float)
    assert torch.allclose(summed, lengths * np.log(tok.vocab_size), rtol=1e-5)


def test_hellaswag_text_export_loads():
    items = hellaswag.load_hellaswag(shared_path("hellaswag", "hellaswag_val_full.txt"))
    assert len(items) == 10042
    assert items[0]["label"] == 3 and len(items[0]["endings"]) == 4
    assert items[0]["ctx"].startswith("Roof shingle removal:")


def test_cosine_schedule_warms_up_and_decays_to_min():
    lrs = [common.lr_at(s, 6e-4, 6e-5, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(6e-5) and lrs[9] == pytest.approx(6e-4)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))
    assert lrs[100] == pytest.approx(6e-5) and lrs[119] == pytest.approx(6e-5)


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(common.ConfigError, match="bad.yaml is not valid YAML"):
        common.load_config(Cfg, [str(path)])


def test_damaged_meta_json_is_refused_clearly(tmp_path):
    for content, message in (('{"vocab_size": 5', "not valid JSON"), ("{}", "lacks tokenizer, vocab_size"),
                             ("[1, 2]", "lacks tokenizer, vocab_size")):
        (tmp_path / "meta.json").write_text(content)
        with pytest.raises(common.ShardError, match=message):
            common.load_meta(str(tmp_path))


def test_token_ids_outside_the_vocabulary_stop_the_loader_at_start(tmp_path):
    """Shards of another tokenizer (ids past meta.json's vocab_size) are refused before training, not by an
    IndexError deep in the embedding; the header's id bound makes this free, older shards are scanned."""
    common.write_shard(str(tmp_path / "train_000000.bin"), np.arange(1000) % 300, 300)
    common.atomic_write_json(str(tmp_path / "meta.json"), {"tokenizer": {"kind": "byte"}, "vocab_size": 257})
    with pytest.raises(common.ShardError, match="token id 299 is outside the vocabulary of 257"):
        common.ShardLoader(str(tmp_path), "train", 2, 16)
    with open(tmp_path / "train_000000.bin", "r+b") as f:  # a shard written before the header kept the bound
        f.seek(16)
        f.write(np.zeros(1, dtype=np.int32).tobytes())
    with pytest.raises(common.ShardError, match="token id 299 is outside the vocabulary of 257"):
        common.ShardLoader(str(tmp_path), "train", 2, 16)
    common.atomic_write_json(str(tmp_path / "meta.json"), {"tokenizer": {"kind": "byte"}, "vocab_size": 300})
    assert common.ShardLoader(str(tmp_path), "train", 2, 16).next_batch()[0].max() < 300


def test_progress_writes_plain_lines_when_stderr_is_not_a_terminal(capsys):
    bar = common.progress(total=50, mininterval=0, desc="shards")
    for _ in range(50):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") >= 10  # one plain line per refresh, no carriage-return frames
    assert err.splitlines()[-1].startswith("shards: 100%") and "50/50" in err.splitlines()[-1]


def test_hf_folder_weights_are_group_readable_and_params_leave_out_embeddings(tmp_path):
    import stat

    import model as model_lib
    tok = common.Tokenizer("byte")
    cfg = model_lib.GPTConfig(block_size=16, vocab_size=common.padded_vocab_size(tok.vocab_size), n_layer=2,
                              n_head=2, n_embd=32)
    gpt = model_lib.GPT(cfg)
    # non-embedding parameters: the blocks and the final norm, neither wte (tied to lm_head) nor wpe
    blocks = sum(p.numel() for p in gpt.transformer.h.parameters()) + sum(p.numel() for p in gpt.transformer.ln_f.parameters())
    assert gpt.num_params() == blocks
    assert gpt.num_params(non_embedding=False) == blocks + 320 * 32 + 16 * 32
    untied = model_lib.GPT(dataclasses.replace(cfg, tie_embeddings=False))  # BD3-LM: lm_head apart from wte
    assert untied.num_params() == blocks and untied.num_params(non_embedding=False) == blocks + 2 * 320 * 32 + 16 * 32
    old = os.umask(0o022)
    try:
        model_lib.save_hf_folder(gpt, tok, str(tmp_path), {})
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode) == 0o644

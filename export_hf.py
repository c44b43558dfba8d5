"""
Native checkpoint -> HuggingFace folder that transformers loads with no custom code, and a proof that
it is the same model.

    python export_hf.py --checkpoint out/run/ckpt_019072.pt --output-dir hf/run
    python export_hf.py --checkpoint out/run/latest --output-dir hf/run      # or just out/run

The folder holds a GPT-2 config, safetensors weights (the padded training vocabulary, e.g. 50304, cut to
the real one), a fast tokenizer built from the same BPE (GPT-2 ranks or raw bytes, plus the run's extra
tokens and multiplication tokens) and a generation config whose EOS/pad ids are the run's end of text.

The export verifies itself before anything appears at --output-dir: it is written to a temporary folder
next to the output, loaded back with AutoModelForCausalLM/AutoTokenizer, and its logits (fp32, max abs
difference <= atol) and token ids (sample text holding every extra token) are compared with the native
model and the training tokenizer. Only then is the folder renamed into place; a mismatch raises
ExportVerificationError with the numbers and leaves nothing behind. (In the seed experiment an exporter
bug silently invalidated every downstream number; this is the guard against that.)

Tokenizer notes. Our Tokenizer turns a *correct, in-range* product (not part of a longer number) into one
multiplication token, written as a*b=c or as 'a x b = c', 'a × b = c', 'a times b is c' (common.MUL_RE);
the token decodes to the canonical 'a*b=c'. HF added tokens would only match literal text, so the HF
tokenizer does it in three steps instead: a normalizer rewrites each product's surface forms to 'a*b=c'
(one Replace per product, with MUL_RE's guards: not after a digit, '.' or ','; not before a digit or '.'/','
and a digit), a pre-tokenizer Split isolates exactly those canonical strings, and the BPE vocabulary maps
each of them to its id (whole pieces found in the vocabulary are taken as is, like tiktoken). This gives the
same ids as ours on all of GSM8K train. Remaining, documented differences:
  - chains such as '2 x 6 = 12 x 1 = 12' or '2*3=4*5=20': our regex consumes the first match (valid or not)
    and leaves the rest as text, while HF may also turn the second product into its token;
  - numbers written with leading zeros ('03 x 4 = 12'): ours reads 3 and makes the token, HF keeps text;
  - HF always recognises special tokens in text (our encode(..., allow_special=True));
  - the per-product normalizer makes HF encoding slower than ours (~1 MB/s), fine for eval/SFT prompts.
"""
import dataclasses
import json
import os
import re
import shutil
import sys
import time

import torch

import common
import model as model_lib


@dataclasses.dataclass
class Config:
    checkpoint: str = ""       # ckpt_NNNNNN.pt, a run folder (its newest checkpoint) or RUN/latest
    output_dir: str = ""       # the HF folder to create
    tokenizer_file: str = ""   # GPT-2 ranks (tiktoken format); default: the run's tokenizer_file, else tiktoken's cache
    overwrite: bool = False    # replace an existing output_dir (only after the new export has verified)
    atol: float = 1e-4         # max abs logit difference allowed between native and HF (fp32)


class ExportVerificationError(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# tokenizer: common.Tokenizer -> a `tokenizers` ByteLevel BPE with the same ids


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map (the vocabulary's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


BYTE_ENCODER = bytes_to_unicode()


def token_str(b):
    return "".join(BYTE_ENCODER[x] for x in b)


def merges_from_ranks(ranks):
    """Recover the BPE merge list from tiktoken ranks: the merge that creates token t is the last step of
    running BPE on t's bytes with only the ranks below t's own. Ordered by rank (= GPT-2's merges.txt)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while True:  # tiktoken's BPE: merge the adjacent pair of lowest rank, restricted to ranks < rank
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((token_str(parts[0]), token_str(parts[1])))
    return merges


def gpt2_ranks(tok):
    """{token bytes: id} of the base BPE, read through tiktoken's public API (no private attributes)."""
    enc = tok.base
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != tok.eot_id}


def mul_split_regex(tok):
    """Isolates exactly the canonical strings of the multiplication tokens, with common.MUL_RE's guards
    (not preceded by a digit, '.' or ','; not followed by a digit or by '.'/',' and a digit)."""
    strings = sorted((tok.id_to_text[i] for i in tok.mul_ids.values()), key=len, reverse=True)
    return "(?:" + "|".join(re.escape(s) for s in strings) + ")"


def build_hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` giving the same ids as `tok` (see the module notes for the exceptions)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if tok.kind == "gpt2":
        ranks = gpt2_ranks(tok)
        vocab = {token_str(b): i for b, i in ranks.items()}
        merges = merges_from_ranks(ranks)
    else:  # byte: ids 0..255 are the bytes themselves, no merges
        vocab = {BYTE_ENCODER[i]: i for i in range(256)}
        merges = []
    # end of text, extra tokens and multiplication tokens sit in the BPE vocabulary at their own ids
    # (so the added-token machinery reuses those ids instead of appending new ones)
    for text, i in tok.special.items():
        vocab[text] = i
    for i in tok.mul_ids.values():
        vocab[tok.id_to_text[i]] = i
    if len(set(vocab.values())) != tok.vocab_size or max(vocab.values()) != tok.vocab_size - 1:
        raise ValueError(f"vocabulary ids are not 0..{tok.vocab_size - 1}")

    # ignore_merges: a whole pre-token found in the vocabulary is taken as is, which is what tiktoken does
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    splits = []
    if tok.mul_ids:
        hf.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex(rf"(?<![\d.,]){a}\s*(?:\*|×|\bx\b|\btimes\b)\s*{b}\s*(?:=|\bis\b)\s*{a * b}"
                                      r"(?![\d]|[.,]\d)"), f"{a}*{b}={a * b}")
            for (a, b), _ in sorted(tok.mul_ids.items(), key=lambda kv: kv[1])])
        alternatives = mul_split_regex(tok)
        splits.append(pre_tokenizers.Split(Regex(r"(?<![\d.,])" + alternatives + r"(?![\d]|[.,]\d)"), behavior="isolated"))
        whole_mul = r"\A" + alternatives + r"\z|"  # keeps an isolated product in one piece through the next split
    else:
        whole_mul = ""
    if tok.kind == "gpt2":
        splits.append(pre_tokenizers.Split(Regex(whole_mul + common.GPT2_PATTERN), behavior="isolated"))
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.special])
    return hf


def hf_tokenizer(tok, model_max_length):
    """The transformers wrapper around build_hf_tokenizer (what save_pretrained writes)."""
    from transformers import PreTrainedTokenizerFast
    eot = common.GPT2_EOT
    return PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(tok), bos_token=eot, eos_token=eot,
                                   unk_token=eot, pad_token=eot, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def sample_text(tok):
    """Text for the tokenizer check: prose, numbers, whitespace, unicode, every special/extra token, every
    multiplication token in canonical form, and near-misses that must stay plain text."""
    parts = [
        "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'll pay $1,234.50 (or 12.5%)!\n\n",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n",
        "  indented\tTabs\r\nCRLF  and   spaces. Ünïcödé: café, naïve, 日本語, emoji 🙂, math ∑ x² ≥ 0.\n",
        "#### 72\n<<48/2=24>> 1*1=1? 13*4=52, 3*4=13, 3*4=125, 123*4=492, 3*4=12.5, 1.3*4=12 ",
        "surface forms: 3 x 4 = 12, 3 × 4 = 12, 3 times 4 is 12, 3 * 4 = 12, 2 x 6 = 12 bags, 12x12=144\n",
    ]
    for text in tok.special:
        parts.append(f"{text}a {text}\n")
    for i in sorted(tok.mul_ids.values()):
        s = tok.id_to_text[i]
        parts.append(f"{s} ({s}),x{s}\n")
    return "".join(parts)


# -----------------------------------------------------------------------------
# model: native GPT -> transformers GPT2LMHeadModel


def hf_config(cfg, tok):
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=tok.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu_new",  # = nn.GELU(approximate="tanh")
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id, tie_word_embeddings=True)


def generation_config(tok):
    from transformers import GenerationConfig
    return GenerationConfig(bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)


def to_hf_model(gpt, tok):
    """An in-memory GPT2LMHeadModel (fp32) with gpt's weights; the padded vocabulary rows are cut."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(hf_config(gpt.config, tok))
    sd = gpt.hf_state_dict(vocab_size=tok.vocab_size)
    target = hf.state_dict()
    for k, v in target.items():  # models trained with bias=False: HF GPT-2 always has biases, zeros are the same
        if k not in sd and k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
    hf.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    hf.generation_config = generation_config(tok)
    return hf.eval()


def load_native(checkpoint, tokenizer_file=None):
    """(GPT in eval mode, common.Tokenizer, checkpoint dict) from a checkpoint path / run folder / latest."""
    ckpt = common.load_checkpoint(checkpoint, expected_kind="gpt")
    gpt = model_lib.build_model(ckpt["model_config"])
    gpt.load_state_dict(ckpt["model"])
    gpt.eval()
    tok = common.Tokenizer.from_spec(ckpt["tokenizer"], tokenizer_file or run_tokenizer_file(ckpt))
    return gpt, tok, ckpt


def run_tokenizer_file(ckpt):
    """The ranks file the run was trained with, if its config names one that exists here."""
    path = (ckpt.get("config") or {}).get("tokenizer_file")
    return path if path and os.path.isfile(path) else None


# -----------------------------------------------------------------------------
# verification


def check_batch(tok, block_size, seed=0):
    """Two rows: the encoded sample text, and random ids over the whole vocabulary (extras, mul tokens)."""
    T = min(block_size, 256)
    ids = tok.encode(sample_text(tok), allow_special=True)
    ids = (ids * (T // max(len(ids), 1) + 1))[:T]
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, tok.vocab_size, (T,), generator=g)
    return torch.stack([torch.tensor(ids), rand])


@torch.no_grad()
def verify_folder(folder, gpt, tok, atol=1e-4):
    """Load `folder` with transformers (no custom code) and compare it with the native model and tokenizer.
    Returns the numbers; raises ExportVerificationError naming every mismatch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    problems = []
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if hf.config.vocab_size != tok.vocab_size:
        problems.append(f"HF vocab_size {hf.config.vocab_size} != tokenizer vocab_size {tok.vocab_size}")
    idx = check_batch(tok, gpt.config.block_size)
    native = gpt.float()(idx)[0][..., :tok.vocab_size]
    theirs = hf(input_ids=idx).logits.float()
    if theirs.shape != native.shape:
        problems.append(f"logits shape HF {tuple(theirs.shape)} vs native {tuple(native.shape)}")
        max_diff = float("inf")
    else:
        max_diff = (theirs - native).abs().max().item()
        if not max_diff <= atol:
            problems.append(f"logits differ: max abs difference {max_diff:.3g} > atol {atol:g} "
                            f"on a batch of {tuple(idx.shape)}")

    hf_tok = AutoTokenizer.from_pretrained(folder)
    text = sample_text(tok)
    ours = tok.encode(text, allow_special=True)
    got = hf_tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    if got != ours:
        i = next((j for j in range(min(len(got), len(ours))) if got[j] != ours[j]), min(len(got), len(ours)))
        problems.append(f"tokenizer ids differ at position {i} of {len(ours)} (HF {got[i:i + 5]} vs ours "
                        f"{ours[i:i + 5]}, around {tok.decode(ours[max(0, i - 3):i + 5])!r})")
    decoded = hf_tok.decode(ours, skip_special_tokens=False)
    if decoded != tok.decode(ours):
        problems.append("HF decode of the sample ids differs from ours")
    gen = hf.generation_config
    if gen.eos_token_id != tok.eot_id or gen.pad_token_id != tok.eot_id:
        problems.append(f"generation config eos/pad {gen.eos_token_id}/{gen.pad_token_id} != end of text {tok.eot_id}")
    report = {"max_abs_logit_diff": max_diff, "atol": atol, "logit_batch": list(idx.shape),
              "tokenizer_sample_tokens": len(ours), "tokenizer_ids_equal": got == ours,
              "extra_tokens_checked": len(tok.special) + len(tok.mul_ids)}
    if problems:
        raise ExportVerificationError(f"export of {folder} failed verification:\n  " + "\n  ".join(problems)
                                      + f"\n  numbers: {json.dumps(report)}")
    return report


# -----------------------------------------------------------------------------
# the export


def write_folder(folder, gpt, tok, info):
    hf = to_hf_model(gpt, tok)
    hf.save_pretrained(folder, safe_serialization=True)
    hf_tokenizer(tok, gpt.config.block_size).save_pretrained(folder)
    # name the generic fast-tokenizer class, which every transformers version (4.x and 5.x) resolves
    tc_path = os.path.join(folder, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    common.atomic_write_json(tc_path, tc)
    common.atomic_write_json(os.path.join(folder, "export_info.json"), info)


def export(checkpoint, output_dir, tokenizer_file=None, overwrite=False, atol=1e-4):
    """Write a verified HF folder at output_dir; returns the export report (also in export_info.json)."""
    t0 = time.time()
    if not output_dir:
        raise ValueError("output_dir is required")
    output_dir = os.path.normpath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=true to replace it")
    gpt, tok, ckpt = load_native(checkpoint, tokenizer_file)
    info = {"source_checkpoint": ckpt["path"], "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
            "tokenizer": tok.spec, "padded_vocab_size": gpt.config.vocab_size, "vocab_size": tok.vocab_size,
            "model_config": dataclasses.asdict(gpt.config),
            "tokenizer_differences": "HF gives the training ids except in product chains such as "
                                     "'2*3=4*5=20' (see export_hf.py), and it always parses special tokens."}
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{os.path.abspath(output_dir)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_folder(tmp, gpt, tok, info)
        info["verification"] = verify_folder(tmp, gpt, tok, atol)
        info["seconds"] = round(time.time() - t0, 2)
        common.atomic_write_json(os.path.join(tmp, "export_info.json"), info)
        if os.path.exists(output_dir):  # overwrite: move the old folder aside only now that the new one is good
            old = f"{os.path.abspath(output_dir)}.old.tmp{os.getpid()}"
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def main(argv=None):
    cfg = common.load_config(Config, argv)
    if not cfg.checkpoint or not cfg.output_dir:
        raise common.ConfigError("both checkpoint= and output_dir= are required "
                                 "(python export_hf.py --checkpoint out/run/latest --output-dir hf/run)")
    info = export(cfg.checkpoint, cfg.output_dir, cfg.tokenizer_file or None, cfg.overwrite, cfg.atol)
    v = info["verification"]
    print(f"exported {info['source_checkpoint']} (step {info['step']}) -> {cfg.output_dir}\n"
          f"verified: max abs logit diff {v['max_abs_logit_diff']:.2e} (atol {v['atol']:g}), tokenizer ids equal on "
          f"{v['tokenizer_sample_tokens']} tokens incl. {v['extra_tokens_checked']} extra tokens; "
          f"vocab {info['padded_vocab_size']} -> {info['vocab_size']}; {info['seconds']}s")
    return info


if __name__ == "__main__":
    try:
        main()
    except (common.ConfigError, ExportVerificationError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

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

Tokenizer notes. Our Tokenizer turns a correct, stand-alone, in-range product of ASCII digits on one line
into one multiplication token, written as a*b=c, a x b = c, a × b = c or a times b is c (the rule and its
guards are dataio.MUL_RE / dataio.fact_pattern); the token decodes to the canonical 'a*b=c', or ' a*b=c' for
the spaced twin a fact preceded by a space takes. HF added tokens would only match literal text, so the HF
tokenizer does it in three steps instead: a normalizer rewrites each product's surface forms to 'a*b=c' (one
Replace per product, with the same pattern and guards), a pre-tokenizer Split isolates exactly those
canonical strings with the space before them, and the BPE vocabulary maps 'a*b=c' and 'Ġa*b=c' to their
ids (whole pieces found in the vocabulary are taken as is, like tiktoken). This gives the same ids as ours
on GSM8K and on the edge cases in tests/test_tokenizer_mul.py. Remaining, documented differences:
  - HF always recognises special tokens in text (our encode(..., allow_special=True));
  - the per-product normalizer makes HF encoding slower than ours (~1 MB/s), fine for eval/SFT prompts.
"""
import common  # first: its import installs the stop-signal handlers, before the slow imports

import dataclasses
import json
import os
import shutil
import time

import torch

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
# verification


def check_batch(tok, block_size, seed=0):
    """Two rows: the encoded sample text, and random ids over the whole vocabulary (extras, mul tokens)."""
    T = min(block_size, 256)
    ids = tok.encode(common.sample_text(tok), allow_special=True)
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
    text = common.sample_text(tok)
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


def export(checkpoint, output_dir, tokenizer_file=None, overwrite=False, atol=1e-4):
    """Write a verified HF folder at output_dir; returns the export report (also in export_info.json)."""
    t0 = time.time()
    if not output_dir:
        raise ValueError("output_dir is required")
    output_dir = os.path.normpath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=true to replace it")
    gpt, tok, ckpt = model_lib.from_checkpoint(checkpoint, tokenizer_file)
    info = {"source_checkpoint": ckpt["path"], "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
            "tokenizer": tok.spec, "padded_vocab_size": gpt.config.vocab_size, "vocab_size": tok.vocab_size,
            "model_config": dataclasses.asdict(gpt.config),
            "tokenizer_differences": "HF gives the training ids (see export_hf.py); it always parses special tokens."}
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{os.path.abspath(output_dir)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model_lib.save_hf_folder(gpt, tok, tmp, info)
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
    common.run_main(main, expected=(ExportVerificationError,))

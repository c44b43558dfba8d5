"""
HellaSwag: pick the ending the model finds most likely. Three rules, side by side:
  acc            the least summed loss of the ending
  acc_norm       the least mean loss per token of the ending (build-nanogpt's acc_norm)
  acc_norm_char  the least summed loss per character of the ending (lm-evaluation-harness's acc_norm)
Used by train_gpt.py during pretraining (items tokenized once, several per forward, split over ranks) and by
eval_gsm8k.py task=hellaswag.
"""
import os

import torch

import common
from tasks.gsm8k import from_hub

HUB = "Rowan/hellaswag"  # the hub source (its validation split); configs name it, a local file overrides


def load_hellaswag(path="", limit=None):
    """Items {ctx, endings[4], label} from HF-style jsonl, the 6-lines-per-item text export, or (an empty
    path or 'Rowan/hellaswag') the validation split of Rowan/hellaswag on the HF hub."""
    if path in ("", HUB):
        rows = from_hub("HellaSwag", HUB, split="validation")  # offline: an error that asks for a local file
        items = [{"ctx": r["ctx"], "endings": list(r["endings"]), "label": int(r["label"])} for r in rows]
        return items[:limit] if limit else items
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HellaSwag file not found: {path}")
    items = []
    if path.endswith(".jsonl"):
        for n, row in enumerate(common.read_jsonl(path), 1):
            if not {"ctx", "endings", "label"} <= set(row):
                raise ValueError(f"{path}: row {n} needs the fields ctx, endings and label")
            items.append({"ctx": row["ctx"], "endings": list(row["endings"]), "label": int(row["label"])})
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if len(lines) % 6:
            raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
        for i in range(0, len(lines), 6):
            ctx, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
            if label.strip() not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}:{i + 2}: label must be 0-3, got {label!r}")
            items.append({"ctx": ctx, "endings": endings, "label": int(label)})
    return items[:limit] if limit else items


def encode_item(tokenizer, item, max_len=None):
    """The 4 rows (context + ' ' + ending token ids) of an item and their masks (1 on the ending's tokens).
    With max_len, rows longer than the model's positions lose context tokens from the left."""
    ctx = tokenizer.encode(item["ctx"])
    rows, masks = [], []
    for ending in item["endings"]:
        end = tokenizer.encode(" " + ending)
        row, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
        if max_len is not None and len(row) > max_len:
            row, mask = row[-max_len:], mask[-max_len:]
        rows.append(row)
        masks.append(mask)
    return {"rows": rows, "masks": masks, "label": item["label"], "chars": [len(e) for e in item["endings"]]}


def encode_items(tokenizer, items, max_len=None):
    """Tokenize every item once (train_gpt.py does this at start, not at every evaluation)."""
    return [encode_item(tokenizer, item, max_len) for item in items]


@torch.no_grad()
def score_encoded(logits_fn, encoded, device):
    """Several items' rows in one padded forward (right padding: a causal model's real positions do not see it).
    Returns per item and ending (n_items, 4): the summed loss of the ending, its number of tokens."""
    rows = [r for e in encoded for r in e["rows"]]
    masks = [m for e in encoded for m in e["masks"]]
    T = max(len(r) for r in rows)
    idx = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.float)
    for i, (r, m) in enumerate(zip(rows, masks)):
        idx[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    idx, mask = idx.to(device), mask.to(device)
    logits = logits_fn(idx).float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1),
                                               reduction="none").view(len(rows), T - 1)
    m = mask[:, 1:]
    return (losses * m).sum(1).view(-1, 4), m.sum(1).view(-1, 4)


def predictions(summed, n_tokens, chars):
    """The three choices of an item's ending from its summed losses (4,), token counts (4,) and ending lengths:
    acc (least summed loss), acc_norm (least loss per token, build-nanogpt), acc_norm_char (least loss per
    character of the ending, lm-evaluation-harness: argmax of loglikelihood / len(choice), where the choice is
    the ending without the ' ' the harness puts before it as target_delimiter)."""
    per_char = summed / torch.tensor(chars, dtype=summed.dtype, device=summed.device)
    return int(summed.argmin()), int((summed / n_tokens).argmin()), int(per_char.argmin())


@torch.no_grad()
def hellaswag_scores(logits_fn, tokenizer, item, device, max_len=None):
    """One item on its own: per-ending (summed loss, mean loss per token); logits_fn(idx) -> logits."""
    summed, n_tokens = score_encoded(logits_fn, [encode_item(tokenizer, item, max_len)], device)
    return summed[0], summed[0] / n_tokens[0]


def hellaswag_eval(logits_fn, encoded, device, rank=0, world_size=1, master=True, batch_items=8):
    """acc, acc_norm and acc_norm_char counts over pre-encoded items (encode_items): rank r scores items r,
    r + W, ..., batch_items items (4 rows each) of similar length per forward. The caller all-reduces the
    counts under DDP."""
    mine = sorted(encoded[rank::world_size], key=lambda e: max(map(len, e["rows"])))  # little padding per batch
    counts = {"correct": 0, "correct_norm": 0, "correct_norm_char": 0, "n": 0}
    for start in common.progress(range(0, len(mine), batch_items), master=master, desc="hellaswag", leave=False):
        batch = mine[start:start + batch_items]
        summed, n_tokens = score_encoded(logits_fn, batch, device)
        for e, s, t in zip(batch, summed, n_tokens):
            pred, pred_norm, pred_char = predictions(s, t, e["chars"])
            counts["correct"] += pred == e["label"]
            counts["correct_norm"] += pred_norm == e["label"]
            counts["correct_norm_char"] += pred_char == e["label"]
            counts["n"] += 1
    return counts

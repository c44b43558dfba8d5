"""
HellaSwag: pick the ending the model finds most likely (acc: summed loss, acc_norm: mean per-token loss).
Used by train_gpt.py during pretraining and by eval_gsm8k.py task=hellaswag.
"""
import os

import torch

import common


def load_hellaswag(path="", limit=None):
    """Items {ctx, endings[4], label} from HF-style jsonl, the 6-lines-per-item text export, or (an empty
    path or 'Rowan/hellaswag') the validation split of Rowan/hellaswag on the HF hub."""
    if not path or path == "Rowan/hellaswag":
        from datasets import load_dataset  # lazily: only needed when reading from the hub
        rows = load_dataset("Rowan/hellaswag", split="validation")
        items = [{"ctx": r["ctx"], "endings": list(r["endings"]), "label": int(r["label"])} for r in rows]
        return items[:limit] if limit else items
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HellaSwag file not found: {path}")
    items = []
    if path.endswith(".jsonl"):
        for row in common.read_jsonl(path):
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


@torch.no_grad()
def hellaswag_scores(logits_fn, tokenizer, item, device, max_len=None):
    """Per-ending (summed loss, mean loss) of ' ' + ending after the context; logits_fn(idx) -> logits.
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
    T = max(len(r) for r in rows)
    idx = torch.zeros((4, T), dtype=torch.long)
    mask = torch.zeros((4, T), dtype=torch.float)
    for i, (r, m) in enumerate(zip(rows, masks)):
        idx[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    idx, mask = idx.to(device), mask.to(device)
    logits = logits_fn(idx).float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1),
                                               reduction="none").view(4, T - 1)
    m = mask[:, 1:]
    summed = (losses * m).sum(1)
    return summed, summed / m.sum(1)


def hellaswag_eval(logits_fn, tokenizer, items, device, rank=0, world_size=1, master=True, max_len=None):
    """acc and acc_norm over `items` (split across ranks; the caller all-reduces the counts if DDP)."""
    correct = correct_norm = n = 0
    for i, item in enumerate(common.progress(items, master=master, desc="hellaswag", leave=False)):
        if i % world_size != rank:
            continue
        summed, mean = hellaswag_scores(logits_fn, tokenizer, item, device, max_len)
        correct += int(summed.argmin().item() == item["label"])
        correct_norm += int(mean.argmin().item() == item["label"])
        n += 1
    return {"correct": correct, "correct_norm": correct_norm, "n": n}

"""
Arithmetic probes: fixed suites (the 12x12 multiplication table, two-digit x one-digit, two-digit addition and
subtraction), each item 3-shot in the suite's own format "Q: a op b\\nA: a op b=c", scored by the last number of
the first line (a multiplication token counts as the text it decodes to).
"""
import random

from tasks.base import Task
from tasks.gsm8k import extract_flexible, same_number

PROBE_OPS = {"mul_table": "*", "mul_2d_1d": "*", "add_2d": "+", "sub_2d": "-"}
PROBE_STOP = ["\n"]


def probe_pairs(suite, n, seed=0):
    rng = random.Random(f"probe-{suite}-{seed}")
    if suite == "mul_table":
        return [(a, b) for a in range(1, 13) for b in range(1, 13)]
    if suite == "mul_2d_1d":
        pool = [(a, b) for a in range(10, 100) for b in range(2, 10)]
    elif suite == "add_2d":
        pool = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    elif suite == "sub_2d":
        pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if a >= b]
    else:
        raise ValueError(f"unknown probe suite {suite!r}")
    return rng.sample(pool, min(n, len(pool)))


def probe_answer(a, op, b):
    return {"*": a * b, "+": a + b, "-": a - b}[op]


def probe_items(n=100, seed=0, limit=0):
    items = []
    for suite, op in PROBE_OPS.items():
        pairs = probe_pairs(suite, n, seed)
        chosen = pairs[:limit] if limit else pairs
        for i, (a, b) in enumerate(chosen):
            rng = random.Random(f"shots-{suite}-{seed}-{i}")
            shots = rng.sample([p for p in pairs if p != (a, b)], 3)
            prompt = "".join(f"Q: {x} {op} {y}\nA: {x}{op}{y}={probe_answer(x, op, y)}\n\n" for x, y in shots)
            prompt += f"Q: {a} {op} {b}\nA:"
            items.append({"id": f"{suite}-{i}", "suite": suite, "question": f"{a}{op}{b}", "prompt": prompt,
                          "gold": str(probe_answer(a, op, b))})
    return items


def score_probe(item, completion):
    pred = extract_flexible(completion)
    return {"suite": item["suite"], "extracted": pred, "correct": same_number(pred, item["gold"])}


class Probes(Task):
    """The probe suites as a task: every item carries its own 3-shot prompt; one split (the suites are fixed)."""
    name = "probes"

    def __init__(self, n=100, seed=0, limit=0):
        self.n, self.seed, self.limit = n, seed, limit

    def examples(self, split="test"):
        return probe_items(self.n, self.seed, self.limit)

    def prompt(self, example, exemplars=()):
        return example["prompt"]

    def stop(self, exemplars=()):
        return PROBE_STOP

    def evaluate(self, example, completion):
        return score_probe(example, completion)

    def reward(self, example, completion):
        return float(score_probe(example, completion)["correct"])

"""
One-step arithmetic ('What is 7 + 5?' -> '#### 12'): a GSM8K-format task small enough that a tiny model
learns it in minutes on a CPU, so the RL demo (configs/grpo_demo.yaml) and the GRPO tests show a reward
that rises. Prompts, stop strings, scoring and reward are GSM8K's (the number after '####').
"""
import random

from tasks.gsm8k import GSM8K

ARITHMETIC_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problem(rng, max_operand, ops):
    a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
    if op == "-" and b > a:
        a, b = b, a  # whole, non-negative answers
    c = ARITHMETIC_OPS[op](a, b)
    return {"question": f"What is {a} {op} {b}?", "answer": f"#### {c}", "gold": str(c)}


class Arithmetic(GSM8K):
    """n problems per split, operands 0..max_operand, operations from ops (a string of + - *). Each split is
    a fixed stream (seed '<split>:<seed>'); with small operands train and test draw from the same few pairs."""
    name = "arithmetic"

    def __init__(self, n=1000, seed=0, max_operand=9, ops="+"):
        bad = [o for o in ops if o not in ARITHMETIC_OPS]
        if bad or not ops or max_operand < 1:
            raise ValueError(f"arithmetic needs ops from {''.join(ARITHMETIC_OPS)} and max_operand >= 1, got "
                             f"ops={ops!r}, max_operand={max_operand}")
        self.n, self.seed, self.max_operand, self.ops = n, seed, max_operand, list(ops)

    def examples(self, split="test"):
        if split not in ("train", "test"):
            raise ValueError(f"arithmetic has train and test splits, not {split!r}")
        rng = random.Random(f"arithmetic:{split}:{self.seed}")
        return [{"id": i, **arithmetic_problem(rng, self.max_operand, self.ops)} for i in range(self.n)]

"""
GSM8K and SVAMP: loading (a local file or the HF hub through `datasets`), the gold number, the two prompt
formats, answer extraction and scoring (as lm-evaluation-harness: `strict` = the number after '####',
`flexible` = the last number), and the RL reward.

Prompt formats
  fewshot  k GSM8K train exemplars "Question: ...\\nAnswer: ...\\n\\n", then "Question: {q}\\nAnswer:" (base models)
  chat     "User: {q}\\nAssistant:", the format sft.py trains (zero-shot)
"""
import json
import os
import random
import re
from decimal import Decimal, InvalidOperation

import common
from tasks.base import Task

# -----------------------------------------------------------------------------
# numbers: normalisation, exact comparison, the answer after '####'

FINAL_ANSWER_RE = re.compile(r"####\s*(-?\s*\$?\s*-?\d[\d,]*(?:\.\d+)?)")
NUMBER_RE = re.compile(r"-?\$?-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text):
    """'$1,234.50' -> '1234.5', '18.0' -> '18', '- 3' -> '-3', '18 dollars' -> '18'; None without a number."""
    if text is None:
        return None
    s = re.sub(r"[\s,$]", "", str(text)).rstrip(".")
    m = re.search(r"-?\d+(?:\.\d+)?", s)  # drops units and other trailing words
    if not m:
        return None
    try:
        d = Decimal(m.group(0))
    except InvalidOperation:
        return None
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def same_number(a, b):
    """Exact numeric equality of two answers (strings or numbers), after normalisation."""
    a, b = normalize_number(a), normalize_number(b)
    return a is not None and b is not None and Decimal(a) == Decimal(b)


def final_answer(text):
    """The number after the last '####' (GSM8K's answer line), normalised; None if absent."""
    found = FINAL_ANSWER_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def gold_number(answer_text):
    """GSM8K's gold answer as a number (an int when it is whole); a missing or non-numeric answer raises."""
    if "####" not in answer_text:
        raise ValueError(f"GSM8K answer without '####': {answer_text[-80:]!r}")
    value = final_answer(answer_text)
    if value is None:
        raise ValueError(f"GSM8K answer with a non-numeric final answer: {answer_text[-80:]!r}")
    return int(value) if "." not in value else float(value)


def extract_strict(completion):
    m = FINAL_ANSWER_RE.search(completion)  # the first '####' answer, as lm-evaluation-harness
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion):
    found = NUMBER_RE.findall(completion)
    return normalize_number(found[-1]) if found else None


def score_completion(completion, gold):
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    return {"extracted": {"strict": strict, "flexible": flexible},
            "correct": {"strict": same_number(strict, gold), "flexible": same_number(flexible, gold)}}


# -----------------------------------------------------------------------------
# data: a local file or the HF hub (lazy `datasets` import)


def read_gsm8k(split="test", data_path=""):
    """GSM8K rows {question, answer}: a local jsonl (e.g. ../shared/data/gsm8k/test.jsonl) or HF openai/gsm8k."""
    if data_path:
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"GSM8K file not found: {data_path}")
        return common.read_jsonl(data_path)
    from datasets import load_dataset  # lazily: only needed when reading from the hub
    return list(load_dataset("openai/gsm8k", "main", split=split))


def load_gsm8k(data_path="", split="test"):
    """GSM8K examples {id, question, answer, gold}."""
    return [{"id": i, "question": r["question"], "answer": r["answer"], "gold": final_answer(r["answer"])}
            for i, r in enumerate(read_gsm8k(split, data_path))]


def load_svamp(data_path="", split="test"):
    """SVAMP examples {id, question (body + question), gold}: a local SVAMP.json or HF ChilleD/SVAMP."""
    if data_path:
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"SVAMP file not found: {data_path}")
        with open(data_path) as f:
            rows = json.load(f)
    else:
        from datasets import load_dataset  # lazily: only needed when reading from the hub
        rows = list(load_dataset("ChilleD/SVAMP", split=split))
    return [{"id": r.get("ID", i), "question": f"{r['Body'].strip()} {r['Question'].strip()}",
             "gold": normalize_number(r["Answer"])} for i, r in enumerate(rows)]


def fewshot_exemplars(k, seed=1234, path="", near=()):
    """k fixed GSM8K train exemplars: `path`, else train.jsonl beside one of the files in `near` (or in
    ../gsm8k of the shared data layout), else the hub's train split."""
    if k <= 0:
        return []
    if not path:
        candidates = []
        for beside in near:
            if beside:
                here = os.path.dirname(os.path.abspath(beside))
                candidates += [os.path.join(here, "train.jsonl"), os.path.join(here, "..", "gsm8k", "train.jsonl")]
        path = next((c for c in candidates if os.path.isfile(c)), "")
    train = load_gsm8k(path, split="train")
    return random.Random(seed).sample(train, k)


# -----------------------------------------------------------------------------
# prompts

CHAT_TEMPLATE = "User: {question}\nAssistant:"  # the format sft.py trains
CHAT_STOP = ["User:"]
FEWSHOT_STOP = ["\n\n", "Question:"]


def format_qa(question, answer):
    """A question/answer pair as text: a few-shot exemplar, and a pretraining document (GSM8K, synthetic)."""
    return f"Question: {question}\nAnswer: {answer}"


def build_prompt(question, exemplars):
    if not exemplars:
        return CHAT_TEMPLATE.format(question=question)
    shots = "".join(format_qa(e["question"], e["answer"]) + "\n\n" for e in exemplars)
    return shots + f"Question: {question}\nAnswer:"


# -----------------------------------------------------------------------------
# the tasks


class GSM8K(Task):
    """GSM8K: examples from a local jsonl per split (test_path, train_path) or the hub. evaluate gives strict
    and flexible; the reward is strict (the number after '####'), the answer format sft.py teaches."""
    name = "gsm8k"

    def __init__(self, test_path="", train_path=""):
        self.paths = {"test": test_path, "train": train_path}

    def examples(self, split="test"):
        return load_gsm8k(self.paths.get(split, ""), split)

    def prompt(self, example, exemplars=()):
        return build_prompt(example["question"], exemplars)

    def stop(self, exemplars=()):
        return FEWSHOT_STOP if exemplars else CHAT_STOP

    def evaluate(self, example, completion):
        return score_completion(completion, example["gold"])

    def reward(self, example, completion):
        return float(same_number(extract_strict(completion), example["gold"]))


class SVAMP(GSM8K):
    """SVAMP: GSM8K's prompts (k-shot exemplars come from GSM8K train, as in the CoT papers) and scoring."""
    name = "svamp"

    def examples(self, split="test"):
        return load_svamp(self.paths.get(split, ""), split)

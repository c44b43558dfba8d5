"""
GSM8K and SVAMP: loading (a local file or the HF hub through `datasets`), the gold number, the two prompt
formats, answer extraction and scoring, and the RL reward.

Prompt formats
  fewshot  k GSM8K train exemplars "Question: ...\\nAnswer: ...\\n\\n", then "Question: {q}\\nAnswer:" (base models)
  chat     "User: {q}\\nAssistant:", the format sft.py trains (zero-shot)

Two scoring protocols, named wherever a number is reported:
  project  (score_completion) numbers normalised before an exact numeric comparison: `strict` = the number
           after the first '####', `flexible` = the last number; '$', commas, spaces, trailing zeros and
           leading zeros do not matter. Sound, but more lenient than the harness's strict-match.
  lm_eval  (score_lm_eval) lm-evaluation-harness's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3.0)
           exactly: `strict-match` and `flexible-extract` regex filters, then exact_match against the whole
           gold answer with its regexes_to_ignore and ignore_case; 5-shot exemplars drawn per question from
           one seeded generator (lm_eval_exemplars), its stop strings (LM_EVAL_STOP).
"""
import json
import os
import random
import re
from decimal import Decimal, InvalidOperation

import dataio
from tasks.base import Task
from tasks.chat import CHAT_STOP, chat_prompt  # noqa: F401 (CHAT_STOP: eval_gsm8k and tests read it here)

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


class HubUnreachable(FileNotFoundError):
    """No local file was given and the HF hub did not answer (offline): the message says what file to pass;
    `reason` is what the hub said."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


GSM8K_HUB, SVAMP_HUB = "openai/gsm8k", "ChilleD/SVAMP"  # the hub sources (configs name them; a file overrides)


def names_hub(data_path, hub):
    """Whether a data path means the hub copy: empty, or the hub id itself (a config may name its source)."""
    return data_path in ("", hub)


def from_hub(what, repo, *args, split):
    """list(load_dataset(repo, *args, split=split)): `what` names the data for the error of an offline machine."""
    from datasets import load_dataset  # lazily: only needed when reading from the hub
    try:
        return list(load_dataset(repo, *args, split=split))
    except OSError as e:  # datasets' ConnectionError offline (HF_DATASETS_OFFLINE=1 or no network)
        reason = f"{repo} ({split}): {' '.join(str(e).split())}"
        raise HubUnreachable(f"no local {what} file given, and the HF hub did not answer ({reason}): pass a "
                             f"local {what} file", reason) from None


def read_gsm8k(split="test", data_path=""):
    """GSM8K rows {question, answer}: a local jsonl (e.g. ../shared/data/gsm8k/test.jsonl) or HF openai/gsm8k
    (data_path empty or 'openai/gsm8k')."""
    if not names_hub(data_path, GSM8K_HUB):
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"GSM8K file not found: {data_path}")
        return require_fields(dataio.read_jsonl(data_path), ("question", "answer"), data_path)
    return from_hub(f"GSM8K {split}", GSM8K_HUB, "main", split=split)


def require_fields(rows, fields, path):
    """Refuse a data file with no rows, or whose rows lack a field the task reads (a clear error, not a
    ZeroDivisionError or a KeyError later)."""
    if not rows:
        raise ValueError(f"{path}: no rows (an empty data file)")
    for n, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{path}: row {n} has no {', '.join(missing)} field (each row needs {', '.join(fields)})")
    return rows


def load_gsm8k(data_path="", split="test"):
    """GSM8K examples {id, question, answer, gold}."""
    return [{"id": i, "question": r["question"], "answer": r["answer"], "gold": final_answer(r["answer"])}
            for i, r in enumerate(read_gsm8k(split, data_path))]


def load_svamp(data_path="", split="test"):
    """SVAMP examples {id, question (body + question), gold}: a local SVAMP.json or HF ChilleD/SVAMP (data_path
    empty or 'ChilleD/SVAMP')."""
    if not names_hub(data_path, SVAMP_HUB):
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"SVAMP file not found: {data_path}")
        with open(data_path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{data_path}: not a JSON file ({e})") from e
        if not isinstance(rows, list):
            raise ValueError(f"{data_path}: expected a JSON list of SVAMP problems")
        require_fields(rows, ("Body", "Question", "Answer"), data_path)
    else:
        rows = from_hub("SVAMP", SVAMP_HUB, split=split)
    return [{"id": r.get("ID", i), "question": f"{r['Body'].strip()} {r['Question'].strip()}",
             "gold": normalize_number(r["Answer"])} for i, r in enumerate(rows)]


def fewshot_exemplars(k, seed=1234, path="", near=()):
    """k fixed GSM8K train exemplars (one set for every question: protocol=project): `path`, else train.jsonl
    beside one of the files in `near` (or in ../gsm8k of the shared data layout), else the hub's train split."""
    if k <= 0:
        return []
    return random.Random(seed).sample(fewshot_pool(path, near), k)


def fewshot_pool(path="", near=()):
    """GSM8K train examples to draw exemplars from (see fewshot_exemplars for where they are looked for)."""
    if not path:
        candidates = []
        for beside in near:
            if beside and beside not in (GSM8K_HUB, SVAMP_HUB):  # a local file, not a hub source
                here = os.path.dirname(os.path.abspath(beside))
                candidates += [os.path.join(here, "train.jsonl"), os.path.join(here, "..", "gsm8k", "train.jsonl")]
        path = next((c for c in candidates if os.path.isfile(c)), "")
    return load_gsm8k(path, split="train")


# -----------------------------------------------------------------------------
# prompts

CHAT_TEMPLATE = "User: {question}\nAssistant:"  # what chat_prompt renders (tasks/chat.py, the format sft.py trains)
FEWSHOT_STOP = ["\n\n", "Question:"]


def format_qa(question, answer):
    """A question/answer pair as text: a few-shot exemplar, and a pretraining document (GSM8K, synthetic)."""
    return f"Question: {question}\nAnswer: {answer}"


def build_prompt(question, exemplars):
    if not exemplars:
        return chat_prompt(question)
    return fewshot_prompt(question, exemplars)


def fewshot_prompt(question, exemplars):
    """The few-shot format (also with no exemplar left: "Question: {q}\\nAnswer:"), as the harness renders it:
    doc_to_text + " " + answer + "\\n\\n" per exemplar."""
    shots = "".join(format_qa(e["question"], e["answer"]) + "\n\n" for e in exemplars)
    return shots + f"Question: {question}\nAnswer:"


def fit_fewshot(question, exemplars, n_tokens, room):
    """The few-shot prompt with as many whole exemplars as fit in `room` tokens (the first ones kept, never a
    cut one), and that number k. n_tokens(text) counts a prompt's tokens; room None = no limit. A question too
    long even alone comes back with k = 0 and longer than room (the caller cuts it and counts it)."""
    for k in range(len(exemplars), -1, -1):
        prompt = fewshot_prompt(question, exemplars[:k])
        if room is None or n_tokens(prompt) <= room:
            return prompt, k
    return prompt, 0


# -----------------------------------------------------------------------------
# protocol=lm_eval: lm-evaluation-harness's gsm8k task (gsm8k.yaml version 3.0), reproduced exactly

LM_EVAL_FEWSHOT = 5                              # num_fewshot
LM_EVAL_FEWSHOT_SEED = 1234                      # the harness's default fewshot_random_seed
LM_EVAL_STOP = ["Question:", "</s>", "<|im_end|>"]  # generation_kwargs.until (the EOS token stops too)
LM_EVAL_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")          # filter strict-match: the first match
LM_EVAL_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # filter flexible-extract: the last match
LM_EVAL_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]              # exact_match regexes_to_ignore, in order
LM_EVAL_INVALID = "[invalid]"                    # the regex filter's fallback when nothing matches


def lm_eval_exemplars(train, questions, k=LM_EVAL_FEWSHOT, seed=LM_EVAL_FEWSHOT_SEED):
    """Per test question (in order), the harness's exemplars: its ContextSampler draws rnd.sample(train, k)
    per document from one random.Random(seed), and drops a drawn exemplar equal to the document itself."""
    rnd = random.Random(seed)
    per_question = []
    for q in questions:
        drawn = rnd.sample(train, k)
        per_question.append([e for e in drawn if (e["question"], e["answer"]) != (q["question"], q.get("answer"))][:k])
    return per_question


def lm_eval_filter(regex, completion, group_select):
    """The harness's RegexFilter: findall, pick match `group_select`, the first non-empty group, stripped."""
    found = regex.findall(completion)
    if not found:
        return LM_EVAL_INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = [g for g in match if g][0]
    return match.strip()


def lm_eval_exact_match(prediction, reference):
    """exact_match with gsm8k.yaml's settings: regexes_to_ignore on both sides, ignore_case: true,
    ignore_punctuation: false."""
    for pattern in LM_EVAL_IGNORE:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


def score_lm_eval(completion, answer_text):
    """strict-match and flexible-extract of a completion against GSM8K's whole gold answer text."""
    strict = lm_eval_filter(LM_EVAL_STRICT_RE, completion, 0)
    flexible = lm_eval_filter(LM_EVAL_FLEXIBLE_RE, completion, -1)
    return {"extracted": {"strict_match": strict, "flexible_extract": flexible},
            "correct": {"strict_match": lm_eval_exact_match(strict, answer_text),
                        "flexible_extract": lm_eval_exact_match(flexible, answer_text)}}


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

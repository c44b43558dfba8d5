"""
The SFT registry: every dataset sft.py trains on, one entry each, all harmonised to one schema

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "gold": str | None}

Classification and multiple choice are text generation: the assistant's reply is the label word, and
generation accuracy parses the label word back out of the model's output (parse_label). Adding a dataset is one
entry: the hub id (and config), its train/eval splits, a prompt template over the row's columns, the target
(a column, or a function of the row) and, for classification, the label words (an int column indexes them).
Every hub loader also reads a local copy (data_path=: .jsonl, .json, .parquet, .csv) with the same columns.

The prompt templates and label words start from the seed document of the HF pipeline (the generative approach:
"Review: ...\\nSentiment:" -> "positive"). How the user/assistant turns become text (the model's chat template,
or `User: ...\\nAssistant: ...`) is sft.py's business; the registry only gives the turns.

Scoring (generation accuracy, and the GRPO reward of SFTSetTask): label = the label word parse_label finds;
number = the number after '####' (GSM8K's strict score); answer = the reply's first line against a short gold
answer, equal as numbers when both are numbers (DeepMind mathematics, ConvFinQA), else as text; "" = eval loss
only (free-form answers).

Mixtures: Mixture(sizes, rates, seed) draws a dataset per example with the given rates (rates must sum to 1),
and within each dataset walks a fresh permutation per pass; a longer stream begins with a shorter one.

SFTSetTask: a scored set as a tasks/base.py Task, so grpo.py trains on it (task=sft:imdb).
"""
import ast
import dataclasses
import json
import os
import random
import re
from fractions import Fraction
from typing import Callable, Optional, Sequence, Union

import dataio
from tasks.arithmetic import Arithmetic
from tasks.base import Task
from tasks.chat import CHAT_STOP, chat_prompt
from tasks.gsm8k import extract_strict, final_answer, same_number
from tasks.synthetic import SyntheticMath

# -----------------------------------------------------------------------------
# an entry


@dataclasses.dataclass
class SFTSet:
    name: str
    hub: str = ""                      # HF hub id ("" = no hub copy: generated or local only)
    config: Optional[str] = None       # the hub config (GLUE task, MMLU "all", ...)
    train_split: str = "train"
    eval_split: Optional[str] = None   # None: a seeded holdout of the train split (see load_split)
    template: Union[str, Callable, None] = None   # str.format over the row's columns, or row -> str
    target: Union[str, Callable, None] = None     # a column name or row -> str; with labels, an int indexes them
    labels: Sequence[str] = ()         # label words of a classification / multiple-choice set
    scoring: str = ""                  # label | number | answer | "" (eval loss only: free-form answers)
    loader: Optional[Callable] = None  # (split, data_path, max_samples, options) -> rows; default: hub / data_path
    messages: bool = False             # rows already hold a `messages` list (chat data)
    doc: str = ""


REGISTRY = {}  # the sets defined below: what the registry has, the same in every process
_DERIVED = {}  # NAME_CONFIG entries registry_name made for hub configs the registry does not list (never in REGISTRY)


def register(entry):
    REGISTRY[entry.name] = entry
    return entry


# sets of the seed that sft.py cannot train, refused by name with the reason (not "unknown dataset")
VISION = ("a vision set: its questions are about images of documents and need an image-text model; sft.py and "
          "grpo.py train text LMs")
REFUSED = {"sujet_finance_vision": VISION, "sujet-ai/Sujet-Finance-QA-Vision-100k": VISION}


HUB_ALIASES = {"glue": "nyu-mll/glue", "imdb": "stanfordnlp/imdb"}  # short hub names the seeds type


def registry_name(name, config=None):
    """A registry name, or a dataset as the seed's users type it (a hub id, with its config: `stanfordnlp/imdb`,
    `glue` + `sst2`, `openai/gsm8k` + `main`) -> the registry name. A hub config the registry does not list for a
    set it has (Financial PhraseBank's sentences_50agree, ...) becomes an entry of its own, NAME_CONFIG."""
    config = None if config in (None, "", "None", "none", "null") else config
    known = REGISTRY.get(name) or _DERIVED.get(name)
    if name in REFUSED or (known and config in (None, known.config)):
        return name
    hub = HUB_ALIASES.get(name.lower(), name)
    on_hub = [e for e in REGISTRY.values() if e.hub and e.hub.lower() == hub.lower()]
    if name in REGISTRY:
        on_hub = [REGISTRY[name]]
    if not on_hub:
        return name  # get_set says it is unknown, listing the registry
    exact = [e for e in on_hub if e.config == config] if config else [e for e in on_hub if e.config is None] or on_hub
    if len(exact) == 1:
        return exact[0].name
    if config and len(on_hub) == 1:  # another config of a set the registry has
        derived = dataclasses.replace(on_hub[0], name=f"{on_hub[0].name}_{config}", config=config,
                                      doc=f"{on_hub[0].doc} (config {config})")
        _DERIVED[derived.name] = derived
        return derived.name
    configs = ", ".join(sorted(str(e.config) for e in on_hub))
    raise dataio.ConfigError(f"dataset '{name}' has several configs in the registry ({configs}): name one with "
                             f"dataset_configs=, e.g. dataset_configs=[{on_hub[0].config}]")


def get_set(name):
    """The entry of a registry name, or of a NAME_CONFIG that registry_name derived."""
    if name in REFUSED:
        raise dataio.ConfigError(f"dataset '{name}' is {REFUSED[name]}")
    entry = REGISTRY.get(name) or _DERIVED.get(name)
    if entry is None:
        raise dataio.ConfigError(f"unknown dataset '{name}'; the registry has: {', '.join(sorted(REGISTRY))}")
    return entry


# -----------------------------------------------------------------------------
# templates (from the seed document) and targets

def label_word(column):
    """The target of a classification row: the label word its int column names (or the word itself)."""
    def target(row, labels):
        value = row[column]
        return labels[int(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    target.uses_labels = True
    return target


def lettered(question, options):
    letters = "ABCDEFGHIJ"
    return question.strip() + "\n" + "\n".join(f"{letters[i]}. {str(o).strip()}" for i, o in enumerate(options))


def mmlu_prompt(row):
    return (f"The following is a multiple choice question about {row.get('subject', '').replace('_', ' ')}. "
            f"Answer with the letter of the correct option.\n\n{lettered(row['question'], row['choices'])}\nAnswer:")


def mmlu_pro_prompt(row):
    return (f"The following is a multiple choice question about {row.get('category', '')}. "
            f"Answer with the letter of the correct option.\n\n{lettered(row['question'], row['options'])}\nAnswer:")


def fiqa_sentiment_label(row, labels):
    """FiQA's sentiment is a score in [-1, 1]: negative below -0.1, positive above 0.1, else neutral."""
    s = float(row["score"])
    return labels[0] if s < -0.1 else labels[2] if s > 0.1 else labels[1]


fiqa_sentiment_label.uses_labels = True


def plain_number(x):
    """18.0 -> '18', 2.50 -> '2.5': a gold number as a solution writes it."""
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:g}"


def svamp_solution(row):
    return f"{str(row['Equation']).strip()} = {plain_number(row['Answer'])}\n#### {plain_number(row['Answer'])}"


def financemath_prompt(row):
    tables = "\n".join(row.get("tables") or [])
    return row["question"].strip() + (f"\n\n{tables}" if tables else "")


def financemath_solution(row):
    return f"{(row.get('python_solution') or '').strip()}\n#### {plain_number(row['ground_truth'])}".lstrip()


def alpaca_prompt(row):
    extra = (row.get("input") or "").strip()
    return row["instruction"].strip() + (f"\n\n{extra}" if extra else "")


def task_rows(task_class, knob_names):
    """A loader for a generated task of tasks/ (its own train and test streams, never overlapping): the
    dataset_options named in knob_names go to the task, e.g. synthetic {max_steps: 2, max_value: 50}."""
    def load(split, data_path, max_samples, options):
        knobs = {k: v for k, v in options.items() if k in knob_names}
        n = max_samples or (5000 if split == "train" else 500)
        try:
            problems = task_class(n=n, **knobs).examples(split)
        except (ValueError, TypeError) as e:  # knobs out of range: a config mistake
            raise dataio.ConfigError(f"dataset '{task_class.name}', dataset_options {options}: {e}") from e
        return [{"question": e["question"], "answer": e["answer"]} for e in problems]
    return load


def jsonl_rows(split, data_path, max_samples, options):
    if not data_path:
        raise dataio.ConfigError("dataset 'jsonl' needs data_path= (a jsonl of prompt/completion or messages rows)")
    return read_local(data_path)


GLUE = [  # name, text columns, label words in the order of the label ids, the question, the answer line
    ("cola", ("sentence",), ("unacceptable", "acceptable"),
     "Determine if this sentence is grammatically acceptable or unacceptable.\n\nSentence: {sentence}\nGrammar:"),
    ("sst2", ("sentence",), ("negative", "positive"),
     "Classify the sentiment of this sentence as either 'positive' or 'negative'.\n\nSentence: {sentence}\nSentiment:"),
    ("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
     "Determine if these two sentences are equivalent or not_equivalent in meaning.\n\n"
     "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nRelation:"),
    ("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
     "Determine if these two questions are duplicate or not_duplicate.\n\n"
     "Question 1: {question1}\nQuestion 2: {question2}\nRelation:"),
    ("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
     "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.\n\n"
     "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"),
    ("qnli", ("question", "sentence"), ("entailment", "not_entailment"),
     "Does the sentence answer the question? Answer entailment or not_entailment.\n\n"
     "Question: {question}\nSentence: {sentence}\nRelation:"),
    ("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
     "Does the first sentence entail the second? Answer entailment or not_entailment.\n\n"
     "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nRelation:"),
    ("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
     "Does the first sentence entail the second? Answer entailment or not_entailment.\n\n"
     "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nRelation:"),
]

# DeepMind mathematics (deepmind/math_dataset): one hub config per module, 2M train rows (train-easy, -medium,
# -hard) and 10k test rows (interpolate) each; the rows are question/answer strings
DEEPMIND_MODULES = [f"{family}__{m}" for family, modules in {
    "algebra": "linear_1d linear_1d_composed linear_2d linear_2d_composed polynomial_roots polynomial_roots_composed "
               "sequence_next_term sequence_nth_term",
    "arithmetic": "add_or_sub add_or_sub_in_base add_sub_multiple div mixed mul mul_div_multiple nearest_integer_root "
                  "simplify_surd",
    "calculus": "differentiate differentiate_composed",
    "comparison": "closest closest_composed kth_biggest kth_biggest_composed pair pair_composed sort sort_composed",
    "measurement": "conversion time",
    "numbers": "base_conversion div_remainder div_remainder_composed gcd gcd_composed is_factor is_factor_composed "
               "is_prime is_prime_composed lcm lcm_composed list_prime_factors list_prime_factors_composed "
               "place_value place_value_composed round_number round_number_composed",
    "polynomials": "add coefficient_named collect compose evaluate evaluate_composed expand simplify_power",
    "probability": "swr_p_level_set swr_p_sequence",
}.items() for m in modules.split()]


def unbytes(text):
    """A DeepMind mathematics string as text. Hub copies made from the files in binary mode hold the repr of
    the bytes, "b'Solve 3*x = 6 for x.\\n'"; that is undone (escapes included), and the line end dropped."""
    t = str(text).strip()
    if re.fullmatch(r"b(['\"]).*\1", t, re.S):
        try:
            t = ast.literal_eval(t).decode("utf-8")
        except (ValueError, SyntaxError, UnicodeDecodeError):
            t = t[2:-1].replace("\\n", "\n")
    return t.strip()


def deepmind_rows(split, data_path, max_samples, options):
    """dataset_options {module: algebra__linear_1d} (the default), or a list of modules, read one after the
    other. data_path: a local copy (.jsonl/.json/.parquet/.csv of question/answer rows, or a module's .txt
    from the pre-generated archive: question and answer on alternate lines)."""
    modules = options.get("module", "algebra__linear_1d")
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = [m for m in modules if m not in DEEPMIND_MODULES]
    if unknown or not modules:
        raise dataio.ConfigError(f"deepmind_math: unknown module {unknown or modules}; dataset_options module is one "
                                 f"of {', '.join(DEEPMIND_MODULES)}")
    if data_path.endswith(".txt"):
        if not os.path.isfile(data_path):
            raise dataio.ConfigError(f"data_path not found: {data_path}")
        with open(data_path) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        return [{"question": q, "answer": a} for q, a in zip(lines[0::2], lines[1::2])]
    if data_path:
        return read_local(data_path)
    from datasets import concatenate_datasets
    parts = [deepmind_hub(m, split) for m in modules]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def deepmind_hub(module, split):
    """One module's split from the hub. The hub repo is built by a loading script, which datasets >= 4 no longer
    runs; then the hub's own parquet export of it (revision refs/convert/parquet, a folder per module) serves."""
    from datasets import load_dataset
    try:
        return load_dataset("deepmind/math_dataset", module, split=split)
    except RuntimeError as e:
        if "script" not in str(e):
            raise
        return load_dataset("deepmind/math_dataset", revision="refs/convert/parquet",
                            data_files={split: f"{module}/{split}/*.parquet"}, split=split)


def deepmind_question(row):
    return unbytes(row["question"])


def deepmind_answer(row):
    return unbytes(row["answer"])


def adaptllm_option(row, labels):
    """AdaptLLM finance-tasks classification rows: `options` (the label words) and `gold_index`. The word is
    mapped onto the entry's labels case-blind; a word outside them is a schema change, reported, never guessed."""
    word = str(row["options"][int(row["gold_index"])]).strip()
    for w in labels:
        if w.lower() == word.lower():
            return w
    raise dataio.ConfigError(f"AdaptLLM row with option {word!r} outside the label words {list(labels)}: "
                             f"the hub schema changed; update tasks/sft_sets.py")


adaptllm_option.uses_labels = True


def adaptllm_label(row):
    """AdaptLLM finance-tasks QA rows (ConvFinQA, NER): `label`, a string or a list whose first item is gold."""
    label = row["label"]
    return str(label if isinstance(label, str) else label[0])


def financial_qa_prompt(row):
    """virattt/financial-qa-10K: the 10-K passage the answer comes from, then the question."""
    return f"Context: {row['context'].strip()}\n\nQuestion: {row['question'].strip()}"


# -----------------------------------------------------------------------------
# the registry

register(SFTSet("gsm8k", "openai/gsm8k", "main", "train", "test", "{question}", "answer", scoring="number",
                doc="grade-school math, worked solutions ending '#### N'"))
register(SFTSet("svamp", "ChilleD/SVAMP", None, "train", "test",
                lambda r: f"{r['Body'].strip()} {r['Question'].strip()}", svamp_solution, scoring="number",
                doc="math word problems: the equation, then '#### N'"))
register(SFTSet("synthetic", "", None, "train", "test", "{question}", "answer", scoring="number",
                loader=task_rows(SyntheticMath, ("seed", "max_value", "min_steps", "max_steps", "templates", "ops")),
                doc="tasks/synthetic.py word problems (options: seed, max_value, min_steps, max_steps, ops)"))
register(SFTSet("arithmetic", "", None, "train", "test", "{question}", "answer", scoring="number",
                loader=task_rows(Arithmetic, ("seed", "max_operand", "ops")),
                doc="tasks/arithmetic.py one-step sums 'What is 7 + 5?' -> '#### 12' (options: max_operand, ops)"))
register(SFTSet("tulu", "allenai/tulu-3-sft-mixture", None, "train", None, messages=True,
                doc="Tulu-3 SFT mixture: multi-turn chats (use max_samples for a subset)"))
register(SFTSet("imdb", "stanfordnlp/imdb", None, "train", "test",
                "Classify the sentiment of this movie review as either 'positive' or 'negative'.\n\nReview: {text}\n"
                "Sentiment:", label_word("label"), ("negative", "positive"), "label"))
for _name, _cols, _labels, _template in GLUE:
    register(SFTSet(_name, "nyu-mll/glue", _name, "train", "validation_matched" if _name == "mnli" else "validation",
                    _template, label_word("label"), _labels, "label", doc=f"GLUE {_name}"))
register(SFTSet("financial_phrasebank", "takala/financial_phrasebank", "sentences_allagree", "train", None,
                "Classify the sentiment of this financial news sentence as negative, neutral or positive.\n\n"
                "Sentence: {sentence}\nSentiment:", label_word("label"), ("negative", "neutral", "positive"), "label"))
register(SFTSet("twitter_financial_sentiment", "zeroshot/twitter-financial-news-sentiment", None, "train", "validation",
                "Classify the sentiment of this financial tweet as bearish, bullish or neutral.\n\nTweet: {text}\n"
                "Sentiment:", label_word("label"), ("bearish", "bullish", "neutral"), "label"))
register(SFTSet("fiqa_sentiment", "TheFinAI/fiqa-sentiment-classification", None, "train", "test",
                "Classify the sentiment of this financial text about {aspect} as negative, neutral or positive.\n\n"
                "Text: {sentence}\nSentiment:", fiqa_sentiment_label, ("negative", "neutral", "positive"), "label"))
register(SFTSet("mmlu", "cais/mmlu", "all", "auxiliary_train", "validation", mmlu_prompt, label_word("answer"),
                tuple("ABCD"), "label", doc="57 subjects, 4 options; trains on the auxiliary_train split"))
register(SFTSet("mmlu_pro", "TIGER-Lab/MMLU-Pro", None, "validation", "test", mmlu_pro_prompt, "answer",
                tuple("ABCDEFGHIJ"), "label", doc="10 options; its only small split (validation) trains"))
register(SFTSet("fiqa_qa", "LLukas22/fiqa", None, "train", "test", "{question}", "answer",
                doc="financial questions with free-form answers (eval loss only)"))
register(SFTSet("finance_alpaca", "gbharti/finance-alpaca", None, "train", None, alpaca_prompt, "output",
                doc="financial instructions in the Alpaca schema (eval loss only)"))
register(SFTSet("financemath", "yale-nlp/FinanceMath", None, "validation", None, financemath_prompt,
                financemath_solution, scoring="number", doc="financial math: a python solution, then '#### N'"))
register(SFTSet("bigcodebench", "bigcode/bigcodebench", None, "v0.1.4", None, "{instruct_prompt}",
                lambda r: r["code_prompt"] + r["canonical_solution"], doc="function-level code (eval loss only)"))
register(SFTSet("gsm8k_socratic", "openai/gsm8k", "socratic", "train", "test", "{question}", "answer", scoring="number",
                doc="GSM8K's socratic config: each step a sub-question and its answer, then '#### N'"))
register(SFTSet("deepmind_math", "deepmind/math_dataset", None, "train", "test", deepmind_question, deepmind_answer,
                scoring="answer", loader=deepmind_rows,
                doc="DeepMind mathematics, by module (dataset_options {module: algebra__linear_1d}, or a list); "
                    "answers scored as numbers when numeric, else as exact text"))
register(SFTSet("financial_qa_10k", "virattt/financial-qa-10K", None, "train", None, financial_qa_prompt, "answer",
                doc="questions on 10-K passages (context given), free-form answers (eval loss only)"))
# AdaptLLM finance-tasks: evaluation sets with one split (test), prompts already written into `input` (the
# reading-comprehension few-shot format of AdaptLLM); training on them holds out a seeded part for eval
register(SFTSet("adaptllm_convfinqa", "AdaptLLM/finance-tasks", "ConvFinQA", "test", None, "{input}", adaptllm_label,
                scoring="answer", doc="AdaptLLM ConvFinQA: numeric answers over a report's text and table"))
register(SFTSet("adaptllm_fpb", "AdaptLLM/finance-tasks", "FPB", "test", None, "{input}", adaptllm_option,
                ("negative", "neutral", "positive"), "label", doc="AdaptLLM Financial PhraseBank sentiment"))
register(SFTSet("adaptllm_fiqa_sa", "AdaptLLM/finance-tasks", "FiQA_SA", "test", None, "{input}", adaptllm_option,
                ("negative", "neutral", "positive"), "label", doc="AdaptLLM FiQA sentiment"))
register(SFTSet("adaptllm_headline", "AdaptLLM/finance-tasks", "Headline", "test", None, "{input}", adaptllm_option,
                ("No", "Yes"), "label", doc="AdaptLLM gold-news headlines: yes/no questions (9 kinds, class_id)"))
register(SFTSet("adaptllm_ner", "AdaptLLM/finance-tasks", "NER", "test", None, "{input}", adaptllm_label,
                doc="AdaptLLM financial NER: 'name (type)' lists (eval loss only; AdaptLLM scores entity F1)"))
register(SFTSet("jsonl", "", None, "train", None, loader=jsonl_rows,
                doc="a local jsonl (data_path=) of {prompt, completion} or {messages} rows"))


# -----------------------------------------------------------------------------
# loading: the hub or a local copy, then one harmonised schema


def read_local(path):
    if not os.path.isfile(path):
        raise dataio.ConfigError(f"data_path not found: {path}")
    if path.endswith(".jsonl"):
        return dataio.read_jsonl(path)
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} or one split's rows under its name
            data = next(v for v in data.values() if isinstance(v, list))
        return data
    if path.endswith((".parquet", ".csv")):
        from datasets import load_dataset
        return list(load_dataset(path.rsplit(".", 1)[1], data_files=path, split="train"))
    raise dataio.ConfigError(f"data_path {path}: expected .jsonl, .json, .parquet or .csv")


def hub_rows(entry, split):
    from datasets import load_dataset  # lazily: only when reading from the hub
    args = (entry.hub, entry.config) if entry.config else (entry.hub,)
    return load_dataset(*args, split=split)


def to_example(entry, row):
    """A raw row -> {"messages": [...], "gold": ...} (gold: the label word or number generation is scored on)."""
    if entry.messages or "messages" in row:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return {"messages": msgs, "gold": None}
    if entry.template is None and "prompt" in row:  # a local prompt/completion row
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["completion"]}], "gold": row.get("gold")}
    template, target = entry.template, entry.target
    prompt = template(row) if callable(template) else template.format(**row)
    if callable(target):
        answer = target(row, entry.labels) if getattr(target, "uses_labels", False) else target(row)
    else:
        answer = str(row[target])
    gold = answer.strip() if entry.scoring in ("label", "answer") else None
    if entry.scoring == "number":
        gold = final_answer(answer)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}],
            "gold": gold}


def load_split(name, split, data_path="", max_samples=0, seed=0, options=None, holdout=200):
    """Examples of one set: split 'train' or 'eval'. A set without an eval split holds out `holdout` train rows
    (a seeded choice, the same on every machine) and trains on the rest. data_path: a local copy of the split."""
    entry = get_set(name)
    options = options or {}
    hub_split = entry.train_split if split == "train" else entry.eval_split
    if entry.loader is not None:
        task_split = "test" if split == "eval" and entry.eval_split else "train"
        rows = entry.loader(task_split, data_path, max_samples, options)
    elif data_path:
        rows = read_local(data_path)
    elif not entry.hub:
        raise dataio.ConfigError(f"dataset '{name}' has no hub copy; give data_path=")
    else:
        rows = hub_rows(entry, hub_split or entry.train_split)
    if len(rows) == 0:
        raise dataio.ConfigError(f"dataset '{name}' has no {split} rows in {data_path or 'its hub copy'}")
    index = list(range(len(rows)))  # rows may be a hub Dataset: pick indices first, read only those rows
    if entry.eval_split is None:  # hold out a fixed part of the train rows for eval
        random.Random(f"holdout:{name}:{seed}").shuffle(index)
        n = min(holdout, len(index) // 10 or 1)
        index = sorted(index[:n] if split == "eval" else index[n:])
    if max_samples and len(index) > max_samples:  # a seeded subset, not the file's first rows
        index = sorted(random.Random(f"subset:{name}:{seed}").sample(index, max_samples))
    rows = [rows[i] for i in index]
    return [to_example(entry, r) for r in rows]


def check_labels(entry, encode):
    """Every label word must tokenize to something (a word that vanishes can be neither trained nor parsed)."""
    for word in entry.labels:
        if not word.strip() or not encode(word.strip()):
            raise dataio.ConfigError(f"dataset '{entry.name}': label word {word!r} tokenizes to nothing")


# -----------------------------------------------------------------------------
# scoring generated text


def parse_label(text, labels):
    """The label word a generated reply names, or None (unparseable). The reply's first word decides when it is a
    label; else the earliest label mentioned as a whole word. Longer labels first, so 'not_entailment' is never
    read as 'entailment'. Single-letter labels (multiple choice) also accept '(B)' and 'answer is B'."""
    t = text.strip()
    by_length = sorted(labels, key=len, reverse=True)
    if all(len(w) == 1 for w in labels):
        m = re.match(r"^\(?([A-Za-z])[\).:\s]", t + " ") or re.search(r"answer is:?\s*\(?([A-Za-z])\b", t)
        letter = m.group(1).upper() if m else None
        return letter if letter in labels else None
    low = t.lower()
    for w in by_length:
        if re.match(rf"{re.escape(w.lower())}(?![\w])", low):
            return w
    best = None
    for w in by_length:
        m = re.search(rf"(?<![\w]){re.escape(w.lower())}(?![\w])", low)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), w)
    return best[1] if best else None


PLAIN_NUMBER_RE = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?")  # no exponents: '1e999999999' stays text


def answer_value(text):
    """A short answer as a number (a Fraction: '-3', '0.25', '1/110', '$1,204', '14.1%' as 14.1), or None."""
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.strip())
    t = t.removeprefix("$").removesuffix("%").strip()
    if not PLAIN_NUMBER_RE.fullmatch(t):
        return None
    try:
        return Fraction(t)
    except ZeroDivisionError:
        return None


def same_answer(pred, gold):
    """Equal as numbers when both are numbers, else the same text up to case and whitespace ('54*a - 30' ==
    '54*a-30', 'False' == 'false'; '-2, 1' is a list, compared as text)."""
    a, b = answer_value(pred), answer_value(gold)
    if a is not None and b is not None:
        return a == b
    return re.sub(r"\s+", "", pred).casefold() == re.sub(r"\s+", "", gold).casefold()


def first_line(text):
    """The answer a reply gives: its first non-empty line, without a closing full stop; None if empty."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].removesuffix(".").strip() if lines else None


def score_generation(entry, example, text):
    """{'pred', 'correct', 'parsed'} of one generated reply against the example's gold."""
    if entry.scoring == "label":
        pred = parse_label(text, entry.labels)
        correct = pred is not None and pred == example["gold"]
    elif entry.scoring == "answer":
        pred = first_line(text)
        correct = pred is not None and same_answer(pred, example["gold"])
    else:  # math: the number after '####' (GSM8K's strict score; a reply without it is unparseable)
        pred = extract_strict(text)
        correct = same_number(pred, example["gold"])
    return {"pred": pred, "correct": bool(correct), "parsed": pred is not None}


# -----------------------------------------------------------------------------
# mixtures


def check_rates(names, rates):
    if not rates:
        return [1.0 / len(names)] * len(names) if len(names) == 1 else None
    if len(rates) != len(names):
        raise dataio.ConfigError(f"{len(names)} datasets but {len(rates)} mixture_rates")
    if any(r < 0 for r in rates) or abs(sum(rates) - 1.0) > 1e-6:
        raise dataio.ConfigError(f"mixture_rates {list(rates)} must be non-negative and sum to 1 "
                                 f"(they sum to {sum(rates):g})")
    return list(rates)


class Mixture:
    """The training stream over several sets: draw i picks set k with probability rates[k] (its own seeded
    generator, so the stream is the same on every rank and after a resume), then that set's next example in a
    permutation redrawn at each pass through it. Without rates (None) the sets are concatenated and shuffled."""

    def __init__(self, sizes, rates=None, seed=0):
        self.sizes, self.rates, self.seed = list(sizes), rates, seed

    def stream(self, n_draws):
        """[(set index, example index), ...] of length n_draws. A longer stream begins with a shorter one (the draws
        and each set's permutations have generators of their own), so a run given more steps continues on the same
        data."""
        empty = [k for k, n in enumerate(self.sizes) if n == 0 and (self.rates is None or self.rates[k] > 0)]
        if empty:
            raise ValueError(f"set {empty[0]} of the mixture has no examples to draw")
        rng = random.Random(f"mixture:{self.seed}")
        if self.rates is None:
            pool = [(k, i) for k, n in enumerate(self.sizes) for i in range(n)]
            out = []
            while len(out) < n_draws:
                rng.shuffle(pool)
                out += pool
            return out[:n_draws]
        shufflers = [random.Random(f"mixture:{self.seed}:{k}") for k in range(len(self.sizes))]
        orders, cursors, out = [[] for _ in self.sizes], [0] * len(self.sizes), []
        for _ in range(n_draws):
            k = rng.choices(range(len(self.sizes)), weights=self.rates)[0]
            if cursors[k] == len(orders[k]):
                orders[k] = list(range(self.sizes[k]))
                shufflers[k].shuffle(orders[k])
                cursors[k] = 0
            out.append((k, orders[k][cursors[k]]))
            cursors[k] += 1
        return out


# -----------------------------------------------------------------------------
# a scored set as a Task (tasks/base.py): what grpo.py trains on with task=sft:NAME


def scored_set(name):
    """The entry of a set that generation can be scored on (label, number, answer), else a one-line error."""
    entry = get_set(name)
    if not entry.scoring:
        raise dataio.ConfigError(f"dataset '{name}' has free-form answers (no scoring), so it gives no reward; "
                                 f"use a set scored by label, number or answer")
    return entry


class SFTSetTask(Task):
    """The examples of a scored registry set (label, number or answer) with the Task interface. The prompt is
    sft.py's user_assistant format, "User: ...\\nAssistant:", the one an SFT warm-up on the same set trained;
    evaluate and reward are score_generation, the scoring of sft.py's generation accuracy, so a reward of 1 is
    what that accuracy counts as correct. Examples also carry "label" (label sets: the gold word, for the
    `label` reward of tasks/rewards.py) and "set" (for its `sft_set` reward).
    train_path / test_path: local copies in the hub schema; a set without an eval split holds out part of
    train_path (load_split's seeded holdout), as sft.py does."""

    def __init__(self, dataset, train_path="", test_path="", max_samples=0, eval_samples=0, seed=0, options=None):
        self.entry = scored_set(dataset)
        self.name = f"sft:{dataset}"
        self.paths = {"train": train_path, "test": test_path or (train_path if self.entry.eval_split is None else "")}
        self.samples = {"train": max_samples, "test": eval_samples}
        self.seed, self.options = seed, options or {}

    def examples(self, split="test"):
        if split not in ("train", "test"):
            raise ValueError(f"{self.name} has train and test splits, not {split!r}")
        rows = load_split(self.entry.name, "train" if split == "train" else "eval", self.paths[split],
                          self.samples[split], self.seed, self.options)
        out = []
        for i, ex in enumerate(rows):
            user = [m["content"] for m in ex["messages"] if m["role"] == "user"][-1]
            example = {"id": i, "question": user.strip(), "answer": ex["messages"][-1]["content"], "gold": ex["gold"],
                       "set": self.entry.name}
            if self.entry.scoring == "label":
                example["label"] = ex["gold"]
            out.append(example)
        return out

    def prompt(self, example, exemplars=()):
        return chat_prompt(example["question"])

    def stop(self, exemplars=()):
        return CHAT_STOP

    def evaluate(self, example, completion):
        scored = score_generation(self.entry, example, completion)
        return {"extracted": scored["pred"], "correct": scored["correct"]}

    def reward(self, example, completion):
        return float(score_generation(self.entry, example, completion)["correct"])

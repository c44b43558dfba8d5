"""
Text sources -> token shards for pretraining: out_dir/val_NNNNNN.bin, train_NNNNNN.bin and meta.json.

    python prepare_data.py configs/data_demo.yaml                  # offline demo: synthetic math, byte tokenizer
    python prepare_data.py source=synthetic_math out_dir=data/demo tokenizer=byte target_tokens=2000000
    python prepare_data.py configs/data_fineweb_edu_10b.yaml       # GPT-2 BPE, FineWeb-Edu sample-10BT
    python prepare_data.py configs/data_fineweb_edu_10b_mul.yaml   # the same text, mul_tokens condition
    python prepare_data.py source=gsm8k data_path=../shared/data/gsm8k/train.jsonl tokenizer=byte

Sources (source=...). Every HF source also reads a local file, folder or glob through data_path=
(.jsonl/.json rows with text_field, .parquet, or plain text), so the project runs offline:
    fineweb_edu     HuggingFaceFW/fineweb-edu, config sample-10BT, streamed
    openwebmath     open-web-math/open-web-math, streamed
    wikitext        Salesforce/wikitext, wikitext-103-raw-v1 (hf_config=wikitext-2-raw-v1 for the small one);
                    rows are grouped into articles (a new article starts at a ' = Title = ' line)
    gsm8k           openai/gsm8k (main): each problem becomes "Question: ...\\nAnswer: ..."
    local           data_path=x.txt|x.jsonl|x.parquet (text_field=, txt_docs=paragraphs|lines|file)
    synthetic_math  generated here: GSM8K-style word problems with worked, calculator-annotated solutions
                    plus arithmetic facts ("7*8=56", "7 x 8 = 56", "7 times 8 is 56", ...). Other scripts use
                    synthetic_math_problems / synthetic_arithmetic_facts / synthetic_math_text directly.

The token stream: each document's tokens are followed by the end-of-text token (tok.eot_id). The first
`val_tokens` tokens of the stream are the validation split (val_000000.bin, ... of at most shard_size
tokens each), everything after is train (train_000000.bin, ...). val_tokens=-1 (auto) takes 1% of
target_tokens, at most one shard: for 10B tokens in 100M shards that is one 100M val shard, the same
split as build-nanogpt's fineweb.py. With target_tokens=0 (the whole source) auto means 100,000 tokens.
A document may straddle the val/train boundary or two shards; the stream stops exactly at target_tokens.

Condition mul_tokens: the tokenizer is common.Tokenizer(..., mul_range=(mul_min, mul_max)), which turns
every correct in-range product written as a*b=c, a x b = c, a × b = c or a times b is c into one token.
The text is the same as in the baseline condition; only the tokenization differs. meta.json counts
the injected tokens (total, per split, per fact), counted in the shards as they are written.

Memory stays bounded while streaming billions of tokens: documents are tokenized by a Pool (imap, in
order) with at most a fixed window of documents in flight, and tokens go into one preallocated shard
buffer that is written out whenever it is full.

Resume: after each shard is written, progress.json records it (file, token count, injection counts) and
where the stream stands (index of the next document and how many of its tokens are already used).
A rerun with the same settings keeps every recorded shard whose header and length check out, and
fast-forwards the document stream to the end of the last kept shard: skipped documents are read but
not tokenized (synthetic_math jumps there directly), then the stream continues. Shards after the first
missing or damaged one are written again; the stream is deterministic, so they come out identical.
A rerun with different settings in the same out_dir stops with an error (overwrite=true starts afresh).
"""
import ast
import contextlib
import dataclasses
import glob
import itertools
import json
import math
import multiprocessing as mp
import operator
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

import common
from common import ConfigError

SOURCES = ("fineweb_edu", "wikitext", "openwebmath", "gsm8k", "local", "synthetic_math")
CONDITIONS = ("baseline", "mul_tokens")
TXT_DOCS = ("paragraphs", "lines", "file")
# source -> (HF dataset id, default config)
HF_DATASETS = {
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebmath": ("open-web-math/open-web-math", None),
    "gsm8k": ("openai/gsm8k", "main"),
}
AUTO_VAL_TOKENS_WHOLE_SOURCE = 100_000


@dataclass
class Config:
    # what to read
    source: str = "synthetic_math"  # fineweb_edu | wikitext | openwebmath | gsm8k | local | synthetic_math
    data_path: str = ""  # local file, folder or glob instead of the HF hub (.jsonl/.json, .parquet, text)
    text_field: str = "text"  # field holding the text in .jsonl/.parquet/HF rows
    txt_docs: str = "paragraphs"  # a plain-text file's documents: paragraphs (blank-line separated) | lines | file
    hf_dataset: str = ""  # '' -> the source's HF dataset id
    hf_config: str = ""  # '' -> the source's default config (sample-10BT, wikitext-103-raw-v1, main)
    hf_split: str = "train"
    streaming: bool = True  # stream HF datasets instead of downloading them whole
    max_docs: int = 0  # stop after this many documents (0: no limit)
    # synthetic_math: the same seed and knobs give the same text
    seed: int = 0
    synth_max_value: int = 100  # largest number the word problems state
    synth_min_steps: int = 1  # reasoning steps (solution lines) per word problem
    synth_max_steps: int = 4
    synth_ops: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "div"])
    synth_templates: list[str] = field(default_factory=list)  # [] -> all problem templates
    synth_facts_fraction: float = 0.3  # share of documents that are arithmetic facts / times tables
    # tokenizer and condition
    tokenizer: str = "gpt2"  # gpt2 | byte
    tokenizer_file: str = ""  # tiktoken ranks file for offline GPT-2 (../shared/data/tokenizers/gpt2.tiktoken)
    extra_tokens: list[str] = field(default_factory=list)  # appended after the base vocabulary
    condition: str = "baseline"  # baseline | mul_tokens
    mul_min: int = 1  # mul_tokens: one token per fact a*b=c with mul_min <= a, b <= mul_max
    mul_max: int = 12
    # output
    out_dir: str = ""  # '' -> data/<source>[_mul]
    target_tokens: int = 0  # stop after this many tokens (0: the whole source)
    shard_size: int = 100_000_000  # tokens per shard
    val_tokens: int = -1  # the first val_tokens tokens are the val split; -1: auto (see the docstring)
    num_proc: int = 0  # tokenizer processes; 0: half the CPU cores
    chunksize: int = 16  # documents per Pool task
    overwrite: bool = False  # start afresh: delete the shards already in out_dir (else: resume, or stop if they differ)


# -----------------------------------------------------------------------------
# synthetic math: grade-school word problems in GSM8K's format, and arithmetic facts
#
# Every problem is built from its own random.Random seeded by a string (seed, index), so problem i is
# the same whatever else is generated, lists are prefix-stable, and a stream can start at any index.
# Each solution step is written through calc(), which evaluates the expression exactly, so the
# <<expr=value>> annotations are correct by construction (the tests check them independently).

NAMES = [("Janet", "she", "her", "her"), ("Tom", "he", "his", "him"), ("Maria", "she", "her", "her"),
         ("Ali", "he", "his", "him"), ("Priya", "she", "her", "her"), ("Kenji", "he", "his", "him"),
         ("Sofia", "she", "her", "her"), ("Liam", "he", "his", "him"), ("Amara", "she", "her", "her"),
         ("Diego", "he", "his", "him"), ("Chen", "he", "his", "him"), ("Fatima", "she", "her", "her"),
         ("Noah", "he", "his", "him"), ("Elena", "she", "her", "her"), ("Omar", "he", "his", "him"),
         ("Grace", "she", "her", "her"), ("Lucas", "he", "his", "him"), ("Mei", "she", "her", "her"),
         ("Jamal", "he", "his", "him"), ("Hannah", "she", "her", "her"), ("Mateo", "he", "his", "him"),
         ("Zara", "she", "her", "her"), ("Ivan", "he", "his", "him"), ("Aisha", "she", "her", "her")]
MUL_SIGNS = ("*", "x")  # how GSM8K solutions write a product; the annotation always uses *
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr):
    """Exact value (a Fraction) of an expression of integers with + - * / and parentheses."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported arithmetic expression {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


def calc(expr, unit=""):
    """'16 - 3 - 4' -> ('16 - 3 - 4 = <<16-3-4=9>>9', 9): one worked step with GSM8K's calculator note."""
    annotation = expr.replace(" ", "").replace("x", "*")
    value = evaluate(annotation)
    if value.denominator != 1 or value < 0:
        raise AssertionError(f"synthetic step {expr} = {value} is not a whole non-negative number")
    value = int(value)
    return f"{expr} = {unit}<<{annotation}={value}>>{value}", value


def _num(rng, lo, hi):
    """A number in [lo, hi]; hi below lo (a small max_value) gives hi, so stated numbers stay <= max_value."""
    return rng.randint(min(lo, hi), hi)


def _x(rng):
    return rng.choice(MUL_SIGNS)


def _person(rng):
    name, he, his, him = rng.choice(NAMES)
    return name, he, his, him, he.capitalize()


def _and_list(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _eggs(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    birds = rng.choice(["ducks", "hens", "chickens", "quails"])
    laid = _num(rng, 10, min(hi, 60))
    eaten, baked = _num(rng, 1, laid // 4), _num(rng, 1, laid // 4)
    dish = rng.choice(["muffins", "a cake", "pancakes", "bread"])
    q = (f"{name}'s {birds} lay {laid} eggs per day. {He} eats {eaten} for breakfast every morning "
         f"and uses {baked} to make {dish} for {his} friends every day.")
    text, left = calc(f"{laid} - {eaten} - {baked}")
    lines = [f"{name} has {text} eggs left every day."]
    if steps == 1:
        return q + f" How many eggs does {he} have left every day?", lines, left
    price = _num(rng, 2, min(hi, 12))
    q += f" {He} sells the rest at the farmers' market for ${price} per egg."
    text, daily = calc(f"{left} {_x(rng)} {price}", "$")
    lines.append(f"{He} makes {text} every day at the market.")
    if steps == 2:
        return q + f" How many dollars does {he} make every day at the market?", lines, daily
    days = rng.choice([7, 30, _num(rng, 2, min(hi, 12))])
    period = {7: "in a week", 30: "in a 30-day month"}.get(days, f"in {days} days")
    text, total = calc(f"{daily} {_x(rng)} {days}", "$")
    lines.append(f"{period.capitalize()} {he} makes {text}.")
    return q + f" How many dollars does {he} make {period}?", lines, total


SHOP_ITEMS = ["notebooks", "pens", "apples", "loaves of bread", "shirts", "toy cars", "boxes of crayons",
              "bags of rice", "pencils", "bottles of juice", "comic books", "cupcakes", "socks", "candles"]


def _shopping(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    change = steps == 2 or (steps >= 4 and rng.random() < 0.5)
    kinds = 1 if steps <= 2 else steps - 1 - change  # one line per kind, one for the sum, one for the change
    items = rng.sample(SHOP_ITEMS, kinds)
    parts, lines, costs = [], [], []
    for item in items:
        qty, price = _num(rng, 2, min(hi, 12)), _num(rng, 1, min(hi, 25))
        parts.append(f"{qty} {item} for ${price} each")
        text, cost = calc(f"{qty} {_x(rng)} {price}", "$")
        lines.append(f"The {item} cost {text}.")
        costs.append(cost)
    store = rng.choice(["the store", "the market", "the shop", "the mall"])
    q = f"{name} goes to {store} and buys {_and_list(parts)}."
    total = costs[0]
    if kinds > 1:
        text, total = calc(" + ".join(str(c) for c in costs), "$")
        lines.append(f"{He} spends {text} in total.")
    if not change:
        return q + rng.choice([f" How much does {he} spend in all?", f" How many dollars does {he} spend?"]), lines, total
    bill = next(b for b in (5, 10, 20, 50, 100, 200, 500, 1000, 10**9) if b > total)
    bill = bill if bill < 10**9 else (total // 1000 + 1) * 1000
    q += f" {He} pays with a ${bill} bill. How much change does {he} get?"
    text, left = calc(f"{bill} - {total}", "$")
    lines.append(f"{his.capitalize()} change is {text}.")
    return q, lines, left


TRAVEL = [("drives", "miles per hour", "miles", 30, 70), ("cycles", "kilometers per hour", "kilometers", 8, 25),
          ("walks", "miles per hour", "miles", 2, 5), ("rows a boat", "kilometers per hour", "kilometers", 3, 8),
          ("rides a scooter", "miles per hour", "miles", 8, 20)]
ORDINALS = ["first", "second", "third", "fourth", "fifth"]


def _travel(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    verb, speed_unit, dist, lo_v, hi_v = rng.choice(TRAVEL)
    round_trip = steps == 2 or (steps >= 4 and rng.random() < 0.5)
    legs = 1 if steps <= 2 else steps - 1 - round_trip  # one line per leg, one for the sum, one for the return
    parts, lines, dists = [], [], []
    for i in range(legs):
        speed, hours = _num(rng, min(lo_v, hi), min(hi_v, hi)), _num(rng, 1, min(hi, 8))
        parts.append(f"at {speed} {speed_unit} for {hours} hour{'s' * (hours > 1)}")
        text, d = calc(f"{speed} {_x(rng)} {hours}")
        lines.append(f"In the {ORDINALS[i]} part of the trip {he} covers {text} {dist}." if legs > 1
                     else f"{He} covers {text} {dist}.")
        dists.append(d)
    q = f"{name} {verb} " + ", then ".join(parts) + "."
    total = dists[0]
    if legs > 1:
        text, total = calc(" + ".join(str(d) for d in dists))
        lines.append(f"Altogether {he} covers {text} {dist}.")
    if not round_trip:
        return q + f" How many {dist} does {he} travel?", lines, total
    text, total = calc(f"{total} {_x(rng)} 2")
    lines.append(f"There and back is {text} {dist}.")
    return q + f" Then {he} comes back the same way. How many {dist} does {he} travel in all?", lines, total


THINGS = ["bike", "video game", "pair of shoes", "tablet", "guitar", "skateboard", "telescope", "backpack"]


def _savings(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    weekly, weeks = _num(rng, 3, min(hi, 50)), _num(rng, 2, min(hi, 12))
    q = f"{name} saves ${weekly} every week for {weeks} weeks."
    text, v = calc(f"{weekly} {_x(rng)} {weeks}", "$")
    lines = [f"{He} saves {text}."]
    events = steps - 1
    goal = events >= 1 and rng.random() < 0.4
    for _ in range(events - goal):
        kind = rng.choice(["gift", "earn", "spend"] if v >= 2 else ["gift", "earn"])
        if kind == "gift":
            g = _num(rng, 2, hi)
            q += f" {his.capitalize()} {rng.choice(['grandmother', 'uncle', 'aunt', 'grandfather'])} gives {him} ${g}."
            text, v = calc(f"{v} + {g}", "$")
        elif kind == "earn":
            g = _num(rng, 2, hi)
            q += f" {He} earns ${g} {rng.choice(['mowing lawns', 'walking dogs', 'washing cars', 'babysitting'])}."
            text, v = calc(f"{v} + {g}", "$")
        else:
            c = _num(rng, 1, min(hi, v - 1))
            q += f" {He} spends ${c} on a {rng.choice(['book', 'movie ticket', 'gift', 'board game'])}."
            text, v = calc(f"{v} - {c}", "$")
        lines.append(f"{rng.choice(['Now', 'Then', 'After that'])} {he} has {text}.")
    if goal:
        price = v + _num(rng, 1, hi)
        q += f" {He} wants to buy a {rng.choice(THINGS)} that costs ${price}. How much more money does {he} need?"
        text, v = calc(f"{price} - {v}", "$")
        lines.append(f"{He} needs {text} more.")
        return q, lines, v
    return q + f" How much money does {he} have now?", lines, v


def _sharing(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    item, box = rng.choice([("candies", "bags"), ("cookies", "boxes"), ("stickers", "packs"),
                            ("chocolates", "boxes"), ("marbles", "bags"), ("grapes", "bunches")])
    if steps == 1:
        n, share = _num(rng, 2, min(hi, 12)), _num(rng, 2, min(hi, 20))
        q = (f"{name} has {n * share} {item} and shares them equally among {n} friends. "
             f"How many {item} does each friend get?")
        text, share = calc(f"{n * share} / {n}")
        return q, [f"Each friend gets {text} {item}."], share
    boxes, per_box = _num(rng, 2, min(hi, 12)), _num(rng, 2, min(hi, 20))
    q = f"{name} buys {boxes} {box} of {item} with {per_box} {item} in each."
    text, total = calc(f"{boxes} {_x(rng)} {per_box}")
    lines = [f"{He} has {text} {item}."]
    if steps >= 3:  # eats some first; keep the rest even so that it splits among 2 or more friends
        eaten = rng.choice([e for e in range(1, max(2, total // 3) + 1) if (total - e) % 2 == 0] or [0])
        q += f" {He} eats {eaten} of them"
        text, total = calc(f"{total} - {eaten}")
        lines.append(f"After eating some, {he} has {text} {item} left.")
    n = rng.choice([k for k in range(2, 13) if total % k == 0 and total // k >= 1])
    q += (" and shares the rest" if steps >= 3 else f" {He} shares them") + f" equally among {n} friends."
    text, share = calc(f"{total} / {n}")
    lines.append(f"Each friend gets {text} {item}.")
    if steps == 4:
        extra = _num(rng, 1, min(hi, 10))
        q += f" Then {his} mother gives each friend {extra} more. How many {item} does each friend have now?"
        text, share = calc(f"{share} + {extra}")
        lines.append(f"Each friend now has {text} {item}.")
        return q, lines, share
    return q + f" How many {item} does each friend get?", lines, share


def _ages(rng, steps, hi, ops):
    future = steps >= 2 and rng.random() < 0.3
    people = rng.sample(NAMES, steps + 1 - future)
    age = _num(rng, 4, min(hi, 40))
    q = f"{people[0][0]} is {age} years old."
    lines = []
    for prev, person in zip(people, people[1:]):
        options = ["older"] + ["younger"] * (age > 2) + ["twice"] * (age <= 40) + ["three"] * (age <= 25) \
            + ["half"] * (age % 2 == 0 and age >= 4)
        kind = rng.choice(options)
        if kind == "older":
            d = _num(rng, 1, min(hi, 30))
            q += f" {person[0]} is {d} years older than {prev[0]}."
            text, age = calc(f"{age} + {d}")
        elif kind == "younger":
            d = _num(rng, 1, min(hi, age - 1))
            q += f" {person[0]} is {d} years younger than {prev[0]}."
            text, age = calc(f"{age} - {d}")
        elif kind in ("twice", "three"):
            k = 2 if kind == "twice" else 3
            q += f" {person[0]} is {'twice' if k == 2 else 'three times'} as old as {prev[0]}."
            text, age = calc(f"{age} {_x(rng)} {k}")
        else:
            q += f" {person[0]} is half as old as {prev[0]}."
            text, age = calc(f"{age} / 2")
        lines.append(f"{person[0]} is {text} years old.")
    last = people[-1][0]
    if future:
        years = _num(rng, 2, min(hi, 20))
        text, age = calc(f"{age} + {years}")
        lines.append(f"In {years} years {last} will be {text} years old.")
        return q + f" How old will {last} be in {years} years?", lines, age
    return q + f" How old is {last}?", lines, age


def _garden(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    plants, fruit = rng.choice([("tomato plants", "tomatoes"), ("apple trees", "apples"),
                                ("pepper plants", "peppers"), ("orange trees", "oranges"),
                                ("strawberry plants", "strawberries"), ("lemon trees", "lemons")])
    rows, per_row = _num(rng, 2, min(hi, 12)), _num(rng, 2, min(hi, 20))
    q = f"{name} plants {rows} rows of {plants} with {per_row} {plants} in each row."
    text, n = calc(f"{rows} {_x(rng)} {per_row}")
    lines = [f"{He} plants {text} {plants}."]
    if steps == 1:
        return q + f" How many {plants} does {he} plant?", lines, n
    dead = _num(rng, 1, max(1, n // 3))
    q += f" {dead} of them do not survive the winter."
    text, n = calc(f"{n} - {dead}")
    lines.append(f"{text} {plants} survive.")
    if steps == 2:
        return q + f" How many {plants} are left?", lines, n
    each = _num(rng, 2, min(hi, 12))
    q += f" Each remaining one gives {each} {fruit}. How many {fruit} does {name} harvest?"
    text, n = calc(f"{n} {_x(rng)} {each}")
    lines.append(f"{name} harvests {text} {fruit}.")
    return q, lines, n


def _reading(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    per_day, days = _num(rng, 5, min(hi, 40)), _num(rng, 2, min(hi, 10))
    if steps == 1:
        q = f"{name} reads {per_day} pages every day. How many pages does {he} read in {days} days?"
        text, n = calc(f"{per_day} {_x(rng)} {days}")
        return q, [f"{He} reads {text} pages."], n
    later_rate, later_days = _num(rng, 5, min(hi, 40)), _num(rng, 2, min(hi, 10))
    pages = per_day * days + later_rate * later_days
    q = f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days."
    text, read = calc(f"{per_day} {_x(rng)} {days}")
    lines = [f"{He} reads {text} pages."]
    text, left = calc(f"{pages} - {read}")
    lines.append(f"There are {text} pages left.")
    if steps == 2:
        return q + " How many pages are left?", lines, left
    q += f" If {he} then reads {later_rate} pages a day, how many more days does {he} need to finish the book?"
    text, n = calc(f"{left} / {later_rate}")
    lines.append(f"{He} needs {text} more days.")
    return q, lines, n


def _wages(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    wage, hours = _num(rng, 5, min(hi, 30)), _num(rng, 2, min(hi, 10))
    extras = sorted(rng.sample(range(3), max(0, steps - 2)))  # which of bonus, bus fare, many weeks
    q = f"{name} earns ${wage} an hour. {He} works {hours} hours a day"
    text, v = calc(f"{wage} {_x(rng)} {hours}", "$")
    lines = [f"{He} earns {text} a day."]
    if steps == 1:
        return q + f". How much does {he} earn in a day?", lines, v
    days = _num(rng, 2, min(hi, 7))
    q += f", {days} days a week."
    text, v = calc(f"{v} {_x(rng)} {days}", "$")
    lines.append(f"In a week {he} earns {text}.")
    if 0 in extras:
        bonus = _num(rng, 5, hi)
        q += f" Every week {he} also gets a bonus of ${bonus}."
        text, v = calc(f"{v} + {bonus}", "$")
        lines.append(f"With the bonus {he} gets {text} a week.")
    if 1 in extras:
        fare = _num(rng, 1, min(hi, v - 1))
        q += f" {He} spends ${fare} a week on the bus."
        text, v = calc(f"{v} - {fare}", "$")
        lines.append(f"After the bus fare {he} keeps {text} a week.")
    verb = "keep" if 1 in extras else "earn"
    if 2 in extras:
        weeks = _num(rng, 2, min(hi, 12))
        text, v = calc(f"{v} {_x(rng)} {weeks}", "$")
        lines.append(f"In {weeks} weeks {he} {verb}s {text}.")
        return q + f" How much does {he} {verb} in {weeks} weeks?", lines, v
    return q + f" How much does {he} {verb} in a week?", lines, v


def _classroom(rng, steps, hi, ops):
    classes, size = _num(rng, 2, min(hi, 12)), _num(rng, 10, min(hi, 30))
    q = f"A school has {classes} classes with {size} students in each class."
    text, n = calc(f"{classes} {_x(rng)} {size}")
    lines = [f"There are {text} students."]
    if steps == 1:
        return q + " How many students are in the school?", lines, n
    if steps == 2:
        absent = _num(rng, 1, max(1, n // 4))
        q += f" {absent} students are sick on the day of the trip. How many students go on the trip?"
        text, n = calc(f"{n} - {absent}")
        lines.append(f"{text} students go on the trip.")
        return q, lines, n
    absent = rng.choice([a for a in range(1, n // 4 + 1) if (n - a) % 2 == 0])
    group = rng.choice([k for k in range(2, 13) if (n - absent) % k == 0])
    q += (f" {absent} students are sick on the day of the trip. The others are split into groups of {group} "
          f"for a museum tour. How many groups are there?")
    text, n = calc(f"{n} - {absent}")
    lines.append(f"{text} students go on the trip.")
    text, n = calc(f"{n} / {group}")
    lines.append(f"There are {text} groups.")
    return q, lines, n


def _baking(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    baked = rng.choice(["muffins", "cookies", "pancakes", "waffles", "scones"])
    eggs = _num(rng, 2, min(hi, 6))
    sat = _num(rng, 2, min(hi, 12))
    q = f"Each batch of {baked} needs {eggs} eggs."
    if steps == 1:
        text, n = calc(f"{sat} {_x(rng)} {eggs}")
        return q + f" {name} bakes {sat} batches. How many eggs does {he} use?", [f"{He} uses {text} eggs."], n
    sun = _num(rng, 2, min(hi, 12))
    q += f" {name} bakes {sat} batches on Saturday and {sun} batches on Sunday."
    text, batches = calc(f"{sat} + {sun}")
    lines = [f"{He} bakes {text} batches."]
    text, n = calc(f"{batches} {_x(rng)} {eggs}")
    lines.append(f"{He} uses {text} eggs.")
    if steps == 2:
        return q + f" How many eggs does {he} use?", lines, n
    price = _num(rng, 1, min(hi, 5))
    q += f" Eggs cost ${price} each. How much does {he} spend on eggs?"
    text, n = calc(f"{n} {_x(rng)} {price}", "$")
    lines.append(f"{He} spends {text} on eggs.")
    return q, lines, n


def _time(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    activity = rng.choice(["practices the piano", "jogs", "reads", "studies Spanish", "plays chess", "swims"])
    minutes = rng.choice([m for m in (10, 12, 15, 20, 30, 40, 45, 60, 90) if m <= max(hi, 10)])
    if steps == 3:
        weeks = rng.randint(1, 2) * (60 // math.gcd(7 * minutes, 60))
        period = f"{weeks} week{'s' * (weeks > 1)}"
        q = f"{name} {activity} for {minutes} minutes every day. How many hours is that in {period}?"
        text, days = calc(f"{weeks} {_x(rng)} 7")
        lines = [f"{period.capitalize()} {'have' if weeks > 1 else 'has'} {text} days."]
    else:
        step = 60 // math.gcd(minutes, 60) if steps == 2 else 1  # whole hours in the end
        days = step * _num(rng, 1 if step > 1 else 2, max(1, min(hi, 14) // step))
        unit = "hours" if steps == 2 else "minutes"
        q = f"{name} {activity} for {minutes} minutes every day. How many {unit} is that in {days} days?"
        lines = []
    text, total = calc(f"{minutes} {_x(rng)} {days}")
    lines.append(f"{He} spends {text} minutes.")
    if steps == 1:
        return q, lines, total
    text, total = calc(f"{total} / 60")
    lines.append(f"That is {text} hours.")
    return q, lines, total


def _collection(rng, steps, hi, ops):
    name, he, his, him, He = _person(rng)
    item = rng.choice(["marbles", "stickers", "stamps", "seashells", "baseball cards", "coins", "beads", "toy cars"])
    v = _num(rng, 5, hi)
    q = f"{name} has {v} {item}."
    lines = []
    for _ in range(steps):
        options = [k for k, ok in (("add", "add" in ops), ("sub", "sub" in ops and v >= 2),
                                   ("mul", "mul" in ops and v <= 10 * hi), ("div", "div" in ops and v % 2 == 0))
                   if ok]
        kind = rng.choice(options or ["mul" if "mul" in ops else "add"])
        if kind == "add":
            d = _num(rng, 1, hi)
            q += " " + rng.choice([f"{He} finds {d} more.", f"{his.capitalize()} friend gives {him} {d} more.",
                                   f"{He} buys {d} more."])
            text, v = calc(f"{v} + {d}")
        elif kind == "sub":
            d = _num(rng, 1, min(hi, v - 1))
            q += " " + rng.choice([f"{He} gives {d} to {his} brother.", f"{He} loses {d}.",
                                   f"{He} trades away {d}."])
            text, v = calc(f"{v} - {d}")
        elif kind == "mul":
            k = rng.choice([2, 3])
            q += f" {He} then {'doubles' if k == 2 else 'triples'} {his} collection."
            text, v = calc(f"{v} {_x(rng)} {k}")
        else:
            q += f" {He} gives away half of {his} {item}."
            text, v = calc(f"{v} / 2")
        lines.append(f"{rng.choice(['Now', 'Then', 'After that', 'So'])} {he} has {text} {item}.")
    return q + f" How many {item} does {name} have now?", lines, v


# name -> (function, fewest steps, most steps, operations it may use); collection adapts to any ops
TEMPLATES = {
    "eggs": (_eggs, 1, 3, {"sub", "mul"}),
    "shopping": (_shopping, 1, 7, {"mul", "add", "sub"}),
    "travel": (_travel, 1, 6, {"mul", "add"}),
    "savings": (_savings, 1, 6, {"mul", "add", "sub"}),
    "sharing": (_sharing, 1, 4, {"mul", "sub", "div", "add"}),
    "ages": (_ages, 1, 8, {"add", "sub", "mul", "div"}),
    "garden": (_garden, 1, 3, {"mul", "sub"}),
    "reading": (_reading, 1, 3, {"mul", "sub", "div"}),
    "wages": (_wages, 1, 5, {"mul", "add", "sub"}),
    "classroom": (_classroom, 1, 3, {"mul", "sub", "div"}),
    "baking": (_baking, 1, 3, {"mul", "add"}),
    "time": (_time, 1, 3, {"mul", "div"}),
    "collection": (_collection, 1, 64, set()),
}
OPS = ("add", "sub", "mul", "div")


def _check_synth_knobs(max_value, min_steps, max_steps, ops, templates):
    if max_value < 10:
        raise ValueError(f"max_value must be at least 10, got {max_value}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"unknown or no operations {bad or ops}; choose from {', '.join(OPS)}")
    bad = [t for t in templates or () if t not in TEMPLATES]
    if bad:
        raise ValueError(f"unknown templates {bad}; choose from {', '.join(TEMPLATES)}")


def _allowed_templates(templates, ops):
    names = list(templates) if templates else list(TEMPLATES)
    allowed = [n for n in names if TEMPLATES[n][3] <= set(ops) and (n != "collection" or {"add", "mul"} & set(ops))]
    if not allowed:
        raise ValueError(f"no word-problem template uses only the operations {sorted(ops)} (templates: {names})")
    return allowed


def _problem(rng, max_value, min_steps, max_steps, templates, ops):
    names = _allowed_templates(templates, ops)
    steps = rng.randint(min_steps, max_steps)
    fitting = [n for n in names if TEMPLATES[n][1] <= steps <= TEMPLATES[n][2]]
    name = rng.choice(fitting or names)
    fn, lo, hi, _ = TEMPLATES[name]
    steps = min(max(steps, lo), hi)  # only when no allowed template can take that many steps
    question, lines, value = fn(rng, steps, max_value, set(ops))
    assert len(lines) == steps, f"template {name} wrote {len(lines)} steps instead of {steps}"
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {value}", "template": name}


def synthetic_math_problem(index, seed=0, max_value=100, min_steps=1, max_steps=4, templates=None, ops=OPS):
    """Problem number `index` of the stream for `seed`: {"question", "answer", "template"}; the answer is a
    GSM8K-style worked solution with <<expr=value>> notes whose final line is '#### N' (N = the gold)."""
    _check_synth_knobs(max_value, min_steps, max_steps, ops, templates)
    return _problem(random.Random(f"synthetic_math:{seed}:{index}"), max_value, min_steps, max_steps, templates, ops)


def synthetic_math_problems(n, seed=0, max_value=100, min_steps=1, max_steps=4, templates=None, ops=OPS):
    """n word problems (see synthetic_math_problem); same arguments, same list, and a longer list starts
    with the shorter one. Difficulty: max_value (size of stated numbers), min/max_steps (solution lines),
    templates (names in TEMPLATES), ops (allowed operations among add, sub, mul, div)."""
    return [synthetic_math_problem(i, seed, max_value, min_steps, max_steps, templates, ops) for i in range(n)]


# arithmetic facts, in the surface forms MUL_RE recognises (the mul_tokens condition turns correct
# in-range products into single tokens) and the same forms for + - /
MUL_FORMS = ("{a}*{b}={c}", "{a} * {b} = {c}", "{a} x {b} = {c}", "{a} × {b} = {c}", "{a} times {b} is {c}")
ADD_FORMS = ("{a}+{b}={c}", "{a} + {b} = {c}", "{a} plus {b} is {c}")
SUB_FORMS = ("{a}-{b}={c}", "{a} - {b} = {c}", "{a} minus {b} is {c}")
DIV_FORMS = ("{a}/{b}={c}", "{a} / {b} = {c}", "{a} divided by {b} is {c}")
FACT_OPS = ("mul", "mul2x1", "add", "sub", "div")  # mul2x1: two-digit times one-digit


def arithmetic_fact(rng, op, mul_min=1, mul_max=12, max_value=100):
    """One correct fact as text, e.g. '7 x 8 = 56', '23 times 4 is 92', '41 + 17 = 58'."""
    if op == "mul":
        a, b = rng.randint(mul_min, mul_max), rng.randint(mul_min, mul_max)
        return rng.choice(MUL_FORMS).format(a=a, b=b, c=a * b)
    if op == "mul2x1":
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return rng.choice(MUL_FORMS).format(a=a, b=b, c=a * b)
    if op == "add":
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        return rng.choice(ADD_FORMS).format(a=a, b=b, c=a + b)
    if op == "sub":
        a, b = sorted((rng.randint(0, max_value), rng.randint(0, max_value)), reverse=True)
        return rng.choice(SUB_FORMS).format(a=a, b=b, c=a - b)
    if op == "div":
        b, c = rng.randint(max(1, mul_min), mul_max), rng.randint(mul_min, mul_max)
        return rng.choice(DIV_FORMS).format(a=b * c, b=b, c=c)
    raise ValueError(f"unknown fact operation {op!r}; choose from {', '.join(FACT_OPS)}")


def synthetic_arithmetic_facts(n, seed=0, ops=FACT_OPS, mul_min=1, mul_max=12, max_value=100):
    """n fact lines, fact i drawn from its own seeded generator (deterministic, prefix-stable)."""
    out = []
    for i in range(n):
        rng = random.Random(f"synthetic_facts:{seed}:{i}")
        out.append(arithmetic_fact(rng, rng.choice(list(ops)), mul_min, mul_max, max_value))
    return out


def format_qa(question, answer):
    """The document text of a question/answer pair (GSM8K and synthetic word problems alike)."""
    return f"Question: {question}\nAnswer: {answer}"


def synthetic_math_document(index, seed=0, facts_fraction=0.3, mul_min=1, mul_max=12, max_value=100,
                            min_steps=1, max_steps=4, templates=None, ops=OPS):
    """Document `index` of the synthetic pretraining text: mostly a word problem with its worked solution,
    else a block of arithmetic facts or a times table. Its problems come from a different generator than
    synthetic_math_problems(seed), so evaluation problems are not copies of the pretraining text."""
    rng = random.Random(f"synthetic_text:{seed}:{index}")
    r = rng.random()
    if r < 0.75 * facts_fraction:
        fact_ops = [o for o in FACT_OPS + ("mul",) if o.replace("2x1", "") in ops]  # times tables twice as often
        facts = [arithmetic_fact(rng, rng.choice(fact_ops), mul_min, mul_max, max_value)
                 for _ in range(rng.randint(6, 20))]
        return "\n".join(facts)
    if r < facts_fraction and "mul" in ops:
        a, form = rng.randint(mul_min, mul_max), rng.choice(MUL_FORMS)
        title = rng.choice([f"The {a} times table:", f"Multiplication table of {a}", f"Times table for {a}"])
        return "\n".join([title] + [form.format(a=a, b=b, c=a * b) for b in range(mul_min, mul_max + 1)])
    p = _problem(rng, max_value, min_steps, max_steps, templates, ops)
    return format_qa(p["question"], p["answer"])


def iter_synthetic_math_text(seed=0, start=0, **knobs):
    """Endless stream of synthetic documents from index `start` (resuming jumps straight there)."""
    _check_synth_knobs(knobs.get("max_value", 100), knobs.get("min_steps", 1), knobs.get("max_steps", 4),
                       knobs.get("ops", OPS), knobs.get("templates"))
    for i in itertools.count(start):
        yield synthetic_math_document(i, seed, **knobs)


def synthetic_math_text(n, seed=0, **knobs):
    """The first n synthetic documents (the text source=synthetic_math tokenizes)."""
    return list(itertools.islice(iter_synthetic_math_text(seed, **knobs), n))


def synth_knobs(cfg):
    return dict(facts_fraction=cfg.synth_facts_fraction, mul_min=cfg.mul_min, mul_max=cfg.mul_max,
                max_value=cfg.synth_max_value, min_steps=cfg.synth_min_steps, max_steps=cfg.synth_max_steps,
                templates=list(cfg.synth_templates) or None, ops=tuple(cfg.synth_ops))


# -----------------------------------------------------------------------------
# text sources: HF datasets (streamed) or local files -> documents (strings)

TEXT_EXTS = (".txt", ".raw", ".text", ".md", ".tokens")
ROW_EXTS = (".jsonl", ".json", ".parquet")


def local_files(data_path):
    """data_path as a list of files: a file, a folder (its data files, sorted) or a glob pattern."""
    if any(ch in data_path for ch in "*?["):
        files = sorted(glob.glob(data_path))
    elif os.path.isdir(data_path):
        files = sorted(os.path.join(data_path, f) for f in os.listdir(data_path)
                       if f.endswith(TEXT_EXTS + ROW_EXTS) and os.path.isfile(os.path.join(data_path, f)))
    elif os.path.isfile(data_path):
        files = [data_path]
    else:
        raise FileNotFoundError(f"data_path not found: {data_path}")
    if not files:
        raise FileNotFoundError(f"data_path {data_path} matches no data files ({', '.join(TEXT_EXTS + ROW_EXTS)})")
    return files


def read_jsonl_rows(path):
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # a .json file holding one array of rows
            yield from json.load(f)
            return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from e


def read_text_docs(path, mode):
    """Documents of a plain-text file: blank-line separated paragraphs, single lines, or the whole file."""
    with open(path, encoding="utf-8", errors="replace") as f:  # universal newlines: CRLF becomes \n
        if mode == "file":
            yield f.read()
            return
        para = []
        for line in f:
            if mode == "lines":
                yield line.rstrip("\n")
            elif line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\n")
                para = []
        if para:
            yield "".join(para).rstrip("\n")


def hf_rows(cfg):
    import datasets  # imported here: only the HF hub path needs it
    name, default_config = HF_DATASETS[cfg.source]
    name, config = cfg.hf_dataset or name, cfg.hf_config or default_config
    try:
        ds = datasets.load_dataset(name, name=config, split=cfg.hf_split, streaming=cfg.streaming)
    except Exception as e:
        raise RuntimeError(f"could not load {name} ({config}, split {cfg.hf_split}) from the HF hub: {e}\n"
                           f"Offline? Give a local copy with data_path=FILE (.jsonl, .parquet or text).") from e
    yield from ds


def source_rows(cfg):
    """Rows (dicts) of the source, from data_path when given, else from the HF hub."""
    if not cfg.data_path:
        yield from hf_rows(cfg)
        return
    for path in local_files(cfg.data_path):
        if path.endswith((".jsonl", ".json")):
            yield from read_jsonl_rows(path)
        elif path.endswith(".parquet"):
            import datasets
            yield from datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        elif cfg.source == "gsm8k":
            raise ValueError(f"source=gsm8k reads .jsonl/.parquet rows with question and answer, not {path}")
        else:  # plain text: wikitext wants the lines, the rest documents
            mode = "lines" if cfg.source == "wikitext" else cfg.txt_docs
            for doc in read_text_docs(path, mode):
                yield {cfg.text_field: doc}


def row_field(row, name, cfg):
    try:
        value = row[name]
    except (KeyError, TypeError, IndexError):
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise KeyError(f"source {cfg.source}: a row has no field {name!r} (it has {keys}); "
                       f"set text_field=") from None
    return value if isinstance(value, str) else str(value)


WIKI_TITLE_RE = re.compile(r"^ ?= [^=].* = ?$")  # ' = Robert Boulter = ' starts an article, ' = = Career = = ' not


def wikitext_articles(lines):
    """Group WikiText lines (HF rows or a .raw file) into one document per article, blank lines dropped."""
    article = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if WIKI_TITLE_RE.match(line) and article:
            yield "\n".join(article)
            article = []
        article.append(line)
    if article:
        yield "\n".join(article)


def iter_documents(cfg, start=0):
    """The documents of the configured source from index `start` (empty documents are dropped)."""
    if cfg.source == "synthetic_math":
        docs = iter_synthetic_math_text(cfg.seed, start, **synth_knobs(cfg))
        start = 0
    elif cfg.source == "gsm8k":
        docs = (format_qa(row_field(r, "question", cfg), row_field(r, "answer", cfg)) for r in source_rows(cfg))
    elif cfg.source == "wikitext":
        docs = wikitext_articles(row_field(r, cfg.text_field, cfg) for r in source_rows(cfg))
    else:
        docs = (row_field(r, cfg.text_field, cfg) for r in source_rows(cfg))
    docs = (d for d in docs if d.strip())
    if start:  # resume: read past the documents already in finished shards, without tokenizing them
        docs = itertools.islice(docs, start, None)
    return docs


# -----------------------------------------------------------------------------
# tokenization: a Pool of workers, each with its own Tokenizer, documents in order

_tok = None


def _init_tokenizer(tok_args):
    global _tok
    _tok = common.Tokenizer(**tok_args)


def _tokenize(text):
    ids = _tok.encode(text)  # literal '<|endoftext|>' inside web text stays text
    ids.append(_tok.eot_id)
    return np.array(ids, dtype=np.uint32)


def tokenize_stream(docs, tok_args, num_proc, chunksize=16):
    """Yield each document's tokens (ending with end-of-text), in order. Pool.imap reads its input ahead
    without limit when the workers are slower than the reader, so a semaphore keeps at most `window`
    documents in flight: memory stays bounded however long the stream."""
    if num_proc <= 1:
        _init_tokenizer(tok_args)
        for text in docs:
            yield _tokenize(text)
        return
    window = num_proc * chunksize * 8
    slots, stop = threading.Semaphore(window), threading.Event()

    def throttled():  # runs in the Pool's task-feeding thread
        for text in docs:
            slots.acquire()
            if stop.is_set():
                return
            yield text

    pool = mp.get_context("fork" if sys.platform.startswith("linux") else None).Pool(
        num_proc, initializer=_init_tokenizer, initargs=(tok_args,))
    try:
        for tokens in pool.imap(_tokenize, throttled(), chunksize=chunksize):
            slots.release()
            yield tokens
    finally:
        stop.set()
        slots.release(window)  # wake the feeder so it sees `stop` and the pool can shut down
        pool.terminate()
        pool.join()


# -----------------------------------------------------------------------------
# shards: one preallocated buffer, flushed to val_/train_NNNNNN.bin when full; progress.json for resume

PROGRESS = "progress.json"


class ShardWriter:
    """Cuts the token stream into shards: the first val_tokens tokens into val shards, the rest into train
    shards, shard_size tokens each, stopping at target_tokens. Records every finished shard in progress."""

    def __init__(self, out_dir, tok, shard_size, val_tokens, target_tokens, progress, logger):
        self.out_dir, self.tok, self.logger = out_dir, tok, logger
        self.shard_size, self.val_tokens, self.target = shard_size, val_tokens, target_tokens
        self.progress = progress
        self.dtype = common.token_dtype(tok.vocab_size)
        self.mul_first = tok.vocab_size - len(tok.mul_ids)  # multiplication tokens are the last ids
        self.total = sum(s["tokens"] for s in progress["shards"])
        self.buf = np.empty(0, dtype=self.dtype)
        self.fill = 0
        self.t0 = time.time()
        self._start_shard()

    def _start_shard(self):
        if self.total < self.val_tokens:
            self.split, self.cap = "val", min(self.shard_size, self.val_tokens - self.total)
        else:
            self.split, self.cap = "train", self.shard_size
        if self.target:
            self.cap = min(self.cap, self.target - self.total)
        if len(self.buf) < self.cap:
            self.buf = np.empty(self.cap, dtype=self.dtype)  # allocated once (the val shard may be smaller)

    @property
    def done(self):
        return bool(self.target) and self.total >= self.target

    def add(self, tokens, doc_index, offset=0):
        """Copy one document's tokens from `offset` on; flush whenever the shard fills. Returns False once
        target_tokens is reached."""
        n_doc = len(tokens)
        while offset < n_doc and not self.done:
            n = min(self.cap - self.fill, n_doc - offset)
            self.buf[self.fill:self.fill + n] = tokens[offset:offset + n]
            self.fill += n
            offset += n
            if self.fill == self.cap:
                # where the next shard's tokens start: the next document, or the rest of this one
                self.flush(doc_index + 1, 0) if offset == n_doc else self.flush(doc_index, offset)
        return not self.done

    def flush(self, next_doc, next_offset):
        if self.fill == 0:
            return
        index = sum(1 for s in self.progress["shards"] if s["split"] == self.split)
        name = f"{self.split}_{index:06d}.bin"
        tokens = self.buf[:self.fill]
        common.write_shard(os.path.join(self.out_dir, name), tokens, self.tok.vocab_size)
        mul = {}
        if self.tok.mul_ids:
            counts = np.bincount(tokens[tokens >= self.mul_first].astype(np.int64) - self.mul_first,
                                 minlength=len(self.tok.mul_ids))
            mul = {self.tok.id_to_text[self.mul_first + i]: int(c) for i, c in enumerate(counts) if c}
        self.progress["shards"].append({"file": name, "split": self.split, "tokens": int(self.fill),
                                        "next_doc": int(next_doc), "next_offset": int(next_offset), "mul": mul})
        common.atomic_write_json(os.path.join(self.out_dir, PROGRESS), self.progress)
        self.total += self.fill
        self.logger.log({"shard": name, "tokens": int(self.fill), "total_tokens": int(self.total),
                         "mul_injections": int(sum(mul.values())), "elapsed_s": round(time.time() - self.t0, 1)},
                        echo=False)
        self.fill = 0
        self._start_shard()


def shard_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if re.match(r"^(train|val)_\d+\.bin$", f)) \
        if os.path.isdir(out_dir) else []


def valid_shard(path, n_tokens, width):
    try:
        tokens = common.read_shard(path)
    except common.ShardError:
        return False
    return len(tokens) == n_tokens and tokens.dtype.itemsize == width


def load_progress(out_dir, fingerprint, overwrite, width):
    """The finished shards a rerun can keep: the longest prefix of recorded shards that are intact (none
    with overwrite). Everything else in out_dir (later or damaged shards, stale meta.json) is removed."""
    path = os.path.join(out_dir, PROGRESS)
    fresh = {"fingerprint": fingerprint, "shards": [], "complete": False}
    old = None
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    existing = shard_files(out_dir)
    if old is not None and old.get("fingerprint") != fingerprint and not overwrite:
        differ = sorted(k for k in set(fingerprint) | set(old.get("fingerprint", {}))
                        if fingerprint.get(k) != old.get("fingerprint", {}).get(k))
        raise ConfigError(f"{out_dir} holds shards made with other settings (differing: {', '.join(differ)}); "
                          f"pass overwrite=true to replace them, or choose another out_dir")
    if old is None and existing and not overwrite:
        raise ConfigError(f"{out_dir} holds shards but no {PROGRESS}, so they cannot be checked; "
                          f"pass overwrite=true to replace them, or choose another out_dir")
    progress = fresh
    if old is not None and old.get("fingerprint") == fingerprint and not overwrite:
        for shard in old["shards"]:
            if not valid_shard(os.path.join(out_dir, shard["file"]), shard["tokens"], width):
                break
            progress["shards"].append(shard)
        progress["complete"] = old.get("complete", False) and len(progress["shards"]) == len(old["shards"])
    keep = {s["file"] for s in progress["shards"]}
    for name in existing:
        if name not in keep:
            os.remove(os.path.join(out_dir, name))
    if not progress["complete"] and os.path.isfile(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
    return progress


# -----------------------------------------------------------------------------
# main


def validate(cfg):
    if cfg.source not in SOURCES:
        raise ConfigError(f"unknown source {cfg.source!r}; choose from {', '.join(SOURCES)}")
    if cfg.condition not in CONDITIONS:
        raise ConfigError(f"unknown condition {cfg.condition!r}; choose from {', '.join(CONDITIONS)}")
    if cfg.tokenizer not in ("gpt2", "byte"):
        raise ConfigError(f"unknown tokenizer {cfg.tokenizer!r}; choose gpt2 or byte")
    if cfg.txt_docs not in TXT_DOCS:
        raise ConfigError(f"unknown txt_docs {cfg.txt_docs!r}; choose from {', '.join(TXT_DOCS)}")
    if not 1 <= cfg.mul_min <= cfg.mul_max:
        raise ConfigError(f"need 1 <= mul_min <= mul_max, got {cfg.mul_min}, {cfg.mul_max}")
    if cfg.shard_size <= 0 or cfg.target_tokens < 0 or cfg.max_docs < 0 or cfg.val_tokens < -1:
        raise ConfigError("shard_size must be > 0; target_tokens, max_docs >= 0; val_tokens >= -1")
    if cfg.source == "local" and not cfg.data_path:
        raise ConfigError("source=local needs data_path=FILE (.txt, .jsonl/.json with text_field=, or .parquet)")
    if cfg.source == "synthetic_math":
        if cfg.data_path:
            raise ConfigError("source=synthetic_math generates its text; it takes no data_path")
        if not cfg.target_tokens and not cfg.max_docs:
            raise ConfigError("source=synthetic_math is endless: set target_tokens=N or max_docs=N")
        try:
            _check_synth_knobs(cfg.synth_max_value, cfg.synth_min_steps, cfg.synth_max_steps, cfg.synth_ops,
                               cfg.synth_templates)
            _allowed_templates(cfg.synth_templates, cfg.synth_ops)
        except ValueError as e:
            raise ConfigError(f"synthetic_math: {e}") from None
        if not 0 <= cfg.synth_facts_fraction <= 1:
            raise ConfigError(f"synth_facts_fraction must be in [0, 1], got {cfg.synth_facts_fraction}")
    if cfg.data_path:
        local_files(cfg.data_path)  # a missing file stops the run here, with its name


def resolve_val_tokens(cfg):
    if cfg.val_tokens >= 0:
        val = cfg.val_tokens
    elif cfg.target_tokens:
        val = min(cfg.shard_size, cfg.target_tokens // 100)
    else:
        val = AUTO_VAL_TOKENS_WHOLE_SOURCE
    if cfg.target_tokens and val >= cfg.target_tokens:
        raise ConfigError(f"val_tokens ({val}) leaves no train tokens of target_tokens ({cfg.target_tokens})")
    return val


def default_out_dir(cfg):
    return os.path.join("data", cfg.source + ("_mul" if cfg.condition == "mul_tokens" else ""))


def prepare(cfg):
    """Write the shards and meta.json for `cfg` (resuming where a previous run stopped); returns meta."""
    validate(cfg)
    val_tokens = resolve_val_tokens(cfg)
    out_dir = cfg.out_dir or default_out_dir(cfg)
    tok_args = dict(kind=cfg.tokenizer, extra_tokens=list(cfg.extra_tokens),
                    mul_range=(cfg.mul_min, cfg.mul_max) if cfg.condition == "mul_tokens" else None,
                    tokenizer_file=cfg.tokenizer_file or None)
    tok = common.Tokenizer(**tok_args)  # a missing ranks file or an offline tiktoken stops the run here
    width = np.dtype(common.token_dtype(tok.vocab_size)).itemsize

    # everything that changes the bytes of the shards; a rerun must match it to keep finished shards
    skip = {"out_dir", "num_proc", "chunksize", "overwrite", "streaming", "tokenizer_file", "val_tokens"}
    fingerprint = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    fingerprint.update(val_tokens=val_tokens, tokenizer_spec=tok.spec)

    os.makedirs(out_dir, exist_ok=True)
    progress = load_progress(out_dir, fingerprint, cfg.overwrite, width)
    resuming = bool(progress["shards"])
    common.atomic_write_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))
    logger = common.Logger(out_dir, resume=True)
    writer = ShardWriter(out_dir, tok, cfg.shard_size, val_tokens, cfg.target_tokens, progress, logger)
    num_proc = cfg.num_proc or max(1, (os.cpu_count() or 2) // 2)

    if progress["complete"]:
        logger.info(f"{out_dir}: all {len(progress['shards'])} shards already written, nothing to do")
    else:
        last = progress["shards"][-1] if resuming else {"next_doc": 0, "next_offset": 0}
        start_doc, start_offset = last["next_doc"], last["next_offset"]
        if resuming:
            logger.info(f"resuming: keeping {len(progress['shards'])} finished shards ({writer.total:,} tokens); "
                        f"the stream restarts at document {start_doc:,} (token {start_offset:,} of it)")
        docs = iter_documents(cfg, start_doc)
        if cfg.max_docs:
            docs = itertools.islice(docs, max(0, cfg.max_docs - start_doc))
        first = next(docs, None)  # open the source here, so that its errors surface in this process
        docs = itertools.chain([first], docs) if first is not None else iter(())
        logger.info(f"tokenizing {cfg.source} with {cfg.tokenizer} ({cfg.condition}, vocab {tok.vocab_size}) "
                    f"on {num_proc} process(es) into {out_dir}")
        bar = common.progress(total=cfg.target_tokens or None, initial=writer.total, unit="tok", unit_scale=True,
                              desc=f"{cfg.source} -> shards")
        doc_index = start_doc
        with contextlib.closing(tokenize_stream(docs, tok_args, num_proc, cfg.chunksize)) as stream:
            for doc_index, tokens in enumerate(stream, start=start_doc):
                offset = start_offset if doc_index == start_doc else 0
                before = writer.total + writer.fill
                more = writer.add(tokens, doc_index, offset)
                bar.update(writer.total + writer.fill - before)
                if not more:
                    break
            else:
                doc_index += 1 if first is not None else 0
        writer.flush(doc_index, 0)  # the last, partly filled shard (when the source ran out)
        bar.close()
        progress["complete"] = True
        common.atomic_write_json(os.path.join(out_dir, PROGRESS), progress)

    meta = build_meta(cfg, tok, progress, val_tokens, out_dir)
    common.atomic_write_json(os.path.join(out_dir, "meta.json"), meta)
    logger.log({"done": True, "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
                "shards": len(meta["shards"]), "mul_injections": meta["mul_injections"]["total"]})
    if meta["train_tokens"] == 0:
        logger.info(f"WARNING: the source gave only {meta['val_tokens']:,} tokens, all of them val; "
                    f"lower val_tokens to get train shards")
    return meta


def build_meta(cfg, tok, progress, val_tokens, out_dir):
    shards = progress["shards"]
    per_fact, by_split = {}, {"train": 0, "val": 0}
    for s in shards:
        for fact, n in s["mul"].items():
            per_fact[fact] = per_fact.get(fact, 0) + n
            by_split[s["split"]] += n
    hf_name, hf_config = HF_DATASETS.get(cfg.source, (None, None))
    last = shards[-1] if shards else {"next_doc": 0, "next_offset": 0}
    return {
        "source": cfg.source,
        "data_path": cfg.data_path or None,
        "hf_dataset": None if cfg.data_path or cfg.source not in HF_DATASETS else (cfg.hf_dataset or hf_name),
        "hf_config": None if cfg.data_path or cfg.source not in HF_DATASETS else (cfg.hf_config or hf_config),
        "tokenizer": tok.spec,
        "tokenizer_file": cfg.tokenizer_file or None,
        "vocab_size": tok.vocab_size,
        "padded_vocab_size": common.padded_vocab_size(tok.vocab_size),
        "eot_id": tok.eot_id,
        "special_tokens": dict(tok.special),
        "condition": cfg.condition,
        "mul_range": [cfg.mul_min, cfg.mul_max] if cfg.condition == "mul_tokens" else None,
        "mul_first_id": tok.vocab_size - len(tok.mul_ids) if tok.mul_ids else None,
        "dtype": np.dtype(common.token_dtype(tok.vocab_size)).name,
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
        "total_tokens": sum(s["tokens"] for s in shards),
        "documents": last["next_doc"] + (1 if last["next_offset"] else 0),
        "mul_injections": {"total": sum(per_fact.values()), "train": by_split["train"], "val": by_split["val"],
                           "per_fact": dict(sorted(per_fact.items(), key=lambda kv: -kv[1]))},
        "target_tokens": cfg.target_tokens,
        "shard_size": cfg.shard_size,
        "val_split": f"the first {val_tokens} tokens of the stream",
        "seed": cfg.seed if cfg.source == "synthetic_math" else None,
        "shards": [{"file": s["file"], "split": s["split"], "tokens": s["tokens"]} for s in shards],
        "out_dir": out_dir,
        "config": dataclasses.asdict(cfg),
    }


def main(argv=None):
    cfg = common.load_config(Config, argv)
    meta = prepare(cfg)
    print(f"wrote {len(meta['shards'])} shards to {cfg.out_dir or default_out_dir(cfg)}: "
          f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
          f"{meta['mul_injections']['total']:,} multiplication tokens")
    return meta


if __name__ == "__main__":
    main()

"""
Synthetic math: grade-school word problems in GSM8K's format (worked solutions with <<expr=value>>
calculator notes, the gold number after '####') and arithmetic facts, for pretraining text
(prepare_data.py source=synthetic_math) and as a GSM8K-style task (SyntheticMath) for eval, sft and grpo.

Every problem is built from its own random.Random seeded by a string (seed, index), so problem i is
the same whatever else is generated, lists are prefix-stable, and a stream can start at any index.
Each solution step is written through calc(), which evaluates the expression exactly, so the
<<expr=value>> annotations are correct by construction (the tests check them independently).
"""
import ast
import itertools
import math
import operator
import random
import re
from fractions import Fraction

from tasks.gsm8k import GSM8K, final_answer, format_qa

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


def exact_value(expr):
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
    value = exact_value(annotation)
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


def check_synth_knobs(max_value, min_steps, max_steps, ops, templates):
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


def allowed_templates(templates, ops):
    names = list(templates) if templates else list(TEMPLATES)
    allowed = [n for n in names if TEMPLATES[n][3] <= set(ops) and (n != "collection" or {"add", "mul"} & set(ops))]
    if not allowed:
        raise ValueError(f"no word-problem template uses only the operations {sorted(ops)} (templates: {names})")
    return allowed


def _problem(rng, max_value, min_steps, max_steps, templates, ops):
    names = allowed_templates(templates, ops)
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
    check_synth_knobs(max_value, min_steps, max_steps, ops, templates)
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
    check_synth_knobs(knobs.get("max_value", 100), knobs.get("min_steps", 1), knobs.get("max_steps", 4),
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
# the synthetic problems as a task: a GSM8K-style set (answers after '####') with GSM8K's prompts and scoring


class SyntheticMath(GSM8K):
    """Synthetic word problems as a task, scored like GSM8K (reward: the exact number after '####').
    Each split is its own fixed stream (seed '<split>:<seed>'), so the test set is the same on every
    machine and never overlaps train; both differ from the pretraining text (synthetic_math_document)."""
    name = "synthetic"

    def __init__(self, n=1000, seed=0, max_value=100, min_steps=1, max_steps=4, templates=None, ops=OPS):
        check_synth_knobs(max_value, min_steps, max_steps, ops, templates)
        allowed_templates(templates, ops)
        self.n, self.seed = n, seed
        self.knobs = dict(max_value=max_value, min_steps=min_steps, max_steps=max_steps, templates=templates, ops=ops)

    def examples(self, split="test"):
        if split not in ("train", "test"):
            raise ValueError(f"synthetic math has train and test splits, not {split!r}")
        problems = synthetic_math_problems(self.n, seed=f"{split}:{self.seed}", **self.knobs)
        return [{"id": i, "question": p["question"], "answer": p["answer"], "gold": final_answer(p["answer"]),
                 "template": p["template"]} for i, p in enumerate(problems)]


# -----------------------------------------------------------------------------
# plans: the same problems as gen_plans.py's JSON ({id, question, plan, execution, answer_numerical}), offline.
# The plan names each step's operation and what it finds, without a number; the execution is the worked
# solution with every number (calculator notes dropped, as gen_plans.py's executions are written).

STEP_WORDS = {"+": "add the amounts together", "-": "subtract the amount taken away",
              "*": "multiply the quantity by the rate", "/": "divide the total into equal parts"}
ORDER_WORDS = ["First", "Then", "Next", "After that"]
NUMBER_RE = re.compile(r"\$?\d[\d,]*(?:\.\d+)?")
CALC_RE = re.compile(r"[\d$][\d\s.,$+\-*x/()]*=\s*\$?<<[^>]*>>\S*?\d+")


def abstract_step(line):
    """'Janet has 16 - 3 - 4 = <<16-3-4=9>>9 eggs left every day.' -> 'subtract the amount taken away to find how
    many: Janet has eggs left every day' (the operation of the calculator note, the line's words, no numbers)."""
    note = re.search(r"<<([^=>]*)=", line).group(1)
    ops = [op for op in "+-*/" if op in note]
    what = NUMBER_RE.sub("", CALC_RE.sub("", line)).replace(" ,", ",")
    what = re.sub(r"\s+", " ", what).strip(" .")
    return f"{' and '.join(STEP_WORDS[op] for op in ops)} to find the result ({what})"


def synthetic_plan(problem, index=0):
    """One problem of synthetic_math_problems as a gen_plans.py record: an abstract plan and a concrete execution."""
    steps = [abstract_step(line) for line in problem["answer"].split("\n") if "<<" in line]
    if len(steps) == 1:
        plan = steps[0][0].upper() + steps[0][1:] + "."
    else:
        words = ORDER_WORDS[:min(len(steps) - 1, 4)] + ["Then"] * max(0, len(steps) - 5) + ["Finally"]
        plan = " ".join(f"{w}, {step}." for w, step in zip(words, steps))
    execution = re.sub(r"<<[^>]*>>", "", problem["answer"])
    return {"id": f"synthetic_{index}", "question": problem["question"], "plan": plan, "execution": execution,
            "answer_numerical": int(final_answer(problem["answer"])), "valid": True}


def synthetic_plans(n, seed=0, **knobs):
    """n records in gen_plans.py's JSON layout (see synthetic_plan); the same knobs as synthetic_math_problems."""
    return [synthetic_plan(p, i) for i, p in enumerate(synthetic_math_problems(n, seed, **knobs))]

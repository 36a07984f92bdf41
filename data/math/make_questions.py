"""Generate the sample math question set for the ``+experiment=math`` experiment.

Writes ``data/math/questions.jsonl``: one JSON object per line with the keys ``id``, ``category``,
``question``, ``answer`` and ``solution`` (a short worked solution ending in a GSM8K-style
``#### <answer>`` line). Categories: addition, subtraction, multiplication, division,
order_of_operations, percent and word_problem, in roughly equal numbers.

The output is fully determined by the seed, so re-running gives a byte-identical file.
Every answer is checked by re-evaluating the question's expression (arithmetic categories)
and each step of the worked solution with an independent exact evaluator.

Regenerate with:

    python data/math/make_questions.py

Options: ``--seed`` (default 1234), ``--count`` (default 240), ``--out`` (default: questions.jsonl
next to this script). Uses the standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from random import Random

DEFAULT_SEED = 1234
DEFAULT_COUNT = 240
DEFAULT_OUT = Path(__file__).resolve().parent / "questions.jsonl"

CATEGORIES = (
    "addition",
    "subtraction",
    "multiplication",
    "division",
    "order_of_operations",
    "percent",
    "word_problem",
)
ARITHMETIC = frozenset(CATEGORIES) - {"percent", "word_problem"}

# fmt: off
NAMES = (
    "Amara", "Ben", "Chloe", "Diego", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kavya", "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara",
)
# fmt: on
PHRASINGS = ("What is {}?", "Compute {}.", "Calculate {}.", "Evaluate {}.")

Number = int | Fraction

# A run of digits/operators/parentheses that starts and ends with a digit or parenthesis.
EXPR_RE = re.compile(r"[\d(][\d\s+\-*/()]*[\d)]")
# A ready-made arithmetic expression such as "12 + 7" or "3*(4": forbidden in word problems.
READY_MADE_RE = re.compile(r"\d\s*[-+*/]\s*\(?\s*\d")


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: ``<lead>: <expr> = <value><unit>.``"""

    lead: str
    expr: str
    value: Number
    unit: str = ""

    def render(self) -> str:
        return f"{self.lead}: {self.expr} = {fmt(self.value)}{self.unit}."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: Number
    steps: tuple[Step, ...]


# --------------------------------------------------------------------------- helpers


def to_answer(value: Number) -> int | float:
    """Int when integral, otherwise a float rounded to 2 decimals."""
    frac = Fraction(value)
    if frac.denominator == 1:
        return int(frac)
    return round(float(frac), 2)


def fmt(value: Number) -> str:
    return str(to_answer(value))


def evaluate(expr: str) -> Fraction:
    """Exactly evaluate an expression made of integers, + - * / and parentheses."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right
        raise ValueError(f"unsupported expression: {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def phrase(rng: Random, expr: str) -> str:
    return rng.choice(PHRASINGS).format(expr)


def two_names(rng: Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first, second


# --------------------------------------------------------------------------- arithmetic


def make_addition(rng: Random) -> Problem:
    terms = [rng.randint(10, 999) for _ in range(rng.choice((2, 2, 3)))]
    expr = " + ".join(map(str, terms))
    total = sum(terms)
    return Problem(phrase(rng, expr), total, (Step("Add the numbers", expr, total),))


def make_subtraction(rng: Random) -> Problem:
    a = rng.randint(50, 999)
    b = rng.randint(10, a - 1)
    expr = f"{a} - {b}"
    return Problem(phrase(rng, expr), a - b, (Step("Subtract", expr, a - b),))


def make_multiplication(rng: Random) -> Problem:
    a = rng.randint(11, 99)
    b = rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(11, 40)
    expr = f"{a} * {b}"
    return Problem(phrase(rng, expr), a * b, (Step("Multiply", expr, a * b),))


def make_division(rng: Random) -> Problem:
    divisor = rng.randint(2, 25)
    quotient = rng.randint(2, 60)
    expr = f"{divisor * quotient} / {divisor}"
    return Problem(phrase(rng, expr), quotient, (Step("Divide", expr, quotient),))


def make_order_of_operations(rng: Random) -> Problem:
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 12)
    steps: tuple[Step, ...]
    form = rng.randrange(6)
    if form == 0:  # a + b * c
        steps = (
            Step("Multiplication first", f"{b} * {c}", b * c),
            Step("Then add", f"{a} + {b * c}", a + b * c),
        )
        expr = f"{a} + {b} * {c}"
    elif form == 1:  # (a - b) * c, with a > b
        a = b + rng.randint(1, 25)
        steps = (
            Step("Parentheses first", f"{a} - {b}", a - b),
            Step("Then multiply", f"{a - b} * {c}", (a - b) * c),
        )
        expr = f"({a} - {b}) * {c}"
    elif form == 2:  # a * b - c
        steps = (
            Step("Multiplication first", f"{a} * {b}", a * b),
            Step("Then subtract", f"{a * b} - {c}", a * b - c),
        )
        expr = f"{a} * {b} - {c}"
    elif form == 3:  # (a + b) / c, exact
        total = c * rng.randint(2, 15)
        a = rng.randint(1, total - 1)
        b = total - a
        steps = (
            Step("Parentheses first", f"{a} + {b}", total),
            Step("Then divide", f"{total} / {c}", total // c),
        )
        expr = f"({a} + {b}) / {c}"
    elif form == 4:  # a - b / c, exact
        b = c * rng.randint(2, 12)
        a = b // c + rng.randint(1, 60)
        steps = (
            Step("Division first", f"{b} / {c}", b // c),
            Step("Then subtract", f"{a} - {b // c}", a - b // c),
        )
        expr = f"{a} - {b} / {c}"
    else:  # a * (b + c) - d
        d = rng.randint(1, 20)
        inner = b + c
        steps = (
            Step("Parentheses first", f"{b} + {c}", inner),
            Step("Then multiply", f"{a} * {inner}", a * inner),
            Step("Then subtract", f"{a * inner} - {d}", a * inner - d),
        )
        expr = f"{a} * ({b} + {c}) - {d}"
    return Problem(phrase(rng, expr), steps[-1].value, steps)


PERCENTS = (5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 90, 120, 150)


def make_percent(rng: Random) -> Problem:
    pct = rng.choice(PERCENTS)
    base = rng.randint(2, 80) * 5
    value = Fraction(pct * base, 100)
    question = rng.choice(("What is {p}% of {b}?", "Find {p}% of {b}.", "Calculate {p}% of {b}.")).format(p=pct, b=base)
    step = Step(f"{pct}% of {base}", f"{pct} * {base} / 100", value)
    return Problem(question, value, (step,))


# --------------------------------------------------------------------------- word problems


SHOP_ITEMS = (
    ("notebooks", 2, 6),
    ("pens", 1, 3),
    ("apples", 1, 2),
    ("comic books", 4, 9),
    ("candles", 3, 7),
    ("pairs of socks", 2, 5),
    ("mugs", 5, 12),
    ("plant pots", 3, 8),
    ("sandwiches", 4, 8),
    ("bottles of juice", 2, 4),
)


def wp_shopping(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    (item1, lo1, hi1), (item2, lo2, hi2) = rng.sample(SHOP_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 6), rng.randint(lo1, hi1), rng.randint(2, 5), rng.randint(lo2, hi2)
    total = n1 * p1 + n2 * p2
    bill = next(b for b in (10, 20, 50, 100) if b > total)
    question = (
        f"{name} buys {n1} {item1} at ${p1} each and {n2} {item2} at ${p2} each. "
        f"{name} pays with a ${bill} bill. How many dollars of change does {name} get back?"
    )
    steps = (
        Step("Total cost", f"{n1} * {p1} + {n2} * {p2}", total, " dollars"),
        Step("Change", f"{bill} - {total}", bill - total, " dollars"),
    )
    return Problem(question, bill - total, steps)


VEHICLES = (
    ("A train", 60, 120),
    ("A bus", 40, 80),
    ("A cyclist", 12, 25),
    ("A car", 50, 110),
    ("A ferry", 20, 40),
)


def wp_distance(rng: Random) -> Problem:
    who, lo, hi = rng.choice(VEHICLES)
    s1, s2 = rng.randint(lo, hi), rng.randint(lo, hi)
    h1, h2 = rng.randint(2, 5), rng.randint(1, 4)
    question = (
        f"{who} travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for {h2} hours. "
        "How many kilometers does it travel in total?"
    )
    d1, d2 = s1 * h1, s2 * h2
    steps = (
        Step("First part", f"{s1} * {h1}", d1, " km"),
        Step("Second part", f"{s2} * {h2}", d2, " km"),
        Step("Total distance", f"{d1} + {d2}", d1 + d2, " km"),
    )
    return Problem(question, d1 + d2, steps)


def wp_travel_time(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    speed, done_h, left_h = rng.randint(4, 12) * 10, rng.randint(1, 4), rng.randint(1, 5)
    total = speed * (done_h + left_h)
    question = (
        f"{name} has to drive {total} km. After driving for {done_h} hours at {speed} km per hour, "
        f"{name} keeps the same speed. How many more hours will the trip take?"
    )
    done = speed * done_h
    steps = (
        Step("Distance driven", f"{speed} * {done_h}", done, " km"),
        Step("Distance left", f"{total} - {done}", total - done, " km"),
        Step("Hours left", f"{total - done} / {speed}", left_h, " hours"),
    )
    return Problem(question, left_h, steps)


SHARE_ITEMS = (("stickers", "sheets"), ("marbles", "bags"), ("crayons", "boxes"), ("cards", "packs"))


def wp_sharing(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    item, container = rng.choice(SHARE_ITEMS)
    packs, per_pack, friends = rng.randint(3, 9), rng.choice((6, 8, 10, 12, 15, 20)), rng.randint(3, 8)
    total = packs * per_pack
    kept = total % friends + friends * rng.randint(0, 2)
    if kept == 0:
        kept = friends
    question = (
        f"{name} has {packs} {container} of {item} with {per_pack} {item} in each. "
        f"{name} keeps {kept} {item} and shares the rest equally among {friends} friends. "
        "How many does each friend get?"
    )
    rest = total - kept
    steps = (
        Step(f"Total {item}", f"{packs} * {per_pack}", total),
        Step("Left to share", f"{total} - {kept}", rest),
        Step("Each friend gets", f"{rest} / {friends}", rest // friends),
    )
    return Problem(question, rest // friends, steps)


def wp_ages(rng: Random) -> Problem:
    young, old = two_names(rng)
    age, times, years = rng.randint(3, 14), rng.randint(2, 4), rng.randint(2, 10)
    older = age * times
    question = (
        f"{young} is {age} years old. {old} is {times} times as old as {young}. "
        f"In {years} years, what will their ages add up to?"
    )
    steps = (
        Step(f"{old}'s age now", f"{age} * {times}", older, " years"),
        Step("Sum of ages now", f"{age} + {older}", age + older, " years"),
        Step(
            f"Sum in {years} years (each is {years} older)",
            f"{age + older} + 2 * {years}",
            age + older + 2 * years,
        ),
    )
    return Problem(question, steps[-1].value, steps)


def wp_fence(rng: Random) -> Problem:
    length, width, cost = rng.randint(5, 40), rng.randint(3, 25), rng.randint(2, 15)
    place = rng.choice(("garden", "playground", "yard", "field"))
    question = (
        f"A rectangular {place} is {length} meters long and {width} meters wide. "
        f"Fencing costs ${cost} per meter. How many dollars does it cost to fence the whole {place}?"
    )
    perimeter = 2 * (length + width)
    steps = (
        Step("Perimeter", f"2 * ({length} + {width})", perimeter, " meters"),
        Step("Cost", f"{perimeter} * {cost}", perimeter * cost, " dollars"),
    )
    return Problem(question, perimeter * cost, steps)


def wp_floor_area(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    length, width = rng.randint(4, 15), rng.randint(3, 12)
    rug_l, rug_w = rng.randint(2, length - 1), rng.randint(2, width - 1)
    question = (
        f"{name}'s room has a rectangular floor {length} meters long and {width} meters wide. "
        f"A rug that is {rug_l} meters long and {rug_w} meters wide lies on it. "
        "How many square meters of floor are not covered by the rug?"
    )
    floor, rug = length * width, rug_l * rug_w
    steps = (
        Step("Floor area", f"{length} * {width}", floor, " square meters"),
        Step("Rug area", f"{rug_l} * {rug_w}", rug, " square meters"),
        Step("Uncovered", f"{floor} - {rug}", floor - rug, " square meters"),
    )
    return Problem(question, floor - rug, steps)


def wp_savings(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    start, weekly, weeks = rng.randint(5, 60), rng.randint(3, 25), rng.randint(3, 12)
    saved = start + weekly * weeks
    spend = rng.randint(5, saved - 1)
    item = rng.choice(("bike helmet", "video game", "jacket", "pair of shoes", "board game"))
    question = (
        f"{name} has ${start} saved and adds ${weekly} every week for {weeks} weeks. "
        f"Then {name} spends ${spend} on a {item}. How many dollars does {name} have left?"
    )
    steps = (
        Step("Money saved over the weeks", f"{weekly} * {weeks}", weekly * weeks, " dollars"),
        Step("Total before shopping", f"{start} + {weekly * weeks}", saved, " dollars"),
        Step("Left after buying", f"{saved} - {spend}", saved - spend, " dollars"),
    )
    return Problem(question, saved - spend, steps)


def wp_recipe(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    food = rng.choice(("cookies", "muffins", "pancakes", "rolls"))
    per_batch, cups, batches = rng.choice((6, 8, 10, 12, 24)), rng.randint(2, 5), rng.randint(2, 9)
    wanted = per_batch * batches
    question = (
        f"One batch of {food} makes {per_batch} {food} and uses {cups} cups of flour. "
        f"{name} wants to make {wanted} {food}. How many cups of flour are needed?"
    )
    steps = (
        Step("Batches needed", f"{wanted} / {per_batch}", batches),
        Step("Flour", f"{batches} * {cups}", batches * cups, " cups"),
    )
    return Problem(question, batches * cups, steps)


def wp_reading(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    per_day, days, extra = rng.randint(8, 40), rng.randint(3, 10), rng.randint(5, 30)
    pages = per_day * days + extra + rng.randint(10, 200)
    question = (
        f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days "
        f"and then {extra} more pages on the weekend. How many pages are still unread?"
    )
    read = per_day * days + extra
    steps = (
        Step("Pages read on weekdays", f"{per_day} * {days}", per_day * days),
        Step("Pages read in total", f"{per_day * days} + {extra}", read),
        Step("Pages left", f"{pages} - {read}", pages - read),
    )
    return Problem(question, pages - read, steps)


def wp_wages(rng: Random) -> Problem:
    name = rng.choice(NAMES)
    rate, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 6)
    earned = rate * hours * days
    spend = rng.randint(10, earned - 1)
    question = (
        f"{name} earns ${rate} per hour and works {hours} hours a day for {days} days. "
        f"{name} then spends ${spend} on groceries. How many dollars are left?"
    )
    steps = (
        Step("Earned per day", f"{rate} * {hours}", rate * hours, " dollars"),
        Step("Earned in total", f"{rate * hours} * {days}", earned, " dollars"),
        Step("Left after groceries", f"{earned} - {spend}", earned - spend, " dollars"),
    )
    return Problem(question, earned - spend, steps)


def wp_bus(rng: Random) -> Problem:
    start = rng.randint(15, 50)
    off1, on1 = rng.randint(2, start - 5), rng.randint(2, 20)
    after1 = start - off1 + on1
    off2 = rng.randint(1, after1 - 1)
    question = (
        f"A bus leaves the station with {start} passengers. At the first stop {off1} people get off "
        f"and {on1} get on. At the second stop {off2} people get off. How many passengers are on the bus now?"
    )
    steps = (
        Step("After the first stop", f"{start} - {off1} + {on1}", after1),
        Step("After the second stop", f"{after1} - {off2}", after1 - off2),
    )
    return Problem(question, after1 - off2, steps)


WORD_TEMPLATES: tuple[Callable[[Random], Problem], ...] = (
    wp_shopping,
    wp_distance,
    wp_travel_time,
    wp_sharing,
    wp_ages,
    wp_fence,
    wp_floor_area,
    wp_savings,
    wp_recipe,
    wp_reading,
    wp_wages,
    wp_bus,
)

GENERATORS: dict[str, Callable[[Random], Problem]] = {
    "addition": make_addition,
    "subtraction": make_subtraction,
    "multiplication": make_multiplication,
    "division": make_division,
    "order_of_operations": make_order_of_operations,
    "percent": make_percent,
}


# --------------------------------------------------------------------------- checks and output


def ensure(condition: bool, message: str) -> None:
    """Like ``assert`` but also active under ``python -O``."""
    if not condition:
        raise AssertionError(message)


def check(category: str, problem: Problem) -> None:
    """Recompute the answer independently and fail loudly on any mismatch."""
    answer = Fraction(problem.answer)
    ensure(Fraction(str(to_answer(answer))) == answer, f"answer needs more than 2 decimals: {problem}")
    for step in problem.steps:
        ensure(evaluate(step.expr) == step.value, f"wrong step {step} in {problem.question!r}")
    ensure(Fraction(problem.steps[-1].value) == answer, f"last step is not the answer: {problem}")
    if category in ARITHMETIC:
        exprs = EXPR_RE.findall(problem.question)
        ensure(len(exprs) == 1, f"expected one expression in {problem.question!r}")
        ensure(evaluate(exprs[0]) == answer, f"question does not evaluate to answer: {problem}")
    elif category == "percent":
        match = re.fullmatch(r"\D*?(\d+)% of (\d+)\D*", problem.question)
        if match is None:
            raise AssertionError(f"unexpected percent question {problem.question!r}")
        ensure(Fraction(int(match[1]) * int(match[2]), 100) == answer, f"wrong percent answer: {problem}")
    else:
        ensure(not READY_MADE_RE.search(problem.question), f"ready-made expression in {problem.question!r}")
        ensure(answer.denominator == 1 and answer >= 0, f"word problem answer must be a whole number: {problem}")


def build(seed: int, count: int) -> list[dict[str, object]]:
    rng = Random(seed)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(count)]
    rng.shuffle(categories)
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    word_index = 0
    for index, category in enumerate(categories, start=1):
        if category == "word_problem":
            generator = WORD_TEMPLATES[word_index % len(WORD_TEMPLATES)]
            word_index += 1
        else:
            generator = GENERATORS[category]
        problem = generator(rng)
        while problem.question in seen:  # keep questions unique
            problem = generator(rng)
        seen.add(problem.question)
        check(category, problem)
        answer = to_answer(problem.answer)
        solution = "\n".join([*(step.render() for step in problem.steps), f"#### {answer}"])
        rows.append(
            {
                "id": f"math-{index:04d}",
                "category": category,
                "question": problem.question,
                "answer": answer,
                "solution": solution,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate data/math/questions.jsonl.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of questions (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL path (default: next to script)")
    args = parser.parse_args()

    rows = build(args.seed, args.count)
    with args.out.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    main()

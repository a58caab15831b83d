"""A seeded generator of small verifiable tasks, so every benchmark runs with no data at all.

Number tasks are one- or two-step word problems with integer answers; choice tasks ask for the result of a
small computation among four numeric options. The same seed always gives the same tasks.

>>> from kvmas.tasks.generator import generate_tasks
>>> ts = generate_tasks(4, seed=1)
>>> [t.kind for t in ts]
['number', 'choice', 'number', 'choice']
>>> generate_tasks(4, seed=1) == ts
True
"""

from __future__ import annotations

import random
from typing import Literal

from kvmas.errors import BadInputError
from kvmas.tasks.task import Choice, Task

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def _number_task(rng: random.Random, idx: int, seed: int) -> Task:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    form = rng.randrange(4)
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 9)
    if form == 0:
        q, ans = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    elif form == 1:
        a = a + b
        q, ans = f"{name} had {a} {item} and gave away {b}. How many {item} are left?", a - b
    elif form == 2:
        q = f"{name} buys {c} boxes with {b} {item} in each box, then finds {a} more. How many {item} in total?"
        ans = c * b + a
    else:
        total = b * c
        q = f"{name} shares {total} {item} equally among {c} friends. How many {item} does each friend get?"
        ans = b
    return Task(id=f"synth-{seed}-{idx}", question=q, answer=str(ans), kind="number", source="synthetic")


def _choice_task(rng: random.Random, idx: int, seed: int) -> Task:
    a, b = rng.randint(3, 15), rng.randint(3, 15)
    op = rng.choice(["+", "*", "-"])
    ans = {"+": a + b, "*": a * b, "-": a - b}[op]
    wrong: set[int] = set()
    while len(wrong) < 3:
        cand = ans + rng.choice([-1, 1]) * rng.randint(1, 6)
        if cand != ans:
            wrong.add(cand)
    values = [ans, *sorted(wrong)]
    rng.shuffle(values)
    labels = ["A", "B", "C", "D"]
    choices = tuple(Choice(label=lab, text=str(v)) for lab, v in zip(labels, values))
    gold = labels[values.index(ans)]
    return Task(id=f"synth-{seed}-{idx}", question=f"What is {a} {op} {b}?", answer=gold, kind="choice",
                choices=choices, source="synthetic")


def generate_tasks(n: int = 20, seed: int = 0,
                   kind: Literal["mixed", "number", "choice"] = "mixed") -> list[Task]:
    """``n`` tasks from ``seed``; ``kind="mixed"`` alternates number and choice tasks."""
    if not 1 <= n <= 100_000:
        raise BadInputError(f"n must be between 1 and 100000, got {n}")
    if kind not in ("mixed", "number", "choice"):
        raise BadInputError(f"unknown synthetic kind {kind!r} (mixed|number|choice)")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = kind if kind != "mixed" else ("number" if i % 2 == 0 else "choice")
        out.append(_number_task(rng, i, seed) if k == "number" else _choice_task(rng, i, seed))
    return out

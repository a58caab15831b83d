"""Shapley values of players under a coalition value function: exact up to 8 players, sampled beyond.

``value(coalition)`` takes a frozenset of players and returns a float; it is memoised, so each coalition is
evaluated once (important when a value is a counterfactual replay).

>>> v = lambda s: float(len(s & {"a", "b"}) == 2) + 0.5 * ("c" in s)
>>> phi = shapley(["a", "b", "c"], v)
>>> round(phi["a"], 3), round(phi["b"], 3), round(phi["c"], 3)
(0.5, 0.5, 0.5)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from itertools import combinations

from kvmas.errors import BadInputError

EXACT_MAX = 8


class ShapleyResult(dict):
    """``{player: phi}`` plus ``exact`` (bool), ``evaluations`` (distinct coalitions valued) and ``stderr``."""

    exact: bool = True
    evaluations: int = 0
    stderr: dict


def shapley(
    players: Sequence[Hashable],
    value: Callable[[frozenset], float],
    exact_max: int = EXACT_MAX,
    samples: int = 200,
    seed: int = 0,
) -> ShapleyResult:
    """Shapley value of every player. Exact enumeration for ``len(players) <= exact_max``, else Monte-Carlo
    over ``samples`` random permutations (antithetic pairs), with a per-player standard error."""
    players = list(dict.fromkeys(players))
    if not players:
        raise BadInputError("shapley: no players")
    if samples < 1:
        raise BadInputError("shapley: samples must be >= 1")
    cache: dict[frozenset, float] = {}

    def v(s: frozenset) -> float:
        if s not in cache:
            cache[s] = float(value(s))
        return cache[s]

    n = len(players)
    res = ShapleyResult()
    if n <= exact_max:
        w = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
        for p in players:
            others = [q for q in players if q != p]
            tot = 0.0
            for k in range(n):
                for combo in combinations(others, k):
                    s = frozenset(combo)
                    tot += w[k] * (v(s | {p}) - v(s))
            res[p] = tot
        res.exact, res.stderr = True, {p: 0.0 for p in players}
    else:
        rng = random.Random(seed)
        contrib: dict = {p: [] for p in players}
        for t in range(samples):
            if t % 2 == 0:
                order = players[:]
                rng.shuffle(order)
            else:
                order = order[::-1]  # antithetic: the reversed permutation lowers the variance
            s: frozenset = frozenset()
            prev = v(s)
            for p in order:
                s2 = s | {p}
                cur = v(s2)
                contrib[p].append(cur - prev)
                s, prev = s2, cur
        for p in players:
            xs = contrib[p]
            m = sum(xs) / len(xs)
            res[p] = m
        res.exact = False
        res.stderr = {
            p: math.sqrt(sum((x - res[p]) ** 2 for x in contrib[p]) / max(1, len(contrib[p]) - 1) / len(contrib[p]))
            for p in players
        }
    res.evaluations = len(cache)
    return res

"""Small-sample statistics, the one place for them: Wilson intervals, exact McNemar, paired bootstrap (seeded).

>>> from kvmas.stats import wilson, mcnemar_exact
>>> lo, hi = wilson(5, 20)
>>> round(lo, 3), round(hi, 3)
(0.112, 0.469)
>>> mcnemar_exact([1, 1, 1, 1, 0], [0, 0, 0, 0, 0]).p_value
0.125
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvmas.errors import BadInputError


def _as_array(values: Sequence[float] | np.ndarray, what: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise BadInputError(f"{what} is empty")
    return arr


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); ``(0, 1)`` when ``n == 0``."""
    if n < 0 or successes < 0 or successes > n:
        raise BadInputError(f"wilson needs 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling items)."""
    arr = _as_array(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    means = arr[idx].mean(axis=1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``a_only`` items only A got right, ``b_only`` only B; two-sided binomial p-value."""

    a_only: int
    b_only: int
    p_value: float

    @classmethod
    def from_counts(cls, a_only: int, b_only: int) -> "McNemar":
        """The test from the discordant counts alone."""
        n = a_only + b_only
        if n == 0:
            return cls(a_only, b_only, 1.0)
        tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
        return cls(a_only, b_only, min(1.0, 2 * tail))


def mcnemar_exact(a: Sequence[int | bool], b: Sequence[int | bool]) -> McNemar:
    """Exact (binomial) McNemar test on paired 0/1 outcomes of the same items."""
    xa, xb = _as_array(a, "a").astype(bool), _as_array(b, "b").astype(bool)
    if xa.size != xb.size:
        raise BadInputError(f"paired outcomes differ in length: {xa.size} vs {xb.size}")
    return McNemar.from_counts(int(np.sum(xa & ~xb)), int(np.sum(~xa & xb)))


@dataclass(frozen=True)
class PairedDiff:
    """Mean difference A - B over paired items with a bootstrap interval."""

    diff: float
    lo: float
    hi: float


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> PairedDiff:
    """Bootstrap interval of mean(a - b), resampling items so the pairing is kept."""
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.size != xb.size:
        raise BadInputError(f"paired outcomes differ in length: {xa.size} vs {xb.size}")
    lo, hi = bootstrap_ci(xa - xb, n_boot=n_boot, seed=seed, level=level)
    return PairedDiff(float(np.mean(xa - xb)), lo, hi)

"""A learned step scorer: a conditional-logit (softmax over the steps of one log) on step features, fitted by
L2-regularised Newton steps in numpy, with k-fold cross-validation helpers. Weights save/load as JSON.

>>> import numpy as np
>>> groups = [np.array([[1.0, 0.0], [0.0, 1.0]])] * 20
>>> sc = StepScorer(["a", "b"]).fit(groups, [0] * 20)
>>> int(sc.probs(groups[0]).argmax())
0
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kvmas.errors import BadInputError, SchemaVersionError
from kvmas.paths import atomic_write_text, read_json

WEIGHTS_SCHEMA = 1


class StepScorer:
    """Softmax over a log's steps of ``x_i · w``; ``fit(groups, labels)`` where ``groups[k]`` is an
    (n_steps, n_features) array and ``labels[k]`` the index of the decisive step."""

    def __init__(self, names: list[str], l2: float = 1.0) -> None:
        self.names = list(names)
        self.l2 = float(l2)
        self.w = np.zeros(len(self.names))

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=float) @ self.w

    def probs(self, x: np.ndarray) -> np.ndarray:
        s = self.scores(x)
        s = s - s.max()
        p = np.exp(s)
        return p / p.sum()

    def fit(self, groups: list[np.ndarray], labels: list[int], iters: int = 50) -> "StepScorer":
        if len(groups) != len(labels) or not groups:
            raise BadInputError("scorer: need as many labels as groups, and at least one")
        d = len(self.names)
        w = np.zeros(d)
        for _ in range(iters):
            grad = self.l2 * w
            hess = self.l2 * np.eye(d)
            for x, y in zip(groups, labels):
                x = np.asarray(x, dtype=float)
                s = x @ w
                p = np.exp(s - s.max())
                p /= p.sum()
                mu = p @ x
                grad -= x[y] - mu
                xc = x - mu
                hess += (xc * p[:, None]).T @ xc
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        self.w = w
        return self

    def to_json(self) -> str:
        return json.dumps({"schema": WEIGHTS_SCHEMA, "l2": self.l2,
                           "weights": dict(zip(self.names, map(float, self.w)))}, indent=1)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "StepScorer":
        """Weights written by :meth:`save`; anything else is a :class:`BadInputError` naming the field."""
        raw = read_json(path, "scorer weights")
        if not isinstance(raw, dict) or not isinstance(raw.get("weights"), dict):
            raise BadInputError(f"{path}: not scorer weights (no 'weights' object)")
        schema, l2, weights = raw.get("schema", 0), raw.get("l2", 1.0), raw["weights"]
        if not _number(schema) or int(schema) != schema:
            raise BadInputError(f"{path}: schema must be an integer")
        if schema > WEIGHTS_SCHEMA:
            raise SchemaVersionError(f"{path}: weights schema {schema} is newer than {WEIGHTS_SCHEMA}")
        if not _number(l2) or l2 < 0:
            raise BadInputError(f"{path}: l2 must be a non-negative number")
        bad = next((k for k, v in weights.items() if not _number(v)), None)
        if bad is not None:
            raise BadInputError(f"{path}: weights.{bad} must be a finite number")
        sc = cls(list(weights), l2=float(l2))
        sc.w = np.array([float(v) for v in weights.values()])
        return sc


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def kfold(n: int, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint test-index folds covering ``range(n)`` after a seeded shuffle.

    >>> [len(f) for f in kfold(10, 3)]
    [4, 3, 3]
    """
    if k < 2 or n < k:
        raise BadInputError(f"kfold: need 2 <= k <= n (k={k}, n={n})")
    idx = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(idx, k)]

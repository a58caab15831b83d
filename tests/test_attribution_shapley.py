"""Shapley values: axioms on exact enumeration, sampled estimates beyond 8 players, surrogate blame."""

import math

import networkx as nx
import pytest

from kvmas.attribution.blame import surrogate_blame
from kvmas.attribution.shapley import shapley
from kvmas.errors import BadInputError


def test_axioms_exact():
    w = {"a": 3.0, "b": 1.0, "c": 0.0}
    v = lambda s: sum(w[p] for p in s) + (2.0 if {"a", "b"} <= s else 0.0)  # noqa: E731
    phi = shapley(["a", "b", "c"], v)
    assert phi.exact and phi.evaluations == 8
    assert math.isclose(sum(phi.values()), v(frozenset("abc")) - v(frozenset()))  # efficiency
    assert math.isclose(phi["a"], 4.0) and math.isclose(phi["b"], 2.0)  # interaction split equally
    assert phi["c"] == 0.0  # null player


def test_sampled_beyond_eight_players():
    players = [f"p{i}" for i in range(10)]
    v = lambda s: float(len(s) >= 5)  # noqa: E731 - symmetric game: every phi is 0.1
    phi = shapley(players, v, samples=400, seed=1)
    assert not phi.exact
    assert math.isclose(sum(phi.values()), 1.0, abs_tol=1e-9)  # permutation estimates stay efficient
    assert all(abs(phi[p] - 0.1) < 4 * phi.stderr[p] + 0.03 for p in players)


def test_bad_args():
    with pytest.raises(BadInputError):
        shapley([], lambda s: 0.0)


def test_surrogate_blame_prefers_upstream_error():
    perf = nx.DiGraph([(0, 1), (1, 2), (2, "Y")])
    b = surrogate_blame(["a", "b", "a"], [0.1, 0.7, 0.1], perf, players=["a", "b"])
    assert b[0].agent == "b" and b[0].delta > 0
    # a step that does not reach the outcome carries no blame
    perf2 = nx.DiGraph([(0, "Y"), (1, 2)])
    b2 = surrogate_blame(["a", "b", "b"], [0.2, 0.9, 0.9], perf2, players=["a", "b"])
    assert {r.agent: r.phi for r in b2}["b"] == 0.0

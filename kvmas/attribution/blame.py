"""Agent blame for logs that cannot be re-run: Shapley values under a graph-surrogate value function.

Value function (stated): every step ``k`` has a local error probability ``e_k`` (the critical-step scorer's
probability that ``k`` is the decisive error). An error propagates along the performance-causal graph, so the
run fails if any step with an own error is an ancestor of the outcome ``Y`` (noisy-OR). Repairing a coalition
``S`` of agents zeroes the own errors of their steps::

    v(S) = P(success | S repaired) = prod_{k in anc(Y), agent(k) not in S} (1 - e_k)

Tool / terminal outputs are not players (they execute what an agent wrote). The bottleneck score is CDC-MAS's
``BS_j = phi_j * (v({j}) - v(empty))``.

>>> import networkx as nx
>>> g = nx.DiGraph([(0, 1), (1, "Y")])
>>> b = surrogate_blame(["a", "b"], [0.8, 0.1], g, players=["a", "b"])
>>> b[0].agent, b[0].phi > b[1].phi
('a', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from kvmas.attribution.graph import OUTCOME
from kvmas.attribution.shapley import shapley


@dataclass
class AgentBlame:
    """One agent's Shapley value ``phi``, single-agent counterfactual effect ``delta`` and ``score`` = phi*delta."""

    agent: str
    phi: float
    delta: float
    score: float
    exact: bool = True


def surrogate_blame(
    step_agents: list[str],
    step_errors: list[float],
    perf: nx.DiGraph | set[int],
    players: list[str] | None = None,
    seed: int = 0,
) -> list[AgentBlame]:
    """Shapley blame of ``players`` (default: every agent) from per-step error probabilities on ``perf``
    (or directly the set of step indices upstream of the outcome).

    Sorted by bottleneck score, best first; ties keep the order of first appearance.
    """
    players = list(dict.fromkeys(players if players is not None else step_agents))
    if isinstance(perf, nx.DiGraph):
        anc = nx.ancestors(perf, OUTCOME) if OUTCOME in perf else set(range(len(step_agents)))
    else:
        anc = set(perf)
    live = [k for k in range(len(step_agents)) if k in anc]
    # log-survival per agent: v(S) = prod over live steps of agents outside S of (1 - e_k)
    logs: dict[str, float] = {}
    zero: dict[str, int] = {}  # steps with e_k = 1 (certain error) per agent
    for k in live:
        e = min(max(float(step_errors[k]), 0.0), 1.0)
        a = step_agents[k]
        if e >= 1.0:
            zero[a] = zero.get(a, 0) + 1
        else:
            logs[a] = logs.get(a, 0.0) + math.log1p(-e)

    def value(coalition: frozenset) -> float:
        if any(a not in coalition for a in zero):
            return 0.0
        return math.exp(sum(v for a, v in logs.items() if a not in coalition))

    phi = shapley(players, value, seed=seed)
    base = value(frozenset())
    rows = [
        AgentBlame(p, phi[p], value(frozenset([p])) - base, phi[p] * (value(frozenset([p])) - base), phi.exact)
        for p in players
    ]
    return sorted(rows, key=lambda b: -b.score)

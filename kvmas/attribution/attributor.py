"""The log attributor: who (agent blame) and when (critical step) for a failed run that cannot be re-run.

Pipeline: features per step -> learned step scorer (softmax over the log's steps) -> per-step error
probabilities -> Shapley agent blame on the performance-causal graph (:mod:`kvmas.attribution.blame`) ->
bottleneck agent -> its highest-scoring step is the critical step. Every ranked step carries its evidence.

>>> from kvmas.attribution.log import from_generic
>>> log = from_generic([{"agent": "planner", "content": "Let's assume the population is 5000."},
...                     {"agent": "checker", "content": "Verified. The answer is 5000."},
...                     {"agent": "checker", "content": "TERMINATE"}])
>>> res = LogAttributor().attribute(log)
>>> res.agent, res.step
('planner', 0)
"""

from __future__ import annotations

from typing import Literal

import networkx as nx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kvmas.attribution.blame import surrogate_blame
from kvmas.attribution.features import step_features
from kvmas.attribution.graph import OUTCOME
from kvmas.attribution.log import AttributionLog
from kvmas.attribution.scorer import StepScorer
from kvmas.attribution.portable import PORTABLE, portable_features
from kvmas.attribution.weights import DEFAULT_WEIGHTS_GT, PORTABLE_WEIGHTS

AgentRule = Literal["shapley", "speaker"]


class RankedStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int
    agent: str
    score: float
    evidence: list[str] = Field(default_factory=list)


class BlameRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str
    phi: float
    delta: float
    score: float


class Attribution(BaseModel):
    """The answer: predicted ``agent`` and ``step``, blame per agent, ranked steps with evidence."""

    model_config = ConfigDict(extra="forbid")

    log_id: str
    agent: str
    step: int
    method: str
    blame: list[BlameRow]
    ranking: list[RankedStep]
    value_function: str
    evidence: list[str] = Field(default_factory=list)
    suggested_fix: str = ""


VALUE_FUNCTION = (
    "graph surrogate: v(S) = prod over steps k upstream of the outcome whose agent is not in S of (1 - e_k), "
    "e_k = learned probability that step k is the decisive error"
)


class LogAttributor:
    """Attributes external logs with a learned step scorer (default: the portable features and their shipped
    weights); ``agent_rule`` picks who: the Shapley bottleneck (CDC-MAS style, the default for the development
    set's features) or the speaker of the top-ranked step (the default for portable ones). ``judge`` (a
    :class:`~kvmas.attribution.judge.LogJudge`) re-ranks the scorer's top ``judge_k`` blameable steps by its
    mistake verdicts (:func:`rerank`); the agent is then the chosen step's speaker."""

    def __init__(self, scorer: StepScorer | None = None, with_gt: bool = False,
                 agent_rule: AgentRule | None = None, judge=None, judge_k: int = 3) -> None:
        if scorer is None:
            # the portable features by default; the development set's features when the gold answer is used
            w = DEFAULT_WEIGHTS_GT if with_gt else PORTABLE_WEIGHTS
            scorer = StepScorer(list(w))
            scorer.w = np.array([w[k] for k in w], dtype=float)
        self.scorer = scorer
        self.with_gt = with_gt
        # portable scorers name the speaker of the top step: over a long log the surrogate's Shapley values
        # add up many small step probabilities, so they track how often an agent speaks, not what it did
        self.agent_rule: AgentRule = agent_rule or ("speaker" if self.scorer.names == PORTABLE else "shapley")
        self.judge, self.judge_k = judge, judge_k

    def attribute(self, log: AttributionLog) -> Attribution:
        if self.scorer.names == PORTABLE:
            fx, cand = portable_features(log)
        else:
            fx, cand = step_features(log, with_gt=self.with_gt and log.ground_truth is not None), None
            if fx.names != self.scorer.names:
                fx = step_features(log, with_gt=self.with_gt)
                if fx.names != self.scorer.names:
                    fx.rows = [[dict(zip(fx.names, r)).get(k, 0.0) for k in self.scorer.names] for r in fx.rows]
        x = np.array(fx.rows)
        cand = cand if cand is not None else list(range(len(log.steps)))
        probs = np.zeros(len(log.steps))
        probs[cand] = self.scorer.probs(x[cand])
        agents = [s.agent for s in log.steps]
        players = list(dict.fromkeys(agents[i] for i in cand)) if fx.names == PORTABLE else players_of(log)
        agent, step, blame, order = decide(probs, agents, players, live_steps(fx.perf), self.agent_rule)
        ranking = [RankedStep(step=i, agent=agents[i], score=float(probs[i]), evidence=fx.evidence[i])
                   for i in order if i in set(cand)]
        method = f"log/{self.agent_rule}"
        judged: list[str] = []
        if self.judge is not None:
            top = [r.step for r in ranking if r.agent in players][:max(1, self.judge_k)]
            verdicts = dict(zip(top, self.judge.verdicts(log, top)))  # one shared prefill for the top steps
            step = rerank(probs, top, verdicts.__getitem__, k=len(top))
            agent, method = agents[step], f"log/speaker+judge({self.judge.model.name}, top {len(top)})"
            judged = [f"judge verdicts (log-odds of a mistake) on the scorer's top {len(top)}: "
                      + ", ".join(f"step {i} {v:+.2f}" for i, v in verdicts.items())]
        chosen = next(r for r in ranking if r.step == step)
        ev = [f"step {step} ({agent}) ranks {ranking.index(chosen) + 1}/{len(ranking)} "
              f"with p={chosen.score:.2f}"] + judged + chosen.evidence
        return Attribution(
            log_id=log.log_id, agent=agent, step=step, method=method,
            blame=[BlameRow(agent=b.agent, phi=b.phi, delta=b.delta, score=b.score) for b in blame],
            ranking=ranking, value_function=VALUE_FUNCTION, evidence=ev,
            suggested_fix=suggest_fix(log, step, chosen.evidence),
        )


def rerank(probs: np.ndarray, order: list[int], verdict, k: int = 3, weight: float = 1.0) -> int:
    """The best of the scorer's top ``k`` steps (``order``, best first) by ``log p + weight * verdict(step)``.

    >>> rerank(np.array([0.5, 0.3, 0.2]), [0, 1, 2], lambda i: 3.0 if i == 1 else 0.0, k=2)
    1
    """
    top = order[:max(1, k)]
    return max(top, key=lambda i: (float(np.log(max(float(probs[i]), 1e-12))) + weight * verdict(i), -order.index(i)))


def players_of(log: AttributionLog) -> list[str]:
    """Blame players: every agent except tool / terminal outputs (all agents if only tools speak)."""
    tools = {s.agent for s in log.steps if s.is_terminal}
    return [a for a in log.agents() if a not in tools] or log.agents()


def live_steps(perf: nx.DiGraph) -> set[int]:
    """Steps upstream of the outcome in the performance-causal graph."""
    return {k for k in nx.ancestors(perf, OUTCOME) if k != OUTCOME}


def decide(probs, agents: list[str], players: list[str], live: set[int], agent_rule: AgentRule = "shapley"):
    """From step probabilities to ``(agent, step, blame, step_order)``.

    ``shapley``: the bottleneck agent (max phi*delta), then its best step; ``speaker``: the best step whose
    speaker is a player, and that speaker.
    """
    blame = surrogate_blame(agents, [float(p) for p in probs], live, players=players)
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    if agent_rule == "shapley":
        agent = blame[0].agent
        step = next(i for i in order if agents[i] == agent)
    else:
        step = next((i for i in order if agents[i] in players), order[0])
        agent = agents[step]
    return agent, step, blame, order


def suggest_fix(log: AttributionLog, step: int, evidence: list[str]) -> str:
    """A short, rule-based repair suggestion for the critical step, from its evidence."""
    s = log.steps[step]
    text = " ".join(evidence)
    if "assumption" in text:
        return (f"Make {s.agent} fetch or compute the real data instead of assuming values at step {step}; "
                "add 'never invent or assume data; say what is missing' to its instructions.")
    if "result right after" in text:
        return (f"Have {s.agent} check why the result after step {step} failed or came back empty, and change its "
                "request (another query, source or tool) instead of going on without it.")
    if "a loop" in text:
        return f"Stop the loop at step {step}: have {s.agent} try a different action instead of repeating itself."
    if "execution right after" in text:
        return f"Have {s.agent} fix the code of step {step} (read the error) before anyone builds on its output."
    if "final answer repeats" in text:
        return (f"Add a verification turn that re-derives the value {s.agent} introduced at step {step} from "
                "an independent source before it becomes the final answer.")
    return (f"Re-run from step {step} with {s.agent} instructed to check its claim against the task "
            "constraints before handing over.")

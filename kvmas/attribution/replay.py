"""Counterfactual attribution of OUR runs by real replays: re-run the same pipeline, same seed, with an agent's
contribution ablated (or replaced) through ``RunContext.interventions``, and see whether the outcome flips.

* Agent blame: exact Shapley over agents (sampled beyond 8) of the game
  ``v(S) = judge(replay with every agent of S ablated) - judge(original run)``:
  an agent whose removal repairs the run gets positive blame; ``delta_j = v({j})`` is its single-agent effect.
  Ablating the answering agent removes its steps except the answer turn (its last instruction and the answer),
  so that the run still answers: otherwise every coalition holding it scores "no answer" and the game is void.
* Who: the agent with the largest Shapley value (when every value is 0, the agent of the flipping step).
* When (critical step): the earliest agent step whose ablation alone (``Intervention("ablate", steps={k})``)
  flips the outcome to a success; candidates are the steps upstream of the answer in the exact provenance graph.
  When nothing upstream repairs the run, the answer step itself is where it fails (its agent is blamed).

``run(interventions) -> result`` re-executes the pipeline (e.g. ``lambda iv: prim(q, model, seed=s,
interventions=iv)``) and must return something with ``.answer`` and ``.trace``; ``judge(answer) -> float`` in
[0, 1] (1 = correct). Replays are memoised per intervention set.

>>> from types import SimpleNamespace as NS
>>> from kvmas.trace import Trace, Step
>>> def run(iv):  # a two-agent pipeline: "bad" writes 7, "good" would write 5
...     t = Trace(question="2+3?")
...     a = "" if "bad" in iv else "7"
...     t.add(Step(agent="bad", role="r", action="speak", writes=[1], text_out=a))
...     t.add(Step(agent="good", role="r", action="speak", reads=[1], writes=[2], text_out=a or "5"))
...     return NS(answer=a or "5", trace=t)
>>> res = ReplayAttributor(run, judge=lambda a: float(a == "5")).attribute(run({}).trace)
>>> res.agent, res.step, res.method
('bad', 0, 'replay')
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from kvmas.agents.agent import Intervention
from kvmas.attribution.attributor import Attribution, BlameRow, RankedStep
from kvmas.attribution.graph import OUTCOME, data_graph
from kvmas.attribution.log import from_trace
from kvmas.attribution.shapley import shapley
from kvmas.errors import BadInputError
from kvmas.trace import Trace

CONTENT_ACTIONS = ("speak", "think")
VALUE_FUNCTION = ("real replays: v(S) = judge(answer of the run re-executed with every agent in S ablated) "
                  "- judge(original answer); same pipeline, same seed; the answering agent keeps its answer turn")


@dataclass
class Replay:
    """One counterfactual re-execution: what was changed, the answer and its judged score."""

    label: str
    answer: str | None
    score: float
    steps: int


class NotReplayable(BadInputError):
    """A counterfactual that cannot be expressed on top of the run's own interventions."""


def compose(base: dict[str, Intervention], change: dict[str, Intervention]) -> dict[str, Intervention]:
    """Counterfactual ``change`` on top of a run's own ``base`` interventions (e.g. a planted fault).

    The contract allows one intervention per agent: a change on an agent that already has one is allowed when it
    covers every step the base one covers (it then supersedes it), otherwise :class:`NotReplayable`.

    >>> compose({"a": Intervention("replace", "x", {3})}, {"a": Intervention("ablate", steps={3})})["a"].kind
    'ablate'
    """
    out = dict(base)
    for agent, iv in change.items():
        old = base.get(agent)
        if old is not None and not (iv.steps is None or (old.steps is not None and old.steps <= iv.steps)):
            raise NotReplayable(f"cannot ablate {agent} at {sorted(iv.steps or [])} while it keeps its "
                                f"own intervention at {sorted(old.steps or []) or 'every step'}")
        out[agent] = iv
    return out


def answer_step(trace: Trace):
    """The step that produced the answer: the last ``speak`` with text (else the last content step)."""
    content = [s for s in trace.steps if s.action in CONTENT_ACTIONS]
    spoken = [s for s in content if s.action == "speak" and (s.text_out or "").strip()]
    return (spoken or content)[-1]


def final_turn(trace: Trace, final) -> set[int]:
    """The answer step and the reads of the same agent right before it (its final instruction)."""
    turn = {final.index}
    i = final.index - 1
    while i >= 0 and trace.steps[i].agent == final.agent and trace.steps[i].action == "read":
        turn.add(i)
        i -= 1
    return turn


def agent_ablation(trace: Trace, agent: str, turn: set[int]) -> Intervention | None:
    """Remove ``agent``'s contributions: every step of it; for the answering agent, its content steps outside
    the answer turn (its reads stay, so that it can still answer). None when nothing is left to remove."""
    steps = {s.index for s in trace.steps if s.agent == agent}
    if not steps & turn:
        return Intervention("ablate")
    rest = {s.index for s in trace.steps if s.agent == agent and s.action in CONTENT_ACTIONS} - turn
    return Intervention("ablate", steps=rest) if rest else None


def _key(ivs: dict[str, Intervention]) -> str:
    return json.dumps({a: [iv.kind, iv.text, sorted(iv.steps) if iv.steps is not None else None]
                       for a, iv in sorted(ivs.items())})


class ReplayAttributor:
    """Attributes a failed kvmas run with counterfactual replays (see module docstring)."""

    def __init__(self, run: Callable[[dict[str, Intervention]], Any], judge: Callable[[str | None], float],
                 max_replays: int = 64, seed: int = 0) -> None:
        self.run = run
        self.judge = judge
        self.max_replays = max_replays
        self.seed = seed
        self.replays: dict[str, Replay] = {}

    def replay(self, ivs: dict[str, Intervention], label: str) -> Replay:
        k = _key(ivs)
        if k not in self.replays:
            if len(self.replays) >= self.max_replays:
                raise BadInputError(f"replay budget of {self.max_replays} exhausted")
            try:
                res = self.run(dict(ivs))
            except NotReplayable:
                raise
            except BadInputError as exc:  # the counterfactual run cannot complete: it produces no answer
                self.replays[k] = Replay(f"{label} (failed: {exc})", None, float(self.judge(None)), 0)
                return self.replays[k]
            ans = getattr(res, "answer", None)
            tr = getattr(res, "trace", None)
            self.replays[k] = Replay(label, ans, float(self.judge(ans)), len(tr.steps) if tr else 0)
        return self.replays[k]

    def attribute(self, trace: Trace, players: list[str] | None = None) -> Attribution:
        """Blame every agent of ``trace`` (or ``players``) and find the earliest flipping step."""
        log = from_trace(trace)
        content = [s for s in trace.steps if s.action in CONTENT_ACTIONS]
        if not content:
            raise BadInputError(f"trace {trace.run_id}: no agent step to attribute")
        final = answer_step(trace)
        turn = final_turn(trace, final)
        players = players or list(dict.fromkeys(s.agent for s in content))
        ablation = {a: agent_ablation(trace, a, turn) for a in players}
        players = [a for a in players if ablation[a] is not None]
        original = self.replay({}, "original")
        base = original.score
        evidence = [f"original replay: answer {original.answer!r}, score {base:.2f}",
                    f"answer step {final.index} ({final.agent}); an agent's ablation removes its steps except "
                    f"the answer turn {sorted(turn)}"]
        if trace.answer is not None and original.answer != trace.answer:
            evidence.append(f"warning: the replay is not deterministic (trace answer {trace.answer!r})")
        if base >= 1.0:
            evidence.append("warning: the run did not fail (score 1); blame is about what breaks it")

        def value(coalition: frozenset) -> float:
            ivs = {a: ablation[a] for a in coalition}
            label = "ablate " + ",".join(sorted(coalition)) if coalition else "original"
            try:
                return self.replay(ivs, label).score - base
            except NotReplayable as exc:
                evidence.append(f"coalition {sorted(coalition)} not replayable ({exc}); value 0")
                return 0.0

        phi = shapley(players, value, seed=self.seed) if players else {}
        blame = sorted(
            (BlameRow(agent=a, phi=phi[a], delta=value(frozenset([a])), score=phi[a]) for a in players),
            key=lambda b: (-b.score, -b.delta, players.index(b.agent)),
        )
        for b in blame:
            r = self.replays.get(_key({b.agent: ablation[b.agent]}))
            if r is not None:
                evidence.append(f"ablating {b.agent}: answer {r.answer!r}, score {base:.2f} -> {r.score:.2f}")
        # critical step: earliest single-step ablation that flips the outcome
        g = data_graph(log)
        perf = g.reverse(copy=True)
        perf.add_edge(final.index, OUTCOME)
        upstream = nx.ancestors(perf, OUTCOME)
        cands = [s for s in content if s.agent in players and s.index in upstream and s.index not in turn]
        ranking: list[RankedStep] = []
        critical = None
        for s in cands:
            try:
                r = self.replay({s.agent: Intervention("ablate", steps={s.index})}, f"ablate step {s.index}")
            except NotReplayable as exc:
                evidence.append(f"step {s.index} not replayable: {exc}")
                continue
            except BadInputError:
                evidence.append(f"replay budget exhausted before step {s.index}")
                break
            gain = r.score - base
            flipped = base < 0.5 <= r.score
            ev = [f"ablating step {s.index} ({s.agent} {s.action}): answer {r.answer!r}, score {base:.2f} -> "
                  f"{r.score:.2f}" + (" — flips the outcome" if flipped else "")]
            ranking.append(RankedStep(step=s.index, agent=s.agent, score=gain, evidence=ev))
            if flipped and critical is None:
                critical = s.index
        ranking.sort(key=lambda r: (-r.score, r.step))
        top = blame[0].agent if blame else final.agent
        informative = bool(blame) and blame[0].phi > 1e-9
        if critical is not None:
            if not informative:
                # no agent-level ablation changes the outcome (every phi is 0): the game cannot tell who, so the
                # agent is the one whose step-level ablation flipped it
                top = trace.steps[critical].agent
                evidence.append(f"every Shapley value is 0 (no whole-agent ablation flips the outcome); the agent "
                                f"is taken from the flipping step {critical}")
            evidence.append(f"step {critical} is the earliest step whose ablation flips the outcome")
        elif informative:  # an agent's ablation repairs the run, no single step alone does
            own = [r for r in ranking if r.agent == top]
            critical = own[0].step if own and own[0].score > 0 else next(
                (s.index for s in cands if s.agent == top), final.index)
            evidence.append("no single-step ablation flipped the outcome; critical step = best step of the "
                            "top-blamed agent")
        else:
            # nothing upstream repairs the run: it fails at the answer step itself, on inputs not to blame
            top, critical = final.agent, final.index
            evidence.append(f"no upstream ablation repairs the run: the answer step {final.index} ({final.agent}) "
                            f"is where it fails")
        agent = top
        fix = (f"Step {critical} ({agent}) decides the failure: re-run with {agent} re-prompted or constrained "
               f"(e.g. a verification turn on its output), or drop it if the pipeline succeeds without it.")
        return Attribution(log_id=trace.run_id, agent=agent, step=critical, method="replay", blame=blame,
                           ranking=ranking, value_function=VALUE_FUNCTION, evidence=evidence,
                           suggested_fix=fix)

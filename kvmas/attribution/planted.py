"""Planted-fault suite: force one agent of a real primitive run to err, then check that the replay attributor
names the planted agent and step.

For every (primitive, task): run it clean; for every agent, replace that agent's first (or last) content step (speak or
think) with a wrong claim (``Intervention("replace", ...)`` at that step); keep the case when the fault is
effective (the clean run is judged correct and the faulted one is not); attribute the faulted trace with
:class:`~kvmas.attribution.replay.ReplayAttributor` (same primitive, same seed, the planted fault kept in every
replay) and score agent and step hits.

>>> from kvmas.attribution.planted import number_judge
>>> number_judge("12")("So 7 + 5 = 12."), number_judge("12")("It is 13.")
(1.0, 0.0)
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvmas.agents.agent import Intervention
from kvmas.attribution.replay import CONTENT_ACTIONS, ReplayAttributor, compose
from kvmas.errors import BadInputError
from kvmas.tasks.answers import extract_number, format_number, parse_number
from kvmas.tasks.numbers import DIGITS

TASKS = [(f"What is {a} + {b}? Answer with a number.", str(a + b))
         for a, b in [(7, 5), (3, 4), (9, 6), (12, 8), (5, 5), (6, 2), (14, 3), (8, 9), (11, 11), (2, 7)]]


def arithmetic_tasks(n: int) -> list[tuple[str, str]]:
    """``n`` (question, gold) sums: :data:`TASKS` first, then more in the same form (deterministic).

    >>> arithmetic_tasks(12)[-1]
    ('What is 13 + 8? Answer with a number.', '21')
    """
    extra = [(a, b) for a in range(13, 40, 3) for b in range(4, 20, 4)]
    more = [(f"What is {a} + {b}? Answer with a number.", str(a + b)) for a, b in extra]
    return (TASKS + more)[:n]


FAULT_TEXT = "I have checked this carefully: the correct final answer is {wrong}."


def number_judge(gold: str) -> Callable[[str | None], float]:
    """1.0 when the answer's extracted number equals ``gold`` (exactly, as fractions), else 0.0."""

    g = parse_number(gold)
    if g is None:
        raise BadInputError(f"gold answer {gold!r} is not a number")

    def judge(answer: str | None) -> float:
        v = parse_number(extract_number(answer)) if answer else None
        return float(v is not None and v == g)

    return judge


def wrong_value(gold: str) -> str:
    """A plausible wrong number near ``gold`` (gold + 1 for integers)."""

    g = parse_number(gold)
    if g is None:
        raise BadInputError(f"gold answer {gold!r} is not a number")
    return format_number(g + 1)


@dataclass
class PlantedCase:
    primitive: str
    question: str
    gold: str
    agent: str
    step: int
    action: str
    clean_answer: str
    faulted_answer: str = ""
    effective: bool = False
    pred_agent: str | None = None
    pred_step: int | None = None
    agent_ok: bool = False
    step_ok: bool = False
    replays: int = 0
    decided_by: str = ""  # "flip": a step ablation flipped the outcome; "answer step": nothing upstream repairs
    # the run (the answer step is blamed); "agent only": an agent's ablation repairs it, no single step does
    wall_s: float = 0.0
    evidence: list[str] = field(default_factory=list)


def content_steps(trace, which: str = "first") -> dict[str, tuple[int, str]]:
    """Each agent's ``first`` or ``last`` content step (speak / think): ``{agent: (step index, action)}``."""
    if which not in ("first", "last"):
        raise BadInputError(f"plant must be 'first' or 'last', not {which!r}")
    out: dict[str, tuple[int, str]] = {}
    for s in trace.steps:
        if s.action in CONTENT_ACTIONS and (which == "last" or s.agent not in out):
            out[s.agent] = (s.index, s.action)
    return out


PLANT_SITES = ("first", "last", "each")


def plant_sites(trace, which: str = "first") -> list[tuple[str, int]]:
    """Where faults go, one per faulted run, in step order: each agent's ``first`` or ``last`` content step,
    or ``each`` content step of every agent (so that mistakes sit anywhere in a run, late ones included).

    >>> from kvmas.trace import Step, Trace
    >>> t = Trace(question="q")
    >>> for a in ("solver", "critic", "solver"):
    ...     _ = t.add(Step(agent=a, role=a, action="speak", text_out="x"))
    >>> plant_sites(t, "first"), plant_sites(t, "last"), plant_sites(t, "each")
    ([('solver', 0), ('critic', 1)], [('critic', 1), ('solver', 2)], [('solver', 0), ('critic', 1), ('solver', 2)])
    """
    if which not in PLANT_SITES:
        raise BadInputError(f"plant must be one of {', '.join(PLANT_SITES)}, not {which!r}")
    if which == "each":
        return [(s.agent, s.index) for s in trace.steps if s.action in CONTENT_ACTIONS]
    return sorted(((a, k) for a, (k, _action) in content_steps(trace, which).items()), key=lambda x: x[1])


def run_suite(primitives: dict[str, Any], tasks: list[tuple[str, str]], model, seed: int = 0,
              max_replays: int = 32, progress: Callable[[PlantedCase], None] | None = None,
              judge_for: Callable[[str], Callable[[str | None], float]] = number_judge,
              fault_for: Callable[[str], str] = lambda gold: FAULT_TEXT.format(wrong=wrong_value(gold)),
              plant: str = "first") -> dict[str, Any]:
    """Run the suite; ``primitives`` maps a label to a primitive object, ``tasks`` are (question, gold).
    ``judge_for(gold)`` builds the outcome judge (default: exact number match); ``fault_for(gold)`` the text the
    faulty agent is forced to produce (default: a confident claim of gold + 1); ``plant``: the agent's first or
    last content step receives the fault.

    Returns ``{"cases": [...], "effective": n, "agent_acc": %, "step_acc": %, "skipped": {...}}``.
    """
    cases: list[PlantedCase] = []
    skipped = {"clean_wrong": 0, "fault_ineffective": 0}
    for label, prim in primitives.items():
        for q, gold in tasks:
            judge = judge_for(gold)
            clean = prim(q, model=model, seed=seed)
            if judge(clean.answer) < 1.0:
                skipped["clean_wrong"] += 1
                continue
            text = fault_for(gold)
            for agent, (k, action) in content_steps(clean.trace, plant).items():
                t0 = time.perf_counter()
                planted = {agent: Intervention("replace", text, {k})}
                case = PlantedCase(label, q, gold, agent, k, action, clean.answer)

                def run(iv, _planted=planted, _prim=prim, _q=q):
                    return _prim(_q, model=model, seed=seed, interventions=compose(_planted, iv))

                faulted = run({})
                case.faulted_answer = faulted.answer
                if judge(faulted.answer) >= 1.0:
                    skipped["fault_ineffective"] += 1
                    case.wall_s = time.perf_counter() - t0
                    cases.append(case)
                    if progress:
                        progress(case)
                    continue
                case.effective = True
                att = ReplayAttributor(run, judge, max_replays=max_replays, seed=seed)
                try:
                    res = att.attribute(faulted.trace)
                    case.pred_agent, case.pred_step = res.agent, res.step
                    case.agent_ok, case.step_ok = res.agent == agent, res.step == k
                    case.evidence = res.evidence
                    case.decided_by = ("flip" if any("flips the outcome" in e for e in res.evidence) else
                                       "answer step" if any("is where it fails" in e for e in res.evidence) else
                                       "agent only")
                except BadInputError as exc:
                    case.evidence = [f"attribution failed: {exc}"]
                case.replays = len(att.replays)
                case.wall_s = time.perf_counter() - t0
                cases.append(case)
                if progress:
                    progress(case)
    return summarize([asdict(c) for c in cases], skipped)


def summarize(cases: list[dict[str, Any]], skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """Hit rates over effective cases, overall and for the cases an actual flip decided."""
    eff = [c for c in cases if c["effective"]]
    flip = [c for c in eff if c.get("decided_by") == "flip"]

    def pct(xs: list[dict], key: str) -> float | None:
        return round(100 * sum(c[key] for c in xs) / len(xs), 2) if xs else None

    return {"cases": cases, "effective": len(eff), "agent_acc": pct(eff, "agent_ok"), "step_acc": pct(eff, "step_ok"),
            "decided_by_flip": len(flip), "agent_acc_flip": pct(flip, "agent_ok"),
            "step_acc_flip": pct(flip, "step_ok"), "skipped": skipped or {}}


FAULTS = [  # a planted mistake, in a few voices: a confident claim, an assumption, a slip in the arithmetic
    "I have checked this carefully: the correct final answer is {wrong}.",
    "Let's assume the numbers were meant differently; then the result is {wrong}.",
    "Adding them up step by step gives {wrong}. The answer is {wrong}.",
]
FAULT_KINDS = ("claim", "slip")
_NUMBER_TOKEN = re.compile(r"(?<![\w.])" + DIGITS + r"(?![\w])")  # digits only: a slip keeps "$", signs, "/"


def slip(text: str, gold: str) -> str | None:
    r"""The agent's own message with one value wrong, in its own words: every number equal to ``gold``
    becomes :func:`wrong_value` (``gold`` + 1), else (the message never states it) its last number + 1;
    None when the message holds no number (nothing to get wrong).

    >>> slip(r"48 / 2 = 24 in May, so 48 + 24 = 72. The answer is \boxed{72}.", "72")
    '48 / 2 = 24 in May, so 48 + 24 = 73. The answer is \\boxed{73}.'
    >>> slip("First halve 48, then add.", "72"), slip("No numbers here.", "72")
    ('First halve 49, then add.', None)
    """
    g = parse_number(gold)
    found = list(_NUMBER_TOKEN.finditer(text))
    if g is None or not found:
        return None
    if any(parse_number(m.group(0)) == g for m in found):
        wrong = wrong_value(gold)
        return _NUMBER_TOKEN.sub(lambda m: wrong if parse_number(m.group(0)) == g else m.group(0), text)
    last = found[-1]
    value = parse_number(last.group(0))
    return text[:last.start()] + format_number(value + 1) + text[last.end():]


def planted_traces(primitives: dict[str, Any], tasks: list[tuple[str, str]], model, seed: int = 0,
                   plant: str = "first", progress: Callable[[str], None] | None = None,
                   batch_size: int | None = None, fault: str = "claim"):
    """Failed runs with a known decisive error, for attribution data: ``(label, trace)`` pairs.

    Every (primitive, task) whose clean run is right gets a faulted run per site of :func:`plant_sites`
    (``plant``: each agent's first or last content step, or each content step), that step replaced by a
    wrong one; a faulted run that ends wrong is kept, its trace's ``outcome`` recording
    ``gold``, ``correct: false`` and ``planted: {agent, step, reason}``. ``fault``: ``claim``, a wrong claim in
    one of the voices of :data:`FAULTS` (rotating), or ``slip``, the agent's own clean message with one value
    wrong (:func:`slip`; a step with no number to get wrong is skipped, said so). The clean runs of a primitive
    run as one batch (``batch_size`` at a time, default all), then its faulted runs as another: each run
    computes what it would alone (the engine's batch invariance), in the same order.
    """
    from kvmas.agents.engine import run_batched

    if fault not in FAULT_KINDS:
        raise BadInputError(f"fault must be one of {', '.join(FAULT_KINDS)}, not {fault!r}")
    if plant not in PLANT_SITES:
        raise BadInputError(f"plant must be one of {', '.join(PLANT_SITES)}, not {plant!r}")
    n = 0
    for label, prim in primitives.items():
        cleans = run_batched(model, [lambda q=q: prim(q, model=model, seed=seed) for q, _ in tasks], batch_size)
        faults = []  # (question, gold, agent, step, text) of every fault to plant, in the sequential order
        for (q, gold), clean in zip(tasks, cleans):
            if number_judge(gold)(clean.answer) < 1.0:
                if progress:
                    progress(f"{label} {q!r}: clean run wrong ({clean.answer!r}), skipped")
                continue
            for agent, k in plant_sites(clean.trace, plant):
                if fault == "slip":
                    text = slip((clean.trace.steps[k].text_out or "").split("\n---\n")[0], gold)
                    if text is None:
                        if progress:
                            progress(f"{label} {q!r}: {agent}@{k} states no number to get wrong, skipped")
                        continue
                else:
                    text = FAULTS[n % len(FAULTS)].format(wrong=wrong_value(gold))
                    n += 1
                faults.append((q, gold, agent, k, text))
        faulted_runs = run_batched(model, [
            lambda q=q, agent=agent, k=k, text=text: prim(
                q, model=model, seed=seed, interventions={agent: Intervention("replace", text, {k})})
            for q, _gold, agent, k, text in faults], batch_size)
        for (q, gold, agent, k, text), faulted in zip(faults, faulted_runs):
            if number_judge(gold)(faulted.answer) >= 1.0:
                if progress:
                    progress(f"{label} {q!r}: fault at {agent}@{k} ineffective, skipped")
                continue
            short = text if len(text) <= 200 else text[:200] + " [...]"
            faulted.trace.outcome = {"gold": gold, "correct": False, "planted": {
                "agent": agent, "step": k, "fault": fault, "reason": f"planted: {agent}'s step replaced by {short!r}"}}
            if progress:
                progress(f"{label} {q!r}: fault at {agent}@{k} -> {faulted.answer[-80:]!r}")
            yield label, faulted.trace

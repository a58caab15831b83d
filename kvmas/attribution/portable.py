"""Step features that mean the same in every multi-agent system: positions relative to the log and to the
agent's own turns, the inferred kind of each turn (:mod:`kvmas.attribution.turns`), and evidence a surface
scorer can see (failed or empty results, loops, values no earlier step supports, the answer's origin).

No feature names an agent or an absolute step index, and the task statement and tool outputs are not
candidates: :func:`portable_features` returns the rows of every step and the candidate indices.

>>> from kvmas.attribution.log import from_generic
>>> log = from_generic([{"agent": "human", "content": "What is 6*7?"},
...                     {"agent": "coder", "content": "```python\\nprint(6*8)\\n```"},
...                     {"agent": "Computer_terminal", "content": "exitcode: 0\\nCode output: 48"},
...                     {"agent": "checker", "content": "The answer is 48."}], question="What is 6*7?")
>>> fx, cand = portable_features(log)
>>> cand
[1, 3]
>>> fx.rows[1][PORTABLE.index("kind_act")], fx.rows[3][PORTABLE.index("kind_report")]
(1.0, 1.0)
"""

from __future__ import annotations

import math
import re

import networkx as nx

from kvmas.attribution.features import StepFeatures, step_features
from kvmas.attribution.graph import OUTCOME, data_graph, final_values, performance_graph, reach_all, values
from kvmas.attribution.log import AttributionLog, normalize_agent
from kvmas.attribution.turns import blameable, turn_kinds
from kvmas.errors import BadInputError

PORTABLE = [
    "rel_pos", "rel_pos_sq", "first_candidate", "agent_first_turn", "agent_turn_rel",
    "kind_instruct", "kind_act", "kind_plan", "kind_report", "kind_handover", "kind_other",
    "next_result_bad", "reads_bad", "says_failure", "repeats", "repeated_later",
    "unsupported_values", "claim_unsupported", "contradicts", "introduces_answer", "answer_origin", "reach",
    "reaches_outcome",
    "assume_cue", "verify_cue", "length_rel", "empty",
]
FEATURE_SETS = ("portable", "cdc")

_BAD = re.compile(r"exitcode:\s*[1-9]|traceback|\berror\b|exception|failed|not found|no such file|"
                  r"no results?|nothing (?:was )?found|unable to|could not|couldn't|cannot access|empty|"
                  r"did not return|returned nothing|404|timed? ?out", re.I)
_ASSUME = re.compile(r"\b(assum\w*|hypothetical\w*|placeholder|for (?:demonstration|illustration|example)|"
                     r"simulat\w*|mock\w*|sample data|dummy|let's say|suppose|example data|fictional|pretend)\b",
                     re.I)
_VERIFY = re.compile(r"\b(verified|confirm\w*|is correct|accurate|validated|checked)\b", re.I)
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CLAIM = re.compile(r"(?:final answer(?: is)?|the answer is|answer:|result is|results? in|output:|total is|equals?|"
                    r"there (?:are|were|is)|is approximately)\W{0,4}(?:\*\*)?\$?(-?\d[\d,]*(?:\.\d+)?)", re.I)


def claims(text: str) -> set[str]:
    """Numbers a turn states as a result ("the answer is 12", "Code output: 7").

    >>> sorted(claims("So the answer is 1,234. Output: 7"))
    ['1234', '7']
    """
    return {m.replace(",", "") for m in _CLAIM.findall(text[:4000])}


def _bad(text: str) -> bool:
    return bool(text) and bool(_BAD.search(text[:2000]))


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()[:3000]))


def _similar(a: set[str], b: set[str]) -> bool:
    return len(a) >= 4 and len(b) >= 4 and len(a & b) / len(a | b) >= 0.6


def _numbers(text: str) -> set[str]:
    return {m.replace(",", "") for m in _NUMBER.findall(text[:4000])}


def portable_features(log: AttributionLog) -> tuple[StepFeatures, list[int]]:
    """Features of every step (names :data:`PORTABLE`) and the indices of the blameable candidates."""
    steps = log.steps
    n = len(steps)
    kinds = turn_kinds(log)
    cand = blameable(kinds)
    rank = {i: r for r, i in enumerate(cand)}
    dg = data_graph(log)
    perf = performance_graph(dg, log)
    reaches = reach_all(perf)
    upstream = nx.ancestors(perf, OUTCOME)
    fv = final_values(log)
    turns: dict[str, list[int]] = {}
    for i in cand:
        turns.setdefault(normalize_agent(steps[i].agent), []).append(i)
    words = [_words(s.content) for s in steps]
    lengths = sorted(math.log1p(len(steps[i].content)) for i in cand)
    median_len = lengths[len(lengths) // 2] if lengths else 0.0
    seen = set(values(log.question))
    introduced: dict[int, int] = {}
    last_claim: set[str] = set()  # what the latest earlier result (a tool's output or a turn's claim) said
    numbers_before = _numbers(log.question)  # every number written before the current step
    rows, ev = [], []
    for s in steps:
        i, text, kind = s.index, s.content, kinds[s.index]
        vals = values(text)
        new = vals - seen
        seen |= vals
        mine = turns.get(normalize_agent(s.agent), [])
        k = mine.index(i) if i in mine else 0
        nxt = steps[i + 1] if i + 1 < n else None
        prev = steps[i - 1] if i > 0 else None
        if new & fv:
            producer = i
            if kind == "tool":  # a tool's values are introduced by the turn that ran it
                producer = next((j for j in range(i - 1, -1, -1) if j in rank), i)
            introduced[producer] = introduced.get(producer, 0) + len(new & fv)
        same = [j for j in mine if j != i]
        claimed = claims(text)
        blameable_turn = kind not in ("tool", "task")
        unsupported = bool(claimed) and blameable_turn and not (claimed & numbers_before)
        contradicts = bool(claimed) and blameable_turn and bool(last_claim) and not (claimed & last_claim)
        f = {
            "rel_pos": rank.get(i, 0) / max(1, len(cand) - 1),
            "first_candidate": float(rank.get(i) == 0),
            "agent_first_turn": float(k == 0 and i in rank),
            "agent_turn_rel": k / max(1, len(mine) - 1),
            "next_result_bad": float(kind in ("act", "instruct") and nxt is not None and _bad(nxt.content)),
            "reads_bad": float(prev is not None and _bad(prev.content)),
            "says_failure": float(kind not in ("tool", "task") and _bad(text)),
            "repeats": float(any(_similar(words[i], words[j]) for j in same if j < i)),
            "repeated_later": float(any(_similar(words[i], words[j]) for j in same if j > i)),
            "unsupported_values": math.log1p(len(new)) if blameable_turn else 0.0,
            "claim_unsupported": float(unsupported),
            "contradicts": float(contradicts),
            "introduces_answer": 0.0,
            "answer_origin": 0.0,
            "reach": reaches[i] / max(1, n - 1),
            "reaches_outcome": float(i in upstream),
            "assume_cue": float(bool(_ASSUME.search(text))),
            "verify_cue": float(bool(_VERIFY.search(text))),
            "length_rel": math.log1p(len(text)) - median_len,
            "empty": float(not text.strip()),
        }
        f["rel_pos_sq"] = f["rel_pos"] ** 2
        for kd in ("instruct", "act", "plan", "report", "handover", "other"):
            f[f"kind_{kd}"] = float(kind == kd)
        e = [f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} turn"]
        if f["next_result_bad"]:
            e.append("the result right after it failed or came back empty")
        if f["repeats"]:
            e.append("repeats an earlier turn of the same agent (a loop)")
        if f["assume_cue"]:
            e.append(f"unverified assumption cue {_ASSUME.search(text).group(0)!r}")
        if new and blameable_turn:
            e.append(f"states {len(new)} value(s) no earlier step supports")
        if unsupported:
            e.append(f"claims {', '.join(sorted(claimed))} with no earlier step supporting it")
        if contradicts:
            e.append(f"claims {', '.join(sorted(claimed))} against the earlier result {', '.join(sorted(last_claim))}")
        if claimed:
            last_claim = claimed
        numbers_before |= _numbers(text)
        rows.append(f)
        ev.append(e)
    for j, c in introduced.items():
        rows[j]["introduces_answer"] = 1.0
        ev[j].append(f"first introduces {c} value(s) that the final answer repeats")
    origin = min((j for j in introduced if j in rank), default=None)
    if origin is not None:  # where the (wrong) final answer comes from: the run's earliest answer value
        rows[origin]["answer_origin"] = 1.0
        ev[origin].append("the earliest step that introduces a value of the final answer")
    return StepFeatures(names=list(PORTABLE), rows=[[r[k] for k in PORTABLE] for r in rows], evidence=ev,
                        perf=perf), cand


def featurize(log: AttributionLog, feature_set: str = "portable",
              with_gt: bool = False) -> tuple[StepFeatures, list[int]]:
    """Rows and candidate steps under one feature set: ``portable`` (this module) or ``cdc`` (the development
    set's features, :mod:`kvmas.attribution.features`, every step a candidate)."""
    if feature_set == "portable":
        return portable_features(log)
    if feature_set == "cdc":
        fx = step_features(log, with_gt=with_gt)
        return fx, list(range(len(log.steps)))
    raise BadInputError(f"feature set must be one of {', '.join(FEATURE_SETS)}, not {feature_set!r}")

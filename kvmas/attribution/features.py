"""Per-step features of a log for the critical-step scorer: position, protocol, causal reach, information
introduction, execution errors, unverified-assumption cues, and (optionally) the gold answer in view.

Each feature has a name in :data:`FEATURES` (or :data:`GT_FEATURES`); :func:`step_features` returns one row
per step plus human-readable evidence strings.

>>> from kvmas.attribution.log import from_generic
>>> log = from_generic([{"agent": "coder", "content": "Let's assume the value is 17.\\n```python\\nprint(17)\\n```"},
...                     {"agent": "Computer_terminal", "content": "exitcode: 0\\nCode output: 17"},
...                     {"agent": "checker", "content": "The answer is 17."}])
>>> fx = step_features(log)
>>> fx.rows[0][FEATURES.index("assume_cue")], fx.rows[0][FEATURES.index("introduces_answer")]
(1.0, 1.0)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx

from kvmas.attribution.graph import OUTCOME, data_graph, final_values, performance_graph, reach_all, values
from kvmas.attribution.log import AttributionLog, normalize_agent

FEATURES = [
    "pos0", "pos1", "pos2", "pos3", "pos4plus", "rel_pos",
    "terminal", "terminate", "first_turn", "majority_agent", "first_speaker",
    "code", "next_exec_error", "next_exec_ok", "reads_exec_error",
    "introduces_answer", "reach", "reaches_outcome", "new_values",
    "assume_cue", "verify_cue", "plan_cue", "length",
]
GT_FEATURES = ["gt_in_step", "gt_seen_before", "gt_lost_here"]

_ERR = re.compile(r"exitcode:\s*[1-9]|traceback|error:|exception|failed|not found|no such file", re.I)
_ASSUME = re.compile(
    r"\b(assum\w*|hypothetical\w*|placeholder|for (?:demonstration|illustration|example)|simulat\w*|mock\w*|"
    r"sample data|dummy|let's say|suppose|example data|fictional|pretend)\b",
    re.I,
)
_VERIFY = re.compile(r"\b(verified|confirm\w*|is correct|accurate|validated)\b", re.I)
_PLAN = re.compile(r"\b(plan|step \d|steps?:|we need to|let's|first,)\b", re.I)


@dataclass
class StepFeatures:
    """Feature rows (one per step), the names, and per-step evidence strings."""

    names: list[str]
    rows: list[list[float]]
    evidence: list[list[str]] = field(default_factory=list)
    perf: nx.DiGraph | None = None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def step_features(log: AttributionLog, with_gt: bool = False) -> StepFeatures:
    """Features of every step of ``log``; ``with_gt`` adds the gold-answer features (needs ``ground_truth``)."""
    steps = log.steps
    n = len(steps)
    dg = data_graph(log)
    perf = performance_graph(dg, log)
    reaches = reach_all(perf)
    upstream = nx.ancestors(perf, OUTCOME)
    speakers = [s.agent for s in steps if not s.is_terminal]
    counts = Counter(speakers)
    majority = max(counts, key=lambda k: (counts[k], -speakers.index(k))) if counts else None
    first_speaker = steps[0].agent
    qvals = values(log.question)
    fv = final_values(log)
    seen_vals: set[str] = set()
    seen_agents: set[str] = set()
    introduced_answer: dict[int, int] = {}  # step -> how many final-answer values it introduced
    gt = _norm(log.ground_truth or "")
    gt_seen = False
    rows, ev = [], []
    for s in steps:
        i, text = s.index, s.content
        low = text.lower()
        vals = values(text) - qvals
        new = vals - seen_vals
        seen_vals |= vals
        new_ans = new & fv
        target = i
        if s.is_terminal and new_ans:
            # an execution output's values are introduced by the code that produced it
            producers = [j for j in dg.successors(i) if dg[i][j]["kind"] == "code->output"]
            target = producers[0] if producers else i
        if new_ans:
            introduced_answer[target] = introduced_answer.get(target, 0) + len(new_ans)
        nxt = steps[i + 1] if i + 1 < n else None
        prev = steps[i - 1] if i > 0 else None
        e: list[str] = []
        f = {
            "pos0": float(i == 0), "pos1": float(i == 1), "pos2": float(i == 2), "pos3": float(i == 3),
            "pos4plus": float(i >= 4), "rel_pos": i / max(1, n - 1),
            "terminal": float(s.is_terminal),
            "terminate": float(text.strip().upper() in ("TERMINATE", "")),
            "first_turn": float(normalize_agent(s.agent) not in seen_agents and not s.is_terminal),
            "majority_agent": float(s.agent == majority),
            "first_speaker": float(s.agent == first_speaker),
            "code": float("```" in text),
            "next_exec_error": float(bool(nxt and nxt.is_terminal and _ERR.search(nxt.content[:2000]))),
            "next_exec_ok": float(bool(nxt and nxt.is_terminal and not _ERR.search(nxt.content[:2000]))),
            "reads_exec_error": float(bool(prev and prev.is_terminal and _ERR.search(prev.content[:2000]))),
            "introduces_answer": 0.0,  # filled below (terminal outputs credit their producer)
            "reach": reaches[i] / max(1, n - 1),
            "reaches_outcome": float(i in upstream),
            "new_values": math.log1p(len(new)),
            "assume_cue": float(bool(_ASSUME.search(text))),
            "verify_cue": float(bool(_VERIFY.search(text))),
            "plan_cue": float(bool(_PLAN.search(text))),
            "length": math.log1p(len(text)) / 10.0,
        }
        if f["next_exec_error"]:
            e.append(f"the execution right after step {i} failed")
        if f["assume_cue"]:
            m = _ASSUME.search(text)
            e.append(f"unverified assumption cue {m.group(0)!r}")
        if with_gt:
            in_step = bool(gt) and gt in _norm(text)
            f["gt_in_step"] = float(in_step)
            f["gt_seen_before"] = float(gt_seen)
            f["gt_lost_here"] = float(gt_seen and not in_step and not s.is_terminal and bool(vals))
            if in_step:
                e.append("states the gold answer")
            gt_seen = gt_seen or in_step
        seen_agents.add(normalize_agent(s.agent))
        rows.append(f)
        ev.append(e)
    for j, k in introduced_answer.items():
        rows[j]["introduces_answer"] = 1.0
        ev[j].append(f"first introduces {k} value(s) that the final answer repeats")
    for i in range(n):
        r = reaches[i]
        if r:
            ev[i].append(f"its output can influence {r} later step(s)")
    names = FEATURES + (GT_FEATURES if with_gt else [])
    return StepFeatures(names=names, rows=[[r[k] for k in names] for r in rows], evidence=ev, perf=perf)

"""Published reference figures, each printed only beside the data it was measured on.

:func:`data_kind` names a set of logs: the Who&When Algorithm-Generated development set (by the exact set of its
question ids), logs in Who&When's Hand-Crafted format (Magentic-One style ``role`` turns with ``(-> Agent)``
sub-turns), our planted-fault logs (their ``system`` field), or ``unknown`` (no anchors: nothing published
was measured on it).

>>> data_kind([]), [a.name for a in ANCHORS["kvmas-planted"]]
('unknown', [])
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kvmas.attribution.log import AttributionLog

AG_IDS_SHA256 = "df2c2c2b75ab15ad986cbc3bf4e6aa39f1fc9da3815b75ffc7e074d3ad0b6f3f"  # sorted question_IDs


@dataclass(frozen=True)
class Anchor:
    name: str
    agent_acc: float
    step_acc: float
    note: str


ANCHORS: dict[str, list[Anchor]] = {
    "whowhen-ag": [
        Anchor("GPT-4o all-at-once", 54.33, 12.50, "Who&When paper, with gold answer"),
        Anchor("GPT-4o step-by-step", 35.20, 25.51, "Who&When paper, with gold answer"),
        Anchor("CDC-MAS", 48.5, 36.2, "self-reported"),
    ],
    "whowhen-hc": [
        Anchor("GPT-4o all-at-once", 55.2, 5.3, "Who&When Hand-Crafted, as cited in issue 15"),
        Anchor("AgenTracer-8B", 69.1, 20.7, "self-reported, Hand-Crafted"),
    ],
    "kvmas-planted": [],
    "unknown": [],
}


def data_kind(logs: list[AttributionLog]) -> str:
    """``whowhen-ag``, ``whowhen-hc``, ``kvmas-planted`` or ``unknown`` (see the module docstring)."""
    if not logs:
        return "unknown"
    systems = {str(lg.meta.get("system") or "") for lg in logs}
    if all(s.startswith("kvmas-planted") for s in systems):
        return "kvmas-planted"
    ids = sorted(str(lg.meta.get("question_id")) for lg in logs)
    if hashlib.sha256("\n".join(ids).encode()).hexdigest() == AG_IDS_SHA256:
        return "whowhen-ag"
    if all(lg.meta.get("format") == "role" for lg in logs) and any(s.target for lg in logs for s in lg.steps):
        return "whowhen-hc"
    return "unknown"

"""One method's result on one task: the record every accuracy report is built from (``items.jsonl``).

>>> from kvmas.trace import Usage
>>> r = ItemResult("single", "t1", "number", "3", "3", True, r"\\boxed{3}", Usage(), 1.0, rule="boxed")
>>> r.correct_strict, ItemResult.from_json(r.to_json()) == r
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmas.primitives.echo import echoes_role_prompt
from kvmas.tasks.answers import STRICT_RULES
from kvmas.trace import Usage

STRICT_SCORED = STRICT_RULES | {"loglik"}


@dataclass
class ItemResult:
    """One method on one task."""

    method: str
    task_id: str
    kind: str
    gold: str
    pred: str | None
    correct: bool
    answer: str
    usage: Usage
    wall_s: float
    answer_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    rule: str | None = None  # the scoring rule that read ``pred`` (kvmas.tasks.answers.RULES, or "loglik")
    echo: bool = False  # the answer copies a role instruction (a collapse, see kvmas.primitives.echo)

    @property
    def correct_strict(self) -> bool:
        """Correct with the answer in an explicit format (boxed / ####), or ranked by likelihood."""
        return self.correct and self.rule in STRICT_SCORED

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "task_id": self.task_id, "kind": self.kind, "gold": self.gold,
                "pred": self.pred, "correct": self.correct, "rule": self.rule, "answer": self.answer,
                "usage": self.usage.model_dump(), "wall_s": round(self.wall_s, 4),
                "answer_tokens": self.answer_tokens, "meta": self.meta, "error": self.error, "echo": self.echo}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ItemResult":
        """An item read back from a line of ``items.jsonl`` (older lines lack ``rule`` and ``echo``)."""
        return cls(d["method"], d["task_id"], d["kind"], d["gold"], d["pred"], d["correct"], d["answer"],
                   Usage(**d["usage"]), d["wall_s"], d.get("answer_tokens", 0), d.get("meta") or {},
                   d.get("error"), d.get("rule"), d.get("echo", echoes_role_prompt(d["answer"])))

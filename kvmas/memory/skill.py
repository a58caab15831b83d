"""A procedural skill: when to use it, 1-6 steps, when to stop. Content is immutable; stats live apart.

>>> from kvmas.memory.skill import Skill
>>> s = Skill(scope="house", name="CleanThenPlace", activation="task says clean <object>",
...           steps=["go to <object place>", "take <object>", "go to sinkbasin", "clean <object>"],
...           termination="<object> is clean")
>>> s.status, s.version, len(s.content_hash)
('candidate', 1, 16)
>>> "When: task says clean" in s.render()
True
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvmas.clock import utc_now

SKILL_SCHEMA_VERSION = 1
MAX_RENDERED_TOKENS = 150  # rough budget; counted with a whitespace/punctuation tokeniser (see approx_tokens)

Status = Literal["candidate", "probation", "active", "archived", "rejected"]
Source = Literal["seed", "extracted", "refined", "new", "imported", "manual"]
LIVE = ("probation", "active")

# Legal status moves; anything else is a bug or a race lost (compare-and-swap fails).
TRANSITIONS: dict[str, set[str]] = {
    "candidate": {"probation", "rejected", "active"},
    "probation": {"active", "rejected", "archived"},
    "active": {"archived"},
    "archived": {"active"},
    "rejected": {"archived"},
}



def approx_tokens(text: str) -> int:
    """Model-free token estimate (words and punctuation); the store keeps real counts when a model is given."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class Skill(BaseModel):
    """Immutable skill content plus identity, lineage and status. A new version is a new row."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16], pattern=r"^[0-9a-f]{8,32}$")
    lineage_id: str = ""
    parent_id: str | None = None
    version: int = Field(default=1, ge=1)
    scope: str = Field(min_length=1, max_length=120, pattern=r"^[\w./:-]+$")
    name: str = Field(min_length=1, max_length=80)
    activation: str = Field(min_length=1, max_length=400)
    activation_terms: list[str] = Field(default_factory=list, max_length=8)
    steps: list[str] = Field(min_length=1, max_length=6)
    termination: str = Field(min_length=1, max_length=300)
    status: Status = "candidate"
    pinned: bool = False
    source: Source = "manual"
    provenance: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=utc_now)

    @field_validator("steps")
    @classmethod
    def _steps_ok(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s.strip() or len(s) > 200:
                raise ValueError("each step must be 1-200 characters")
        return [s.strip() for s in v]

    @field_validator("activation_terms")
    @classmethod
    def _terms_ok(cls, v: list[str]) -> list[str]:
        return sorted({t.strip().lower() for t in v if t.strip()})

    @model_validator(mode="after")
    def _lineage(self) -> "Skill":
        if not self.lineage_id:
            object.__setattr__(self, "lineage_id", self.id)
        if approx_tokens(self.render()) > MAX_RENDERED_TOKENS:
            raise ValueError(f"rendered skill exceeds {MAX_RENDERED_TOKENS} tokens")
        return self

    @property
    def content_hash(self) -> str:
        """sha256 of the normalised activation, steps and termination (name and stats excluded)."""
        blob = json.dumps([_norm(self.activation), [_norm(s) for s in self.steps], _norm(self.termination)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def render(self) -> str:
        """The text block injected into a prompt (never executed)."""
        lines = [f"Skill: {self.name}", f"When: {self.activation}", "Steps:"]
        lines += [f"{i + 1}. {s}" for i, s in enumerate(self.steps)]
        lines.append(f"Stop when: {self.termination}")
        return "\n".join(lines)

    @property
    def token_count(self) -> int:
        return approx_tokens(self.render())

    def derive(self, **changes: Any) -> "Skill":
        """A child version in the same lineage (fresh id, status candidate)."""
        data = self.model_dump(exclude={"id", "created_at", "status", "pinned"})
        data.update(parent_id=self.id, lineage_id=self.lineage_id, version=self.version + 1, source="refined")
        data.update(changes)
        return Skill(**data)


class SkillStats(BaseModel):
    """Usage statistics, updated with SQL arithmetic; never part of the content hash."""

    model_config = ConfigDict(extra="forbid")

    n_activations: int = 0
    n_episodes: int = 0
    n_success: int = 0
    sum_credit: float = 0.0
    sum_sq_credit: float = 0.0
    probation_uses: int = 0
    age_iters: int = 0
    last_used_at: str | None = None

    @property
    def mean_credit(self) -> float:
        return self.sum_credit / self.n_episodes if self.n_episodes else 0.0

    def lcb(self, t: int, beta: float = 0.2) -> float:
        """Lower confidence bound of the credited advantage: mean - beta*sqrt(ln(1+t)/max(1,n))."""
        return self.mean_credit - beta * math.sqrt(math.log(1 + max(t, 0)) / max(1, self.n_episodes))


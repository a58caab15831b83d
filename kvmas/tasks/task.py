"""The unit of evaluation: one question with a verifiable answer.

>>> from kvmas.tasks.task import Task, Choice
>>> t = Task(id="q1", question="2+3?", answer="5")
>>> t.kind
'number'
>>> c = Task(id="q2", question="Sky colour?", answer="B",
...          choices=[Choice(label="A", text="green"), Choice(label="B", text="blue")])
>>> c.kind, c.labels
('choice', ['A', 'B'])
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvmas.tasks.numbers import parse_number


class Choice(BaseModel):
    """One option of a multiple-choice task: its label ("A".."E" or "1".."5") and text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(min_length=1, max_length=8)
    text: str


class Task(BaseModel):
    """A question with its gold answer.

    ``kind="number"``: ``answer`` is a number as text (``"18"``, ``"-2.5"``, ``"3/4"``).
    ``kind="choice"``: ``answer`` is the label of the right :class:`Choice`.
    ``kind`` is inferred from ``choices`` when omitted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    kind: Literal["number", "choice"] = "number"
    choices: tuple[Choice, ...] | None = None
    source: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data:
            data = dict(data)
            data["kind"] = "choice" if data.get("choices") else "number"
        return data

    @model_validator(mode="after")
    def _check(self) -> "Task":
        if self.kind == "choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("a choice task needs at least two choices")
            labels = [c.label for c in self.choices]
            if len(set(labels)) != len(labels):
                raise ValueError(f"duplicate choice labels {labels}")
            if self.answer not in labels:
                raise ValueError(f"answer {self.answer!r} is not one of the labels {labels}")
        else:
            if parse_number(self.answer) is None:
                raise ValueError(f"answer {self.answer!r} of a number task is not a number")
        return self

    @property
    def labels(self) -> list[str]:
        """The choice labels in order (empty for number tasks)."""
        return [c.label for c in self.choices or ()]

    def choice_text(self, label: str) -> str:
        """Text of the option with ``label`` (KeyError if none)."""
        for c in self.choices or ():
            if c.label == label:
                return c.text
        raise KeyError(label)

"""The run record: a pydantic trace of every agent call, with honest token accounting.

Every run writes one. Attribution and skill learning consume traces, never internal objects.

>>> from kvmas.trace import Trace, Step, Usage
>>> t = Trace(method="single", question="What is 2+3?")
>>> _ = t.add(Step(agent="solver", role="solver", action="extend", usage=Usage(prefilled=12)))
>>> t.usage.prefilled
12
>>> Trace.model_validate_json(t.model_dump_json()) == t
True
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from kvmas.clock import utc_now
from kvmas.errors import BadInputError, SchemaVersionError
from kvmas.paths import atomic_write_text, read_json

TRACE_SCHEMA_VERSION = 1
#: How a method's agents hand each other their work (the ``comm`` of ``comm:primitive``): latent thoughts,
#: messages re-encoded as text, or messages decoded into the shared KV cache and read there.
COMMS: tuple[str, ...] = ("latent", "text", "kv")


class Usage(BaseModel):
    """Token counts of one step (or a sum of steps).

    prefilled: prompt tokens this step ran through the model (computed KV).
    reused:    tokens whose KV this step read from a received cache instead of recomputing them.
               Counted once per step per row group; a row-batched read of a shared prefix counts once.
    latent:    latent steps (hidden state fed back as an input embedding; one position each).
    generated: tokens decoded (sampled or greedy), all rows together.
    """

    model_config = ConfigDict(extra="forbid")

    prefilled: int = 0
    reused: int = 0
    latent: int = 0
    generated: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            prefilled=self.prefilled + other.prefilled,
            reused=self.reused + other.reused,
            latent=self.latent + other.latent,
            generated=self.generated + other.generated,
        )

    @property
    def computed(self) -> int:
        """Positions the model actually computed: prefilled + latent + generated."""
        return self.prefilled + self.latent + self.generated


class Step(BaseModel):
    """One agent call. ``reads`` / ``writes`` are segment ids of the LatentState (exact provenance)."""

    model_config = ConfigDict(extra="forbid")

    index: int = -1
    agent: str
    role: str
    action: str  # extend | think | speak | score | fork | select | merge | drop | organize | ...
    reads: list[int] = Field(default_factory=list)
    writes: list[int] = Field(default_factory=list)
    rows: int = 1
    text_in: str | None = None
    text_out: str | None = None
    usage: Usage = Field(default_factory=Usage)
    wall_s: float = 0.0
    meta: dict[str, Any] = Field(default_factory=dict)


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("kvmas", "torch", "transformers", "safetensors", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out



class Trace(BaseModel):
    """A whole run: question, method, seed, model fingerprint, steps, answer and outcome."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = TRACE_SCHEMA_VERSION
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: str = Field(default_factory=utc_now)
    method: str = "single"
    question: str = ""
    seed: int = 0
    model: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=_library_versions)
    steps: list[Step] = Field(default_factory=list)
    answer: str | None = None
    outcome: dict[str, Any] = Field(default_factory=dict)
    wall_s: float = 0.0

    _watchers: list = PrivateAttr(default_factory=list)  # not data: never saved

    def add(self, step: Step) -> Step:
        """Append a step, numbering it, and tell the watchers. Returns the step."""
        step.index = len(self.steps)
        self.steps.append(step)
        for watcher in self._watchers:
            watcher(step)
        return step

    def watch(self, on_step) -> None:
        """Call ``on_step(step)`` for every step added from now on (live output; raising stops the run).

        >>> t, seen = Trace(), []
        >>> t.watch(lambda s: seen.append(s.action))
        >>> _ = t.add(Step(agent="a", role="a", action="read"))
        >>> seen
        ['read']
        """
        self._watchers.append(on_step)

    @property
    def usage(self) -> Usage:
        total = Usage()
        for s in self.steps:
            total = total + s.usage
        return total

    def agents(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.steps:
            seen.setdefault(s.agent, None)
        return list(seen)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Atomically write the trace as JSON."""
        return atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a trace; a missing, unreadable or foreign file raises :class:`BadInputError`."""
        path = Path(path)
        raw = read_json(path, "trace file")
        if not isinstance(raw, dict) or "schema_version" not in raw or "steps" not in raw:
            raise BadInputError(f"{path} is not a kvmas trace (no schema_version/steps)")
        version = raw["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BadInputError(f"{path}: schema_version must be a positive integer, not {json.dumps(version)[:40]}")
        if version > TRACE_SCHEMA_VERSION:
            raise SchemaVersionError(f"{path} has trace schema {version}, this kvmas reads up to "
                                     f"{TRACE_SCHEMA_VERSION}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise BadInputError(f"invalid trace {path}: {loc}: {first['msg']}") from exc


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.elapsed`` — wall time in seconds."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start

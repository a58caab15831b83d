"""The attribution log: one failed multi-agent run as explicitly numbered steps, from any source.

Adapters turn Who&When records (``name`` field, or ``role`` with a ``(-> Agent)`` suffix), a generic JSON list
of ``{agent, content}`` and our own :class:`kvmas.trace.Trace` into one :class:`AttributionLog`.
Steps are numbered from 0 (Who&When labels are 0-based strings; they become ints here).

>>> rec = {"question": "2+3?", "ground_truth": "5", "mistake_agent": "Solver", "mistake_step": "1",
...        "history": [{"name": "Planner", "role": "assistant", "content": "Add them."},
...                    {"name": "Solver", "role": "user", "content": "The answer is 6."}]}
>>> log = from_whowhen(rec, record_id="r1")
>>> [(s.index, s.agent) for s in log.steps], log.gold_agent, log.gold_step
([(0, 'Planner'), (1, 'Solver')], 'Solver', 1)
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmas.errors import BadInputError
from kvmas.paths import read_json
from kvmas.trace import Trace

TERMINAL_HINTS = frozenset({"terminal", "executor", "tool", "interpreter", "shell", "console"})
_PAREN = re.compile(r"\s*\(.*?\)\s*$")


class AttributionWarning(UserWarning):
    """A record was skipped or repaired while reading a log file (message starts with the record id)."""


class SkippedRecord(AttributionWarning):
    """A record could not be read and was left out (message names the file and the line or record)."""


def normalize_agent(name: str | None) -> str:
    """Canonical agent name for comparisons: no ``(-> X)``/``(thought)`` suffix, lower case, ``_`` separators.

    >>> normalize_agent("Orchestrator (-> WebSurfer)"), normalize_agent(" Data Verification-Expert ")
    ('orchestrator', 'data_verification_expert')
    """
    if not name:
        return ""
    base = _PAREN.sub("", str(name)).strip().lower()
    return re.sub(r"[\s\-]+", "_", base)


class LogStep(BaseModel):
    """One step: who spoke, what they said, and (for our traces) the exact segment provenance."""

    model_config = ConfigDict(extra="forbid")

    index: int
    agent: str
    content: str = ""
    role: str = ""
    target: str | None = None  # the addressee of an ``(-> X)`` turn
    reads: list[int] = Field(default_factory=list)
    writes: list[int] = Field(default_factory=list)

    @property
    def is_terminal(self) -> bool:
        """A tool / code-execution output rather than an agent's own reasoning."""
        camel = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", _PAREN.sub("", self.agent or ""))  # ComputerTerminal
        parts = set(normalize_agent(camel).split("_"))
        return bool(parts & TERMINAL_HINTS) or self.content.lstrip().startswith("exitcode:")


class AttributionLog(BaseModel):
    """A failed run to attribute: numbered steps, optional gold answer and gold (agent, step) label."""

    model_config = ConfigDict(extra="forbid")

    log_id: str
    source: Literal["whowhen", "generic", "trace"] = "generic"
    question: str = ""
    ground_truth: str | None = None
    answer: str | None = None
    steps: list[LogStep]
    gold_agent: str | None = None
    gold_step: int | None = None
    exact_provenance: bool = False  # True when reads/writes come from a kvmas trace
    meta: dict[str, Any] = Field(default_factory=dict)

    def agents(self) -> list[str]:
        """Distinct agent names in order of first appearance."""
        return list(dict.fromkeys(s.agent for s in self.steps))

    def labelled(self) -> bool:
        return self.gold_agent is not None and self.gold_step is not None


def _split_role(role: str) -> tuple[str, str | None]:
    """``"Orchestrator (-> WebSurfer)"`` -> ``("Orchestrator", "WebSurfer")``; ``"X (thought)"`` -> ``("X", None)``."""
    m = re.match(r"^\s*(.*?)\s*\(\s*->\s*(.*?)\s*\)\s*$", role)
    if m:
        return m.group(1), m.group(2)
    return _PAREN.sub("", role).strip() or role.strip(), None


def from_whowhen(record: dict[str, Any], record_id: str | None = None) -> AttributionLog:
    """Adapt one Who&When record (Algorithm-Generated ``name`` or Hand-Crafted ``role`` format).

    Raises :class:`BadInputError` (message starts with the record id) on missing or unusable fields.
    """
    if not isinstance(record, dict):
        raise BadInputError(f"{record_id or '?'}: record is not a JSON object")
    rid = str(record_id or record.get("source_file") or record.get("question_ID") or "?")
    hist = record.get("history")
    if not isinstance(hist, list) or not hist:
        raise BadInputError(f"{rid}: empty or missing 'history'")
    steps: list[LogStep] = []
    for i, item in enumerate(hist):
        if not isinstance(item, dict):
            raise BadInputError(f"{rid}: history[{i}] is not an object")
        content = item.get("content")
        content = "" if content is None else str(content)
        role = str(item.get("role") or "")
        if item.get("name"):
            agent, target = str(item["name"]), None
        elif role:
            agent, target = _split_role(role)
        else:
            raise BadInputError(f"{rid}: history[{i}] has neither 'name' nor 'role'")
        steps.append(LogStep(index=i, agent=agent, content=content, role=role, target=target))
    gold_agent = record.get("mistake_agent")
    gold_step: int | None = None
    raw_step = record.get("mistake_step")
    if raw_step is not None and str(raw_step).strip() != "":
        try:
            gold_step = int(str(raw_step).strip())
        except ValueError as exc:
            raise BadInputError(f"{rid}: mistake_step {raw_step!r} is not an integer") from exc
        if not 0 <= gold_step < len(steps):
            raise BadInputError(f"{rid}: mistake_step {gold_step} outside 0..{len(steps) - 1}")
    gt = record.get("ground_truth")
    log = AttributionLog(
        log_id=rid,
        source="whowhen",
        question=str(record.get("question") or ""),
        ground_truth=None if gt is None else str(gt),
        steps=steps,
        gold_agent=None if gold_agent is None else str(gold_agent),
        gold_step=gold_step,
        meta={"question_id": record.get("question_ID"), "mistake_reason": record.get("mistake_reason"),
              "system": record.get("system"),
              "format": "name" if any(isinstance(h, dict) and h.get("name") for h in hist) else "role"},
    )
    if log.gold_agent is not None and normalize_agent(log.gold_agent) not in {
        normalize_agent(a) for a in log.agents()
    }:
        warnings.warn(f"{rid}: gold agent {log.gold_agent!r} never speaks in the log", AttributionWarning, 2)
    return log


def from_generic(items: list[dict[str, Any]], log_id: str = "log", **fields: Any) -> AttributionLog:
    """Adapt a plain JSON list of ``{"agent": ..., "content": ...}`` (``name``/``role`` accepted for agent).

    >>> from_generic([{"agent": "a", "content": "x"}, {"agent": "b", "content": "y"}]).agents()
    ['a', 'b']
    """
    if not isinstance(items, list) or not items:
        raise BadInputError(f"{log_id}: empty or non-list log")
    steps = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise BadInputError(f"{log_id}: item {i} is not an object")
        agent = it.get("agent") or it.get("name") or it.get("role")
        if not agent:
            raise BadInputError(f"{log_id}: item {i} has no 'agent'")
        agent, target = _split_role(str(agent))
        steps.append(LogStep(index=i, agent=agent, content=str(it.get("content") or ""), target=target))
    return AttributionLog(log_id=log_id, source="generic", steps=steps, **fields)


def from_trace(trace: Trace) -> AttributionLog:
    """Adapt a kvmas trace: every step keeps its ``reads``/``writes`` segment ids (exact provenance).

    >>> from kvmas.trace import Trace, Step
    >>> t = Trace(question="q")
    >>> _ = t.add(Step(agent="a", role="solver", action="speak", writes=[1], text_out="4"))
    >>> _ = t.add(Step(agent="b", role="critic", action="speak", reads=[1], writes=[2], text_out="ok"))
    >>> from_trace(t).steps[1].reads
    [1]
    """
    if not trace.steps:
        raise BadInputError(f"trace {trace.run_id}: no steps")
    steps = [
        LogStep(
            index=i,
            agent=s.agent,
            role=s.role,
            content=s.text_out or s.text_in or "",
            reads=list(s.reads),
            writes=list(s.writes),
        )
        for i, s in enumerate(trace.steps)
    ]
    oc = trace.outcome or {}
    return AttributionLog(
        log_id=trace.run_id,
        source="trace",
        question=trace.question,
        ground_truth=None if oc.get("gold") is None else str(oc.get("gold")),
        answer=trace.answer,
        steps=steps,
        exact_provenance=True,
        meta={"method": trace.method, "seed": trace.seed, "outcome": oc},
    )


def recorded_failure(log: AttributionLog, gold: str | None = None) -> str | None:
    """Why ``log`` counts as a failed run, or None when nothing records a failure (then there is no one to blame).

    Who&When and generic logs are failed runs by construction. A kvmas trace failed when its outcome says so
    (``success``/``correct`` false) or when its answer misses the gold answer (``gold``, else ``outcome.gold``).

    >>> from kvmas.trace import Trace, Step
    >>> t = Trace(question="2+3?", answer="5")
    >>> _ = t.add(Step(agent="a", role="solver", action="speak", text_out="5"))
    >>> recorded_failure(from_trace(t)) is None, recorded_failure(from_trace(t), gold="6")
    (True, 'the answer misses the gold answer 6')
    """
    if log.source != "trace":
        return "a failure log"
    oc = log.meta.get("outcome") or {}
    for key in ("success", "correct"):
        if oc.get(key) is False:
            return f"its outcome records {key}=false"
    gold = gold if gold is not None else log.ground_truth
    if gold is not None:
        from kvmas.tasks.answers import extract_number, parse_number

        want = parse_number(str(gold))
        if want is None:
            raise BadInputError(f"gold answer {gold!r} is not a number")
        got = parse_number(extract_number(log.answer)) if log.answer else None
        return None if got is not None and got == want else f"the answer misses the gold answer {gold}"
    return None


def iter_jsonl(path: str | Path, max_line_bytes: int = 64 << 20) -> Iterator[AttributionLog]:
    """Stream Who&When-style records from a JSONL file, one line at a time (bounded memory).

    A bad line is skipped with an :class:`AttributionWarning` naming the record (line number or id);
    iteration never stops on one bad record. Lines longer than ``max_line_bytes`` are skipped unread.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"log file not found: {path}")
    with path.open("rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # drain the rest of the oversized line
                    raw = fh.readline(1 << 20)
                warnings.warn(f"{path.name} line {lineno}: record over {max_line_bytes} bytes, skipped",
                              SkippedRecord, 2)
                continue
            if not raw.strip():
                continue
            try:  # decoded as UTF-8 first: json.loads of bytes would guess UTF-16 from a stray FF FE
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                warnings.warn(f"{path.name} line {lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                              f"position {exc.start})", SkippedRecord, 2)
                continue
            except json.JSONDecodeError as exc:
                warnings.warn(f"{path.name} line {lineno}: invalid JSON ({exc.msg})", SkippedRecord, 2)
                continue
            rid = rec.get("source_file") or rec.get("question_ID") if isinstance(rec, dict) else None
            rid = str(rid or f"line {lineno}")
            try:
                yield from_whowhen(rec, record_id=rid)
            except BadInputError as exc:
                msg = str(exc)  # names the record, which is "line N" when it has no id of its own
                warnings.warn(f"{path.name} {msg}" if msg.startswith(f"line {lineno}:")
                              else f"{path.name} line {lineno}: {msg}", SkippedRecord, 2)


def iter_logs(path: str | Path) -> Iterator[AttributionLog]:
    """Logs from a ``.jsonl`` file (streamed), a directory of ``*.json`` records, or one JSON file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            raise BadInputError(f"no *.json records in {path}")
        for f in files:
            try:
                yield load_log(f)
            except BadInputError as exc:
                msg = str(exc)
                warnings.warn(msg if f.name in msg else f"{f.name}: {msg}", SkippedRecord, 2)
        return
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path)
        return
    yield load_log(path)


def load_log(path: str | Path) -> AttributionLog:
    """Read one log file: a kvmas trace, a Who&When record, or a generic ``[{agent, content}]`` list."""
    path = Path(path)
    raw = read_json(path, "log file")
    if isinstance(raw, dict) and "schema_version" in raw and "steps" in raw:
        return from_trace(Trace.load(path))
    if isinstance(raw, dict) and "history" in raw:
        return from_whowhen(raw, record_id=path.name)  # the file, so every message names what to open
    if isinstance(raw, list):
        return from_generic(raw, log_id=path.stem)
    if isinstance(raw, dict) and isinstance(raw.get("steps") or raw.get("messages"), list):
        items = raw.get("steps") or raw.get("messages")
        return from_generic(items, log_id=str(raw.get("id") or path.stem),
                            question=str(raw.get("question") or ""),
                            ground_truth=raw.get("ground_truth"))
    raise BadInputError(f"{path}: not a trace, a Who&When record, or a list of {{agent, content}}")

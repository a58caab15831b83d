"""Loading tasks: JSONL files through small adapters, shipped samples, or the seeded generator.

Formats understood out of the box (detected from the first record of a file):

- ``gsm8k``: ``{"id", "question", "answer": "...#### 18", "final": "18"}`` (``final`` optional);
- ``arc``: ``{"id", "question", "choices": [{"label", "text"}...], "answer": "A"}``, also the AI2 layout
  (``question: {stem, choices}``, ``answerKey``) and the Hugging Face layout (``choices: {text: [], label: []}``);
- ``kvmas``: records that already are :class:`~kvmas.tasks.task.Task` fields.

Another format is one small adapter away: subclass :class:`TaskAdapter` and :func:`register_adapter` it.

Shipped samples (no data needed): ``gsm8k-sample`` (GSM8K test items 0-19, openai/grade-school-math, MIT
licence) and ``arc-easy-sample`` (ARC-Easy test items 0-19, AI2 ARC, CC BY-SA 4.0, Clark et al. 2018).

>>> from kvmas.tasks.loaders import load_tasks
>>> ts = load_tasks("gsm8k-sample", n=3)
>>> ts[0].id, ts[0].answer
('gsm8k-test-0', '18')
>>> len(load_tasks(None, n=5, seed=3))
5
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kvmas.errors import BadInputError
from kvmas.paths import loads_json
from kvmas.tasks.generator import generate_tasks
from kvmas.tasks.task import Task

SAMPLES = {"gsm8k-sample": "gsm8k_sample.jsonl", "arc-easy-sample": "arc_easy_sample.jsonl"}
SYNTHETIC = {"synthetic": "mixed", "synthetic-number": "number", "synthetic-choice": "choice"}


class TaskAdapter:
    """Turns one JSON record into a :class:`Task`. Subclasses set ``name`` and implement both methods."""

    name = "base"

    def matches(self, record: dict[str, Any]) -> bool:
        """Whether this adapter understands ``record`` (used for detection on a file's first record)."""
        raise NotImplementedError

    def to_task(self, record: dict[str, Any], index: int) -> Task:
        """The task of ``record`` (``index`` is its 0-based position, for a default id)."""
        raise NotImplementedError


class GSM8KAdapter(TaskAdapter):
    """GSM8K: the gold number is ``final``, else what follows ``####`` in ``answer``."""

    name = "gsm8k"

    def matches(self, record: dict[str, Any]) -> bool:
        ans = record.get("answer")
        return isinstance(record.get("question"), str) and not record.get("choices") and (
            "final" in record or (isinstance(ans, str) and "####" in ans))

    def to_task(self, record: dict[str, Any], index: int) -> Task:
        final = record.get("final")
        sol = record.get("answer") or ""
        if final is None:
            if "####" not in str(sol):
                raise ValueError("no 'final' field and no '####' in 'answer'")
            final = str(sol).rsplit("####", 1)[1].strip()
        final = str(final).replace(",", "").strip()
        return Task(id=str(record.get("id", f"gsm8k-{index}")), question=record["question"], answer=final,
                    kind="number", source=str(record.get("source", "gsm8k")), meta={"solution": sol} if sol else {})


class ARCAdapter(TaskAdapter):
    """ARC-style multiple choice (flat, AI2 or Hugging Face layout)."""

    name = "arc"

    def matches(self, record: dict[str, Any]) -> bool:
        q = record.get("question")
        return bool(record.get("choices")) or (isinstance(q, dict) and "choices" in q)

    def to_task(self, record: dict[str, Any], index: int) -> Task:
        q = record.get("question")
        choices = record.get("choices")
        if isinstance(q, dict):
            choices = q.get("choices", choices)
            q = q.get("stem")
        if isinstance(choices, dict):  # Hugging Face layout: {"text": [...], "label": [...]}
            choices = [{"label": lab, "text": txt} for lab, txt in zip(choices["label"], choices["text"])]
        answer = record.get("answer", record.get("answerKey"))
        return Task(id=str(record.get("id", f"arc-{index}")), question=q, answer=str(answer), kind="choice",
                    choices=tuple({"label": str(c["label"]), "text": str(c["text"])} for c in choices),
                    source=str(record.get("source", "arc")))


class KvmasAdapter(TaskAdapter):
    """Records that already carry Task fields (``id`` defaults to the line number)."""

    name = "kvmas"

    def matches(self, record: dict[str, Any]) -> bool:
        return isinstance(record.get("question"), str) and "answer" in record

    def to_task(self, record: dict[str, Any], index: int) -> Task:
        fields = {k: v for k, v in record.items() if k in Task.model_fields}
        fields.setdefault("id", f"task-{index}")
        fields["answer"] = str(fields["answer"])
        return Task.model_validate(fields)


_ADAPTERS: list[TaskAdapter] = [ARCAdapter(), GSM8KAdapter(), KvmasAdapter()]


def register_adapter(adapter: TaskAdapter, first: bool = True) -> None:
    """Add an adapter; ``first=True`` gives it priority in detection."""
    _ADAPTERS.insert(0 if first else len(_ADAPTERS), adapter)


def get_adapter(name: str) -> TaskAdapter:
    for a in _ADAPTERS:
        if a.name == name:
            return a
    raise BadInputError(f"unknown task format {name!r} (known: {', '.join(a.name for a in _ADAPTERS)})")


def _detect(record: dict[str, Any], where: str) -> TaskAdapter:
    for a in _ADAPTERS:
        if a.matches(record):
            return a
    raise BadInputError(f"{where}: unrecognised task record (fields: {', '.join(sorted(record))})")


def _read_lines(text: str, where: str, adapter: TaskAdapter | str | None, limit: int | None) -> list[Task]:
    tasks: list[Task] = []
    chosen = get_adapter(adapter) if isinstance(adapter, str) else adapter
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(tasks) >= limit:
            break
        record = loads_json(line, f"{where}:{lineno}")
        if not isinstance(record, dict):
            raise BadInputError(f"{where}:{lineno}: expected a JSON object, got {type(record).__name__}")
        chosen = chosen or _detect(record, f"{where}:{lineno}")
        try:
            tasks.append(chosen.to_task(record, len(tasks)))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "record"
            raise BadInputError(f"{where}:{lineno}: {loc}: {err['msg']}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{where}:{lineno}: bad {chosen.name} record: {exc}") from exc
    if not tasks:
        raise BadInputError(f"{where}: no tasks in file")
    return tasks


def load_jsonl(path: str | Path, adapter: TaskAdapter | str | None = None, limit: int | None = None) -> list[Task]:
    """Tasks from a JSONL file (format detected from the first record unless ``adapter`` is given)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise BadInputError(f"task file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"unreadable task file {path}: {exc}") from exc
    return _read_lines(text, str(path), adapter, limit)


def load_sample(name: str) -> list[Task]:
    """A sample shipped inside the package (see :data:`SAMPLES`)."""
    if name not in SAMPLES:
        raise BadInputError(f"unknown sample {name!r} (known: {', '.join(SAMPLES)})")
    text = resources.files("kvmas").joinpath("data", SAMPLES[name]).read_text(encoding="utf-8")
    return _read_lines(text, name, None, None)


def task_names() -> list[str]:
    """Names :func:`load_tasks` accepts besides file paths."""
    return [*SYNTHETIC, *SAMPLES]


def load_tasks(path_or_name: str | Path | None = None, n: int | None = None, seed: int = 0,
               shuffle: bool = False, adapter: str | None = None, start: int = 0) -> list[Task]:
    """Tasks from a JSONL path, a shipped sample name, or the generator (``None`` = ``"synthetic"``).

    Files and samples keep their order and give the first ``n`` items, or the ``n`` after the first ``start``
    (``shuffle=True``: a seeded random subset of ``n``). The generator makes ``n`` tasks (default 20) from
    ``seed``.

    >>> [t.id for t in load_tasks("gsm8k-sample", n=2, start=1)] == [t.id for t in load_tasks("gsm8k-sample")[1:3]]
    True
    """
    if n is not None and n <= 0:
        raise BadInputError(f"n must be positive, got {n}")
    if start < 0:
        raise BadInputError(f"start must be 0 or more, got {start}")
    if start and shuffle:
        raise BadInputError("start counts items in file order; it cannot be combined with shuffle")
    name = "synthetic" if path_or_name is None else str(path_or_name)
    if name in SYNTHETIC:
        if start:
            raise BadInputError("start counts items of a file or sample; generated tasks differ by seed instead")
        return generate_tasks(n or 20, seed=seed, kind=SYNTHETIC[name])  # type: ignore[arg-type]
    if name in SAMPLES:
        tasks = load_sample(name)
    elif Path(name).exists() or name.endswith(".jsonl") or "/" in name:
        tasks = load_jsonl(name, adapter=adapter, limit=None if shuffle or not n else start + n)
    else:
        raise BadInputError(f"no task file or known name {name!r} (names: {', '.join(task_names())})")
    if shuffle:
        tasks = random.Random(seed).sample(tasks, k=min(n or len(tasks), len(tasks)))
    tasks = tasks[start:]
    if not tasks:
        raise BadInputError(f"start {start} is past the last item of {name}")
    return tasks[:n] if n else tasks

"""A finished accuracy run taught to a knowledge pool: every verified outcome of a fixed method, offline.

``auto`` learns online, one item at a time, from the pipelines it happens to choose. A bench run already holds
verified outcomes of fixed methods on every item (run as batches): :func:`teach_pool` gives each of them to
:meth:`KnowledgePool.learn`, the same rule as online learning (a success keeps the question with the method's
pipeline as a learned entry). Teach a pool on training items, then run ``auto --no-learn --pool`` on others.

Each outcome is taught once: its run id is ``bench <started> <method> <task>``, and the pool refuses a
second outcome for a run id, so teaching the same run again adds nothing (counted as ``already taught``).
What cannot be taught is counted with its reason, never dropped silently: items that failed to run, methods
that are not a fixed pipeline (``auto``, ``random``, ``loglik``, ...), a task missing from the data or with
another gold answer (the data changed since the run).

>>> from kvmas.bench.lessons import method_spec
>>> method_spec("kv:vote").describe()
'vote(comm=kv)'
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kvmas.bench.harness import load_run, parse_methods
from kvmas.errors import BadInputError
from kvmas.organizer import KnowledgePool
from kvmas.organizer.spec import PipelineSpec
from kvmas.tasks import Task, format_question, load_tasks


def method_spec(name: str) -> PipelineSpec:
    """The pipeline a bench method runs: ``single``, ``comm:primitive`` or ``pipeline:PATH``.

    Raises BadInputError for methods that are not one fixed pipeline (``auto``, ``random``, ``loglik``...).
    """
    method = parse_methods(name)[0]
    if method.kind == "pipeline":
        return PipelineSpec.load(method.arg)
    if method.kind != "primitive":
        raise BadInputError(f"method {name!r} is not a fixed pipeline")
    comm, _, prim = name.rpartition(":")
    return PipelineSpec.chain((prim, {"comm": comm}) if comm else prim)


@dataclass
class Lessons:
    """What :func:`teach_pool` did: outcomes taught, successes among them, and every skip with its reason."""

    per_method: dict[str, list[int]] = field(default_factory=dict)  # method -> [taught, successes]
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    @property
    def taught(self) -> int:
        return sum(n for n, _ in self.per_method.values())

    @property
    def successes(self) -> int:
        return sum(ok for _, ok in self.per_method.values())

    def lines(self) -> list[str]:
        out = [f"taught {self.taught} verified outcomes ({self.successes} successes kept as pool entries)"]
        out += [f"  {m}: {ok}/{n} right" for m, (n, ok) in self.per_method.items()]
        out += [f"skipped {n}: {why}" for why, n in sorted(self.skipped.items())]
        return out


def teach_pool(run_dir: str | Path, pool: KnowledgePool, *, data: str | Path | None = None, model=None) -> Lessons:
    """Teach ``pool`` every verified outcome of the accuracy run in ``run_dir`` (see the module doc).

    ``data``: the task file when it moved since the run (default: the run's own ``config.data``). ``model``
    embeds the learned entries now (else they are embedded on the first search that needs them).
    """
    summary, items = load_run(Path(run_dir))
    cfg = summary["config"]
    tasks = _tasks_by_id(data or cfg.get("data"), cfg, {item.task_id for item in items})
    started = cfg.get("started") or Path(run_dir).resolve().name
    style = cfg.get("prompt", "cot")
    specs: dict[str, PipelineSpec | str] = {}
    out = Lessons()
    for item in items:
        if item.method not in specs:
            try:
                specs[item.method] = method_spec(item.method)
            except BadInputError as exc:
                specs[item.method] = str(exc)
        spec, task = specs[item.method], tasks.get(item.task_id)
        why = _unteachable(item, spec, task)
        if why is not None:
            out.skipped[why] += 1
            continue
        run_id = f"bench {started} {item.method} {item.task_id}"
        if pool.has_outcome(run_id):
            out.skipped["already taught"] += 1
            continue
        pool.learn(format_question(task, style=style), spec, item.correct, tokens=item.usage.computed,
                   model=model, run_id=run_id)
        counts = out.per_method.setdefault(item.method, [0, 0])
        counts[0] += 1
        counts[1] += int(item.correct)
    return out


def _unteachable(item, spec: PipelineSpec | str, task: Task | None) -> str | None:
    """Why an item cannot be taught (None when it can): ``spec`` is the method's pipeline or why it has none."""
    if isinstance(spec, str):
        return spec
    if item.error:
        return "the item failed to run"
    if task is None:
        return "task not in the data"
    if task.answer != item.gold:
        return "gold answer differs from the data's"
    return None


def _tasks_by_id(data, cfg: dict, wanted: set[str]) -> dict[str, Task]:
    """The run's tasks as it took them (its data, n, start, seed, shuffle); when some are not among them (a
    merged run, or one that recorded no start), the whole file."""
    if not data:
        raise BadInputError("the run records no data file; pass the task file")
    tasks = load_tasks(data, n=cfg.get("n"), seed=cfg.get("seed", 0), start=cfg.get("start") or 0,
                       shuffle=bool(cfg.get("shuffle")))
    by_id = {t.id: t for t in tasks}
    if wanted - by_id.keys() and Path(str(data)).is_file():
        by_id = {t.id: t for t in load_tasks(data)}
    return by_id

"""Questions fanned out over Ray workers, one model replica per worker (the ``ray`` extra; ``kvmas batch run``).

``fan_out(model_ref, method, items, workers=N)`` starts N actors (each loads ``model_ref`` once: a registry
name or a model folder, on the CPU or GPU the cluster gives it) and hands each one question at a time, so a
fast worker takes more. Every run is the one ``prim(question, seed=seed)`` gives alone in process, so the
results equal a single-process run. A worker that dies has its question run again on another and is not used
again; the report lists what was re-run. ``workers=1`` runs in this process, without Ray.

>>> from kvmas.testing import tiny_hf_model, tiny_tokenizer
>>> import tempfile
>>> d = tempfile.mkdtemp(); tok = tiny_tokenizer()
>>> _ = tiny_hf_model("llama", vocab_size=len(tok)).save_pretrained(d), tok.save_pretrained(d)
>>> res, report = fan_out(d, "single", [Item("a", "2+2?")], workers=1, params={"max_new_tokens": 3})
>>> res[0].id, report.reruns
('a', [])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvmas.errors import BadInputError, KvmasError
from kvmas.primitives import parse_method


@dataclass
class Item:
    id: str
    question: str
    seed: int = 0


@dataclass
class Result:
    id: str
    question: str
    answer: str
    method: str
    usage: dict[str, int]
    run_id: str
    worker: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    items: int
    workers: int
    wall_s: float = 0.0
    reruns: list[str] = field(default_factory=list)  # ids run again after their worker died
    dead_workers: list[int] = field(default_factory=list)


def run_one(model, method: str, params: dict, item: Item, worker: int | None = None) -> Result:
    """One question as ``prim(question, seed=seed)`` runs it alone; a KvmasError is the item's error."""
    prim = parse_method(method, **params)
    try:
        r = prim(item.question, model=model, seed=item.seed)
    except KvmasError as exc:
        return Result(item.id, item.question, "", prim.method, {}, "", worker, f"{type(exc).__name__}: {exc}")
    u = r.trace.usage
    return Result(item.id, item.question, r.answer, r.trace.method, u.model_dump(), r.trace.run_id, worker)


def _replica_class(ray):
    @ray.remote
    class Replica:
        """One model replica: loads the model once, runs questions one at a time."""

        def __init__(self, model_ref: str | None, device: str | None, dtype: str, index: int):
            from kvmas.agents.model import Model

            self.model, self.index = Model.load(model_ref, device=device, dtype=dtype), index

        def run(self, method: str, params: dict, item: Item) -> Result:
            return run_one(self.model, method, params, item, self.index)

    return Replica


def fan_out(model_ref: str | None, method: str, items: Sequence[Item], *, workers: int = 1, params: dict | None = None,
            address: str | None = None, device: str | None = None, dtype: str = "auto",
            on_done: Callable[[int, Result], None] | None = None, after_submit=None) -> tuple[list[Result], Report]:
    """Run every item; results in item order. ``after_submit(actor, index)`` hears each hand-out (tests: kill a
    worker mid-run)."""
    params = dict(params or {})
    parse_method(method, **params)  # an unknown method or bad parameter fails before any worker starts
    if workers < 1:
        raise BadInputError(f"workers must be >= 1, got {workers}")
    items = list(items)
    report = Report(items=len(items), workers=workers)
    t0 = time.perf_counter()
    results: list[Result | None] = [None] * len(items)
    if workers == 1 and address is None:
        from kvmas.agents.model import Model

        model = Model.load(model_ref, device=device, dtype=dtype)
        for i, item in enumerate(items):
            results[i] = run_one(model, method, params, item)
            if on_done:
                on_done(i, results[i])
    else:
        _on_ray(model_ref, method, params, items, workers, address, device, dtype, results, report, on_done,
                after_submit)
    report.wall_s = round(time.perf_counter() - t0, 3)
    return results, report


def _on_ray(model_ref, method, params, items, workers, address, device, dtype, results, report, on_done,
            after_submit) -> None:
    try:
        import ray
        from ray.exceptions import RayActorError
    except ModuleNotFoundError as exc:
        raise KvmasError("--workers needs the ray extra: pip install 'kvmas[ray]'") from exc
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    gpus = 1 if device and device.startswith("cuda") else 0
    Replica = _replica_class(ray)
    actors = {k: Replica.options(num_cpus=1, num_gpus=gpus).remote(model_ref, device, dtype, k)
              for k in range(workers)}
    todo = list(range(len(items)))[::-1]  # popped from the end: item order
    flight: dict[Any, tuple[int, int]] = {}  # object ref -> (worker, item index)

    def submit(k: int) -> None:
        if todo:
            i = todo.pop()
            flight[actors[k].run.remote(method, params, items[i])] = (k, i)
            if after_submit:
                after_submit(actors[k], i)

    for k in list(actors):
        submit(k)
    while flight:
        done, _ = ray.wait(list(flight), num_returns=1)
        k, i = flight.pop(done[0])
        try:
            results[i] = ray.get(done[0])
        except RayActorError:  # the worker died: its question goes back, the worker is not used again
            report.dead_workers.append(k)
            report.reruns.append(items[i].id)
            actors.pop(k, None)
            todo.append(i)
            if not actors:
                raise KvmasError(f"every worker died ({len(report.dead_workers)}); {len(todo)} questions not run")
            for other in list(actors):  # idle live workers pick the returned question up
                if not any(w == other for w, _ in flight.values()):
                    submit(other)
            continue
        if on_done:
            on_done(i, results[i])
        submit(k)

"""Work fanned out over Ray workers, one model replica per worker (the ``ray`` extra): ``kvmas batch run`` and
``kvmas bench accuracy --workers N``. The one place kvmas talks to Ray.

:class:`Replicas` starts N actors; each loads the model once (a registry name or a model folder, on the CPU or
GPU the cluster gives it). :meth:`Replicas.run` hands each worker one job at a time, so a fast worker takes
more. A job is a module-level function ``job(model, payload, worker) -> result`` that a worker imports. A
worker that dies has its job run again on another and is not used again; ``run`` returns the ids it re-ran.

``fan_out(model_ref, method, items, workers=N)`` answers questions with one method, each run the one
``prim(question, seed=seed)`` gives alone in process, so the results equal a single-process run; the report
lists what was re-run. ``workers=1`` runs in this process, without Ray.

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


def _answer(model, job: tuple[str, dict, Item], worker: int) -> Result:
    """The job of ``fan_out``: one question (method, params, item)."""
    return run_one(model, *job, worker)


def _replica_class(ray):
    @ray.remote
    class Replica:
        """One model replica: loads the model once, runs jobs one at a time."""

        def __init__(self, model_ref: str | None, device: str | None, dtype: str, index: int):
            from kvmas.agents.model import Model

            self.model, self.index = Model.load(model_ref, device=device, dtype=dtype), index

        def info(self) -> dict[str, str]:
            return {"name": self.model.name, "key": self.model.fingerprint.key}

        def run(self, job: Callable, payload: Any) -> Any:
            return job(self.model, payload, self.index)

    return Replica


class Replicas:
    """``workers`` Ray actors, each holding one replica of ``model_ref``, for as many :meth:`run` calls as
    needed (a benchmark's methods one after another on the same replicas). Joins the cluster at ``address``,
    else the one this process already joined, else starts a local one. Use as a context manager: leaving it
    ends the actors."""

    def __init__(self, model_ref: str | None, workers: int, *, address: str | None = None,
                 device: str | None = None, dtype: str = "auto"):
        if workers < 1:
            raise BadInputError(f"workers must be >= 1, got {workers}")
        try:
            import ray
            from ray.exceptions import RayActorError
        except ModuleNotFoundError as exc:
            raise KvmasError("--workers needs the ray extra: pip install 'kvmas[ray]'") from exc
        self._ray, self._died = ray, RayActorError
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        gpus = 1 if device and device.startswith("cuda") else 0
        # an actor the cluster cannot place waits for resources forever: refuse up front instead
        have = ray.cluster_resources()
        for kind, each in (("CPU", 1), ("GPU", gpus)):
            if each and have.get(kind, 0) < workers * each:
                raise BadInputError(f"--workers {workers} needs {workers * each} {kind}s, one per replica; the Ray "
                                    f"cluster has {have.get(kind, 0):g} (add nodes or ask for fewer workers)")
        Replica = _replica_class(ray)
        self.workers = workers
        self.actors = {k: Replica.options(num_cpus=1, num_gpus=gpus).remote(model_ref, device, dtype, k)
                       for k in range(workers)}
        self.dead: list[int] = []  # workers that died, in order, over every run

    def __enter__(self) -> "Replicas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the actors (their CPUs and GPUs go back to the cluster)."""
        for actor in self.actors.values():
            self._ray.kill(actor)
        self.actors.clear()

    def _lost(self, k: int) -> None:
        self.dead.append(k)
        self.actors.pop(k, None)
        if not self.actors:
            raise KvmasError(f"every worker died ({len(self.dead)})")

    def info(self) -> dict[str, str]:
        """The loaded model's name and fingerprint key, as a live worker reports them."""
        while True:
            k = next(iter(self.actors))
            try:
                return self._ray.get(self.actors[k].info.remote())
            except self._died:
                self._lost(k)

    def run(self, job: Callable[[Any, Any, int], Any], payloads: Sequence[Any], *,
            ids: Callable[[Any], list[str]], on_done: Callable[[int, Any], None] | None = None,
            after_submit: Callable[[Any, int], None] | None = None) -> tuple[list[Any], list[str]]:
        """``job(model, payload, worker)`` for every payload; (results in payload order, the ids of the payloads
        run again after their worker died). ``on_done(index, result)`` hears each result as it comes;
        ``after_submit(actor, index)`` each hand-out (tests: kill a worker mid-run)."""
        ray = self._ray
        results: list[Any] = [None] * len(payloads)
        reruns: list[str] = []
        todo = list(range(len(payloads)))[::-1]  # popped from the end: payload order
        flight: dict[Any, tuple[int, int]] = {}  # object ref -> (worker, payload index)

        def submit(k: int) -> None:
            if todo:
                i = todo.pop()
                flight[self.actors[k].run.remote(job, payloads[i])] = (k, i)
                if after_submit:
                    after_submit(self.actors[k], i)

        for k in list(self.actors):
            submit(k)
        while flight:
            done, _ = ray.wait(list(flight), num_returns=1)
            k, i = flight.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except self._died:  # the worker died: its job goes back, the worker is not used again
                reruns.extend(ids(payloads[i]))
                todo.append(i)
                try:
                    self._lost(k)
                except KvmasError as exc:
                    raise KvmasError(f"{exc}; {len(todo)} jobs not run") from None
                for other in list(self.actors):  # idle live workers pick the returned job up
                    if not any(w == other for w, _ in flight.values()):
                        submit(other)
                continue
            if on_done:
                on_done(i, results[i])
            submit(k)
        return results, reruns


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
    if workers == 1 and address is None:
        from kvmas.agents.model import Model

        model = Model.load(model_ref, device=device, dtype=dtype)
        results = []
        for i, item in enumerate(items):
            results.append(run_one(model, method, params, item))
            if on_done:
                on_done(i, results[i])
    else:
        with Replicas(model_ref, workers, address=address, device=device, dtype=dtype) as replicas:
            results, report.reruns = replicas.run(_answer, [(method, params, item) for item in items],
                                                  ids=lambda job: [job[2].id], on_done=on_done,
                                                  after_submit=after_submit)
            report.dead_workers = list(replicas.dead)
    report.wall_s = round(time.perf_counter() - t0, 3)
    return results, report

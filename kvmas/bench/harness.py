"""The evaluation harness: every method on the same tasks, same model, same seed and budgets; honest statistics.

``kvmas bench accuracy`` and ``kvmas bench efficiency`` both run here: one task loop (:func:`run_bench`)
writing one item record per method and task (:class:`kvmas.bench.items.ItemResult`, carrying the run's
:class:`~kvmas.trace.Usage`); the summary, markdown report and charts are :mod:`kvmas.bench.report`'s.
Options: ``BenchConfig.isolate`` runs each method in its own worker process, so its peak memory is its own;
``trace_dir`` keeps every run's trace; ``workers=N`` (and ``ray_address``) spreads each method's tasks over N
Ray workers, one model replica each (:mod:`kvmas.bench.fanout`): contiguous chunks of tasks, each run as rows
of one batch on a worker, kept in task order, so items and statistics equal a single-process run; a worker
that dies has its chunk re-run elsewhere, and ``config.fanout`` says which tasks.
``auto`` learning online cannot be split (each choice depends on what the pool learned from the items before
it): it runs in this process, one item at a time, as without workers. Every answer is checked for an echoed
role prompt.

Methods (comma-separated): ``single``; ``latent:review``, ``text:vote``, ... (any primitive as ``comm:name``);
``pipeline:PATH`` (a spec file); ``auto`` (the organizer over a seeded pool, learning online from each
verified answer: it chooses before seeing the gold answer, then learns); ``auto-empty`` (ablation: empty
pool, so always the organizer's fallback); ``random`` (ablation: a seeded random pick among the retrieved
pipelines); ``loglik`` (multiple choice only: options ranked by the mean per-token log-likelihood of their
text after ``Question: ...\nAnswer:``, no decoding).
With ``choice_scoring="loglik"`` every method's multiple-choice answer is also read by likelihood: after the
method's final state (its answer included), "Therefore, the answer is (" is prefilled and the option labels
are ranked; that label is scored (the extracted one stays in the item log).

Outputs in ``out_dir``: ``items.jsonl`` (one line per method and task, written as it goes), ``results.json``,
``results.md`` and ``chart.png``. Each method gets accuracy with a Wilson 95% interval (flexible and strict),
tokens and seconds per item, answer lengths, echoed role prompts and sample answers; every pair of methods
gets an exact McNemar test and a paired-bootstrap interval of the accuracy difference.

>>> from kvmas.bench.harness import parse_methods
>>> [m.name for m in parse_methods("single, text:review,auto")]
['single', 'text:review', 'auto']
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kvmas.agents.engine import default_batch_size, run_batched
from kvmas.agents.model import Model
from kvmas.agents.state import LatentState
from kvmas.bench.items import ItemResult
from kvmas.bench.report import write_summary
from kvmas.clock import utc_now
from kvmas.errors import BadInputError, InterruptedRunError, KvmasError
from kvmas.organizer import KnowledgePool, Organizer
from kvmas.organizer.pipeline import Pipeline
from kvmas.organizer.spec import PipelineSpec
from kvmas.paths import atomic_write_text, inside, safe_name
from kvmas.primitives import COMMS, PRIMITIVES, parse_method
from kvmas.primitives.echo import echoes_role_prompt
from kvmas.tasks import Task, format_question, loglik_continuations, loglik_prefix
from kvmas.tasks.answers import matches_gold, read_answer
from kvmas.tasks.prompts import check_style, prompt_echo_floor
from kvmas.trace import Usage

LABEL_LEAD = "\nTherefore, the answer is ("
# strict figures count explicit answer formats, and labels ranked by likelihood (no text is parsed for those)
SPECIAL = ("auto", "auto-empty", "random", "loglik")
DEFAULT_METHODS = "single,latent:review,text:review,latent:vote,text:vote,latent:plan,text:plan,auto"


@dataclass(frozen=True)
class Method:
    """One method to benchmark: ``kind`` is primitive | pipeline | auto | auto-empty | random | loglik."""

    name: str
    kind: str
    arg: str = ""


def parse_methods(text: str) -> list[Method]:
    """Parse ``--methods``; unknown names fail before anything runs."""

    out: list[Method] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name in SPECIAL:
            out.append(Method(name, name))
        elif name.startswith("pipeline:"):
            path = name.split(":", 1)[1]
            if not Path(path).is_file():
                raise BadInputError(f"method {name!r}: no spec file {path}")
            out.append(Method(name, "pipeline", path))
        else:
            comm, _, prim = name.rpartition(":")
            if prim not in PRIMITIVES or comm not in ("", *COMMS):
                raise BadInputError(f"unknown method {name!r} (primitives: {', '.join(PRIMITIVES)} as "
                                    f"[{'|'.join(COMMS)}:]NAME; also {', '.join(SPECIAL)}, pipeline:PATH)")
            out.append(Method(name, "primitive", name))
    if not out:
        raise BadInputError("no methods given")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise BadInputError(f"duplicate methods in {text!r}")
    return out


@dataclass
class BenchConfig:
    """Budgets and options shared by every method."""

    seed: int = 0
    max_new_tokens: int = 512
    latent_steps: int | None = None
    pool_path: str | None = None
    learn: bool = True
    organizer_k: int = 4
    choice_scoring: str = "extract"  # extract | loglik (multiple choice: rank the labels after the method's answer)
    prompt: str = "cot"  # cot (reason step by step) | direct (the answer alone)
    isolate: bool = False  # each method in its own worker process (its peak memory measured alone)
    batch_size: int | None = 1  # questions run as rows of shared forwards (None: as many as fit)
    trace_dir: str | None = None  # keep every run's trace here
    device: str | None = None  # where a worker loads the model (None: KVMAS_DEVICE, else auto)
    dtype: str = "auto"
    workers: int = 1  # Ray workers, one model replica each (1 and no ray_address: this process)
    ray_address: str | None = None  # a running Ray cluster (None: the one joined already, else a local one)

    @property
    def fanned_out(self) -> bool:
        return self.workers > 1 or self.ray_address is not None

    def learns_online(self, m: "Method") -> bool:
        """``auto`` teaching its pool after each item: its items depend on each other, one at a time."""
        return m.kind == "auto" and self.learn

    def prim_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.latent_steps is not None:
            params["latent_steps"] = self.latent_steps
        return params


def trace_name(method: str, index: int, task_id: str) -> str:
    """A trace file name that stays inside its folder whatever the task id holds (``../x`` included): a slug
    plus a short hash of method, index and task id, so distinct items never share a file."""
    return safe_name(f"{method}__{index:05d}__{task_id}", max_len=150) + ".json"


class _Runner:
    """Builds each method once and runs it on tasks."""

    def __init__(self, method: Method, model, cfg: BenchConfig, out_dir: Path):
        self.method, self.model, self.cfg = method, model, cfg
        self.org = None
        if method.kind == "primitive":
            self.prim = parse_method(method.arg, **cfg.prim_params())
        elif method.kind == "pipeline":
            self.prim = Pipeline(PipelineSpec.load(method.arg).with_params(**cfg.prim_params()))
        elif method.kind in ("auto", "auto-empty", "random"):
            path = out_dir / f"pool-{method.kind}.sqlite"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            if method.kind == "auto-empty":
                pool = KnowledgePool(path, seed=False)
            else:
                if cfg.pool_path:  # validated as it opens; copied with what its write-ahead log holds
                    KnowledgePool(cfg.pool_path).copy_to(path)
                pool = KnowledgePool(path)
            self.org = Organizer(pool, k=cfg.organizer_k, node_params=cfg.prim_params(),
                                 random_choice=method.kind == "random")

    def positions(self, tasks: Sequence[Task]) -> int:
        """KV positions the longest task holds at once with this method, over all its rows (sizes the
        default batch)."""
        longest = max(len(self.model.encode(format_question(t, style=self.cfg.prompt))) for t in tasks)
        prim = self.prim if self.org is None and self.method.kind != "loglik" else None
        return prim.kv_positions(longest) if prim is not None else longest + 1024

    def run(self, task: Task, index: int = 0) -> ItemResult:
        t0 = time.perf_counter()
        if self.method.kind == "loglik":
            return self._loglik(task, t0)
        question = format_question(task, style=self.cfg.prompt)
        if self.org is not None:
            result = self.org.run(question, model=self.model, seed=self.cfg.seed)
        else:
            result = self.prim(question, model=self.model, seed=self.cfg.seed)
        answer = result.answer or ""
        reading = read_answer(answer, task)
        pred, rule = reading.answer, reading.rule
        ok = matches_gold(pred, task)
        usage = result.trace.usage
        facts = {k: v for k, v in result.meta.items() if k != "organizer"}
        meta: dict[str, Any] = {"facts": facts} if facts else {}
        _score_candidates(meta, task)
        if self.cfg.choice_scoring == "loglik" and task.kind == "choice" and result.state is not None:
            label, scores, extra = self._label_after(result.state, task)
            meta.update({"extracted": pred, "extracted_rule": rule, "label_scores": scores})
            pred, ok, usage, rule = label, label == task.answer, usage + extra, "loglik"
        wall = time.perf_counter() - t0
        if self.org is not None:
            org = result.meta.get("organizer", {})
            meta.update(chosen=org.get("method"), entry_id=org.get("entry_id"), decision=org.get("decision"))
            if self.cfg.learn and self.method.kind == "auto":
                self.org.feedback(result, ok, model=self.model)
        if self.cfg.trace_dir:
            result.trace.outcome = {"correct": ok, "gold": task.answer, "pred": pred, "rule": rule, "task_id": task.id}
            result.trace.save(inside(self.cfg.trace_dir, trace_name(self.method.name, index, task.id)))
        return ItemResult(self.method.name, task.id, task.kind, task.answer, pred, ok, answer, usage, wall,
                          len(self.model.encode(answer)) if answer else 0, meta, rule=rule,
                          echo=echoes_role_prompt(answer))

    def _label_after(self, state, task: Task) -> tuple[str, list[float], Usage]:
        """The option label the model finds most likely right after its own answer (``--choice-scoring loglik``)."""
        if state.rows > 1:
            state = state.select([0])
        lead = LABEL_LEAD
        after = state.extend(lead, agent="scorer", role="scorer")
        scores = after.score(task.labels)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        extra = Usage(prefilled=after.length - state.length, reused=state.length)
        return task.labels[best], [round(x, 4) for x in scores], extra

    def _loglik(self, task: Task, t0: float) -> ItemResult:
        if task.kind != "choice":
            raise BadInputError(f"loglik scores multiple-choice tasks only; {task.id} is a {task.kind} task")
        prefix = loglik_prefix(task)
        conts = loglik_continuations(task)
        state = LatentState.empty(self.model).extend(prefix, agent="scorer", role="scorer")
        scores = state.score(conts, mean=True)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        label = task.labels[best]
        n_cont = sum(max(0, len(self.model.encode(c)) - 1) for c in conts)
        usage = Usage(prefilled=state.length + n_cont, reused=state.length * (len(conts) - 1))
        return ItemResult(self.method.name, task.id, task.kind, task.answer, label, label == task.answer, label,
                          usage, time.perf_counter() - t0, 0, {"scores": [round(s, 4) for s in scores]}, rule="loglik")


def _score_candidates(meta: dict[str, Any], task: Task) -> None:
    """Score each candidate answer a Vote recorded (``facts.vote_candidates``) and each draft a Review's critic
    read (``facts.review_drafts``) against the gold answer, so the report can show what selection had to choose
    from and what refinement did."""
    facts = meta.get("facts") or {}
    for fact, scored in (("vote_candidates", "candidates_correct"), ("review_drafts", "drafts_correct")):
        keys = facts.get(fact)
        if isinstance(keys, list):
            meta[scored] = [bool(k) and matches_gold(str(k), task) for k in keys]


def run_bench(tasks: Sequence[Task], methods: Sequence[Method] | str, model, out_dir: str | Path,
              cfg: BenchConfig | None = None, data_name: str = "",
              progress: Callable[[str, int, int], None] | None = None, extra=None,
              after_submit: Callable[[Any, int], None] | None = None, start: int = 0,
              shuffle: bool = False) -> dict[str, Any]:
    """Run every method on every task; write the item log, JSON, markdown and chart; return the results dict.

    ``start`` and ``shuffle`` say how ``tasks`` were taken from ``data_name`` (``load_tasks``' arguments); they
    are only recorded, so that ``kvmas pool learn`` can read the same tasks again.

    ``model``: a Model (or, with ``cfg.isolate`` or ``cfg.workers``, also a registry name / model dir for the
    workers to load; with workers the name is not loaded here unless ``auto`` learns online).
    ``extra(summary) -> dict`` adds a report section (the efficiency bench's ratios) before anything is written.
    ``after_submit(actor, chunk)`` hears each chunk handed to a Ray worker (tests: kill a worker mid-run).
    """
    cfg = cfg or BenchConfig()
    if cfg.choice_scoring not in ("extract", "loglik"):
        raise BadInputError(f"unknown choice scoring {cfg.choice_scoring!r} (extract|loglik)")
    check_style(cfg.prompt)  # up front: a bad style fails before any method runs
    if isinstance(methods, str):
        methods = parse_methods(methods)
    if not tasks:
        raise BadInputError("no tasks to run")
    if any(m.kind == "loglik" for m in methods) and any(t.kind != "choice" for t in tasks):
        raise BadInputError("method loglik needs multiple-choice tasks (the data has number tasks)")
    if cfg.workers < 1:
        raise BadInputError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.fanned_out and cfg.isolate:
        raise BadInputError("isolate measures each method alone in one process; it does not go with workers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[ItemResult]] = {m.name: [] for m in methods}
    peak: dict[str, float] = {}
    method_wall: dict[str, float] = {}  # each method's whole task loop: with batching, items overlap in time
    replicas = None  # started when the first method that can be split runs
    reruns: dict[str, list[str]] = {}
    started = utc_now()
    interrupted = None
    with open(out / "items.jsonl", "w", encoding="utf-8") as log, ExitStack() as stack:
        for k, m in enumerate(methods):
            def keep(item: ItemResult, name=m.name) -> None:
                results[name].append(item)
                log.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
                log.flush()
                if progress:
                    progress(name, len(results[name]), len(tasks))

            if progress:
                progress(m.name, 0, len(tasks))
            t0 = time.perf_counter()
            try:
                if cfg.isolate:
                    peak[m.name] = _run_isolated(m, tasks, model, cfg, out, keep)
                elif cfg.fanned_out and not cfg.learns_online(m):
                    if replicas is None:
                        replicas = stack.enter_context(_replicas(model, cfg))
                    reruns[m.name] = _run_on_replicas(m, tasks, replicas, cfg, keep, after_submit)
                else:
                    _run_method(m, tasks, model, cfg, out, keep)
            except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, from the CLI): report what finished, then stop
                interrupted = {"method": m.name, "done": len(results[m.name]), "of": len(tasks),
                               "not_run": [x.name for x in methods[k + 1:]]}
            method_wall[m.name] = round(time.perf_counter() - t0, 3)
            if interrupted:
                break
        loaded = replicas.info() if replicas is not None else None
    if loaded is not None:
        model_name, model_key = loaded["name"], loaded["key"]
    else:
        model_name = model if isinstance(model, str) else getattr(model, "name", "?")
        model_key = _model_key(model, cfg)
    config = {"data": data_name, "n": len(tasks), "start": start, "shuffle": shuffle, "seed": cfg.seed,
              "model": model_name, "model_key": model_key, "max_new_tokens": cfg.max_new_tokens,
              "latent_steps": cfg.latent_steps, "learn": cfg.learn, "choice_scoring": cfg.choice_scoring,
              "prompt": cfg.prompt, "started": started, "methods": [m.name for m in methods],
              "batch_size": cfg.batch_size, "method_wall_s": method_wall,
              "prompt_echo_floor": prompt_echo_floor(tasks, cfg.prompt)}
    if cfg.fanned_out:
        config["fanout"] = {"workers": cfg.workers, "workers_died": len(replicas.dead) if replicas else 0,
                            "reruns": {name: ids for name, ids in reruns.items() if ids},
                            "in_process": [m.name for m in methods if cfg.learns_online(m)]}
    if interrupted is not None:
        _report_interrupted(out, config, results, interrupted, peak)
    return write_summary(out, config, results, peak_rss_mb=peak, extra=extra)


def _report_interrupted(out: Path, config: dict[str, Any], results: dict[str, list[ItemResult]],
                        interrupted: dict[str, Any], peak: dict[str, float]) -> None:
    """An interrupted run's report over the items that finished (a method's first ``done`` tasks, since items
    are kept in task order: a range that ``--start`` continues and ``merge`` joins), then the error."""
    kept = {name: items for name, items in results.items() if items}
    where = f"{interrupted['method']}: {interrupted['done']} of {interrupted['of']} items finished"
    if kept:
        config = {**config, "methods": list(kept), "interrupted": interrupted,
                  "method_wall_s": {n: w for n, w in config["method_wall_s"].items() if n in kept}}
        write_summary(out, config, kept, peak_rss_mb=peak)
        where += f"; their report is in {out}"
    else:
        where += "; no report written"
    err = InterruptedRunError(f"interrupted ({where})")
    err.report = interrupted
    raise err


def _model_key(model, cfg: "BenchConfig") -> str:
    if isinstance(model, str):
        model = Model.load(model, device=cfg.device, dtype=cfg.dtype)
    return model.fingerprint.key


def _replicas(model, cfg: BenchConfig):
    """``cfg.workers`` Ray workers holding ``model`` (a Model: the same weights on the same device, in the same
    dtype; a name or folder: as ``cfg`` says)."""
    from kvmas.bench.fanout import Replicas

    if isinstance(model, str) or model is None:
        return Replicas(model, cfg.workers, address=cfg.ray_address, device=cfg.device, dtype=cfg.dtype)
    return Replicas(model.source or model.name, cfg.workers, address=cfg.ray_address, device=str(model.device),
                    dtype=str(model.dtype).removeprefix("torch."))


def _run_on_replicas(m: Method, tasks: Sequence[Task], replicas, cfg: BenchConfig,
                     keep: Callable[[ItemResult], None], after_submit=None) -> list[str]:
    """The task loop of one method over Ray workers: contiguous chunks of ``cfg.batch_size`` tasks (default:
    the tasks split evenly over the workers, at most 32 a chunk), each run by :func:`_run_method` on a worker;
    items kept in task order as chunks come. Returns the ids of the tasks re-run after their worker died."""
    size = cfg.batch_size or max(1, min(32, -(-len(tasks) // replicas.workers)))
    chunks = [(m, cfg, i, list(tasks[i:i + size])) for i in range(0, len(tasks), size)]
    release = _InOrder(lambda items: [keep(item) for item in items])
    _, reruns = replicas.run(_chunk_job, chunks, ids=lambda chunk: [t.id for t in chunk[3]], on_done=release,
                             after_submit=after_submit)
    return reruns


def _chunk_job(model, chunk, worker: int) -> list[ItemResult]:
    """On a Ray worker: one chunk of one method's tasks, as :func:`_run_method` runs them in process."""
    m, cfg, first, tasks = chunk
    items: list[ItemResult] = []
    _run_method(m, tasks, model, cfg, _worker_scratch(), items.append, first=first)
    return items


_SCRATCH: list[Path] = []


def _worker_scratch() -> Path:
    """A folder of this worker process's own (a pool-based method's copy of its pool lives there)."""
    if not _SCRATCH:
        import tempfile

        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="kvmas-worker-")))
    return _SCRATCH[0]


class _InOrder:
    """``release(i, value)`` passes values on to ``emit`` in index order, whatever order they finish in."""

    def __init__(self, emit: Callable[[Any], Any]):
        self.emit, self.done, self.next, self.lock = emit, {}, 0, threading.Lock()

    def __call__(self, i: int, value: Any) -> None:
        with self.lock:
            self.done[i] = value
            while self.next in self.done:
                self.emit(self.done.pop(self.next))
                self.next += 1


def _run_method(m: Method, tasks: Sequence[Task], model, cfg: BenchConfig, out: Path,
                keep: Callable[[ItemResult], None], first: int = 0) -> None:
    """The task loop of one method, in this process: ``cfg.batch_size`` tasks at a time as rows of shared
    forwards (items still kept in task order, as they finish). ``auto`` learning online runs one at a time:
    each choice depends on what the pool learned from the items before it. ``first``: the index of
    ``tasks[0]`` among the run's tasks (a worker's chunk; trace names count from it)."""
    if isinstance(model, str):
        model = Model.load(model, device=cfg.device, dtype=cfg.dtype)
    runner = _Runner(m, model, cfg, out)

    def one(i: int, task: Task) -> ItemResult:
        try:
            return runner.run(task, first + i)
        except KvmasError as exc:  # a user-visible limit (context overflow, ...): logged, counted wrong
            return ItemResult(m.name, task.id, task.kind, task.answer, None, False, "", Usage(), 0.0,
                              error=f"{type(exc).__name__}: {exc}")

    size = 1 if cfg.learns_online(m) else cfg.batch_size
    if size is None:
        size = default_batch_size(model, runner.positions(tasks))
    run_batched(model, [lambda i=i, t=t: one(i, t) for i, t in enumerate(tasks)], size, on_done=_InOrder(keep))


def _run_isolated(m: Method, tasks: Sequence[Task], model, cfg: BenchConfig, out: Path,
                  keep: Callable[[ItemResult], None]) -> float:
    """The task loop of one method in a worker process; returns the worker's peak RSS (MB)."""
    ref = model if isinstance(model, str) else (model.source or model.name)
    spec_cfg = asdict(cfg)
    if not isinstance(model, str):  # the worker loads the same weights on the same device, in the same dtype
        spec_cfg.update(device=str(model.device), dtype=str(model.dtype).removeprefix("torch."))
    stem = safe_name(m.name)
    spec_path, result_path = inside(out, f".{stem}.spec.json"), inside(out, f".{stem}.result.json")
    atomic_write_text(spec_path, json.dumps({
        "method": asdict(m), "model": ref, "cfg": spec_cfg, "out": str(out), "result": str(result_path),
        "tasks": [t.model_dump(mode="json") for t in tasks]}))
    proc = subprocess.Popen([sys.executable, "-m", "kvmas.bench.harness", "--worker", str(spec_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("ITEM "):
            keep(ItemResult.from_json(json.loads(line[5:])))
    err = proc.stderr.read()
    try:
        if proc.wait() != 0:
            raise KvmasError(f"{m.name} failed: {err.strip().splitlines()[-1] if err.strip() else 'no output'}")
        return float(json.loads(result_path.read_text())["peak_rss_mb"])
    finally:
        for p in (spec_path, result_path):
            p.unlink(missing_ok=True)


def _worker(spec_path: str) -> None:
    """Worker entry (``python -m kvmas.bench.harness --worker SPEC``): one method, items on stdout."""
    spec = json.loads(Path(spec_path).read_text())
    tasks = [Task.model_validate(t) for t in spec["tasks"]]

    def emit(item: ItemResult) -> None:
        print("ITEM " + json.dumps(item.to_json(), ensure_ascii=False), flush=True)

    _run_method(Method(**spec["method"]), tasks, spec["model"], BenchConfig(**spec["cfg"]), Path(spec["out"]), emit)
    atomic_write_text(spec["result"], json.dumps(
        {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# Settings that must agree before runs can be merged into one report (methods, tasks and start time may differ).
MERGE_KEYS = ("data", "seed", "model_key", "max_new_tokens", "latent_steps", "choice_scoring", "prompt")


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """One report from runs on the same data and settings: methods split across processes or sessions, and
    one method's task ranges run at different times (``--start 0 --n 100`` and ``--start 100 --n 100``) are
    joined; the item logs are concatenated in task order, the statistics recomputed. Methods may cover
    different tasks (a costly twin on fewer items): each pair is compared on the tasks both ran, with its n.

    Raises BadInputError when the runs disagree on a setting in ``MERGE_KEYS`` or a method ran a task twice.
    """
    if len(run_dirs) < 2:
        raise BadInputError("merge needs at least two run directories")
    if Path(out_dir).resolve() in {Path(d).resolve() for d in run_dirs}:
        raise BadInputError(f"the merged report would overwrite one of its inputs ({out_dir})")
    configs: list[dict[str, Any]] = []
    results: dict[str, list[ItemResult]] = {}
    ran_in: dict[tuple[str, str], Path] = {}
    order: dict[str, int] = {}
    walls: dict[str, float] = {}
    for d in map(Path, run_dirs):
        summary, items = load_run(d)
        cfg = summary["config"]
        for key in MERGE_KEYS:
            if configs and _setting(cfg, key) != _setting(configs[0], key):
                raise BadInputError(f"{d}: config.{key} = {cfg.get(key)!r} differs from "
                                    f"{configs[0].get(key)!r} in {run_dirs[0]}")
        configs.append(cfg)
        for item in items:
            if ran_in.setdefault((item.method, item.task_id), d) != d:
                raise BadInputError(f"{d}: method {item.method} also ran task {item.task_id} in "
                                    f"{ran_in[item.method, item.task_id]}")
            order.setdefault(item.task_id, len(order))
            results.setdefault(item.method, []).append(item)
        for name, wall in (cfg.get("method_wall_s") or {}).items():
            walls[name] = round(walls.get(name, 0.0) + wall, 3)
    for items in results.values():
        items.sort(key=lambda r: order[r.task_id])
    config = dict(configs[0])
    config["n"] = len(order)
    config["n_per_method"] = {name: len(items) for name, items in results.items()}
    config["methods"] = list(results)
    config["method_wall_s"] = walls
    config["batch_sizes"] = {m: c.get("batch_size") for c in configs for m in c.get("methods", [])}
    config["merged_from"] = [str(d) for d in run_dirs]
    config.pop("start", None)  # the joined ranges need not be one: a reader looks tasks up by id
    fanned = [c["fanout"] for c in configs if c.get("fanout")]
    config.pop("fanout", None)
    if fanned:  # the runs over workers, joined: the most workers any used, every death and every re-run
        reran: dict[str, list[str]] = {}
        for f in fanned:
            for name, ids in f.get("reruns", {}).items():
                reran.setdefault(name, []).extend(ids)
        config["fanout"] = {"workers": max(f["workers"] for f in fanned),
                            "workers_died": sum(f.get("workers_died", 0) for f in fanned), "reruns": reran,
                            "in_process": sorted({m for f in fanned for m in f.get("in_process", [])})}
    return _write_report(Path(out_dir), config, results)


def _setting(cfg: dict[str, Any], key: str) -> Any:
    """A run's setting as merge compares it: a data file by where it is (``../data/x.jsonl`` run from one folder
    and ``/abs/data/x.jsonl`` are the same data), anything else as recorded."""
    value = cfg.get(key)
    if key == "data" and isinstance(value, str) and Path(value).is_file():
        return str(Path(value).resolve())
    return value


def rescore_run(run_dir: str | Path, tasks: Sequence[Task], out_dir: str | Path) -> dict[str, Any]:
    """The report of a finished run with every stored answer read again by the current scorer (after a scorer
    change: no model needed). ``tasks`` must hold every task of the run (looked up by id). Items ranked by
    likelihood keep their label; their extracted text answer is re-read into ``meta``.

    The rescored report records the previous figures under ``config.rescored_from``.
    """
    src = Path(run_dir)
    if Path(out_dir).resolve() == src.resolve():
        raise BadInputError(f"the rescored report would overwrite its input ({out_dir})")
    before, items = load_run(src)
    by_id = {t.id: t for t in tasks}
    results: dict[str, list[ItemResult]] = {}
    for item in items:
        task = by_id.get(item.task_id)
        if task is None:
            raise BadInputError(f"{src}: task {item.task_id} is not in the data given")
        if item.error is None:
            reading = read_answer(item.answer, task)
            if item.rule == "loglik" or "label_scores" in item.meta or "scores" in item.meta:
                item.rule = "loglik"
                if "label_scores" in item.meta:
                    item.meta.update(extracted=reading.answer, extracted_rule=reading.rule)
            else:
                item.pred, item.rule = reading.answer, reading.rule
                item.correct = matches_gold(item.pred, task)
            _score_candidates(item.meta, task)
        results.setdefault(item.method, []).append(item)
    config = dict(before["config"])
    config["prompt_echo_floor"] = prompt_echo_floor([by_id[r.task_id] for r in next(iter(results.values()))],
                                                    config.get("prompt", "cot"))
    config["rescored_from"] = {"run": str(src), "correct": {m: s["correct"] for m, s in before["methods"].items()}}
    return _write_report(Path(out_dir), config, results)


def load_run(d: Path) -> tuple[dict[str, Any], list[ItemResult]]:
    """A finished run's results dict and item records; BadInputError naming what is wrong."""
    try:
        summary = json.loads((d / "results.json").read_text(encoding="utf-8"))
        lines = (d / "items.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{d}: not a finished accuracy run ({exc})") from exc
    if not isinstance(summary, dict) or not {"config", "methods"} <= set(summary):
        raise BadInputError(f"{d}: not a finished accuracy run (results.json has no config and methods)")
    items = []
    for n, line in enumerate(lines, 1):
        try:
            items.append(ItemResult.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"{d}/items.jsonl line {n}: not an item record ({exc})") from exc
    return summary, items


def _write_report(out: Path, config: dict[str, Any], results: dict[str, list[ItemResult]]) -> dict[str, Any]:
    """The item log (atomically) and the summary of a report built from stored items."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n"
                                                   for items in results.values() for r in items))
    return write_summary(out, config, results)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        raise SystemExit("usage: kvmas bench accuracy|efficiency ... (this module's __main__ is the worker entry)")

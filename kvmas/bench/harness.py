"""The evaluation harness: every method on the same tasks, same model, same seed and budgets; honest statistics.

``kvmas bench accuracy`` and ``kvmas bench efficiency`` both run here: one item record (:class:`ItemResult`,
carrying the run's :class:`~kvmas.trace.Usage`), one task loop (:func:`run_bench`), one summary, markdown
report and chart. Options: ``BenchConfig.isolate`` runs each method in its own worker process, so its peak
memory is its own; ``trace_dir`` keeps every run's trace; ``workers=N`` (and ``ray_address``) spreads each
method's tasks over N Ray workers, one model replica each (:mod:`kvmas.bench.fanout`): contiguous chunks of
tasks, each run as rows of one batch on a worker, kept in task order, so items and statistics equal a
single-process run; a worker that dies has its chunk re-run elsewhere, and ``config.fanout`` says which tasks.
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
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

from kvmas.agents.engine import default_batch_size, run_batched
from kvmas.agents.model import Model
from kvmas.agents.state import LatentState
from kvmas.clock import utc_now
from kvmas.errors import BadInputError, InterruptedRunError, KvmasError
from kvmas.organizer import KnowledgePool, Organizer
from kvmas.organizer.pipeline import Pipeline
from kvmas.organizer.spec import PipelineSpec
from kvmas.paths import atomic_write_text, inside, safe_name
from kvmas.primitives import COMMS, PRIMITIVES, parse_method
from kvmas.primitives.echo import echoes_role_prompt
from kvmas.stats import mcnemar_exact, paired_bootstrap, wilson
from kvmas.tasks import Task, format_question, loglik_continuations, loglik_prefix
from kvmas.tasks.answers import STRICT_RULES, matches_gold, read_answer
from kvmas.tasks.prompts import check_style, prompt_echo_floor
from kvmas.trace import Usage

LABEL_LEAD = "\nTherefore, the answer is ("
# strict figures count explicit answer formats, and labels ranked by likelihood (no text is parsed for those)
STRICT_SCORED = STRICT_RULES | {"loglik"}
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


def draft_summary(items: list[ItemResult]) -> dict[str, int] | None:
    """What a Review's refinement did, over the items that recorded their drafts: ``first_right`` (the first
    draft was right), ``fixed`` (first draft wrong, final answer right), ``broke`` (first draft right, final
    answer wrong); None when no item recorded drafts.

    >>> from kvmas.trace import Usage
    >>> r = ItemResult("kv:review", "t1", "number", "3", "3", True, "", Usage(), 0.0,
    ...                meta={"facts": {"review_drafts": ["4", "3"]}, "drafts_correct": [False, True]})
    >>> draft_summary([r])
    {'n': 1, 'first_right': 0, 'final_right': 1, 'fixed': 1, 'broke': 0}
    """
    rows = [r for r in items if r.meta.get("drafts_correct")]
    if not rows:
        return None
    first = [r.meta["drafts_correct"][0] for r in rows]
    return {"n": len(rows), "first_right": sum(first), "final_right": sum(r.correct for r in rows),
            "fixed": sum(r.correct and not f for r, f in zip(rows, first)),
            "broke": sum(f and not r.correct for r, f in zip(rows, first))}


def candidate_summary(items: list[ItemResult]) -> dict[str, int] | None:
    """What a method's candidates held, over the items that recorded them: ``any_correct`` (the ceiling of
    any selection), ``majority`` (items with a strict majority answer) and ``majority_correct`` (that answer
    right), ``unanimous``; None when no item recorded candidates.

    >>> from kvmas.trace import Usage
    >>> r = ItemResult("kv:vote", "t1", "number", "3", "4", False, "", Usage(), 0.0,
    ...                meta={"facts": {"vote_candidates": ["3", "3", "4"]}, "candidates_correct": [True, True, False]})
    >>> candidate_summary([r])
    {'n': 1, 'any_correct': 1, 'majority': 1, 'majority_correct': 1, 'unanimous': 0}
    """
    rows = [r for r in items if "candidates_correct" in r.meta]
    if not rows:
        return None
    out = {"n": len(rows), "any_correct": 0, "majority": 0, "majority_correct": 0, "unanimous": 0}
    for r in rows:
        keys, right = r.meta["facts"]["vote_candidates"], r.meta["candidates_correct"]
        out["any_correct"] += any(right)
        counts = Counter(k for k in keys if k)
        if counts:
            top, count = counts.most_common(1)[0]
            if count * 2 > len(keys):
                out["majority"] += 1
                out["majority_correct"] += right[keys.index(top)]
            out["unanimous"] += count == len(keys)
    return out


def _summarise(items: list[ItemResult]) -> dict[str, Any]:
    n = len(items)
    k = sum(r.correct for r in items)
    wlo, whi = wilson(k, n)
    k_strict = sum(r.correct_strict for r in items)
    rules: dict[str, dict[str, int]] = {}
    for r in items:
        row = rules.setdefault(r.rule or "none", {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(r.correct)
    tot = Usage()
    for r in items:
        tot = tot + r.usage
    per = lambda v: round(v / n, 2) if n else 0.0  # noqa: E731
    out: dict[str, Any] = {
        "n": n, "correct": k, "accuracy": round(k / n, 4) if n else 0.0,
        "ci95_wilson": [round(wlo, 4), round(whi, 4)],
        "correct_strict": k_strict, "accuracy_strict": round(k_strict / n, 4) if n else 0.0,
        "ci95_wilson_strict": [round(x, 4) for x in wilson(k_strict, n)], "rules": rules,
        "tokens_per_item": {"prefilled": per(tot.prefilled), "reused": per(tot.reused), "latent": per(tot.latent),
                            "generated": per(tot.generated), "computed": per(tot.computed)},
        "tokens_total": {**tot.model_dump(), "computed": tot.computed},
        "wall_s_total": round(sum(r.wall_s for r in items), 3), "wall_s_per_item": per(sum(r.wall_s for r in items)),
        "answer_tokens_mean": per(sum(r.answer_tokens for r in items)),
        "answer_chars_mean": per(sum(len(r.answer) for r in items)),
        "empty_answers": sum(1 for r in items if not r.answer.strip()),
        "no_extractable_answer": sum(1 for r in items if r.pred is None),
        "errors": sum(1 for r in items if r.error),
        "echoes": sum(1 for r in items if r.echo),
        "samples": [{"task_id": r.task_id, "gold": r.gold, "pred": r.pred, "rule": r.rule, "answer": r.answer[:300]}
                    for r in items[:3]],
    }
    cands = candidate_summary(items)
    if cands:
        out["candidates"] = cands
    drafts = draft_summary(items)
    if drafts:
        out["drafts"] = drafts
    read = [r for r in items if "extracted" in r.meta]  # --choice-scoring loglik keeps the text's own answer too
    if read:
        k_text = sum(r.meta["extracted"] == r.gold for r in read)
        out["extracted"] = {"n": len(read), "correct": k_text,
                            "ci95_wilson": [round(x, 4) for x in wilson(k_text, len(read))]}
    chosen = [r for r in items if r.meta.get("chosen")]
    if chosen:  # how often each pipeline was chosen, and how often it was then right
        counts = Counter(r.meta["chosen"] for r in chosen)
        right = Counter(r.meta["chosen"] for r in chosen if r.correct)
        out["chosen_pipelines"] = dict(counts.most_common())
        out["chosen_correct"] = {c: right[c] for c in out["chosen_pipelines"]}
    return out


def _paired(results: dict[str, list[ItemResult]], seed: int) -> list[dict[str, Any]]:
    out = []
    for a, b in combinations(list(results), 2):
        ra = {r.task_id: r.correct for r in results[a]}
        rb = {r.task_id: r.correct for r in results[b]}
        ids = [t for t in ra if t in rb]
        if not ids:
            continue
        xa, xb = [int(ra[t]) for t in ids], [int(rb[t]) for t in ids]
        mc = mcnemar_exact(xa, xb)
        d = paired_bootstrap(xa, xb, seed=seed)
        out.append({"a": a, "b": b, "n": len(ids), "diff": round(d.diff, 4), "ci95": [round(d.lo, 4), round(d.hi, 4)],
                    "a_only": mc.a_only, "b_only": mc.b_only, "mcnemar_p": round(mc.p_value, 4)})
    return out


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
    return _write_summary(out, config, results, peak_rss_mb=peak, extra=extra)


def _report_interrupted(out: Path, config: dict[str, Any], results: dict[str, list[ItemResult]],
                        interrupted: dict[str, Any], peak: dict[str, float]) -> None:
    """An interrupted run's report over the items that finished (a method's first ``done`` tasks, since items
    are kept in task order: a range that ``--start`` continues and ``merge`` joins), then the error."""
    kept = {name: items for name, items in results.items() if items}
    where = f"{interrupted['method']}: {interrupted['done']} of {interrupted['of']} items finished"
    if kept:
        config = {**config, "methods": list(kept), "interrupted": interrupted,
                  "method_wall_s": {n: w for n, w in config["method_wall_s"].items() if n in kept}}
        _write_summary(out, config, kept, peak_rss_mb=peak)
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
            keep(_item_from_json(json.loads(line[5:])))
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
            items.append(_item_from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"{d}/items.jsonl line {n}: not an item record ({exc})") from exc
    return summary, items


def _write_report(out: Path, config: dict[str, Any], results: dict[str, list[ItemResult]]) -> dict[str, Any]:
    """The item log (atomically) and the summary of a report built from stored items."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n"
                                                   for items in results.values() for r in items))
    return _write_summary(out, config, results)


def _item_from_json(d: dict[str, Any]) -> ItemResult:
    return ItemResult(d["method"], d["task_id"], d["kind"], d["gold"], d["pred"], d["correct"], d["answer"],
                      Usage(**d["usage"]), d["wall_s"], d.get("answer_tokens", 0), d.get("meta") or {},
                      d.get("error"), d.get("rule"), d.get("echo", echoes_role_prompt(d["answer"])))


def _write_summary(out: Path, config: dict[str, Any], results: dict[str, list[ItemResult]], *,
                   peak_rss_mb: dict[str, float] | None = None, extra=None) -> dict[str, Any]:
    seed = config["seed"]
    summary = {"config": config, "methods": {name: _summarise(items) for name, items in results.items()},
               "paired": _paired(results, seed)}
    for name, mb in (peak_rss_mb or {}).items():
        summary["methods"][name]["peak_rss_mb"] = round(mb, 1)
    for name, wall in (config.get("method_wall_s") or {}).items():
        s = summary["methods"].get(name)
        if s and s["n"]:  # the cost a user pays per question at this batch size (wall clock / questions)
            s["seconds_per_question"] = round(wall / s["n"], 3)
    summary["pareto"] = pareto_fronts(summary["methods"])
    if extra is not None:
        summary["efficiency"] = extra(summary)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False))
    atomic_write_text(out / "results.md", to_markdown(summary))
    if write_chart(summary, out / "chart.png") is None or write_pareto(summary, out / "pareto.png") is None:
        summary["chart"] = "not written: matplotlib is not installed (pip install kvmas[charts])"
        atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def to_markdown(summary: dict[str, Any]) -> str:
    """The results as markdown: one row per method, the paired comparisons, then any efficiency section."""
    cfg = summary["config"]
    peak = any("peak_rss_mb" in s for s in summary["methods"].values())
    lines = [f"# {cfg['data'] or 'tasks'} (n={cfg['n']}, model {cfg['model']}, seed {cfg['seed']}, "
             f"max_new_tokens {cfg['max_new_tokens']}, latent_steps "
             f"{cfg['latent_steps'] if cfg.get('latent_steps') is not None else 'default'}, "
             f"prompt {cfg.get('prompt', 'cot')})", "",
             "| method | accuracy (flexible) | 95% CI (Wilson) | strict (boxed/####) | computed tokens/item | "
             "prefilled/item | reused/item | generated/item | latent/item | s/question | answer tokens | no answer | "
             "echoed a role prompt | errors | " + ("peak RSS MB | " if peak else "") + "answers by rule (correct/read) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if peak else "") + "---|"]
    for name, s in summary["methods"].items():
        t = s["tokens_per_item"]
        lines.append(f"| {name} | {s['correct']}/{s['n']} ({100 * s['accuracy']:.1f}%) | "
                     f"{_ci_cell(s['ci95_wilson'])} | {_strict_cell(s)} | {t['computed']:.0f} | "
                     f"{t['prefilled']:.0f} | {t['reused']:.0f} | {t['generated']:.0f} | {t['latent']:.0f} | "
                     f"{seconds_per_question(s):.2f} | {s['answer_tokens_mean']:.0f} | {s['no_extractable_answer']} | "
                     f"{s.get('echoes', 0)} | {s['errors']} | " + (f"{s.get('peak_rss_mb', 0):.0f} | " if peak else "")
                     + f"{rule_counts(s)} |")
    lines += ["", "s/question: each method's wall clock over its questions (run as rows of shared forwards at "
                  "the batch size used), where recorded; else the mean time of one run."]
    if cfg.get("fanout"):
        lines += ["", fanout_line(cfg["fanout"])]
    if summary.get("pareto"):
        lines += [f"Pareto front (no method is both more accurate and cheaper): by seconds "
                  f"{', '.join(summary['pareto']['seconds'])}; by computed tokens {', '.join(summary['pareto']['tokens'])}."]
    if "prompt_echo_floor" in cfg:
        lines += ["", f"Prompt-echo floor: a reply that only repeats its prompt would be credited on "
                      f"{cfg['prompt_echo_floor']} of {cfg['n']} items."]
    first = cfg["methods"][0] if cfg.get("methods") else None
    shown = [p for p in summary["paired"] if first in (p["a"], p["b"]) or "auto" in (p["a"], p["b"])]
    if shown:
        against = first if first == "auto" else f"{first} and vs auto"
        lines += ["", f"Paired comparisons (vs {against}; all pairs in results.json):", "",
                  "| A vs B | diff (A−B) | 95% CI | only A right | only B right | McNemar p |",
                  "|---|---|---|---|---|---|"]
        for p in shown:
            lines.append(f"| {p['a']} vs {p['b']} | {100 * p['diff']:+.1f} pts | {100 * p['ci95'][0]:+.1f} to "
                         f"{100 * p['ci95'][1]:+.1f} | {p['a_only']} | {p['b_only']} | {p['mcnemar_p']:.3g} |")
    cands = {n: s["candidates"] for n, s in summary["methods"].items() if "candidates" in s}
    if cands:
        lines += ["", "What the candidates held (items with a right candidate bound any selection):", "",
                  "| method | items | method right | some candidate right | strict majority | majority right | "
                  "unanimous |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {c['n']} | {summary['methods'][n]['correct']} | {c['any_correct']} | {c['majority']} | "
                  f"{c['majority_correct']} | {c['unanimous']} |" for n, c in cands.items()]
    drafts = {n: s["drafts"] for n, s in summary["methods"].items() if "drafts" in s}
    if drafts:
        lines += ["", "What refinement did (the first draft the critic read against the final answer):", "",
                  "| method | items | first draft right | final right | fixed | broke |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {d['n']} | {d['first_right']} | {d['final_right']} | {d['fixed']} | {d['broke']} |"
                  for n, d in drafts.items()]
    both = {n: s for n, s in summary["methods"].items() if "extracted" in s}
    if both:
        lines += ["", "Both readings of the same answers (ranked by likelihood after the answer, and the option the "
                      "answer text gives):", "",
                  "| method | ranked by likelihood | 95% CI | read from the text | 95% CI |", "|---|---|---|---|---|"]
        for n, s in both.items():
            e = s["extracted"]
            lines.append(f"| {n} | {s['correct']}/{s['n']} | {_ci_cell(s['ci95_wilson'])} | {e['correct']}/{e['n']} | "
                         f"{_ci_cell(e['ci95_wilson'])} |")
    chosen = {n: s for n, s in summary["methods"].items() if "chosen_pipelines" in s}
    if chosen:
        lines += ["", "Pipelines chosen (times chosen, right when chosen):"]
        for n, s in chosen.items():
            right = s.get("chosen_correct", {})  # absent from reports written before it was counted
            lines.append(f"- {n}: " + ", ".join(f"{k} ×{v}" + (f" ({right[k]} right)" if k in right else "")
                                                for k, v in s["chosen_pipelines"].items()))
    eff = summary.get("efficiency")
    if eff:
        lines += ["", "Ratios measured in this run:", "", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}× |" for k, v in eff.get("ratios", {}).items()]
        merge = eff.get("merge_error")
        if merge:
            lines += ["", "Vote selector merge policies vs exact re-prefill (next-token distribution of the selector, "
                          "on the state Vote builds):", ""]
            for policy in ("shared", "rerotate"):
                vals = [m[policy] for m in merge]
                lines.append(f"- {policy}: max |Δlogprob| mean "
                             f"{sum(v['max_abs_dlogprob'] for v in vals) / len(vals):.3f}, KL mean "
                             f"{sum(v['kl_exact_to_policy'] for v in vals) / len(vals):.4f}, top-1 agrees "
                             f"{sum(v['top1_agrees'] for v in vals)}/{len(vals)}")
    lines += ["", "Sample answers (first items):"]
    for name, s in summary["methods"].items():
        for smp in s["samples"][:3]:
            ans = " ".join(smp["answer"].split())[:160]
            lines.append(f"- {name} / {smp['task_id']} (gold {smp['gold']}, got {smp['pred']}): {ans}")
    return "\n".join(lines) + "\n"


def fanout_line(fanout: dict[str, Any]) -> str:
    """What a run over Ray workers says about them: how many, how many died, which tasks were re-run.

    >>> fanout_line({"workers": 2, "workers_died": 1, "reruns": {"single": ["t3"]}, "in_process": ["auto"]})
    'Run on 2 Ray workers (in this process, learning online: auto). 1 worker(s) died; re-run elsewhere: single: t3.'
    """
    text = f"Run on {fanout['workers']} Ray workers"
    if fanout.get("in_process"):
        text += f" (in this process, learning online: {', '.join(fanout['in_process'])})"
    text += "."
    if fanout.get("workers_died"):
        text += (f" {fanout['workers_died']} worker(s) died; re-run elsewhere: "
                 + "; ".join(f"{m}: {', '.join(ids)}" for m, ids in fanout["reruns"].items()) + ".")
    return text


def seconds_per_question(s: dict[str, Any]) -> float:
    """Wall clock per question of a method's whole loop when recorded, else the mean item wall time."""
    return s.get("seconds_per_question", s["wall_s_per_item"])


def pareto_fronts(methods: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The methods no other method beats on both accuracy and cost (seconds, computed tokens per question).

    >>> pareto_fronts({"a": {"accuracy": .5, "wall_s_per_item": 1, "tokens_per_item": {"computed": 10}},
    ...                "b": {"accuracy": .6, "wall_s_per_item": 3, "tokens_per_item": {"computed": 5}},
    ...                "c": {"accuracy": .4, "wall_s_per_item": 2, "tokens_per_item": {"computed": 20}}})
    {'seconds': ['a', 'b'], 'tokens': ['b']}
    """
    def front(cost) -> list[str]:
        pts = {n: (s["accuracy"], cost(s)) for n, s in methods.items() if s.get("n", 1)}
        return [n for n, (acc, c) in pts.items()
                if not any((a >= acc and k <= c) and (a > acc or k < c) for m, (a, k) in pts.items() if m != n)]

    return {"seconds": front(seconds_per_question), "tokens": front(lambda s: s["tokens_per_item"]["computed"])}


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib (``kvmas[charts]``) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a temp file beside it, then a rename) and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_pareto(summary: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy (Wilson 95% interval) against seconds and against computed tokens per question, one point per
    method, the Pareto front joined (PNG). None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None

    methods = summary["methods"]
    fronts = summary.get("pareto") or pareto_fronts(methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label, cost in ((axes[0], "seconds", "seconds per question", seconds_per_question),
                                 (axes[1], "tokens", "computed tokens per question",
                                  lambda s: s["tokens_per_item"]["computed"])):
        for name, s in methods.items():
            acc = 100 * s["accuracy"]
            lo, hi = 100 * s["ci95_wilson"][0], 100 * s["ci95_wilson"][1]
            on = name in fronts[key]
            ax.errorbar([cost(s)], [acc], yerr=[[acc - lo], [hi - acc]], fmt="o", capsize=3,
                        color="#C44E52" if on else "#4C72B0")
            ax.annotate(name, (cost(s), acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
        pts = sorted((cost(methods[n]), 100 * methods[n]["accuracy"]) for n in fronts[key])
        if len(pts) > 1:
            ax.plot(*zip(*pts), "--", color="#C44E52", linewidth=1, label="Pareto front")
            ax.legend(loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    fig.suptitle(f"accuracy vs cost · {summary['config']['data']} · {summary['config']['model']} · "
                 f"n={summary['config']['n']}")
    return _save_png(plt, fig, path)


def _ci_cell(ci: list[float]) -> str:
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _strict_cell(s: dict[str, Any]) -> str:
    if "correct_strict" not in s:
        return "–"  # a report written before strict figures existed
    return f"{s['correct_strict']}/{s['n']} ({100 * s['accuracy_strict']:.1f}%)"


def rule_counts(s: dict[str, Any]) -> str:
    """``boxed 12/14, answer-is 3/5, none 0/2``: per scoring rule, correct of the answers it read."""
    return ", ".join(f"{rule} {c['correct']}/{c['n']}" for rule, c in sorted(
        s.get("rules", {}).items(), key=lambda kv: -kv[1]["n"])) or "–"


def write_chart(summary: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy with Wilson 95% intervals, computed tokens per item (by kind) and seconds per item (PNG).

    Returns None (and writes nothing) when matplotlib, an optional dependency (``kvmas[charts]``), is missing.
    """
    plt = _pyplot()
    if plt is None:
        return None

    names = list(summary["methods"])
    rows = [summary["methods"][n] for n in names]
    acc = [100 * r["accuracy"] for r in rows]
    lo = [a - 100 * r["ci95_wilson"][0] for a, r in zip(acc, rows)]
    hi = [100 * r["ci95_wilson"][1] - a for a, r in zip(acc, rows)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(max(12, 1.3 * len(names) * 3), 4.2))
    ax1.bar(names, acc, yerr=[lo, hi], capsize=4, color="#4C72B0")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title(f"accuracy, n={summary['config']['n']} (95% Wilson CI)")
    bottom = [0.0] * len(names)
    for kind, colour in (("prefilled", "#8172B2"), ("latent", "#937860"), ("generated", "#DD8452")):
        vals = [r["tokens_per_item"][kind] for r in rows]
        ax2.bar(names, vals, bottom=bottom, color=colour, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("computed tokens per item")
    ax2.set_title("cost")
    ax2.legend()
    ax3.bar(names, [seconds_per_question(r) for r in rows], color="#55A868")
    ax3.set_ylabel("seconds per question")
    ax3.set_title("time")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", rotation=35)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    fig.suptitle(f"{summary['config']['data']} · {summary['config']['model']}")
    fig.subplots_adjust(bottom=0.3, top=0.85, wspace=0.3)
    return _save_png(plt, fig, path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        raise SystemExit("usage: kvmas bench accuracy|efficiency ... (this module's __main__ is the worker entry)")

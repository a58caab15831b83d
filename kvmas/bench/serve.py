"""The server under load (``kvmas bench serve``): C concurrent clients over loopback, the same questions
sequentially in process, one report.

The model is loaded once; first the baseline runs the method on ``baseline`` questions one after another in
this process (the throughput a script gets without the server); then a :class:`~kvmas.serve.BackgroundServer`
over the same model takes ``requests[i]`` requests from ``concurrency[i]`` client threads for each level. Per
level: p50 / p95 latency, requests/s, completion tokens/s, the ratio to one client and to the in-process
baseline. Every response is matched to its request: each must come back once (status 200, its own trace id),
and the trace it names must hold the question that request sent; answers to baseline questions are compared
with the in-process answers (the batched server should give the same text). Bounded by the request counts
and a per-request timeout; nothing leaves the loopback.

>>> from kvmas.testing import tiny_model
>>> from kvmas.tasks import load_tasks
>>> import tempfile
>>> cfg = LoadConfig(concurrency=(1, 2), requests=(2, 4), baseline=2, max_new_tokens=3)
>>> r = run_load_bench(tiny_model(), load_tasks("gsm8k-sample", n=3), tempfile.mkdtemp(), cfg)
>>> [(lv["concurrency"], lv["ok"], lv["lost"], lv["duplicated"], lv["mismatched"]) for lv in r["levels"]]
[(1, 2, 0, 0, 0), (2, 4, 0, 0, 0)]
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from kvmas.clock import utc_now
from kvmas.errors import BadInputError
from kvmas.paths import atomic_write_text
from kvmas.primitives import parse_method
from kvmas.serve import BackgroundServer, ServeConfig, create_app
from kvmas.tasks import Task, format_question

Progress = Callable[[str, int, int], None]


@dataclass
class LoadConfig:
    concurrency: Sequence[int] = (1, 8, 32)
    requests: Sequence[int] = (32, 64, 128)  # per level
    baseline: int = 16  # questions run sequentially in process (the main thread)
    baseline_thread: int = 4  # of those, run again sequentially from one worker thread
    method: str = "single"
    max_new_tokens: int = 48
    seed: int = 0
    prompt: str = "cot"
    timeout_s: float = 900.0  # per request
    collect_ms: float = 5.0
    data: str | None = None  # where the questions came from (for the report)

    def check(self) -> "LoadConfig":
        if len(self.concurrency) != len(self.requests) or not self.concurrency:
            raise BadInputError(f"{len(self.concurrency)} concurrency levels for {len(self.requests)} request counts")
        if any(c < 1 for c in self.concurrency) or any(n < c for c, n in zip(self.concurrency, self.requests)):
            raise BadInputError("each level needs concurrency >= 1 and at least as many requests as clients")
        if self.baseline < 1:
            raise BadInputError("baseline needs at least one question")
        parse_method(self.method, max_new_tokens=self.max_new_tokens)  # an unknown method fails before loading
        return self


@dataclass
class Reply:
    index: int
    status: int
    latency_s: float
    answer: str | None = None
    trace_id: str | None = None
    completion_tokens: int = 0
    error: str | None = None


def _percentile(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def _baseline(model, questions: list[str], cfg: LoadConfig, progress: Progress | None) -> tuple[dict, list[str]]:
    prim = parse_method(cfg.method, max_new_tokens=cfg.max_new_tokens)
    prim(questions[0], model=model, seed=cfg.seed)  # warm-up (first-call allocations), not timed
    answers, tokens = [], 0
    t0 = time.perf_counter()
    for i, q in enumerate(questions):
        r = prim(q, model=model, seed=cfg.seed)
        answers.append(r.answer)
        tokens += r.usage.generated
        if progress:
            progress("in-process", i + 1, len(questions))
    wall = time.perf_counter() - t0
    # the same runs from one worker thread, as the server's request threads run them (measured on a loaded
    # 2-core machine, the main thread ran the same work several times slower: reported, not assumed away)
    k = min(len(questions), cfg.baseline_thread)
    box: dict[str, float] = {}

    def worker() -> None:
        t = time.perf_counter()
        box["tokens"] = sum(prim(q, model=model, seed=cfg.seed).usage.generated for q in questions[:k])
        box["wall"] = time.perf_counter() - t

    if k:
        th = threading.Thread(target=worker, name="kvmas-baseline")
        th.start()
        th.join()
    thread = {"requests": k, "wall_s": round(box["wall"], 3), "requests_per_s": round(k / box["wall"], 4),
              "tokens_per_s": round(box["tokens"] / box["wall"], 2)} if k else None
    return {"requests": len(questions), "wall_s": round(wall, 3), "requests_per_s": round(len(questions) / wall, 4),
            "tokens_per_s": round(tokens / wall, 2), "latency_mean_s": round(wall / len(questions), 3),
            "worker_thread": thread}, answers


def _level(url: str, questions: list[str], clients: int, n: int, cfg: LoadConfig,
           progress: Progress | None) -> tuple[list[Reply], float]:
    """``n`` requests from ``clients`` threads; request i asks question ``i % len(questions)``."""
    todo = iter(range(n))
    lock = threading.Lock()
    replies: list[Reply] = []
    label = f"C={clients}"

    def client() -> None:
        with httpx.Client(base_url=url, timeout=cfg.timeout_s) as http:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                body = {"model": cfg.method, "max_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                        "messages": [{"role": "user", "content": questions[i % len(questions)]}]}
                t0 = time.perf_counter()
                try:
                    resp = http.post("/v1/chat/completions", json=body)
                    data = resp.json()
                    reply = Reply(i, resp.status_code, time.perf_counter() - t0)
                    if resp.status_code == 200:
                        reply.answer = data["choices"][0]["message"]["content"]
                        reply.trace_id = data["kvmas"]["trace_id"]
                        reply.completion_tokens = data["usage"]["completion_tokens"]
                    else:
                        reply.error = data.get("error", {}).get("message", resp.text[:200])
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    reply = Reply(i, 0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
                with lock:
                    replies.append(reply)
                    if progress:
                        progress(label, len(replies), n)

    threads = [threading.Thread(target=client, name=f"kvmas-client-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, time.perf_counter() - t0


def _check(url: str, questions: list[str], replies: list[Reply], n: int, baseline: list[str]) -> dict[str, Any]:
    """Every request answered once, by a run of its own question; answers against the in-process ones."""
    seen = [r.index for r in replies]
    ok = [r for r in replies if r.status == 200]
    ids = [r.trace_id for r in ok]
    mismatched = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for r in ok:
            trace = http.get(f"/v1/traces/{r.trace_id}")
            if trace.status_code != 200 or trace.json().get("question") != questions[r.index % len(questions)]:
                mismatched += 1
    compared = [r for r in ok if r.index % len(questions) < len(baseline)]
    same = sum(r.answer == baseline[r.index % len(questions)] for r in compared)
    return {"ok": len(ok), "failed": len(replies) - len(ok), "lost": len(set(range(n)) - set(seen)),
            "duplicated": len(seen) - len(set(seen)) + len(ids) - len(set(ids)), "mismatched": mismatched,
            "answers_compared": len(compared), "answers_same_as_in_process": same,
            "errors": sorted({r.error for r in replies if r.error})[:5]}


def run_load_bench(model, tasks: Sequence[Task], out_dir: str | Path, cfg: LoadConfig | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Run the baseline and every level; write ``results.json`` and ``results.md`` in ``out_dir``."""
    cfg = (cfg or LoadConfig()).check()
    if not tasks:
        raise BadInputError("no tasks to send")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions = [format_question(t, style=cfg.prompt) for t in tasks]
    started = utc_now()
    base, answers = _baseline(model, questions[: cfg.baseline], cfg, progress)
    scfg = ServeConfig(max_batch=max(cfg.concurrency), max_queue=max(cfg.concurrency), collect_ms=cfg.collect_ms,
                       max_tokens=cfg.max_new_tokens, max_tokens_limit=max(cfg.max_new_tokens, 1),
                       trace_dir=out / "traces")
    levels = []
    with BackgroundServer(create_app(model, scfg)) as srv:
        with httpx.Client(base_url=srv.url, timeout=cfg.timeout_s) as http:  # warm-up, not timed
            http.post("/v1/chat/completions", json={"model": cfg.method, "max_tokens": cfg.max_new_tokens,
                                                    "messages": [{"role": "user", "content": questions[0]}]})
        for clients, n in zip(cfg.concurrency, cfg.requests):
            replies, wall = _level(srv.url, questions, clients, n, cfg, progress)
            lat = [r.latency_s for r in replies if r.status == 200]
            tokens = sum(r.completion_tokens for r in replies)
            levels.append({"concurrency": clients, "requests": n, "wall_s": round(wall, 3),
                           "requests_per_s": round(len(lat) / wall, 4), "tokens_per_s": round(tokens / wall, 2),
                           "latency_p50_s": _percentile(lat, 50), "latency_p95_s": _percentile(lat, 95),
                           "latency_max_s": _percentile(lat, 100),
                           **_check(srv.url, questions, replies, n, answers)})
    one = levels[0]["requests_per_s"]
    for lv in levels:
        lv["vs_first_level"] = round(lv["requests_per_s"] / one, 3) if one else None
        lv["vs_in_process"] = round(lv["requests_per_s"] / base["requests_per_s"], 3)
        if base["worker_thread"]:
            lv["vs_in_process_thread"] = round(lv["requests_per_s"] / base["worker_thread"]["requests_per_s"], 3)
    summary = {"config": {**asdict(cfg), "concurrency": list(cfg.concurrency), "requests": list(cfg.requests),
                          "model": getattr(model, "name", "?"), "questions": len(questions),
                          "started": started, "finished": utc_now()},
               "in_process": base, "levels": levels,
               "total_requests": sum(cfg.requests),
               "lost_or_duplicated": sum(lv["lost"] + lv["duplicated"] + lv["mismatched"] for lv in levels)}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", to_markdown(summary))
    return summary


def to_markdown(summary: dict[str, Any]) -> str:
    c, b = summary["config"], summary["in_process"]
    lines = [f"# kvmas bench serve · {c['model']} · {c['method']} · max_new_tokens={c['max_new_tokens']}", "",
             f"{c['questions']} questions ({c['data'] or 'tasks'}), seed {c['seed']}, started {c['started']}.", "",
             "| clients | requests | ok | lost | dup | mismatched | same answer as in-process | req/s | "
             "× 1 client | × in-process | tokens/s | p50 s | p95 s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in summary["levels"]:
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['ok']} | {lv['lost']} | {lv['duplicated']} | "
                     f"{lv['mismatched']} | {lv['answers_same_as_in_process']}/{lv['answers_compared']} | "
                     f"{lv['requests_per_s']:.3f} | {lv['vs_first_level']} | {lv['vs_in_process']} | "
                     f"{lv['tokens_per_s']:.1f} | {lv['latency_p50_s']} | {lv['latency_p95_s']} |")
    lines += ["", f"In process, sequential: {b['requests']} runs, {b['requests_per_s']:.3f} req/s, "
              f"{b['tokens_per_s']:.1f} tokens/s, {b['latency_mean_s']} s per run (main thread)."]
    if b.get("worker_thread"):
        w = b["worker_thread"]
        lines += [f"The first {w['requests']} again from one worker thread: {w['requests_per_s']:.3f} req/s, "
                  f"{w['tokens_per_s']:.1f} tokens/s (× in-process thread for the top level: "
                  f"{summary['levels'][-1].get('vs_in_process_thread')})."]
    lines.append("")
    return "\n".join(lines)

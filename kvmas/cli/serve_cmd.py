"""`kvmas serve` (an OpenAI-compatible server over the primitives) and `kvmas bench serve` (its load bench).

    kvmas serve --model qwen2.5-coder-0.5b --port 8000 [--api-key KEY] [--pipeline NAME=FILE]
    kvmas bench serve --model qwen2.5-coder-0.5b --data ../shared/data/gsm8k/test_dev.jsonl --concurrency 1,8,32
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.text import Text

from kvmas.cli.options import DEVICE, DTYPE
from kvmas.cli.render import clean, console as make_console
from kvmas.errors import BadInputError, KvmasError

API_KEY_ENV = "KVMAS_API_KEY"


def _need_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise KvmasError(f"kvmas serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'kvmas[serve]'") from exc


def _pipelines(items: list[str]) -> dict:
    from kvmas.organizer import PipelineSpec

    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BadInputError(f"--pipeline takes NAME=FILE, got {item!r}")
        if ":" in name or name in ("single", "auto") or name in out:
            raise BadInputError(f"--pipeline name {name!r} is taken or has a ':' (those name primitives)")
        out[name.strip()] = PipelineSpec.load(path.strip())
    return out


def serve(
    model: str = typer.Option(None, "--model", "-m", help="the LLM every request runs on (registry name or HF dir)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default loopback only)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    api_key: str = typer.Option(None, "--api-key", help=f"require 'Authorization: Bearer KEY' (or ${API_KEY_ENV})"),
    pipeline: list[str] = typer.Option(None, "--pipeline", help="register a pipeline spec as NAME=FILE (repeat)"),
    auto: bool = typer.Option(True, "--auto/--no-auto", help="serve 'auto' (the organizer over your pool)"),
    max_batch: int = typer.Option(32, "--max-batch", help="requests run at once, as rows of one batch"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests waiting for a slot before 429"),
    collect_ms: float = typer.Option(5.0, "--collect-ms", help="how long an idle server gathers a burst"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="decode budget per speaking agent when a request "
                                   "sends none"),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="most a request may ask for"),
    max_request_kb: int = typer.Option(1024, "--max-request-kb", help="largest request body (KiB)"),
    trace_dir: Path = typer.Option(None, "--trace-dir", help="where run traces are kept (default "
                                   "$KVMAS_HOME/serve/traces)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Serve the primitives over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models,
    GET /v1/traces/ID). The request's `model` names the method: single, latent:review, text:vote, auto, or a
    registered pipeline."""
    _need_extra()
    import uvicorn

    from kvmas.agents.model import Model
    from kvmas.serve import ServeConfig, create_app

    console = make_console()
    key = api_key or os.environ.get(API_KEY_ENV) or None
    pool = None
    if auto:
        from kvmas.organizer import KnowledgePool

        pool = KnowledgePool()
    cfg = ServeConfig(api_key=key, max_batch=max_batch, max_queue=max_queue, collect_ms=collect_ms,
                      max_tokens=max_tokens, max_tokens_limit=max_tokens_limit,
                      max_request_bytes=max_request_kb * 1024, trace_dir=trace_dir, pipelines=_pipelines(pipeline),
                      pool=pool)
    with console.status("loading model…"):
        m = Model.load(model, device=device, dtype=dtype)
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        console.print(Text(f"warning: listening on {clean(host)} without an API key", style="yellow"))
    console.print(Text(f"kvmas serve · {clean(m.name)} · http://{clean(host)}:{port}/v1"
                       f"{' · API key required' if key else ''}", style="bold"))
    uvicorn.run(create_app(m, cfg), host=host, port=port, log_level="info")


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise BadInputError(f"{what} takes comma-separated integers, got {text!r}") from exc
    if not out:
        raise BadInputError(f"{what} is empty")
    return out


def bench_serve(
    model: str = typer.Option(None, "--model", "-m", help="registry name or HF dir (default: embedded)"),
    data: str = typer.Option("gsm8k-sample", "--data", "-d", help="GSM8K JSONL path or a task name"),
    method: str = typer.Option("single", "--method", help="what every request runs (the request's model field)"),
    concurrency: str = typer.Option("1,8,32", "--concurrency", "-c", help="concurrent clients per level"),
    requests: str = typer.Option("32,64,128", "--requests", "-r",
                                 help="requests per level (one number: the same for every level)"),
    baseline: int = typer.Option(16, "--baseline", help="questions run one after another in process"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="decode budget per speaking agent"),
    n: int = typer.Option(128, "--n", help="distinct questions (request i asks question i mod n)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", "-o", help="output folder (default runs/bench-serve-<time>)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Load-test kvmas serve over loopback: C concurrent clients per level, p50/p95 latency, requests/s and
    tokens/s, against the same questions run sequentially in process; every response matched to its request."""
    _need_extra()
    from datetime import datetime, timezone

    from kvmas.agents.model import Model
    from kvmas.bench.serve import LoadConfig, run_load_bench
    from kvmas.cli.bench_cmd import _bars, _progress
    from kvmas.cli.render import DataTable
    from kvmas.tasks import load_tasks

    levels = _ints(concurrency, "--concurrency")
    counts = _ints(requests, "--requests")
    counts = counts * len(levels) if len(counts) == 1 else counts
    cfg = LoadConfig(concurrency=levels, requests=counts, baseline=baseline, method=method,
                     max_new_tokens=max_new_tokens, seed=seed, data=data).check()
    tasks = load_tasks(data, n=n)
    out = out or Path("runs") / f"bench-serve-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    console = make_console()
    with console.status("loading model…"):
        m = Model.load(model, device=device, dtype=dtype)
    with _progress(console) as progress:
        summary = run_load_bench(m, tasks, out, cfg, _bars(progress))
    table = DataTable(f"bench serve · {m.name} · {method} · max_new_tokens={max_new_tokens}")
    for col in ("clients", "requests", "ok", "lost", "dup", "mismatched", "same as in-process", "req/s",
                "× 1 client", "× in-process", "tokens/s", "p50 s", "p95 s"):
        table.add_column(col, no_wrap=True)
    for lv in summary["levels"]:
        table.add_row(str(lv["concurrency"]), str(lv["requests"]), str(lv["ok"]), str(lv["lost"]),
                      str(lv["duplicated"]), str(lv["mismatched"]),
                      f"{lv['answers_same_as_in_process']}/{lv['answers_compared']}", f"{lv['requests_per_s']:.3f}",
                      str(lv["vs_first_level"]), str(lv["vs_in_process"]), f"{lv['tokens_per_s']:.1f}",
                      str(lv["latency_p50_s"]), str(lv["latency_p95_s"]))
    console.print(table)
    b = summary["in_process"]
    console.print(Text(f"in process, sequential: {b['requests']} runs, {b['requests_per_s']:.3f} req/s, "
                       f"{b['tokens_per_s']:.1f} tokens/s · results in {clean(out)}", style="dim"))
    if summary["lost_or_duplicated"]:
        raise KvmasError(f"{summary['lost_or_duplicated']} requests lost, duplicated or answered for another question")

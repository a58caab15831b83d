"""`kvmas batch run`: a JSONL file of questions answered by one method, optionally over Ray workers.

    kvmas batch run questions.jsonl --method text:review --model qwen2.5-coder-0.5b -o answers.jsonl
    kvmas batch run questions.jsonl --workers 4 --ray-address auto     # one model replica per Ray worker

Each input line is ``{"question": "...", "id": "...", "seed": 0}`` (id and seed optional; GSM8K lines work).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.text import Text

from kvmas.cli.options import DEVICE, DTYPE
from kvmas.cli.render import clean, console as make_console
from kvmas.errors import BadInputError

app = typer.Typer(help="Batch jobs: many questions, one method, optionally over Ray workers.", no_args_is_help=True,
                  add_completion=False)


def read_items(path: Path):
    from kvmas.bench.fanout import Item
    from kvmas.paths import loads_json

    items, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = loads_json(line, f"{path} line {n}")
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
            raise BadInputError(f"{path} line {n}: needs a non-empty \"question\" string")
        seed = rec.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise BadInputError(f"{path} line {n}: seed must be an integer")
        item_id = str(rec.get("id", f"line-{n}"))
        if item_id in seen:
            raise BadInputError(f"{path} line {n}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(Item(item_id, rec["question"], seed))
    if not items:
        raise BadInputError(f"{path} has no questions")
    return items


@app.callback()
def _batch() -> None:
    """Batch jobs: many questions, one method, optionally over Ray workers."""


@app.command("run")
def run(
    file: Path = typer.Argument(..., help="JSONL, one {\"question\", \"id\"?, \"seed\"?} per line"),
    method: str = typer.Option("single", "--method", help="single, latent:review, text:vote, ... (comm:name)"),
    model: str = typer.Option(None, "--model", "-m", help="registry name or model folder every worker loads"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="decode budget per speaking agent"),
    workers: int = typer.Option(1, "--workers", "-w", help="Ray workers, one model replica each (1: this process)"),
    ray_address: str = typer.Option(None, "--ray-address", help="a running Ray cluster, e.g. auto or HOST:6379 "
                                   "(default: the one `ray start` started here, else a local one for this run)"),
    out: Path = typer.Option(None, "--out", "-o", help="answers JSONL (default: FILE.answers.jsonl)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Answer every question of FILE with one method; answers in input order, the same as one process gives."""
    from kvmas.bench.fanout import fan_out
    from kvmas.cli.bench_cmd import _bars, _progress
    from kvmas.paths import atomic_write_text

    items = read_items(file)
    out = out or file.with_suffix(".answers.jsonl")
    console = make_console()
    with _progress(console) as progress:
        bar, done = _bars(progress), [0]

        def tick(_i, _r):
            done[0] += 1
            bar(method, done[0], len(items))

        results, report = fan_out(model, method, items, workers=workers,
                                  params={"max_new_tokens": max_new_tokens}, address=ray_address, device=device,
                                  dtype=dtype, on_done=tick)
    atomic_write_text(out, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results))
    errors = sum(1 for r in results if r.error)
    console.print(Text(f"{len(results)} answers ({errors} errors) in {report.wall_s:.1f}s on {report.workers} "
                       f"worker(s) · written to {clean(out)}", style="dim"))
    if report.reruns:
        console.print(Text(f"{len(report.dead_workers)} worker(s) died; re-run elsewhere: "
                           f"{clean(', '.join(report.reruns))}", style="yellow"))

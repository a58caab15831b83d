"""`kvmas pool`: the organizer's knowledge pool.

    kvmas pool list [--all]                      # entries: origin, pipeline, trials, successes, prior
    kvmas pool show ID                           # one entry with its pipeline spec
    kvmas pool add --query TEXT --spec FILE [--tags a,b] [--name NAME]
    kvmas pool search "QUESTION" [-k 4]          # what the organizer would retrieve (lexical; --model to embed)
    kvmas pool export FILE | kvmas pool import FILE | kvmas pool stats
    kvmas pool feedback RUN_ID --good|--bad      # teach the pool the verified outcome of a `kvmas run --auto`
    kvmas pool learn RUN_DIR [--model NAME]      # teach it every verified outcome of a `kvmas bench accuracy` run
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.text import Text

from kvmas.cli.boundary import fail as _fail
from kvmas.cli.render import DataTable, console, lit, say
from kvmas.errors import BadInputError, KvmasError

app = typer.Typer(help="The organizer's knowledge pool: list, show, add, search, export, import, stats, feedback, "
                       "learn.",
                  no_args_is_help=True, add_completion=False)
POOL_OPT = typer.Option(None, "--pool", help="pool file (default: KVMAS_HOME/pool.sqlite)")


def _pool(path: Path | None):
    from kvmas.organizer import KnowledgePool

    return KnowledgePool(path)


@app.command("list")
def list_cmd(pool: Path = POOL_OPT, all_: bool = typer.Option(False, "--all", help="include retired entries")) -> None:
    """Entries with their pipeline and outcome counts."""
    try:
        entries = _pool(pool).entries(include_retired=all_)
    except KvmasError as exc:
        _fail(exc)
    table = DataTable(f"knowledge pool ({len(entries)} entries)")
    for col in ("id", "name", "origin", "pipeline", "trials", "ok", "prior", "tags", "query"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "trials", "ok", "prior"))
    for e in entries:
        table.add_row(str(e.id), e.name or "-", e.origin + (" (retired)" if e.retired else ""), e.spec.describe(),
                      str(e.trials), str(e.successes), f"{e.prior:.2f}", ",".join(e.tags),
                      e.query if len(e.query) < 70 else e.query[:67] + "...")
    console().print(table)


@app.command("show")
def show_cmd(entry_id: int = typer.Argument(..., help="entry id (see `kvmas pool list`)"), pool: Path = POOL_OPT) -> None:
    """One entry in full, with its pipeline spec as JSON."""
    try:
        e = _pool(pool).get(entry_id)
    except KvmasError as exc:
        _fail(exc)
    c = console()
    c.print(Text.assemble((f"#{e.id} ", "bold"), lit(e.name or "(unnamed)", "bold"),
                          lit(f" · {e.origin}{' · retired' if e.retired else ''}")))
    c.print(lit(f"query: {e.query}"))
    c.print(lit(f"tags: {', '.join(e.tags) or '-'}"))
    c.print(f"trials {e.trials} · successes {e.successes} · weight {e.weight:.3f} · prior {e.prior:.3f} · "
            f"mean tokens {e.mean_tokens:.0f} · time {e.time_s:.1f}s")
    c.print(lit(f"created {e.created} · updated {e.updated}"))
    c.print(lit(f"pipeline: {e.spec.describe()}"))
    c.print_json(e.spec.to_json())


@app.command("add")
def add_cmd(query: str = typer.Option(..., "--query", "-q", help="the kind of question this pipeline suits"),
            spec: Path = typer.Option(..., "--spec", "-s", help="pipeline spec JSON file"),
            tags: str = typer.Option("", "--tags", help="comma-separated tags"),
            name: str = typer.Option("", "--name"), pool: Path = POOL_OPT) -> None:
    """Add a pipeline for a kind of query (the spec is validated; nothing in it is ever executed as code)."""
    from kvmas.organizer import PipelineSpec

    try:
        e, created = _pool(pool).add(query, PipelineSpec.load(spec), name=name,
                                     tags=[t.strip() for t in tags.split(",") if t.strip()])
    except KvmasError as exc:
        _fail(exc)
    say(f"{'added' if created else 'already present'}: #{e.id} {e.spec.describe()}")


@app.command("search")
def search_cmd(question: str = typer.Argument(...), k: int = typer.Option(4, "-k"),
               model: str = typer.Option(None, "--model", help="embed with this model (default: lexical only)"),
               pool: Path = POOL_OPT) -> None:
    """The candidates the organizer would retrieve for a question."""
    try:
        m = None
        if model:
            from kvmas.agents.model import Model

            m = Model.load(model)
        hits = _pool(pool).search(question, model=m, k=k)
    except KvmasError as exc:
        _fail(exc)
    table = DataTable(f"top {k} for: {question[:60]}")
    for col in ("id", "name", "pipeline", "score", "how", "prior"):
        table.add_column(col)
    for h in hits:
        table.add_row(str(h.entry.id), h.entry.name or "-", h.entry.spec.describe(), f"{h.score:.3f}", h.how,
                      f"{h.entry.prior:.2f}")
    console().print(table)


@app.command("export")
def export_cmd(file: Path = typer.Argument(..., help="JSON file to write"), pool: Path = POOL_OPT,
               no_embeddings: bool = typer.Option(False, "--no-embeddings")) -> None:
    """Write every entry (retired included) as JSON, atomically."""
    try:
        text = _pool(pool).export_json(file, include_embeddings=not no_embeddings)
    except KvmasError as exc:
        _fail(exc)
    say(f"exported {len(json.loads(text)['entries'])} entries to {file}")


@app.command("import")
def import_cmd(file: Path = typer.Argument(..., help="a file written by `kvmas pool export`"),
               pool: Path = POOL_OPT) -> None:
    """Merge an export into the pool (idempotent: counts take the larger value)."""
    try:
        if not file.is_file():
            raise BadInputError(f"no such file: {file}")
        res = _pool(pool).import_json(file)
    except KvmasError as exc:
        _fail(exc)
    say(f"imported: {res['added']} added, {res['updated']} updated")


@app.command("stats")
def stats_cmd(pool: Path = POOL_OPT) -> None:
    """Entry counts by origin, outcome totals, embedded models."""
    try:
        s = _pool(pool).stats()
    except KvmasError as exc:
        _fail(exc)
    c = console()
    c.print(lit(f"pool {s['path']} (schema {s['schema']})"))
    c.print(lit(f"entries {s['entries']} ({', '.join(f'{k} {v}' for k, v in s['by_origin'].items()) or 'none'}), "
                f"retired {s['retired']}"))
    c.print(f"verified outcomes: {s['trials']} trials, {s['successes']} successes")
    c.print(lit(f"embeddings: {', '.join(f'{k} ({v})' for k, v in s['embeddings'].items()) or 'none yet'}"))


@app.command("feedback")
def feedback_cmd(run: str = typer.Argument(..., help="run id printed by `kvmas run --auto`, or a trace file"),
                 good: bool = typer.Option(None, "--good/--bad", help="was the answer right?"),
                 pool: Path = POOL_OPT) -> None:
    """Teach the pool whether an auto run's answer was right."""
    from kvmas.organizer import feedback

    try:
        if good is None:
            raise BadInputError("say --good or --bad")
        entry = feedback(run, good, pool_path=pool)
    except KvmasError as exc:
        _fail(exc)
    if entry is not None:
        say(f"recorded success; pool entry #{entry.id} now {entry.successes}/{entry.trials}")
    else:
        say("recorded failure")


@app.command("learn")
def learn_cmd(run_dir: Path = typer.Argument(..., help="a finished `kvmas bench accuracy` output folder"),
              pool: Path = POOL_OPT,
              data: Path = typer.Option(None, "--data", help="the run's task file, if it moved (default: as recorded)"),
              model: str = typer.Option(None, "--model", help="embed the learned entries now with this model")) -> None:
    """Teach the pool every verified outcome of a bench run's fixed methods (run them on training items, then
    `bench accuracy --methods auto --no-learn --pool` on others)."""
    from kvmas.bench.lessons import teach_pool

    try:
        m = None
        if model:
            from kvmas.agents.model import Model

            m = Model.load(model)
        lessons = teach_pool(run_dir, _pool(pool), data=data, model=m)
    except KvmasError as exc:
        _fail(exc)
    for line in lessons.lines():
        say(line)

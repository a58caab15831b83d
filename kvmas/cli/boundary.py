"""The CLI's one error boundary: whatever a command raises ends as one line on stderr and an exit code.

Typed kvmas errors keep their exit code; file-system, SQLite, decoding and other errors become one readable
line (exit 1 for the environment, 2 for bad input, 70 for a bug, with ``KVMAS_DEBUG=1`` for its traceback).

>>> describe(IsADirectoryError(21, "Is a directory", "runs"))
('runs: Is a directory', 1)
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import NoReturn

import click
import typer
from typer.core import TyperGroup

from kvmas.cli.render import print_error
from kvmas.db import store_error
from kvmas.errors import KvmasError

INTERNAL_ERROR = 70  # EX_SOFTWARE
try:  # newer typer parses with its own copy of click: its usage errors are not click's
    from typer.exceptions import TyperException as _TyperClickError
except ImportError:  # pragma: no cover - older typer raises click's own
    _TyperClickError = click.ClickException


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of an error that reached the command line."""
    if isinstance(exc, KvmasError):
        return str(exc), exc.exit_code
    if isinstance(exc, sqlite3.Error):
        typed = store_error(exc, "a kvmas store")
        return (str(typed), typed.exit_code) if isinstance(typed, KvmasError) else (f"store error: {exc}", 1)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", 1
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} at line {exc.lineno}", 2
    if isinstance(exc, UnicodeError):
        return f"text that is not valid UTF-8 ({getattr(exc, 'reason', exc)})", 2
    if isinstance(exc, RecursionError):
        return "input nested too deeply", 2
    if isinstance(exc, MemoryError):
        return "out of memory", 1
    return (f"internal error ({type(exc).__name__}: {exc}); please report it, with KVMAS_DEBUG=1 for the "
            "traceback", INTERNAL_ERROR)


def fail(exc: BaseException) -> NoReturn:
    """Print ``exc`` as one line on stderr and exit with its code."""
    message, code = describe(exc)
    print_error(message)
    raise typer.Exit(code)


class BoundaryGroup(TyperGroup):
    """The root command group: every sub-command runs inside it, so every error passes through here."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.exceptions.Abort,
                _TyperClickError):  # usage errors: the parser prints them (exit 2)
            raise
        except BrokenPipeError:  # `kvmas ... | head`: the reader left, nothing to report
            raise typer.Exit(1) from None
        except Exception as exc:
            if os.environ.get("KVMAS_DEBUG"):
                raise
            fail(exc)

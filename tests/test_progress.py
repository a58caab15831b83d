"""Progress written to a log (not a terminal): plain lines, throttled, always the finishing one."""

import io

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from kvmas.progress import LineProgress, progress_bar


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=60), out


def test_a_log_gets_lines_not_a_live_bar():
    console, out = _log_console()
    with progress_bar(console, every=0) as p:
        assert isinstance(p, LineProgress)
        task = p.add_task(escape("kv:review [0-49]"), total=4)
        p.advance(task)
        p.update(task, completed=3)
        p.advance(task)
    lines = out.getvalue().splitlines()
    assert [ln.rsplit(" ", 1)[0] for ln in lines] == [
        "kv:review [0-49] 1/4 (25%)", "kv:review [0-49] 3/4 (75%)", "kv:review [0-49] 4/4 (100%)"]


def test_lines_are_throttled_but_the_end_is_always_printed_once():
    console, out = _log_console()
    with progress_bar(console, every=3600) as p:
        task = p.add_task("questions", total=100)
        for _ in range(100):
            p.advance(task)
        p.update(task, completed=100)  # a repeat of the end prints nothing more
    assert [ln.rsplit(" ", 1)[0] for ln in out.getvalue().splitlines()] == ["questions 100/100 (100%)"]


def test_bytes_and_unknown_totals():
    console, out = _log_console()
    with progress_bar(console, unit="bytes", every=0) as p:
        task = p.add_task("assembling model.bin", total=None)
        p.advance(task, 2_000_000)
    assert out.getvalue().split()[:3] == ["assembling", "model.bin", "2.0"]


def test_a_terminal_keeps_the_live_bar():
    console = Console(file=io.StringIO(), force_terminal=True)
    bar = progress_bar(console)
    assert type(bar) is Progress


def test_a_task_that_has_not_moved_still_gets_lines_and_none_after_the_end():
    """The heartbeat: a long batch completes nothing for minutes, and its log must still show it is alive."""
    import time

    console, out = _log_console()
    with progress_bar(console, every=0.05) as p:
        task = p.add_task("kv:review", total=4)
        p.advance(task)
        deadline = time.monotonic() + 10
        while out.getvalue().count("kv:review 1/4") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.getvalue().count("kv:review 1/4") >= 3  # the count stood still; the lines kept coming
        p.update(task, completed=4)
    ended = out.getvalue()
    assert ended.count("kv:review 4/4 (100%)") == 1
    time.sleep(0.2)
    assert out.getvalue() == ended  # the heartbeat stopped with the bar

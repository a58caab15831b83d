"""The one progress bar: counted work (items, tensors, questions) or bytes (assembly, downloads).

On a terminal it is a live rich bar. Written to a file or a pipe (``nohup kvmas bench ... > log``) a live bar
shows nothing until the end, so there it prints one plain line per running task every ``every`` seconds, and
when a task finishes.

>>> import io
>>> from rich.console import Console
>>> out = io.StringIO()
>>> with progress_bar(Console(file=out, width=80)) as p:
...     task = p.add_task("questions", total=2)
...     p.advance(task, 2)
>>> p.tasks[0].finished
True
>>> print(out.getvalue().strip())
questions 2/2 (100%) 0:00:00
"""

from __future__ import annotations

import threading
import time

from rich import get_console
from rich.console import Console
from rich.filesize import decimal
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text


def progress_bar(console: Console | None = None, *, unit: str = "count", transient: bool = False,
                 every: float = 30.0) -> Progress:
    """A rich ``Progress`` on ``console``: ``unit="count"`` shows done/total and elapsed time, ``"bytes"``
    size, speed and time left; ``transient`` bars vanish when done. A console that is not a terminal gets
    :class:`LineProgress` (a line per task every ``every`` seconds) instead."""
    console = console or get_console()
    if not console.is_terminal or console.is_dumb_terminal:
        return LineProgress(console, unit=unit, every=every)
    if unit == "bytes":
        columns = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, console=console, transient=transient)


class LineProgress(Progress):
    """Progress for logs: no live display; ``"<description> done/total (pct) elapsed"`` lines instead, one per
    task every ``every`` seconds while it runs (moved or not), and always when the task completes."""

    def __init__(self, console: Console, *, unit: str = "count", every: float = 30.0) -> None:
        super().__init__(console=console, disable=True)
        self.unit = unit
        self.every = every
        self._printed: dict[TaskID, float] = {}
        self._line_lock = threading.Lock()  # not _lock: that is rich's own
        self._stopped = threading.Event()
        self._beat: threading.Thread | None = None

    def start(self) -> None:
        """Also a heartbeat: a task whose count has not moved still gets its line every ``every`` seconds
        (a batch of long questions finishes nothing for many minutes; the elapsed time shows it is alive)."""
        super().start()
        if self.every > 0 and self._beat is None:
            self._stopped.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="progress-lines", daemon=True)
            self._beat.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        super().stop()

    def _heartbeat(self) -> None:
        while not self._stopped.wait(self.every / 2):  # half: the throttle below is what spaces the lines
            for task_id in list(self._tasks):
                task = self._tasks.get(task_id)
                if task is not None and task.started and not task.finished:
                    self._report(task_id)

    def update(self, task_id: TaskID, **kw) -> None:
        super().update(task_id, **kw)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        with self._line_lock:  # the heartbeat thread reports too
            self._report_locked(task_id)

    def _report_locked(self, task_id: TaskID) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        now = self.get_time()  # the clock the tasks were started on
        if task.finished:
            if self._printed.get(task_id) == float("inf"):
                return  # its last line is out already
            self._printed[task_id] = float("inf")
        elif now - self._printed.get(task_id, task.start_time or now) < self.every:
            return
        else:
            self._printed[task_id] = now
        self.console.print(self._line(task), markup=False, highlight=False, soft_wrap=True)

    def _line(self, task) -> str:
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0)).removeprefix("0")
        fmt = (lambda v: decimal(int(v))) if self.unit == "bytes" else (lambda v: f"{v:g}")
        done = fmt(task.completed)
        name = Text.from_markup(task.description).plain.rstrip()  # descriptions may hold escaped markup
        if task.total is None:
            return f"{name} {done} {elapsed}"
        pct = 100 * task.completed / task.total if task.total else 100.0
        return f"{name} {done}/{fmt(task.total)} ({pct:.0f}%) {elapsed}"

"""The one progress bar: counted work (items, tensors, questions) or bytes (assembly, downloads).

>>> import io
>>> from rich.console import Console
>>> with progress_bar(Console(file=io.StringIO())) as p:
...     task = p.add_task("questions", total=2)
...     p.advance(task, 2)
>>> p.tasks[0].finished
True
"""

from __future__ import annotations

from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)


def progress_bar(console=None, *, unit: str = "count", transient: bool = False) -> Progress:
    """A rich ``Progress`` on ``console``: ``unit="count"`` shows done/total and elapsed time, ``"bytes"``
    size, speed and time left; ``transient`` bars vanish when done."""
    if unit == "bytes":
        columns = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, console=console, transient=transient)

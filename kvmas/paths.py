"""Where kvmas keeps its data, and atomic file writes.

>>> from kvmas.paths import kvmas_home
>>> kvmas_home().name  # doctest: +SKIP
'kvmas'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def kvmas_home() -> Path:
    """The data dir: ``$KVMAS_HOME`` if set, else ``$XDG_CACHE_HOME/kvmas`` (default ``~/.cache/kvmas``)."""
    env = os.environ.get("KVMAS_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "kvmas"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))

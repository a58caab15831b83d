"""SQLite set-up shared by the persistent stores (knowledge pool, skill store): WAL, busy timeout, FKs.

>>> import tempfile, os
>>> from kvmas.db import connect, immediate
>>> conn = connect(os.path.join(tempfile.mkdtemp(), "x.sqlite"), busy_timeout_s=1.0)
>>> with immediate(conn) as c:
...     _ = c.execute("CREATE TABLE t (x)")
>>> conn.execute("PRAGMA journal_mode").fetchone()[0]
'wal'
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterator


def connect(path: str | Path, busy_timeout_s: float) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with a busy timeout, foreign keys on and Row results."""
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (write lock taken up front); rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")

"""The SQLite base both persistent stores (knowledge pool, skill store) stand on.

A :class:`SQLiteStore` opens its file only after a read-only look (not SQLite, damaged, another program's
file, a newer schema: refused, left untouched), keeps one connection per thread (WAL, busy timeout, foreign
keys), writes in ``BEGIN IMMEDIATE`` transactions, stamps ``application_id`` and ``user_version``, and wraps
exports in one envelope (``format`` + ``schema_version``).

>>> import tempfile, os
>>> from kvmas.db import SQLiteStore
>>> class Notes(SQLiteStore):
...     kind, app_id, schema_version, export_format = "notes", 0x6E6F7465, 1, "notes"
...     schema = "CREATE TABLE notes (text TEXT NOT NULL)"
>>> notes = Notes(os.path.join(tempfile.mkdtemp(), "n.sqlite"))
>>> with notes.transaction() as c:
...     _ = c.execute("INSERT INTO notes VALUES ('hi')")
>>> notes.connection().execute("PRAGMA journal_mode").fetchone()[0], notes.created
('wal', True)
>>> notes.open_envelope(notes.envelope(notes=[]))["notes"]
[]
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from kvmas.errors import BadInputError, CacheCorruptError, OutputError, SchemaVersionError, StoreBusyError


_BUSY = ("database is locked", "database table is locked", "database is busy")
_DAMAGED = ("malformed", "not a database", "disk i/o error", "no such table", "no such column", "could not decode")


def store_error(exc: sqlite3.Error, path: str | Path) -> Exception:
    """The typed error for an SQLite failure a user can cause: busy past the timeout, a damaged (or altered)
    file, a full disk, a read-only file; anything else is returned unchanged (constraint violations, which
    callers handle, and bugs in our SQL)."""
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return exc
    msg = str(exc).lower()
    if any(w in msg for w in _BUSY):
        return StoreBusyError(f"{path} stayed locked by another writer past the busy timeout; nothing was "
                              "written, try again")
    if any(w in msg for w in _DAMAGED):
        return CacheCorruptError(f"{path} is damaged ({exc})")
    if "disk is full" in msg or "readonly database" in msg or "unable to open database" in msg:
        return OutputError(f"cannot write {path} ({exc})")
    return exc


@contextlib.contextmanager
def _typed(path: str | Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        typed = store_error(exc, path)
        if typed is exc:
            raise
        raise typed from None
    except UnicodeDecodeError:  # a TEXT cell that is not UTF-8
        raise CacheCorruptError(f"{path} holds text that is not UTF-8 (damaged or altered outside kvmas)") from None
    except OverflowError as exc:  # an imported number past SQLite's 64-bit INTEGER; the transaction rolls back
        raise BadInputError(f"a number too large to store in {path} ({exc}); nothing was written") from None


class _Cursor(sqlite3.Cursor):
    """Rows are read lazily, so reading is where a damaged page shows: typed there too."""

    def fetchone(self):
        with _typed(self.connection.path):
            return super().fetchone()

    def fetchmany(self, *args):
        with _typed(self.connection.path):
            return super().fetchmany(*args)

    def fetchall(self):
        with _typed(self.connection.path):
            return super().fetchall()

    def __next__(self):
        with _typed(self.connection.path):
            return super().__next__()


class _Connection(sqlite3.Connection):
    """A connection whose SQLite failures a user can cause come out as typed kvmas errors."""

    path = ""

    def cursor(self, factory=_Cursor):
        return super().cursor(factory)

    def execute(self, *args):
        with _typed(self.path):
            return self.cursor().execute(*args)

    def executemany(self, *args):
        with _typed(self.path):
            return self.cursor().executemany(*args)


def connect(path: str | Path, busy_timeout_s: float) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with a busy timeout, foreign keys on and Row results; failures a
    user can cause (lock past the timeout, damaged file) raise typed errors (:func:`store_error`)."""
    with _typed(path):
        conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, factory=_Connection)
    conn.path = str(path)
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
        with contextlib.suppress(Exception):  # no transaction left to roll back
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):  # no transaction left to roll back
            conn.execute("ROLLBACK")
        raise


def _columns(conn: sqlite3.Connection, tables: set[str]) -> dict[str, list[str]]:
    """Column names of each table, in order."""
    return {t: [r[1] for r in conn.execute(f"PRAGMA table_info(\"{t.replace(chr(34), chr(34) * 2)}\")")]
            for t in tables}


class SQLiteStore:
    """Base of a kvmas SQLite file. Subclasses set ``kind`` (for messages), ``app_id``, ``schema_version``,
    ``schema`` (DDL, ``;``-separated), ``export_format`` and, for files written before kvmas stamped an
    ``application_id``, ``legacy_tables`` (tables that mark an unstamped file as one of ours)."""

    kind = "store"
    app_id = 0
    schema_version = 1
    schema = ""
    export_format = ""
    legacy_tables: frozenset[str] = frozenset()

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._check_existing()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.of(exc, self.path, f"create the {self.kind}") from None
        self.created = self._init_schema()

    # -- opening ---------------------------------------------------------------------------------
    def _check_existing(self) -> None:
        """Refuse foreign, damaged or newer files before anything writes to them."""
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise BadInputError(f"{self.kind} path {self.path} is a directory")
        if self.path.stat().st_size == 0:
            return
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.busy_timeout_s)
            try:
                app = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                check = conn.execute("PRAGMA quick_check").fetchone()[0]
                columns = _columns(conn, tables) if check == "ok" else {}
            finally:
                conn.close()
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            if isinstance(exc, sqlite3.Error) and isinstance(store_error(exc, self.path), StoreBusyError):
                raise StoreBusyError(f"{self.path} stayed locked by another program past the busy timeout; "
                                     "try again") from None
            raise CacheCorruptError(f"{self.path} is not a readable {self.kind} file ({type(exc).__name__}: "
                                    f"{str(exc)[:80]}); left untouched") from None
        if check != "ok":
            raise CacheCorruptError(f"{self.path} failed its integrity check ({check}); left untouched")
        ours = app == self.app_id or (app == 0 and bool(self.legacy_tables) and self.legacy_tables <= tables)
        if not ours and (tables or version):
            raise CacheCorruptError(f"{self.path} is an SQLite file but not a kvmas {self.kind}; left untouched")
        if version > self.schema_version:
            raise SchemaVersionError(f"{self.path} has {self.kind} schema {version}, this kvmas reads up to "
                                     f"{self.schema_version}; left untouched")
        if version == self.schema_version:
            for table, want in self._schema_columns().items():
                if columns.get(table) != want:
                    raise CacheCorruptError(f"{self.path}: table {table} does not have the columns of a kvmas "
                                            f"{self.kind} (altered outside kvmas); left untouched")

    @classmethod
    def _schema_columns(cls) -> dict[str, list[str]]:
        """The columns of every table :attr:`schema` creates (made once per class, in memory)."""
        cached = cls.__dict__.get("_columns_cache")
        if cached is None:
            conn = sqlite3.connect(":memory:")
            try:
                for stmt in filter(str.strip, cls.schema.split(";")):
                    conn.execute(stmt)
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                cached = _columns(conn, tables)
            finally:
                conn.close()
            cls._columns_cache = cached
        return cached

    def _init_schema(self) -> bool:
        """Create the tables in a new file (True), or stamp an older kvmas file's ``application_id``."""
        with self.transaction() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > self.schema_version:  # raced with a newer writer
                raise SchemaVersionError(f"{self.path} has {self.kind} schema {version}; left untouched")
            if version == self.schema_version:
                if c.execute("PRAGMA application_id").fetchone()[0] != self.app_id:
                    c.execute(f"PRAGMA application_id={self.app_id}")
                return False
            for stmt in filter(str.strip, self.schema.split(";")):
                c.execute(stmt)
            c.execute(f"PRAGMA application_id={self.app_id}")
            c.execute(f"PRAGMA user_version={self.schema_version}")
            self.on_create()
            return True

    def on_create(self) -> None:
        """Fill a new file; runs inside the transaction that creates the schema (override in a subclass)."""

    # -- connections and transactions --------------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, busy_timeout_s=self.busy_timeout_s)
            self._local.conn, self._local.depth = conn, 0
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that takes the write lock up front. Never call a model inside.

        Nested calls (one logical operation built from smaller ones) join the outer transaction through a
        savepoint: an inner failure undoes the inner part only, and nothing is committed before the outermost
        block ends, so a kill at any point leaves all of the operation or none of it. A lock held past the
        busy timeout is a :class:`StoreBusyError`, a damaged file a :class:`CacheCorruptError`.
        """
        conn = self.connection()
        depth = self._local.depth
        self._local.depth = depth + 1
        try:
            if depth:
                name = f"kvmas_{depth}"
                conn.execute(f"SAVEPOINT {name}")
                try:
                    yield conn
                except BaseException:
                    conn.execute(f"ROLLBACK TO {name}")
                    conn.execute(f"RELEASE {name}")
                    raise
                conn.execute(f"RELEASE {name}")
            else:
                with immediate(conn):
                    yield conn
        finally:
            self._local.depth = depth

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn, self._local.depth = None, 0

    def integrity(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        return self.connection().execute("PRAGMA integrity_check").fetchone()[0]

    def copy_to(self, dest: str | Path) -> Path:
        """A consistent copy of the store at ``dest`` (SQLite's online backup): what committed transactions
        still hold in the write-ahead log is copied too, which a plain file copy would lose."""
        dest = Path(dest)
        with _typed(dest):
            target = sqlite3.connect(dest)
            try:
                self.connection().backup(target)
            finally:
                target.close()
        return dest

    # -- export envelope ----------------------------------------------------------------------------
    @classmethod
    def envelope(cls, **body: Any) -> dict[str, Any]:
        """An export document: ``format``, ``schema_version``, then ``body``."""
        return {"format": cls.export_format, "schema_version": cls.schema_version, **body}

    @classmethod
    def open_envelope(cls, doc: Any, *, legacy_version_key: str | None = None) -> dict[str, Any]:
        """Check an export document's envelope; BadInputError / SchemaVersionError naming the field."""
        if not isinstance(doc, dict):
            raise BadInputError(f"{cls.kind} export: top level must be an object")
        if doc.get("format") != cls.export_format:
            raise BadInputError(f"format: expected {cls.export_format!r}, got {doc.get('format')!r} "
                                f"(not a kvmas {cls.kind} export)")
        key = "schema_version" if "schema_version" in doc or legacy_version_key is None else legacy_version_key
        ver = doc.get(key, 0 if key == legacy_version_key else None)
        if not isinstance(ver, int) or isinstance(ver, bool):
            raise BadInputError(f"{key}: must be an integer")
        if ver > cls.schema_version:
            raise SchemaVersionError(f"{key}: {cls.kind} export has schema {ver}, this kvmas reads up to "
                                     f"{cls.schema_version}")
        return doc

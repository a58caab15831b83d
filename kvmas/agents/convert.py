"""The GGUF -> safetensors conversion cache: convert once, atomically, and verify by checksum.

A cache directory holds what ``save_pretrained`` writes (fp32 or bf16 safetensors, config, tokenizer with its
chat template) plus ``kvmas-model.json``: a manifest with the cache schema version, the source GGUF's sha256,
the sha256 and size of every file, and the measured conversion and load times. The directory only ever appears
complete (built in a temp dir next to it, then renamed), so a crash leaves nothing that loads.

>>> from kvmas.agents.convert import read_manifest
>>> read_manifest("/nonexistent") is None
True
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from kvmas.errors import CacheCorruptError, KvmasError, SchemaVersionError
from kvmas.paths import atomic_write_text

SCHEMA_VERSION = 1
MANIFEST = "kvmas-model.json"
_KIND = "kvmas-model-cache"
_CHUNK = 8 << 20


class FileSum(BaseModel):
    size: int
    sha256: str


class CacheManifest(BaseModel):
    """What ``kvmas-model.json`` records about a converted model directory."""

    schema_version: int = SCHEMA_VERSION
    kind: str = _KIND
    name: str
    upstream: str = ""
    source_file: str
    source_size: int
    source_sha256: str
    dtype: str  # storage dtype of the safetensors ("float32" | "bfloat16"); compute is always fp32
    retied: bool  # the GGUF stored an untied output matrix and we re-tied it to the embedding (upstream)
    tied: bool
    params: int
    kvmas_version: str
    transformers_version: str
    created: str
    convert_s: float
    load_s: float | None = None  # warm load of the converted dir (tokenizer + fp32 model), measured here
    files: dict[str, FileSum]
    stamps: dict[str, int] = {}  # mtime_ns at last verification: unchanged files skip re-hashing


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: str | os.PathLike, progress=None) -> str:
    """Streamed sha256 of a file (bounded memory); ``progress(nbytes)`` is called per chunk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def read_manifest(directory: str | os.PathLike) -> CacheManifest | None:
    """The manifest of a cache dir; ``None`` if it has none; :class:`SchemaVersionError` if newer than us."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorruptError(f"{path} is not a readable kvmas manifest ({exc})") from None
    if not isinstance(raw, dict) or raw.get("kind") != _KIND:
        raise CacheCorruptError(f"{path} is not a kvmas model manifest")
    found = raw.get("schema_version")
    if not isinstance(found, int):
        raise CacheCorruptError(f"{path} has no valid schema_version")
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path.parent} was written by a newer kvmas (cache schema {found} > {SCHEMA_VERSION}); "
            f"refusing to use or overwrite it (upgrade kvmas, or delete it with `kvmas models remove`)"
        )
    try:
        return CacheManifest.model_validate(raw)
    except ValidationError as exc:
        raise CacheCorruptError(f"{path} is not a valid kvmas manifest ({exc.error_count()} errors)") from None


def verify_cache(directory: str | os.PathLike, *, full: bool = False) -> CacheManifest:
    """Check a cache dir against its manifest; return the manifest or raise :class:`CacheCorruptError`.

    Every file must exist with its recorded size. A file is re-hashed when its mtime differs from the one
    recorded at its last verification (the git-index rule), or always with ``full=True``.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CacheCorruptError(f"{directory} has no {MANIFEST}: not a complete kvmas model cache")
    if manifest.schema_version < SCHEMA_VERSION:
        raise CacheCorruptError(f"{directory} uses the old cache schema {manifest.schema_version}; rebuild it")
    rehashed: dict[str, int] = {}
    for rel, want in manifest.files.items():
        path = directory / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CacheCorruptError(f"{path} is missing from the model cache") from None
        if st.st_size != want.size:
            raise CacheCorruptError(f"{path} has {st.st_size} bytes, the manifest says {want.size}")
        if full or manifest.stamps.get(rel) != st.st_mtime_ns:
            if sha256_file(path) != want.sha256:
                raise CacheCorruptError(f"{path} failed its sha256 check")
            rehashed[rel] = st.st_mtime_ns
    if rehashed and any(manifest.stamps.get(k) != v for k, v in rehashed.items()):
        manifest = manifest.model_copy(update={"stamps": {**manifest.stamps, **rehashed}})
        with contextlib.suppress(OSError):  # a read-only cache stays valid; we just re-hash next time
            atomic_write_text(directory / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest


def refuse_newer(directory: str | os.PathLike) -> None:
    """Raise :class:`SchemaVersionError` if ``directory`` holds a cache written by a newer kvmas.

    A damaged or foreign manifest is not a reason to refuse: such a directory may be rebuilt.
    """
    with contextlib.suppress(CacheCorruptError):
        read_manifest(directory)


# -- locking and atomic directory replacement -----------------------------------------------------
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock for building or removing ``directory``: across processes (``flock`` on a sibling
    ``.NAME.lock`` file) and threads; re-entrant within one thread."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    with _HELD_GUARD:
        entry = _HELD.setdefault(key, [threading.RLock(), 0, None])
    rlock = entry[0]
    with rlock:
        entry[1] += 1
        try:
            if entry[1] == 1:
                fh = open(directory.parent / f".{directory.name}.lock", "a+")
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                entry[2] = fh
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and entry[2] is not None:
                fcntl.flock(entry[2].fileno(), fcntl.LOCK_UN)
                entry[2].close()
                entry[2] = None


def _tmp_prefix(directory: Path) -> str:
    return f".tmp-{directory.name}-"


def clean_stale_temps(directory: Path) -> int:
    """Remove temp/trash dirs an interrupted build of ``directory`` left behind (call with the lock held)."""
    n = 0
    for p in directory.parent.glob(f".*-{directory.name}-*"):
        if p.name.startswith((_tmp_prefix(directory), f".trash-{directory.name}-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(tmp: Path, directory: Path) -> None:
    """Atomically make ``tmp`` (a complete cache) become ``directory``, replacing an older/corrupt one.

    A directory written by a newer kvmas is refused, never replaced.
    """
    if directory.exists():
        refuse_newer(directory)  # a newer schema raises; damaged ones get replaced
        trash = directory.parent / f".trash-{directory.name}-{uuid.uuid4().hex[:8]}"
        os.replace(directory, trash)
        os.replace(tmp, directory)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)


def _disk_error(exc: OSError, what: str) -> KvmasError:
    if exc.errno == errno.ENOSPC:
        return KvmasError(f"disk full while {what}; nothing was left half-written (free space and re-run)")
    return KvmasError(f"{what} failed: {exc}")


# -- conversion --------------------------------------------------------------------------------------
def _status(console, text: str):
    if console is None:
        return contextlib.nullcontext()
    return console.status(text, spinner="dots")


def _write_rope_theta(config_path: Path) -> None:
    """Put ``rope_theta`` at top level too: transformers 4.x ignores the newer ``rope_parameters`` field and
    silently falls back to 10000 (wrong for Qwen's 1e6)."""
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    changed = False
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        changed = True
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        changed = True
    if changed:
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def retie_embeddings(hf) -> bool:
    """Tie the output projection to the input embedding (upstream Qwen/SmolLM behaviour); True if it changed.

    GGUF files of tied models may carry a separate, re-quantised copy of the embedding as ``output.weight``;
    tying drops it and uses the embedding matrix for both.
    """
    emb, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    hf.config.tie_word_embeddings = True
    if out is None or out.weight is emb.weight:
        return False
    hf.tie_weights()
    out = hf.get_output_embeddings()
    if out.weight is not emb.weight:
        out.weight = emb.weight
    return True


@contextlib.contextmanager
def _quiet_transformers(console=None, label: str = "de-quantising tensors") -> Iterator[None]:
    """Silence transformers' tqdm bars; route the GGUF loader's per-tensor loop to a rich bar instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    progress = None
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)

    def shim(iterable, *args, **kwargs):
        if progress is None:
            return iterable
        task = progress.add_task(label, total=len(iterable) if hasattr(iterable, "__len__") else None)

        def advance():
            for item in iterable:
                yield item
                progress.advance(task)

        return advance()

    was = hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = shim
    try:
        with progress if progress is not None else contextlib.nullcontext():
            yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was:
            hf_logging.enable_progress_bar()


def _load_gguf(gguf_path: Path, console=None, name: str = ""):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _status(console, f"[bold]{name}[/]: reading the tokenizer from {gguf_path.name}"), _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with _quiet_transformers(console, f"{name}: de-quantising tensors"):
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return tok, hf


def measure_load(directory: Path) -> float:
    """Seconds to load tokenizer + fp32 model from a converted dir, with a one-token forward as a sanity check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(directory)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        elapsed = time.perf_counter() - t0
    ids = tok.encode("Hi", add_special_tokens=False)[:1] or [0]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits
    if not torch.isfinite(logits).all():
        raise KvmasError(f"the converted model in {directory} produces non-finite logits")
    return elapsed


def convert_gguf(
    gguf_path: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    name: str,
    upstream: str = "",
    retie: bool = False,
    bf16: bool = False,
    source_sha256: str | None = None,
    console=None,
) -> CacheManifest:
    """Convert a GGUF file into a verified safetensors directory at ``directory``, atomically.

    ``retie``: when the GGUF stores a separate output matrix, tie it back to the embedding (upstream ties).
    ``bf16``: store weights in bfloat16 (half the disk); ``Model.load`` still computes in fp32.
    Holds the directory's lock; a newer-schema directory there is refused with :class:`SchemaVersionError`.

    >>> convert_gguf("model.gguf", "/tmp/out", name="m")  # doctest: +SKIP
    """
    import torch
    import transformers

    gguf_path, directory = Path(gguf_path), Path(directory)
    if not gguf_path.is_file():
        raise KvmasError(f"GGUF source {gguf_path} does not exist")
    with cache_lock(directory):
        refuse_newer(directory)  # before spending minutes converting
        clean_stale_temps(directory)
        tmp = directory.parent / f"{_tmp_prefix(directory)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            with _status(console, f"[bold]{name}[/]: hashing source GGUF"):
                source_sha = source_sha256 or sha256_file(gguf_path)
            tok, hf = _load_gguf(gguf_path, console, name)
            retied = retie_embeddings(hf) if retie else False
            tied = hf.get_output_embeddings() is not None and (
                hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
            )
            if getattr(hf, "hf_quantizer", None) is not None:
                hf.hf_quantizer.remove_quantization_config(hf)
            if bf16:
                hf = hf.to(torch.bfloat16)
            params = sum(p.numel() for p in hf.parameters())
            dtype = "bfloat16" if bf16 else "float32"
            with _status(console, f"[bold]{name}[/]: writing safetensors ({params / 1e6:.0f}M params, {dtype})"):
                with _quiet_transformers():
                    hf.save_pretrained(tmp)
                    tok.save_pretrained(tmp)
                _write_rope_theta(tmp / "config.json")
            del hf, tok
            convert_s = time.perf_counter() - t0
            with _status(console, f"[bold]{name}[/]: checking the converted model loads"):
                load_s = measure_load(tmp)
            files, stamps = {}, {}
            with _status(console, f"[bold]{name}[/]: checksumming the cache"):
                for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    rel = path.relative_to(tmp).as_posix()
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
                    files[rel] = FileSum(size=path.stat().st_size, sha256=sha256_file(path))
                    stamps[rel] = path.stat().st_mtime_ns
            manifest = CacheManifest(
                name=name, upstream=upstream, source_file=gguf_path.name, source_size=gguf_path.stat().st_size,
                source_sha256=source_sha, dtype=dtype, retied=retied, tied=tied, params=params,
                kvmas_version=_version("kvmas"), transformers_version=transformers.__version__,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                convert_s=round(convert_s, 2), load_s=round(load_s, 3), files=files, stamps=stamps,
            )
            atomic_write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2))
            publish_dir(tmp, directory)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error(exc, f"converting {gguf_path.name}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest

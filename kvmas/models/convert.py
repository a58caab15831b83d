"""The GGUF -> safetensors conversion cache: convert once, atomically, and verify by checksum.

A cache directory holds what ``save_pretrained`` writes (fp32 or bf16 safetensors, config, tokenizer with its
chat template) plus ``kvmas-model.json``: a manifest with the cache schema version, the source GGUF's sha256,
the sha256 and size of every file, and the measured conversion and load times. The directory only ever appears
complete (built in a temp dir next to it, then renamed), so a crash leaves nothing that loads.

>>> from kvmas.models.convert import read_manifest
>>> read_manifest("/nonexistent") is None
True
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
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
    retied: bool  # the GGUF stored two copies of the tied upstream matrix and we re-tied them (upstream shape)
    tied_to: str = ""  # which stored copy was kept for both roles: "embedding" | "output" (higher precision)
    tied: bool
    params: int
    kvmas_version: str
    transformers_version: str
    created: str
    convert_s: float
    load_s: float | None = None  # warm load of the converted dir (tokenizer + fp32 model), measured here
    files: dict[str, FileSum]
    stamps: dict[str, int] = {}  # mtime_ns at last verification: unchanged files skip re-hashing
    damaged: str = ""  # why the last verification failed; sticks until a full verification passes or a rebuild


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
    recorded at its last verification (the git-index rule), or always with ``full=True``. A failure is
    recorded in the manifest (``damaged``): the cache stays refused, whatever the mtimes say, until a full
    verification passes again (``kvmas models verify``) or it is rebuilt.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CacheCorruptError(f"{directory} has no {MANIFEST}: not a complete kvmas model cache")
    if manifest.schema_version < SCHEMA_VERSION:
        raise CacheCorruptError(f"{directory} uses the old cache schema {manifest.schema_version}; rebuild it")
    if manifest.damaged and not full:
        raise CacheCorruptError(f"{directory} failed verification ({manifest.damaged}); rebuild it, or run "
                                "`kvmas models verify` to check it again")
    rehashed: dict[str, int] = {}
    try:
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
    except CacheCorruptError as exc:
        _write_manifest(directory, manifest.model_copy(update={"damaged": str(exc)}))
        raise
    if manifest.damaged or (rehashed and any(manifest.stamps.get(k) != v for k, v in rehashed.items())):
        manifest = manifest.model_copy(update={"stamps": {**manifest.stamps, **rehashed}, "damaged": ""})
        _write_manifest(directory, manifest)
    return manifest


def _write_manifest(directory: Path, manifest: CacheManifest) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: the check is just repeated next time
        atomic_write_text(directory / MANIFEST, manifest.model_dump_json(indent=2))


def refuse_newer(directory: str | os.PathLike) -> None:
    """Raise :class:`SchemaVersionError` if ``directory`` holds a cache written by a newer kvmas.

    A damaged or foreign manifest is not a reason to refuse: such a directory may be rebuilt.
    """
    with contextlib.suppress(CacheCorruptError):
        read_manifest(directory)


def record_load_time(directory: str | os.PathLike) -> CacheManifest:
    """Re-measure the warm load of a verified cache and store it in its manifest (atomic rewrite)."""
    directory = Path(directory)
    verify_cache(directory)
    load_s = measure_load(directory)
    with cache_lock(directory):
        manifest = verify_cache(directory).model_copy(update={"load_s": round(load_s, 3)})
        atomic_write_text(directory / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest


# -- locking and atomic directory replacement -----------------------------------------------------
@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock for building or removing ``directory``: across processes and threads (``filelock`` on a
    sibling ``.NAME.lock`` file, one lock object per file, its state per thread); re-entrant within one thread."""
    from filelock import FileLock

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # the lock file stays: removing it on release would let a waiter lock an unlinked file
    with FileLock(directory.parent / f".{directory.name}.lock", is_singleton=True, preserve_lock_file=True):
        yield


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


def _gguf_header(path: str | os.PathLike) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """``{name: (ggml type, shape in GGUF order, absolute data offset)}``, read by ``gguf.GGUFReader``."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, EOFError) as exc:  # bad magic, version, value type, truncation
        raise CacheCorruptError(f"{path} is not a GGUF file kvmas can read ({exc})") from None
    return {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset)) for t in reader.tensors}


def gguf_tensor_table(path: str | os.PathLike) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{tensor name: (ggml type id, shape in GGUF order)}``, parsed from the header (no tensor data read).

    >>> gguf_tensor_table("model.gguf")["output.weight"]  # doctest: +SKIP
    (8, (896, 151936))
    """
    return {name: (t, dims) for name, (t, dims, _) in _gguf_header(path).items()}


def read_gguf_tensor(path: str | os.PathLike, name: str):
    """One tensor of a GGUF file, de-quantised to a float32 torch tensor in torch (row-major) order."""
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    table = _gguf_header(path)
    if name not in table:
        raise KvmasError(f"{path} has no tensor {name!r}")
    ggml_type, dims, offset = table[name]
    qtype = GGMLQuantizationType(ggml_type)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(dims))
    raw = np.fromfile(path, dtype=np.uint8, count=count // block * nbytes, offset=offset)
    shape = tuple(reversed(dims))
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
    else:
        values = dequantize(raw.reshape(shape[:-1] + (-1,)), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def _bits_per_weight(ggml_type: int) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return 8 * nbytes / block


def tie_source(gguf_path: str | os.PathLike) -> str | None:
    """Which stored copy a re-tie should keep: ``"output"`` when the GGUF's separate output matrix is stored at
    higher precision than its embedding (e.g. Q8_0 vs Q5_0 in the Qwen files: both are quantisations of the
    same upstream matrix, so the finer one is closer to upstream), ``"embedding"`` otherwise, ``None`` when the
    file stores no separate output matrix."""
    table = gguf_tensor_table(gguf_path)
    if "output.weight" not in table or "token_embd.weight" not in table:
        return None
    out_bits = _bits_per_weight(table["output.weight"][0])
    emb_bits = _bits_per_weight(table["token_embd.weight"][0])
    return "output" if out_bits > emb_bits else "embedding"


def retie_embeddings(hf, keep: str = "embedding") -> bool:
    """Tie the output projection and the input embedding into one matrix (upstream Qwen/SmolLM behaviour).

    GGUF files of tied models may store two separately quantised copies of the one upstream matrix; tying
    keeps ``keep`` (``"embedding"`` or ``"output"``) for both roles. Returns True if anything changed.
    """
    emb, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    hf.config.tie_word_embeddings = True
    if out is None or out.weight is emb.weight:
        return False
    if keep == "output":
        emb.weight = out.weight
    elif keep != "embedding":
        raise ValueError(f"keep must be 'embedding' or 'output', not {keep!r}")
    hf.tie_weights()
    out = hf.get_output_embeddings()
    if out.weight is not emb.weight:
        out.weight = emb.weight
    return True


@contextlib.contextmanager
def quiet_transformers(console=None, label: str = "de-quantising tensors") -> Iterator[None]:
    """Silence transformers' tqdm bars; route the GGUF loader's per-tensor loop to a rich bar instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    progress = None
    if console is not None:
        from kvmas.progress import progress_bar

        progress = progress_bar(console, transient=True)

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

    with _status(console, f"[bold]{name}[/]: reading the tokenizer from {gguf_path.name}"), quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with quiet_transformers(console, f"{name}: de-quantising tensors"):
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return tok, hf


def measure_load(directory: Path) -> float:
    """Seconds to load tokenizer + fp32 model from a converted dir, with a one-token forward as a sanity check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
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

    ``retie``: when the GGUF stores a separate output matrix although upstream ties them, re-tie, keeping the
    higher-precision of the two stored copies (:func:`tie_source`).
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
            keep = tie_source(gguf_path) if retie else None
            tok, hf = _load_gguf(gguf_path, console, name)
            retied = retie_embeddings(hf, keep) if keep else False
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
                with quiet_transformers():
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
                source_sha256=source_sha, dtype=dtype, retied=retied, tied_to=keep if retied else "", tied=tied,
                params=params,
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

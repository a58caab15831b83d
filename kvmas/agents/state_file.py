"""The saved form of a LatentState: safetensors plus JSON metadata, checksummed and checked before use.

A state file holds the per-layer keys/values, mask, positions, next positions, the optional last hidden
state and logits, latent input embeddings and, as metadata, the model fingerprint, the segment table, a
segment-id counter and a sha256 over the model's fingerprint key, that metadata and every tensor's name,
dtype, shape and bytes. :func:`read_state` refuses anything it cannot vouch for (a :class:`KvmasError` every time): a file that
is not a kvmas state, a newer or checksum-less format, another model's fingerprint, a failed checksum (bit
flips, tensors spliced in from another file), shapes or dtypes that do not match the fingerprint, and a
segment table that does not fit the tensors.

>>> import tempfile, os
>>> from kvmas.testing import tiny_model
>>> from kvmas.agents.state import LatentState
>>> m = tiny_model()
>>> path = LatentState.empty(m).extend("Q: 2+3?").save(os.path.join(tempfile.mkdtemp(), "s.safetensors"))
>>> LatentState.load(path, m).length
7
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from kvmas.agents.fingerprint import ModelFingerprint
from kvmas.errors import BadInputError, CacheCorruptError, SchemaVersionError
from kvmas.paths import atomic_write_bytes

STATE_FORMAT = "kvmas.latent_state/2"
_FORMAT_VERSION = 2
_FORMAT = re.compile(r"kvmas\.latent_state/(\d+)")
_INT = re.compile(r"-?\d{1,18}")


@dataclass(frozen=True)
class StateFile:
    """What a checked state file holds (tensors on the model's device)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    positions: torch.Tensor
    next_pos: torch.Tensor
    segments: tuple[Any, ...]
    last_hidden: torch.Tensor | None
    last_logits: torch.Tensor | None
    latent_inputs: dict[int, torch.Tensor]
    shared_cols: int
    next_id: int


def checksum(fingerprint_key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """``sha256:`` over the fingerprint key, the metadata (all but the checksum itself) and every tensor
    (name, dtype, shape, bytes), in name order."""
    fields = {k: v for k, v in (meta or {}).items() if k != "checksum"}
    h = hashlib.sha256(f"kvmas-state\0{fingerprint_key}\0{json.dumps(fields, sort_keys=True)}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def write_state(path: str | Path, tensors: dict[str, torch.Tensor], fingerprint: ModelFingerprint,
                segments: list[dict], shared_cols: int, next_id: int) -> Path:
    """Write host copies of ``tensors`` and the metadata atomically; returns the path."""
    import safetensors.torch as st

    host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": STATE_FORMAT, "fingerprint": fingerprint.model_dump_json(), "segments": json.dumps(segments),
            "shared_cols": str(shared_cols), "next_id": str(next_id)}
    meta["checksum"] = checksum(fingerprint.key, host, meta)
    return atomic_write_bytes(path, st.save(host, metadata=meta))


def read_state(path: str | Path, model, segment_type) -> StateFile:
    """Read and check a state file for ``model``; ``segment_type`` validates one segment-table row."""
    import safetensors

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"state file not found: {path}")
    if path.is_dir():
        raise BadInputError(f"state file {path} is a directory")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own, OSError and more for a damaged header
        raise CacheCorruptError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    bad = _Refuse(path)
    fmt = meta.get("format")
    found = _FORMAT.fullmatch(fmt) if isinstance(fmt, str) else None
    if found is None:
        raise CacheCorruptError(f"{path} is not a kvmas latent state (format {str(fmt)[:40]!r})")
    if int(found.group(1)) > _FORMAT_VERSION:
        raise SchemaVersionError(f"{path} is a state of format {found.group(1)}, this kvmas reads up to "
                                 f"{_FORMAT_VERSION}")
    if int(found.group(1)) < _FORMAT_VERSION:
        raise bad("was saved by an older kvmas without a checksum; save the state again")
    try:
        fp = ModelFingerprint.model_validate_json(meta.get("fingerprint", ""))
    except ValidationError:
        raise bad("has an unreadable model fingerprint") from None
    model.fingerprint.check(fp, f"state file {path.name}")
    if meta.get("checksum") != checksum(fp.key, tensors, meta):
        raise bad("failed its checksum (damaged, or its tensors or table were altered or come from another file)")
    shared_cols, next_id = bad.integer(meta, "shared_cols"), bad.integer(meta, "next_id")
    raw_segments = bad.json(meta, "segments")

    n = fp.num_layers
    want = {"mask", "positions", "next_pos", *(f"layers.{i}.{kv}" for i in range(n) for kv in ("keys", "values"))}
    has_head = "last_hidden" in tensors or "last_logits" in tensors
    if has_head:
        want |= {"last_hidden", "last_logits"}
    latent_names = {k for k in tensors if re.fullmatch(r"latent_inputs\.\d{1,18}", k)}
    if set(tensors) != want | latent_names:
        odd = sorted((set(tensors) ^ (want | latent_names)))[:3]
        raise bad(f"does not hold the tensors of a {n}-layer state (unexpected or missing: {', '.join(odd)})")
    mask, positions, next_pos = tensors["mask"], tensors["positions"], tensors["next_pos"]
    bad.check(mask.dtype == torch.long and mask.dim() == 2 and mask.shape[0] >= 1, "mask must be [rows, columns] "
              "int64")
    rows, cols = mask.shape
    bad.check(bool(((mask == 0) | (mask == 1)).all()), "mask holds values other than 0 and 1")
    bad.check(positions.dtype == torch.long and tuple(positions.shape) == (rows, cols)
              and bool((positions >= 0).all()), "positions must be non-negative int64 shaped like the mask")
    bad.check(next_pos.dtype == torch.long and tuple(next_pos.shape) == (rows,) and bool((next_pos >= 0).all()),
              "next_pos must be one non-negative int64 per row")
    dtype = getattr(torch, fp.dtype, None)
    kv_shape = (rows, fp.num_kv_heads, cols, fp.head_dim)
    for i in range(n):
        for kv in ("keys", "values"):
            t = tensors[f"layers.{i}.{kv}"]
            bad.check(t.dtype == dtype, f"layer {i} {kv} are {str(t.dtype).removeprefix('torch.')}, the model "
                      f"computes in {fp.dtype}")
            bad.check(tuple(t.shape) == kv_shape, f"layer {i} {kv} have shape {list(t.shape)}, expected "
                      f"{list(kv_shape)} (rows, kv heads, columns, head size)")
    if has_head:
        for name, width in (("last_hidden", fp.hidden_size), ("last_logits", None)):
            t = tensors[name]
            bad.check(t.is_floating_point() and t.dim() == 2 and t.shape[0] == rows
                      and (width is None or t.shape[1] == width), f"{name} does not fit {rows} rows of this model")
    segments = _segments(raw_segments, segment_type, rows, cols, fp.vocab_size, bad)
    kinds = {s.id: s.kind for s in segments}
    latent = {}
    for name in latent_names:
        sid, t = int(name.split(".")[1]), tensors[name]
        bad.check(kinds.get(sid) == "latent", f"{name} belongs to no latent segment")
        bad.check(t.is_floating_point() and t.dim() == 3 and t.shape[0] == rows and t.shape[2] == fp.hidden_size,
                  f"{name} is not [rows, steps, hidden size]")
        latent[sid] = t
    bad.check(0 <= shared_cols <= cols, f"shared_cols {shared_cols} outside 0..{cols}")
    bad.check(next_id > max(kinds, default=-1), f"next_id {next_id} does not follow the segment ids")

    dev = model.device
    move = (lambda t: t.to(dev)) if str(dev) != "cpu" else (lambda t: t)
    return StateFile(
        keys=tuple(move(tensors[f"layers.{i}.keys"]) for i in range(n)),
        values=tuple(move(tensors[f"layers.{i}.values"]) for i in range(n)),
        mask=move(mask), positions=move(positions), next_pos=move(next_pos), segments=tuple(segments),
        last_hidden=move(tensors["last_hidden"]) if has_head else None,
        last_logits=move(tensors["last_logits"]) if has_head else None,
        latent_inputs={k: move(v) for k, v in latent.items()}, shared_cols=shared_cols, next_id=next_id)


def _segments(raw: Any, segment_type, rows: int, cols: int, vocab: int, bad: "_Refuse") -> list:
    """The segment table, each row checked against the tensors' rows and columns."""
    bad.check(isinstance(raw, list), "segments must be a list")
    out = []
    for i, item in enumerate(raw):
        try:
            seg = segment_type.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise bad(f"segments[{i}].{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        where = f"segment {seg.id}"
        bad.check(seg.id >= 0, f"{where}: negative id")  # branches of one fork share ids after a merge
        bad.check(seg.start >= 0 and seg.length >= 0 and seg.start + seg.length <= cols,
                  f"{where}: columns {seg.start}..{seg.start + seg.length} outside 0..{cols}")
        bad.check(seg.rows == rows, f"{where}: {seg.rows} rows, the tensors have {rows}")
        if seg.token_ids is not None:
            bad.check(len(seg.token_ids) == rows and all(len(r) <= seg.length for r in seg.token_ids),
                      f"{where}: token ids do not fit its rows and columns")
            bad.check(all(0 <= t < vocab for r in seg.token_ids for t in r), f"{where}: token id outside the "
                      f"vocabulary of {vocab}")
        if seg.text is not None:
            bad.check(len(seg.text) == rows, f"{where}: {len(seg.text)} texts for {rows} rows")
        bad.check(seg.branch is None or seg.branch >= 0, f"{where}: negative branch")
        out.append(seg)
    return out


class _Refuse:
    """Builds the one-line :class:`CacheCorruptError` of a state file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, what: str) -> CacheCorruptError:
        return CacheCorruptError(f"state file {self.path}: {what}; refusing it")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise self(what)

    def integer(self, meta: dict, key: str) -> int:
        value = meta.get(key)
        self.check(isinstance(value, str) and _INT.fullmatch(value) is not None, f"{key} is not an integer")
        return int(value)

    def json(self, meta: dict, key: str) -> Any:
        try:
            return json.loads(meta.get(key, ""))
        except (json.JSONDecodeError, RecursionError):
            raise self(f"{key} is not valid JSON") from None

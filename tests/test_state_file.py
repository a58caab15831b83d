"""Saved states are checked before use: checksum, fingerprint shapes and dtype, segment table, typed errors."""

import json

import pytest
import safetensors
import safetensors.torch as st
import torch

from kvmas.agents.state import LatentState
from kvmas.agents.state_file import checksum, write_state
from kvmas.errors import BadInputError, CacheCorruptError, FingerprintMismatchError, KvmasError, SchemaVersionError
from kvmas.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture()
def saved(model, tmp_path):
    s = LatentState.empty(model).extend("Keep me.").think(2)
    return s, s.save(tmp_path / "s.safetensors")


def parts(path):
    with safetensors.safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


def rewrite(path, tensors, meta, *, rehash_with=None):
    """Write tensors + metadata as they are (or with a valid checksum for ``rehash_with``'s key)."""
    if rehash_with is not None:
        meta = {**meta, "checksum": checksum(rehash_with.key, tensors, meta)}
    st.save_file(tensors, str(path), metadata=meta)
    return path


def test_a_round_trip_is_exact(model, saved):
    s, path = saved
    back = LatentState.load(path, model)
    assert all(torch.equal(a, b) for a, b in zip(back.keys, s.keys)) and back.segments == s.segments
    assert back.speak(3).texts == s.speak(3).texts


def test_a_bit_flip_in_any_tensor_is_refused(model, saved):
    _, path = saved
    blob = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    for offset in (header, header + (len(blob) - header) // 2, len(blob) - 1):
        flipped = bytearray(blob)
        flipped[offset] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(CacheCorruptError, match="checksum"):
            LatentState.load(path, model)


def test_an_altered_segment_table_is_refused(model, saved, tmp_path):
    _, path = saved
    tensors, meta = parts(path)
    table = segs(path)
    table[0]["role"] = "system"  # provenance rewritten, tensors untouched
    bad = rewrite(tmp_path / "t.safetensors", tensors, {**meta, "segments": json.dumps(table)})
    with pytest.raises(CacheCorruptError, match="checksum"):
        LatentState.load(bad, model)


def test_tensors_spliced_from_another_model_are_refused(model, tmp_path):
    other = tiny_model("llama", seed=5)  # same shapes, other weights
    a = LatentState.empty(model).extend("Same text.").save(tmp_path / "a.safetensors")
    b = LatentState.empty(other).extend("Same text.").save(tmp_path / "b.safetensors")
    (_, ma), (tb, mb) = parts(a), parts(b)
    spliced = rewrite(tmp_path / "x.safetensors", tb, ma)  # b's tensors under a's whole metadata
    with pytest.raises(CacheCorruptError, match="checksum"):
        LatentState.load(spliced, model)
    copied_fp = rewrite(tmp_path / "y.safetensors", tb, {**mb, "fingerprint": ma["fingerprint"]})
    with pytest.raises(CacheCorruptError, match="checksum"):  # the checksum covers the fingerprint key
        LatentState.load(copied_fp, model)
    with pytest.raises(FingerprintMismatchError):
        LatentState.load(b, model)


@pytest.mark.parametrize("lie,match", [
    (lambda t: {**t, "layers.0.keys": t["layers.0.keys"].double()}, "computes in float32"),
    (lambda t: {**t, "layers.1.values": torch.cat([t["layers.1.values"]] * 2, 1)}, "expected"),
    (lambda t: {k: v for k, v in t.items() if k != "layers.1.keys"}, "missing"),
    (lambda t: {**t, "mask": t["mask"] * 2}, "0 and 1"),
    (lambda t: {**t, "positions": -t["positions"] - 1}, "non-negative"),
    (lambda t: {**t, "next_pos": t["next_pos"].float()}, "next_pos"),
    (lambda t: {**t, "last_hidden": t["last_hidden"][:, :3].contiguous()}, "last_hidden"),
    (lambda t: {**t, "extra": torch.zeros(1)}, "unexpected"),
])
def test_shape_and_dtype_lies_with_a_valid_checksum_are_refused(model, saved, tmp_path, lie, match):
    _, path = saved
    tensors, meta = parts(path)
    bad = rewrite(tmp_path / "lie.safetensors", lie(tensors), meta, rehash_with=model.fingerprint)
    with pytest.raises(CacheCorruptError, match=match):
        LatentState.load(bad, model)


def segs(path):
    return json.loads(parts(path)[1]["segments"])


@pytest.mark.parametrize("change,match,err", [
    (lambda m, s: {**m, "segments": "[{"}, "not valid JSON", CacheCorruptError),
    (lambda m, s: {**m, "segments": "{}"}, "must be a list", CacheCorruptError),
    (lambda m, s: {**m, "segments": json.dumps([{**s[0], "kind": "spell"}])}, r"segments\[0\]\.kind",
     CacheCorruptError),
    (lambda m, s: {**m, "segments": json.dumps([{**s[0], "length": 999}])}, "outside", CacheCorruptError),
    (lambda m, s: {**m, "segments": json.dumps([{**s[0], "rows": 2}])}, "rows", CacheCorruptError),
    (lambda m, s: {**m, "segments": json.dumps([{**s[0], "token_ids": [[10**6]]}])}, "vocabulary",
     CacheCorruptError),
    (lambda m, s: {**m, "fingerprint": "{}"}, "fingerprint", CacheCorruptError),
    (lambda m, s: {**m, "shared_cols": "lots"}, "shared_cols", CacheCorruptError),
    (lambda m, s: {**m, "shared_cols": "99999"}, "shared_cols", CacheCorruptError),
    (lambda m, s: {k: v for k, v in m.items() if k != "next_id"}, "next_id", CacheCorruptError),
    (lambda m, s: {**m, "next_id": "0"}, "next_id", CacheCorruptError),
    (lambda m, s: {**m, "format": "kvmas.latent_state/1"}, "older kvmas", CacheCorruptError),
    (lambda m, s: {**m, "format": "kvmas.latent_state/9"}, "format 9", SchemaVersionError),
    (lambda m, s: {k: v for k, v in m.items() if k != "format"}, "not a kvmas latent state", CacheCorruptError),
])
def test_malformed_metadata_is_a_typed_error(model, saved, tmp_path, change, match, err):
    _, path = saved
    tensors, meta = parts(path)
    bad = rewrite(tmp_path / "meta.safetensors", tensors, change(meta, segs(path)), rehash_with=model.fingerprint)
    with pytest.raises(err, match=match):
        LatentState.load(bad, model)
    unhashed = rewrite(tmp_path / "meta2.safetensors", tensors, {**change(meta, segs(path)),
                                                                 "checksum": meta["checksum"]})
    with pytest.raises(KvmasError):  # without a fresh checksum, the checksum refuses it (or the check before)
        LatentState.load(unhashed, model)


def test_paths_that_are_not_state_files(model, tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        LatentState.load(tmp_path / "nope.safetensors", model)
    with pytest.raises(BadInputError, match="directory"):
        LatentState.load(tmp_path, model)
    for blob in (b"", b"\x00" * 7, b"\xff" * 64, (10**6).to_bytes(8, "little") + b"{}"):
        (tmp_path / "b").write_bytes(blob)
        with pytest.raises(KvmasError):
            LatentState.load(tmp_path / "b", model)


def test_write_state_is_what_save_uses(model, tmp_path):
    s = LatentState.empty(model).extend("x")
    tensors = {"mask": s.mask, "positions": s.positions, "next_pos": s.next_pos,
               "last_hidden": s.last_hidden, "last_logits": s.last_logits,
               **{f"layers.{i}.{kv}": t for i, (k, v) in enumerate(zip(s.keys, s.values))
                  for kv, t in (("keys", k), ("values", v))}}
    a = write_state(tmp_path / "a", tensors, model.fingerprint, [g.model_dump() for g in s.segments],
                    s.shared_cols, s.ids.value)
    assert parts(a)[1]["checksum"] == parts(s.save(tmp_path / "b"))[1]["checksum"]

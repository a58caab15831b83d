"""`kvmas models` sub-app: listing, install/verify/remove on a tiny fake-part model, one-line errors."""

from __future__ import annotations

import hashlib

import pytest
from typer.testing import CliRunner

from kvmas.models import install as inst
from kvmas.models.registry import REGISTRY, cache_dir
from kvmas.cli.models_cmd import app
from test_models_install import DirSources, split_parts, tiny_entry

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMAS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny_registered(tmp_path, home, monkeypatch):
    from test_models_convert import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    entry = tiny_entry(data)
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    parts = split_parts(data, tmp_path / "parts")
    monkeypatch.setattr(inst, "PackageSources", lambda: DirSources(parts))
    return entry, data


def test_list_shows_every_registry_model(home):
    result = runner.invoke(app, [])
    assert result.exit_code == 0, result.output
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "Apache-2.0"):
        assert name in result.output
    assert runner.invoke(app, ["list"]).exit_code == 0


def test_bad_names_are_one_line_errors(home):
    for args in (["install", "gpt-17"], ["remove", "gpt-17"], ["verify", "gpt-17"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.output.strip().startswith("error: unknown model 'gpt-17'; known: smollm2-135m")
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["verify", "qwen2.5-coder-1.5b"])
    assert result.exit_code == 2 and "kvmas models install qwen2.5-coder-1.5b" in result.output


def test_install_verify_remove_round_trip(tiny_registered):
    entry, _ = tiny_registered
    result = runner.invoke(app, ["install", entry.name, "--prune-sources"])
    assert result.exit_code == 0, result.output
    assert f"installed {entry.name}" in result.output and "uninstalled 3 source package(s)" in result.output
    assert "already installed" in runner.invoke(app, ["install", entry.name]).output
    listing = runner.invoke(app, ["list"])
    assert entry.name in listing.output and "installed" in listing.output
    assert runner.invoke(app, ["verify", entry.name]).exit_code == 0
    timed = runner.invoke(app, ["verify", entry.name, "--time-load"])
    assert timed.exit_code == 0 and "warm load" in timed.output
    from kvmas.models.convert import verify_cache

    assert verify_cache(cache_dir(entry.name), full=True).load_s is not None
    weights = cache_dir(entry.name) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    bad = runner.invoke(app, ["verify", entry.name])
    assert bad.exit_code == 2 and "failed its sha256 check" in bad.output
    assert "damaged" in runner.invoke(app, ["list"]).output
    removed = runner.invoke(app, ["remove", entry.name])
    assert removed.exit_code == 0 and "freed" in removed.output
    assert not cache_dir(entry.name).exists()
    assert "was not installed" in runner.invoke(app, ["remove", entry.name]).output


def test_install_with_a_bad_hash_exits_non_zero(tiny_registered, monkeypatch):
    entry, data = tiny_registered
    wrong = entry.model_copy(update={"sha256": hashlib.sha256(data + b"x").hexdigest()})
    monkeypatch.setitem(REGISTRY, entry.name, wrong)
    result = runner.invoke(app, ["install", entry.name])
    assert result.exit_code == 2
    assert "sha256" in result.output and "expected" in result.output and "Traceback" not in result.output
    assert not cache_dir(entry.name).exists()
    assert list(inst.downloads_dir().iterdir()) == []


def test_bf16_install(tiny_registered):
    entry, _ = tiny_registered
    result = runner.invoke(app, ["install", entry.name, "--bf16"])
    assert result.exit_code == 0 and "(bfloat16)" in result.output

"""File names made from data stay in their folder; atomic writes clean up after killed writers."""

import os
import subprocess
import sys
import time

import pytest

from kvmas.errors import BadInputError, OutputError
from kvmas.paths import atomic_write_bytes, atomic_write_text, clean_stale_temps, inside, safe_name

HOSTILE = ["../../../x", "..", ".", "", "/etc/passwd", "a/../../b", "con", "\x00nul", "é/ü", "a" * 500, "\\..\\x",
           "~root", "-rf", ".hidden", "x\ny", "\x1b]0;title\x07"]


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_names_never_name_a_path(tmp_path, text):
    name = safe_name(text)
    assert 8 <= len(name) <= 80 and "/" not in name and "\\" not in name and ".." not in name
    assert not name.startswith((".", "-")) and name.isascii() and name.isprintable()
    assert inside(tmp_path, name).parent == tmp_path


def test_safe_names_of_distinct_texts_differ():
    names = {safe_name(t) for t in ["a/b", "a_b", "a?b", "a b", "A/B"] + HOSTILE}
    assert len(names) == 5 + len(HOSTILE)


def test_inside_refuses_escapes_and_symlinks_out(tmp_path):
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path, tmp_path / "in" / "up")
    for name in ("../x", "/etc/passwd", "up/x", "", "."):
        with pytest.raises(BadInputError, match="leave its folder"):
            inside(tmp_path / "in", name)
    assert inside(tmp_path / "in", "ok.json") == tmp_path / "in" / "ok.json"


def test_output_errors_are_typed_and_name_the_path(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "d", tmp_path / "f" / "under-a-file.json"):
        with pytest.raises(OutputError, match="cannot write") as info:
            atomic_write_text(bad, "data")
        assert isinstance(info.value, OSError) and info.value.errno is not None
    assert (tmp_path / "f").read_text() == "x" and os.listdir(tmp_path / "d") == []


def test_a_killed_writers_temp_file_is_removed_on_the_next_write(tmp_path):
    target = tmp_path / "state.bin"
    code = ("import os, sys; from kvmas import paths; "
            "real = os.replace; os.replace = lambda *a: os.kill(os.getpid(), 9); "
            "paths.atomic_write_bytes(sys.argv[1], b'x' * 1000000)")
    proc = subprocess.run([sys.executable, "-c", code, str(target)])
    assert proc.returncode == -9
    orphans = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(orphans) == 1 and not target.exists()
    old = tmp_path / ".state.bin.abcd1234.tmp"  # an older kvmas' temp name (no pid): stale after an hour
    old.write_bytes(b"y")
    os.utime(old, (time.time() - 7200,) * 2)
    live = tmp_path / f".state.bin.p{os.getpid()}.feed.tmp"  # a writer that is still running
    live.write_bytes(b"z")
    other = tmp_path / ".state.bin.p1.x.tmp.keep"  # not a temp name of this file
    other.write_bytes(b"k")
    atomic_write_bytes(target, b"done")
    assert target.read_bytes() == b"done"
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, live.name, other.name])
    assert clean_stale_temps(target) == 0

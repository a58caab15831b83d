"""The SQLite base protects both stores alike: foreign, damaged and newer files are refused untouched."""

import hashlib
import sqlite3

import pytest

from kvmas.errors import BadInputError, CacheCorruptError, SchemaVersionError
from kvmas.memory.store import SkillStore
from kvmas.organizer.pool import KnowledgePool

STORES = [pytest.param(lambda p: KnowledgePool(p, seed=False), id="pool"), pytest.param(SkillStore, id="skills")]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("open_store", STORES)
def test_random_bytes_are_refused_untouched(tmp_path, open_store):
    p = tmp_path / "x.sqlite"
    p.write_bytes(bytes(range(256)) * 64)
    before = digest(p)
    with pytest.raises(CacheCorruptError, match="left untouched"):
        open_store(p)
    assert digest(p) == before


@pytest.mark.parametrize("open_store", STORES)
def test_a_foreign_sqlite_file_is_refused_untouched(tmp_path, open_store):
    p = tmp_path / "x.sqlite"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE invoices (n INTEGER)")
    before = digest(p)
    with pytest.raises(CacheCorruptError, match="not a kvmas"):
        open_store(p)
    assert digest(p) == before
    with sqlite3.connect(p) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert {r[0] for r in c.execute("SELECT name FROM sqlite_master")} == {"invoices"}


@pytest.mark.parametrize("open_store", STORES)
def test_a_newer_schema_is_refused_before_anything_is_written(tmp_path, open_store):
    p = tmp_path / "x.sqlite"
    store = open_store(p)
    store.close()
    with sqlite3.connect(p) as c:
        c.execute(f"PRAGMA user_version={store.schema_version + 1}")
    before = digest(p)
    with pytest.raises(SchemaVersionError, match="left untouched"):
        open_store(p)
    assert digest(p) == before


@pytest.mark.parametrize("open_store", STORES)
def test_reopening_keeps_contents_and_stamps(tmp_path, open_store):
    p = tmp_path / "x.sqlite"
    store = open_store(p)
    assert store.created and store.integrity() == "ok"
    store.close()
    again = open_store(p)
    assert not again.created
    assert again.connection().execute("PRAGMA application_id").fetchone()[0] == store.app_id
    with pytest.raises(BadInputError, match="directory"):
        open_store(tmp_path)


def test_a_skill_store_written_before_the_stamp_is_still_ours(tmp_path):
    p = tmp_path / "old.sqlite"
    SkillStore(p).close()
    with sqlite3.connect(p) as c:  # as kvmas wrote it before application_id was set
        c.execute("PRAGMA application_id=0")
    store = SkillStore(p)
    assert store.connection().execute("PRAGMA application_id").fetchone()[0] == SkillStore.app_id


@pytest.mark.parametrize("open_store", STORES)
def test_export_envelope_is_checked(tmp_path, open_store):
    store = open_store(tmp_path / "x.sqlite")
    doc = store.envelope()
    assert store.open_envelope(doc) == doc
    with pytest.raises(BadInputError, match="format"):
        store.open_envelope({**doc, "format": "something-else"})
    with pytest.raises(SchemaVersionError):
        store.open_envelope({**doc, "schema_version": store.schema_version + 1})
    with pytest.raises(BadInputError, match="object"):
        store.open_envelope([doc])

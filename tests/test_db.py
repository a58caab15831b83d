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


@pytest.mark.parametrize("open_store", STORES)
@pytest.mark.parametrize("damage", ["truncated", "garbled page", "garbled header"])
def test_a_damaged_file_is_refused_untouched(tmp_path, open_store, damage):
    p = tmp_path / "x.sqlite"
    store = open_store(p)
    with store.transaction() as c:  # enough rows for several pages
        c.execute("CREATE TABLE IF NOT EXISTS filler (t TEXT)")
        c.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 64)
    store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    blob = bytearray(p.read_bytes())
    if damage == "truncated":
        blob = blob[: len(blob) // 2 + 100]
    elif damage == "garbled page":
        blob[4096 * 2: 4096 * 3] = bytes(range(256)) * 16
    else:
        blob[16:24] = b"\xff" * 8  # page size and format bytes
    p.write_bytes(bytes(blob))
    before = digest(p)
    with pytest.raises(CacheCorruptError, match="left untouched"):
        open_store(p)
    assert digest(p) == before


@pytest.mark.parametrize("open_store", STORES)
def test_a_lock_held_past_the_busy_timeout_is_a_typed_error(tmp_path, open_store):
    from kvmas.errors import StoreBusyError

    p = tmp_path / "x.sqlite"
    store = open_store(p)
    store.busy_timeout_s = 0.05
    store.close()
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusyError, match="try again"):
            with store.transaction() as c:
                c.execute("PRAGMA user_version")
        assert store.integrity() == "ok"  # reads still work while another process writes
    finally:
        other.execute("ROLLBACK")
    with store.transaction():  # and the store is usable once the lock is gone
        pass


def test_nested_transactions_are_one_commit_and_undo_only_their_part(tmp_path):
    store = SkillStore(tmp_path / "x.sqlite")
    meta = lambda k: store.get_meta(k)  # noqa: E731
    with store.transaction():
        store.set_meta("a", "1")
        with pytest.raises(BadInputError):
            with store.transaction():
                store.set_meta("b", "2")
                raise BadInputError("inner part fails")
        store.set_meta("c", "3")
        other = sqlite3.connect(store.path)  # nothing is visible to others before the outer block ends
        assert other.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0
    assert (meta("a"), meta("b"), meta("c")) == ("1", None, "3")
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.set_meta("d", "4")
            raise RuntimeError("outer fails")
    assert meta("d") is None


def test_a_new_pool_is_seeded_in_the_transaction_that_creates_it(tmp_path, monkeypatch):
    from kvmas.organizer import seeds

    real = seeds.seed_entries
    monkeypatch.setattr(seeds, "seed_entries", lambda: [*real()[:2], None])  # dies while seeding
    with pytest.raises(TypeError):
        KnowledgePool(tmp_path / "p.sqlite")
    monkeypatch.setattr(seeds, "seed_entries", real)
    pool = KnowledgePool(tmp_path / "p.sqlite")  # nothing was committed: created and seeded now, in full
    assert pool.created and len(pool) == len(real())

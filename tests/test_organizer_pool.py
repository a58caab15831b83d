import json
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvmas.errors import BadInputError, CacheCorruptError, SchemaVersionError
from kvmas.organizer.pool import DECAY, KnowledgePool, infer_tags
from kvmas.organizer.seeds import SEED_DESIGNS
from kvmas.organizer.spec import PipelineSpec
from kvmas.testing import tiny_model

VOTE = PipelineSpec.chain(("vote", {"n": 3}))
REVIEW = PipelineSpec.chain(("review", {"rounds": 2}))


@pytest.fixture
def pool(tmp_path):
    return KnowledgePool(tmp_path / "pool.sqlite")


def test_new_pool_is_seeded_once_and_empty_pool_on_request(tmp_path):
    p = KnowledgePool(tmp_path / "a.sqlite")
    assert len(p) == len(SEED_DESIGNS) and p.stats()["by_origin"] == {"seed": len(SEED_DESIGNS)}
    assert KnowledgePool(tmp_path / "a.sqlite").seed() == 0  # reopening / reseeding adds nothing
    assert len(KnowledgePool(tmp_path / "a.sqlite")) == len(SEED_DESIGNS)
    empty = KnowledgePool(tmp_path / "b.sqlite", seed=False)
    assert len(empty) == 0 and empty.search("anything") == []
    con = sqlite3.connect(tmp_path / "a.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1


def test_record_updates_counts_decays_and_recovers(pool):
    e, created = pool.add("q about eggs", VOTE, tags=["math"])
    assert created and e.trials == 0 and e.prior == 0.5
    e = pool.record(e.id, False, tokens=100, time_s=2.0)
    assert (e.trials, e.successes, e.fail_streak, e.tokens) == (1, 0, 1, 100)
    assert e.weight == pytest.approx(DECAY)
    e = pool.record(e.id, True, tokens=50, time_s=1.0)
    assert (e.trials, e.successes, e.fail_streak) == (2, 1, 0)
    assert e.weight == pytest.approx(DECAY + (1 - DECAY) / 2)
    assert e.time_s == pytest.approx(3.0) and e.mean_tokens == 75
    with pytest.raises(BadInputError):
        pool.record(99999, True)


def test_failing_learned_entries_retire_but_seeds_only_decay(pool):
    learned = pool.learn("Sam has 3 apples and 4 pears", REVIEW, True)
    assert learned.origin == "learned" and (learned.trials, learned.successes) == (1, 1)
    for _ in range(6):
        pool.record(learned.id, False)
    assert pool.get(learned.id).retired and learned.id not in [e.id for e in pool.entries()]
    seed = pool.entries()[0]
    for _ in range(8):
        pool.record(seed.id, False)
    s = pool.get(seed.id)
    assert not s.retired and s.weight < 0.1 and s.prior < 0.01


def test_learn_adds_successes_and_bumps_repeats(pool):
    seed = pool.search("several independent reasoning paths, most common answer", k=1)[0].entry
    n0 = len(pool)
    assert pool.learn("What is 17*3?", seed.spec, False, entry_id=seed.id) is None
    assert len(pool) == n0 and pool.get(seed.id).trials == 1
    new = pool.learn("What is 17*3?", seed.spec, True, entry_id=seed.id, tokens=40, tags=["math"])
    assert len(pool) == n0 + 1 and new.query == "What is 17*3?" and new.tokens == 40
    again = pool.learn("What is 17*3?", seed.spec, True, entry_id=new.id)
    assert again.id == new.id and (again.trials, again.successes) == (2, 2)  # counted once, on itself
    third = pool.learn("What is  17*3?", seed.spec, True)  # same query modulo spaces: same entry
    assert third.id == new.id and third.trials == 3
    assert pool.get(seed.id).trials == 2  # used by the first two runs only


def test_copy_to_keeps_what_the_write_ahead_log_holds(tmp_path):
    """A pool still open in this process keeps its last writes in the WAL; ``copy_to`` copies them, a plain
    copy of the main file would not (the bench once copied a pool that way)."""
    import shutil

    src = KnowledgePool(tmp_path / "src.sqlite", seed=False)
    src.add("a question learned a moment ago", PipelineSpec.chain("single"), origin="learned", trials=1, successes=1)
    assert (tmp_path / "src.sqlite-wal").stat().st_size > 0
    shutil.copyfile(tmp_path / "src.sqlite", tmp_path / "plain.sqlite")
    assert len(KnowledgePool(tmp_path / "plain.sqlite", seed=False)) == 0
    copy = KnowledgePool(src.copy_to(tmp_path / "copy.sqlite"), seed=False)
    assert [e.query for e in copy.entries()] == ["a question learned a moment ago"]
    assert copy.integrity() == "ok"


def test_lexical_search_diversity_and_tags(pool):
    hits = pool.search("several independent reasoning paths compared, most common answer kept", k=5)
    assert hits[0].entry.name == "self-consistency" and all(h.how == "lexical" for h in hits)
    specs = [h.entry.spec.to_json() for h in hits]
    assert len(set(specs)) == len(specs)  # identical pipelines never fill two slots
    only_choice = pool.search("a question", k=20, tags=["choice"])
    assert only_choice and all("choice" in h.entry.tags for h in only_choice)
    no_div = pool.search("several independent reasoning paths", k=3, diversity=0.0)
    assert [h.score for h in no_div] == sorted([h.score for h in no_div], reverse=True)
    with pytest.raises(BadInputError):
        pool.search("x", k=0)
    assert "choice" in infer_tags("Which one?\nA. red\nB. blue")


def test_embedding_search_is_keyed_by_model(tmp_path):
    p = KnowledgePool(tmp_path / "e.sqlite")
    m1, m2 = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    entry = p.entries()[3]
    hits = p.search(entry.query, model=m1, k=3)
    assert hits[0].how == "cosine" and hits[0].entry.id == entry.id  # its own text is its nearest neighbour
    assert p.stats()["embeddings"] == {m1.name: len(SEED_DESIGNS)}
    p.search(entry.query, model=m2, k=1)
    assert p.stats()["embeddings"] == {m1.name: len(SEED_DESIGNS), m2.name: len(SEED_DESIGNS)}
    v1 = p._embeddings(m1.fingerprint.key)[entry.id]
    assert np.allclose(v1, m1.embed_text(entry.query).numpy(), atol=1e-6)
    new = p.learn("fresh question 12 + 30", VOTE, True, model=m1)
    assert new.id in p._embeddings(m1.fingerprint.key)


def test_export_import_round_trip_is_idempotent(tmp_path, pool):
    m = tiny_model()
    pool.learn("Sam has 3 apples", REVIEW, True, tokens=9)
    pool.search("x", model=m)
    path = tmp_path / "out.json"
    pool.export_json(path)
    other = KnowledgePool(tmp_path / "other.sqlite", seed=False)
    assert other.import_json(path) == {"added": len(pool.entries(include_retired=True)), "updated": 0}
    assert other.import_json(path)["added"] == 0
    key = lambda e: (e.query, e.spec.to_json(), e.trials, e.successes, e.tokens, e.origin)
    assert sorted(map(key, other.entries())) == sorted(map(key, pool.entries()))
    assert other.stats()["embeddings"] == pool.stats()["embeddings"]
    bad = json.loads(path.read_text())
    bad["entries"][0]["spec"]["nodes"][0]["type"] = "rm -rf"
    with pytest.raises(BadInputError, match=r"entries\[0\]\.spec: .*unknown primitive"):
        other.import_json(json.dumps(bad))
    with pytest.raises(BadInputError, match="not a kvmas pool export"):
        other.import_json('{"entries": []}')
    with pytest.raises(SchemaVersionError):
        other.import_json(json.dumps({"format": "kvmas-pool", "schema": 99, "entries": []}))


def test_corrupted_foreign_and_newer_files_are_refused_untouched(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    before = junk.read_bytes()
    with pytest.raises(CacheCorruptError, match="left untouched"):
        KnowledgePool(junk)
    assert junk.read_bytes() == before

    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(CacheCorruptError, match="not a kvmas pool"):
        KnowledgePool(foreign)

    newer = tmp_path / "newer.sqlite"
    KnowledgePool(newer)
    con = sqlite3.connect(newer)
    con.execute("PRAGMA user_version=7")
    con.commit()
    con.close()
    before = newer.read_bytes()
    with pytest.raises(SchemaVersionError, match="schema 7"):
        KnowledgePool(newer)
    assert newer.read_bytes() == before


WORKER = textwrap.dedent("""
    import sys
    from kvmas.organizer.pool import KnowledgePool
    from kvmas.organizer.spec import PipelineSpec
    pool = KnowledgePool(sys.argv[1])
    eid, wid = int(sys.argv[2]), sys.argv[3]
    spec = PipelineSpec.chain(("vote", {"n": 3}))
    for i in range(25):
        pool.record(eid, i % 2 == 0, tokens=1)
        pool.learn(f"shared question {i % 5}", spec, True)
""")


def test_concurrent_writers_lose_no_update(tmp_path):
    path = tmp_path / "c.sqlite"
    pool = KnowledgePool(path)
    eid = pool.entries()[0].id
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(eid), str(w)]) for w in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    e = pool.get(eid)
    assert (e.trials, e.successes, e.tokens) == (100, 52, 100)
    learned = [x for x in pool.entries() if x.origin == "learned"]
    assert len(learned) == 5 and sum(x.trials for x in learned) == 100


def test_a_failed_learn_records_nothing_so_its_retry_counts(pool):
    e, _ = pool.add("q about eggs", VOTE)
    with pytest.raises(BadInputError, match="no pool entry"):
        pool.learn("q about eggs", VOTE, True, entry_id=e.id + 999, run_id="r1")
    assert pool.connection().execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == 0
    pool.learn("q about eggs", VOTE, True, entry_id=e.id, run_id="r1")
    assert pool.get(e.id).trials == 1
    with pytest.raises(BadInputError, match="already has a recorded outcome"):
        pool.learn("q about eggs", VOTE, True, entry_id=e.id, run_id="r1")
    assert pool.get(e.id).trials == 1

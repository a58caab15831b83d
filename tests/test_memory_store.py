"""Skill store: uniqueness, concurrency, crash safety, export/import, rollback, schema refusal, scoped purge."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from kvmas.errors import BadInputError, SchemaVersionError
from kvmas.memory.skill import Skill
from kvmas.memory.store import SkillStore

PY = sys.executable


def mk(scope="s", name="Heat", steps=("go to microwave 1", "heat <object> with microwave 1"), **kw) -> Skill:
    return Skill(scope=scope, name=name, activation=kw.pop("activation", "the task asks for a hot object"),
                 steps=list(steps), termination="It is hot now.", **kw)


@pytest.fixture()
def store(tmp_path):
    return SkillStore(tmp_path / "skills.sqlite")


def test_unique_content_collapses_and_stats_are_separate(store):
    a, created = store.add(mk())
    b, created2 = store.add(mk(name="OtherName"))  # same content, other name and id
    assert created and not created2 and b.id == a.id
    store.record_use(a.id, credit=0.5, activations=2, success=True)
    store.record_use(a.id, credit=-0.25)
    st = store.stats(a.id)
    assert (st.n_episodes, st.n_activations, st.n_success) == (2, 3, 1)
    assert st.sum_credit == pytest.approx(0.25) and st.sum_sq_credit == pytest.approx(0.3125)
    assert store.get(a.id).content_hash == mk().content_hash  # stats never touch content
    with pytest.raises(BadInputError):
        store.get("0123456789abcdef")


def test_search_bm25_and_embeddings(store):
    store.add(mk(status="active"))
    store.add(mk(name="Clean", steps=["go to sinkbasin 1", "clean <object> with sinkbasin 1"],
                 activation="the task asks for a clean object", status="active"))
    store.add(mk(name="Cand", steps=["look"], activation="sinkbasin cleaning candidate"))  # not live
    hits = store.search("s", "put a clean mug on the table")
    assert [s.name for s, _ in hits][0] == "Clean" and all(s.name != "Cand" for s, _ in hits)
    sid = hits[0][0].id
    store.set_embedding(sid, [1.0, 0.0, 0.0], "m1")
    emb = store.search("s", "zzz", query_vec=[0.9, 0.1, 0.0], embedding_model="m1")
    assert [s.id for s, _ in emb] == [sid]
    assert store.search("s", "zzz", query_vec=[0.9, 0.1, 0.0], embedding_model="other") == []


def test_status_compare_and_swap_and_legal_moves(store):
    s, _ = store.add(mk())
    assert store.set_status(s.id, "probation", expected="candidate", reason="gate")
    assert not store.set_status(s.id, "active", expected="candidate", reason="stale view")  # lost the race
    with pytest.raises(BadInputError):
        store.set_status(s.id, "candidate", reason="illegal")
    ops = [e.op for e in store.history(s.id)]
    assert ops == ["create", "probation"]


_WRITER = textwrap.dedent("""
    import sys
    from kvmas.memory.store import SkillStore
    from kvmas.memory.skill import Skill
    path, me, shared = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    st = SkillStore(path)
    def mk(name, step):
        return Skill(scope="c", name=name, activation="when " + step, steps=[step], termination="done")
    for i in range(5):
        st.add(mk(f"same{i}", f"common step {i}"))          # identical content from every writer
        st.add(mk(f"own{me}_{i}", f"writer {me} step {i}"))  # unique content
    for _ in range(25):
        st.record_use(shared, credit=1.0, activations=1)
""")


def test_concurrent_writers_lose_nothing_and_never_duplicate(tmp_path):
    path = tmp_path / "c.sqlite"
    st = SkillStore(path)
    shared, _ = st.add(Skill(scope="c", name="Shared", activation="x", steps=["y"], termination="z"))
    n = 4
    procs = [subprocess.Popen([PY, "-c", _WRITER, str(path), str(i), shared.id]) for i in range(n)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    skills = st.all("c")
    assert len(skills) == 1 + 5 + 5 * n
    assert len({s.content_hash for s in skills}) == len(skills)
    assert st.stats(shared.id).n_episodes == 25 * n and st.stats(shared.id).sum_credit == pytest.approx(25 * n)
    assert sum(e.op == "create" for e in st.events(scope="c")) == len(skills)
    assert st.integrity() == "ok"


def test_crash_mid_write_leaves_store_consistent(tmp_path):
    path = tmp_path / "crash.sqlite"
    st = SkillStore(path)
    st.add(mk(name="Before"))
    crash = textwrap.dedent("""
        import os, sys
        from kvmas.memory.store import SkillStore
        from kvmas.memory.skill import Skill
        st = SkillStore(sys.argv[1])
        def die(*a, **k):
            os._exit(3)  # killed after the skill, FTS and stats rows were written, before the event + COMMIT
        st._log = die
        st.add(Skill(scope="s", name="Half", activation="half written", steps=["a"], termination="b"))
    """)
    assert subprocess.run([PY, "-c", crash, str(path)]).returncode == 3
    st2 = SkillStore(path)
    assert st2.integrity() == "ok"
    assert [s.name for s in st2.all()] == ["Before"]
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM skill_stats").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM skills_fts").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    s, created = st2.add(Skill(scope="s", name="Half", activation="half written", steps=["a"], termination="b"))
    assert created


def _populated(store: SkillStore) -> None:
    a, _ = store.add(mk(status="active", source="seed", activation_terms=["hot"], provenance={"why": "seed"}))
    b, _ = store.add(a.derive(steps=["go to microwave 1", "heat <object> with microwave 1", "go to <target>"]))
    store.set_status(b.id, "probation", reason="gate")
    store.record_use(b.id, credit=0.4, activations=2, success=True, probation=True)
    store.add(mk(scope="other", name="Clean", steps=["clean it"], status="rejected"))


def test_export_import_round_trip_is_identical(tmp_path):
    src = SkillStore(tmp_path / "a.sqlite")
    _populated(src)
    f1 = src.export_file(tmp_path / "one.json")
    dst = SkillStore(tmp_path / "b.sqlite")
    assert dst.import_file(f1) == {"created": 3, "skipped": 0}
    f2 = dst.export_file(tmp_path / "two.json")
    assert f1.read_bytes() == f2.read_bytes()
    assert dst.import_file(f1) == {"created": 0, "skipped": 3}  # idempotent
    assert dst.search("s", "hot object")  # FTS rows rebuilt on import


def test_malformed_import_names_the_field_and_newer_schema_is_refused(tmp_path, store):
    doc = SkillStore(tmp_path / "x.sqlite")
    _populated(doc)
    data = doc.export()
    bad = json.loads(json.dumps(data))
    bad["skills"][1]["steps"] = [f"s{i}" for i in range(7)]
    with pytest.raises(BadInputError, match=r"skills\[1\]\.steps"):
        store.import_doc(bad)
    bad = json.loads(json.dumps(data))
    bad["skills"][0]["stats"]["n_episodes"] = "many"
    with pytest.raises(BadInputError, match=r"skills\[0\]\.stats\.n_episodes"):
        store.import_doc(bad)
    with pytest.raises(SchemaVersionError):
        store.import_doc(dict(data, schema_version=99))
    assert store.all() == []  # nothing half-imported

    path = tmp_path / "newer.sqlite"
    SkillStore(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version=7")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError):
        SkillStore(path)
    assert path.read_bytes() == before  # refused, never overwritten


def test_rollback_restores_a_version_as_new_events(store):
    v1, _ = store.add(mk(status="active"))
    v2, _ = store.add(v1.derive(steps=["go to microwave 1"]))
    store.set_status(v2.id, "active", expected="candidate", reason="accepted")
    store.set_status(v1.id, "archived", expected="active", reason="superseded")
    before = store.history(v1.id)
    restored = store.rollback(v1.lineage_id, 1, reason="v2 regressed")
    after = store.history(v1.id)
    assert restored.id == v1.id and restored.status == "active" and store.get(v2.id).status == "archived"
    assert after[: len(before)] == before  # append-only: old events untouched
    new = after[len(before):]
    assert [(e.op, e.skill_id) for e in new] == [("archive", v2.id), ("rollback", v1.id)]
    assert all(e.reason == "v2 regressed" for e in new)
    with pytest.raises(BadInputError):
        store.rollback(v1.id, 9)


def test_purge_is_scoped(store):
    _populated(store)
    with pytest.raises(BadInputError):
        store.purge("")
    assert store.purge("other") == 1
    assert store.scopes() == ["s"] and len(store.all("s")) == 2
    assert store.events(scope="other")[-1].op == "purge"

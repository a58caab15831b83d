"""Fault injection: writer processes of both stores are killed (SIGKILL) at random moments, restarted, and
every count is checked exactly afterwards: no outcome recorded without being counted, none counted twice,
no lost update, a sound file. A planted non-atomic writer shows the checks catch what they look for."""

import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest

from kvmas.errors import BadInputError
from kvmas.memory.skill import Skill
from kvmas.memory.store import SkillStore
from kvmas.organizer.pool import KnowledgePool
from kvmas.organizer.spec import PipelineSpec

SPEC = PipelineSpec.chain(("vote", {"n": 3}))
WRITERS, ITERATIONS, TOKENS, KILLS = 4, 300, 7, 20
CTX = mp.get_context("fork")  # a forked writer starts in milliseconds, so kills land inside its loop

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def ok_of(i: int) -> bool:
    return i % 3 != 0


# -- writers (run in forked processes; each resumes where the store says it stopped) --------------------
def pool_writer(path, k, n, entry_id, progress, plant_at=None):
    pool = KnowledgePool(path, seed=False)
    for i in range(n):
        run_id = f"w{k}-{i}"
        if plant_at == i:  # the old two-transaction learn, killed between its transactions
            with pool.transaction() as c:
                c.execute("INSERT INTO outcomes (run_id, entry_id, success, ts) VALUES (?, ?, ?, 'x')",
                          (run_id, entry_id, int(ok_of(i))))
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            pool.learn(f"writer {k} question", SPEC, ok_of(i), entry_id=entry_id, tokens=TOKENS, run_id=run_id)
        except BadInputError:  # counted before the last kill: the retry is refused, as it should be
            pass
        progress.value += 1


def skill_writer(path, k, n, skill_id, progress, plant_at=None):
    st = SkillStore(path)
    scope = f"s{k}"
    while (i := st.iteration(scope)) < n:
        episode = dict(ep_id=f"{k}-{i}", env="house", task_family="f", iteration=i, reward=1.0, success=i % 2 == 0,
                       n_steps=3, trace_json="{}")
        use = dict(skill_id=skill_id, credit=1.0, activations=2, success=i % 2 == 0)
        if plant_at == i:  # episode and credit in separate transactions, killed in between
            st.add_episode(scope=scope, **episode)
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            st.commit_iteration(scope, episodes=[episode], uses=[use], meta={f"last:{scope}": str(i)})
        except BadInputError:  # the episode is kept but the iteration is not counted: stuck (the checks see it)
            return
        progress.value += 1


# -- what must hold afterwards ------------------------------------------------------------------------------
def pool_problems(pool, entry_id, writers, n):
    c = pool.connection()
    problems = []
    runs = {r[0]: r[1] for r in c.execute("SELECT run_id, success FROM outcomes")}
    if set(runs) != {f"w{k}-{i}" for k in range(writers) for i in range(n)}:
        problems.append(f"{len(runs)} outcomes recorded, expected {writers * n}")
    e = pool.get(entry_id)
    want_ok = sum(ok_of(i) for i in range(n))
    if (e.trials, e.successes, e.tokens) != (writers * n, writers * want_ok, TOKENS * writers * n):
        problems.append(f"shared entry counts {e.trials}/{e.successes}/{e.tokens}")
    if e.trials != len(runs) or e.successes != sum(runs.values()):
        problems.append("outcomes recorded but not counted (or counted twice)")
    for k in range(writers):
        learned = [x for x in pool.entries() if x.query == f"writer {k} question"]
        if len(learned) != 1 or (learned[0].trials, learned[0].successes, learned[0].tokens) != (
                want_ok, want_ok, TOKENS * want_ok):
            problems.append(f"writer {k}: learned entry {[(x.trials, x.successes, x.tokens) for x in learned]}")
    if pool.integrity() != "ok":
        problems.append("integrity check failed")
    return problems


def skill_problems(st, skill_id, writers, n):
    problems = []
    for k in range(writers):
        scope = f"s{k}"
        episodes = st.connection().execute("SELECT COUNT(*) FROM episodes WHERE scope=?", (scope,)).fetchone()[0]
        if (st.iteration(scope), episodes, st.get_meta(f"last:{scope}")) != (n, n, str(n - 1)):
            problems.append(f"{scope}: counter {st.iteration(scope)}, {episodes} episodes")
    s = st.stats(skill_id)
    want = (writers * n, 2 * writers * n, writers * ((n + 1) // 2), float(writers * n))
    if (s.n_episodes, s.n_activations, s.n_success, s.sum_credit) != want:
        problems.append(f"skill stats {s.n_episodes}/{s.n_activations}/{s.n_success}/{s.sum_credit}, want {want}")
    if st.integrity() != "ok":
        problems.append("integrity check failed")
    return problems


# -- the harness ----------------------------------------------------------------------------------------------
def run_with_kills(target, args_of, writers, *, kills, seed=0, deadline_s=60.0):
    """Start ``writers`` processes on ``args_of(k, n)``, SIGKILL a random one (inside its loop) and restart it,
    until ``kills`` kills are made; a round that finishes first is followed by one with ``ITERATIONS`` more
    iterations (writers resume where the store says). Every writer must end with exit code 0. Returns
    ``(kills made, iterations per writer)``."""
    rng = random.Random(seed)
    progress = [CTX.RawValue("i", 0) for _ in range(writers)]
    made, n, t0 = 0, 0, time.monotonic()

    def start(k):
        p = CTX.Process(target=target, args=(*args_of(k, n), progress[k]))
        p.start()
        return p

    while made < kills:
        n += ITERATIONS
        procs = [start(k) for k in range(writers)]
        while any(p.is_alive() for p in procs):
            assert time.monotonic() - t0 < deadline_s, "writers did not finish in time"
            time.sleep(rng.uniform(0.0005, 0.01))
            live = [k for k, p in enumerate(procs) if p.is_alive() and progress[k].value > 0]
            if made < kills and live:
                k = rng.choice(live)
                os.kill(procs[k].pid, signal.SIGKILL)
                procs[k].join()
                made += 1
                progress[k].value = 0
                procs[k] = start(k)
        assert [p.exitcode for p in procs] == [0] * writers
    return made, n


def test_killed_pool_writers_lose_no_outcome(tmp_path):
    path = tmp_path / "pool.sqlite"
    entry, _ = KnowledgePool(path, seed=False).add("shared question", SPEC)
    made, n = run_with_kills(pool_writer, lambda k, n: (path, k, n, entry.id), WRITERS, kills=KILLS, seed=1)
    assert made == KILLS
    assert pool_problems(KnowledgePool(path, seed=False), entry.id, WRITERS, n) == []


def test_killed_skill_writers_lose_no_credit(tmp_path):
    path = tmp_path / "skills.sqlite"
    shared, _ = SkillStore(path).add(Skill(scope="c", name="Shared", activation="x", steps=["y"], termination="z"))
    made, n = run_with_kills(skill_writer, lambda k, n: (path, k, n, shared.id), WRITERS, kills=KILLS, seed=2)
    assert made == KILLS
    assert skill_problems(SkillStore(path), shared.id, WRITERS, n) == []


def test_the_checks_catch_a_split_transaction(tmp_path):
    """The same checks on writers that split one logical operation in two and die in between."""
    pool_path, skills_path = tmp_path / "pool.sqlite", tmp_path / "skills.sqlite"
    entry, _ = KnowledgePool(pool_path, seed=False).add("shared question", SPEC)
    shared, _ = SkillStore(skills_path).add(Skill(scope="c", name="S", activation="x", steps=["y"], termination="z"))
    for target, path, ref in ((pool_writer, pool_path, entry.id), (skill_writer, skills_path, shared.id)):
        progress = CTX.RawValue("i", 0)
        for plant in (3, None):  # killed at iteration 3, then restarted to the end
            p = CTX.Process(target=target, args=(path, 0, 6, ref, progress, plant))
            p.start()
            p.join()
            assert p.exitcode == (-signal.SIGKILL if plant is not None else 0)
    assert pool_problems(KnowledgePool(pool_path, seed=False), entry.id, 1, 6) != []
    assert skill_problems(SkillStore(skills_path), shared.id, 1, 6) != []


def test_an_imported_number_past_64_bits_is_refused_and_nothing_is_written(tmp_path):
    """Found by the fuzz test: a pool export whose entry has tokens = 10**30 raised OverflowError from sqlite3."""
    from kvmas.errors import BadInputError
    from kvmas.organizer.pool import KnowledgePool

    pool = KnowledgePool(tmp_path / "pool.sqlite")
    doc = json.loads(pool.export_json())
    before = len(doc["entries"])
    doc["entries"][0]["tokens"] = 10 ** 30
    doc["entries"][0]["query"] = "a query that is new, so the entry would be added"
    fresh = KnowledgePool(tmp_path / "fresh.sqlite")
    with pytest.raises(BadInputError, match="too large to store"):
        fresh.import_json(json.dumps(doc))
    assert len(json.loads(fresh.export_json())["entries"]) == before

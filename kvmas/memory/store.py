"""The skill store: one SQLite file (WAL) holding skills, stats, evidence episodes, gate reports and an
append-only event log. Safe for several processes: uniqueness and arithmetic live in SQL, writes are short
``BEGIN IMMEDIATE`` transactions that never contain a model call.

>>> import tempfile, os
>>> from kvmas.memory.store import SkillStore
>>> from kvmas.memory.skill import Skill
>>> st = SkillStore(os.path.join(tempfile.mkdtemp(), "s.sqlite"))
>>> sk, created = st.add(Skill(scope="demo", name="Heat", activation="task says hot", steps=["heat it"],
...                            termination="it is hot", status="active"))
>>> created, st.add(sk.model_copy(update={"id": "ffffffffffffffff"}))[1]
(True, False)
>>> [s.name for s, _ in st.search("demo", "hot task")]
['Heat']
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ValidationError

from kvmas.db import SQLiteStore
from kvmas.clock import utc_now
from kvmas.errors import BadInputError, CacheCorruptError
from kvmas.memory.skill import LIVE, TRANSITIONS, Skill, SkillStats
from kvmas.paths import atomic_write_text, kvmas_home, read_json

STORE_SCHEMA_VERSION = 1
STORE_APP_ID = 0x6B766D73  # "kvms": marks a kvmas skill store file
EXPORT_FORMAT = "kvmas-skills"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS skills (
    id TEXT PRIMARY KEY, lineage_id TEXT NOT NULL, parent_id TEXT, version INTEGER NOT NULL,
    scope TEXT NOT NULL, name TEXT NOT NULL, content_hash TEXT NOT NULL, status TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL, token_count INTEGER NOT NULL,
    body TEXT NOT NULL, created_at TEXT NOT NULL, embedding BLOB, embedding_model TEXT,
    UNIQUE (scope, content_hash));
CREATE INDEX IF NOT EXISTS skills_scope_status ON skills (scope, status);
CREATE INDEX IF NOT EXISTS skills_lineage ON skills (lineage_id, version);
CREATE TABLE IF NOT EXISTS skill_stats (
    skill_id TEXT PRIMARY KEY REFERENCES skills(id) ON DELETE CASCADE,
    n_activations INTEGER NOT NULL DEFAULT 0, n_episodes INTEGER NOT NULL DEFAULT 0,
    n_success INTEGER NOT NULL DEFAULT 0, sum_credit REAL NOT NULL DEFAULT 0,
    sum_sq_credit REAL NOT NULL DEFAULT 0, probation_uses INTEGER NOT NULL DEFAULT 0,
    age_iters INTEGER NOT NULL DEFAULT 0, last_used_at TEXT);
CREATE VIRTUAL TABLE IF NOT EXISTS skills_fts USING fts5 (name, activation, steps, termination);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, actor TEXT NOT NULL, op TEXT NOT NULL,
    scope TEXT NOT NULL, skill_id TEXT, reason TEXT NOT NULL DEFAULT '', before_json TEXT, after_json TEXT);
CREATE INDEX IF NOT EXISTS events_skill ON events (skill_id);
CREATE TABLE IF NOT EXISTS episodes (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, env TEXT NOT NULL, task_family TEXT NOT NULL,
    iteration INTEGER NOT NULL, reward REAL NOT NULL, success INTEGER NOT NULL, n_steps INTEGER NOT NULL,
    trace_json TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS episodes_scope ON episodes (scope, iteration);
CREATE TABLE IF NOT EXISTS gate_results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, skill_id TEXT NOT NULL REFERENCES skills(id) ON DELETE CASCADE,
    parent_id TEXT, accepted INTEGER NOT NULL, report_json TEXT NOT NULL, ts TEXT NOT NULL);
"""

_STAT_COLS = ("n_activations", "n_episodes", "n_success", "sum_credit", "sum_sq_credit", "probation_uses",
              "age_iters", "last_used_at")



class Event(BaseModel):
    """One row of the append-only log."""

    seq: int
    ts: str
    actor: str
    op: str
    scope: str
    skill_id: str | None
    reason: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def default_path() -> Path:
    """``kvmas_home()/skills.sqlite`` (absolute; resolved once, never relative to the working directory)."""
    return (kvmas_home() / "skills.sqlite").resolve()


def field_error(exc: ValidationError, prefix: str = "") -> str:
    """First pydantic error as ``path.to.field: message``."""
    first = exc.errors()[0]
    loc = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    return f"{loc.lstrip('.')}: {first['msg']}"


class SkillStore(SQLiteStore):
    """Skills in one SQLite file; one connection per thread; every write is a short immediate transaction."""

    kind, app_id, schema_version, schema, export_format = "skill store", STORE_APP_ID, STORE_SCHEMA_VERSION, \
        _SCHEMA, EXPORT_FORMAT
    legacy_tables = frozenset({"meta", "skills", "skill_stats", "events", "episodes", "gate_results"})

    def __init__(self, path: str | Path | None = None, *, busy_timeout_ms: int = 10000):
        super().__init__(Path(path).expanduser().resolve() if path else default_path(),
                         busy_timeout_s=busy_timeout_ms / 1000)

    # -- events ------------------------------------------------------------------------------
    def _log(self, c: sqlite3.Connection, op: str, scope: str, skill_id: str | None, *, actor: str,
             reason: str = "", before: dict | None = None, after: dict | None = None) -> None:
        c.execute(
            "INSERT INTO events (ts, actor, op, scope, skill_id, reason, before_json, after_json)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (utc_now(), actor, op, scope, skill_id, reason,
             json.dumps(before, sort_keys=True) if before is not None else None,
             json.dumps(after, sort_keys=True) if after is not None else None),
        )

    def log(self, op: str, scope: str, skill_id: str | None = None, *, actor: str = "api", reason: str = "",
            after: dict | None = None) -> None:
        """Record a decision that changes no row (e.g. a candidate dropped before gating)."""
        with self.transaction() as c:
            self._log(c, op, scope, skill_id, actor=actor, reason=reason, after=after)

    def events(self, *, skill_ids: list[str] | None = None, scope: str | None = None,
               limit: int = 1000) -> list[Event]:
        sql, args = "SELECT * FROM events WHERE 1=1", []
        if skill_ids is not None:
            sql += f" AND skill_id IN ({','.join('?' * len(skill_ids))})"
            args += skill_ids
        if scope is not None:
            sql += " AND scope=?"
            args.append(scope)
        rows = self.connection().execute(sql + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        try:
            return [Event(seq=r["seq"], ts=r["ts"], actor=r["actor"], op=r["op"], scope=r["scope"],
                          skill_id=r["skill_id"], reason=r["reason"],
                          before=json.loads(r["before_json"]) if r["before_json"] else None,
                          after=json.loads(r["after_json"]) if r["after_json"] else None) for r in rows]
        except (ValueError, TypeError, RecursionError) as exc:
            raise CacheCorruptError(f"an event row of {self.path} is unreadable ({type(exc).__name__})") from None

    # -- skills --------------------------------------------------------------------------------
    @staticmethod
    def _row_to_skill(r: sqlite3.Row) -> Skill:
        try:
            body = json.loads(r["body"])
            return Skill(id=r["id"], lineage_id=r["lineage_id"], parent_id=r["parent_id"], version=r["version"],
                         scope=r["scope"], name=r["name"], status=r["status"], pinned=bool(r["pinned"]),
                         source=r["source"], created_at=r["created_at"], **body)
        except (ValueError, TypeError, RecursionError) as exc:  # JSON and pydantic errors are ValueErrors
            raise CacheCorruptError(f"skill row {str(r['id'])[:32]!r} is unreadable "
                                    f"({type(exc).__name__}); the store was altered outside kvmas") from None

    def _insert(self, c: sqlite3.Connection, skill: Skill, stats: SkillStats | None, *, actor: str,
                reason: str, op: str = "create") -> tuple[str, bool]:
        body = skill.model_dump(include={"activation", "activation_terms", "steps", "termination", "provenance"})
        cur = c.execute(
            "INSERT INTO skills (id, lineage_id, parent_id, version, scope, name, content_hash, status, pinned,"
            " source, token_count, body, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT DO NOTHING",
            (skill.id, skill.lineage_id, skill.parent_id, skill.version, skill.scope, skill.name,
             skill.content_hash, skill.status, int(skill.pinned), skill.source, skill.token_count,
             json.dumps(body, sort_keys=True), skill.created_at),
        )
        if cur.rowcount == 0:
            row = c.execute("SELECT id FROM skills WHERE (scope=? AND content_hash=?) OR id=?",
                            (skill.scope, skill.content_hash, skill.id)).fetchone()
            return row["id"], False
        rowid = c.execute("SELECT rowid FROM skills WHERE id=?", (skill.id,)).fetchone()[0]
        c.execute("INSERT INTO skills_fts (rowid, name, activation, steps, termination) VALUES (?,?,?,?,?)",
                  (rowid, skill.name, skill.activation + " " + " ".join(skill.activation_terms),
                   " ".join(skill.steps), skill.termination))
        st = stats or SkillStats()
        c.execute(f"INSERT INTO skill_stats (skill_id, {', '.join(_STAT_COLS)}) VALUES (?{',?' * len(_STAT_COLS)})",
                  (skill.id, *[getattr(st, k) for k in _STAT_COLS]))
        self._log(c, op, skill.scope, skill.id, actor=actor, reason=reason,
                  after=skill.model_dump(mode="json"))
        return skill.id, True

    def add(self, skill: Skill, *, actor: str = "api", reason: str = "") -> tuple[Skill, bool]:
        """Insert a skill; an identical (scope, content) one collapses into the existing row.

        Returns (stored skill, created?)."""
        with self.transaction() as c:
            sid, created = self._insert(c, skill, None, actor=actor, reason=reason)
        return self.get(sid), created

    def get(self, skill_id: str) -> Skill:
        rows = self.connection().execute("SELECT * FROM skills WHERE id=? OR id LIKE ?",
                                    (skill_id, skill_id + "%")).fetchall()
        if len(rows) != 1:
            raise BadInputError(f"no skill with id {skill_id!r}" if not rows else f"ambiguous id prefix {skill_id!r}")
        return self._row_to_skill(rows[0])

    def stats(self, skill_id: str) -> SkillStats:
        r = self.connection().execute("SELECT * FROM skill_stats WHERE skill_id=?", (skill_id,)).fetchone()
        if r is None:
            raise BadInputError(f"no stats for skill {skill_id!r}")
        try:
            return SkillStats(**{k: r[k] for k in _STAT_COLS})
        except ValidationError as exc:
            raise CacheCorruptError(f"the stats of skill {skill_id!r} are unreadable ({field_error(exc)})") from None

    def list(self, scope: str | None = None, status: str | tuple[str, ...] | None = None, *,
             limit: int = 50, after: int = 0) -> tuple[list[Skill], int | None]:
        """One page of skills in insertion order; returns (skills, next cursor or None). Never truncates silently."""
        sql, args = "SELECT rowid AS rid, * FROM skills WHERE rowid > ?", [after]
        if scope is not None:
            sql += " AND scope=?"
            args.append(scope)
        if status is not None:
            statuses = (status,) if isinstance(status, str) else tuple(status)
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += statuses
        rows = self.connection().execute(sql + " ORDER BY rowid LIMIT ?", (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [self._row_to_skill(r) for r in rows], (rows[-1]["rid"] if more else None)

    def all(self, scope: str | None = None, status: str | tuple[str, ...] | None = None) -> list[Skill]:
        out, cursor = [], 0
        while cursor is not None:
            page, cursor = self.list(scope, status, limit=500, after=cursor)
            out += page
        return out

    def lineage(self, lineage_id: str) -> list[Skill]:
        rows = self.connection().execute("SELECT * FROM skills WHERE lineage_id=? ORDER BY version, created_at",
                                    (lineage_id,)).fetchall()
        return [self._row_to_skill(r) for r in rows]

    def scopes(self) -> list[str]:
        return [r[0] for r in self.connection().execute("SELECT DISTINCT scope FROM skills ORDER BY scope")]

    # -- status (compare-and-swap) -----------------------------------------------------------
    def set_status(self, skill_id: str, new: str, *, expected: str | None = None, reason: str,
                   actor: str = "api", op: str | None = None) -> bool:
        """Move a skill to ``new`` if it is still in ``expected`` (or any legal source state). Logged."""
        with self.transaction() as c:
            return self._set_status(c, skill_id, new, expected=expected, reason=reason, actor=actor, op=op)

    def _set_status(self, c, skill_id, new, *, expected, reason, actor, op=None) -> bool:
        r = c.execute("SELECT status, scope FROM skills WHERE id=?", (skill_id,)).fetchone()
        if r is None:
            raise BadInputError(f"no skill with id {skill_id!r}")
        old = r["status"]
        if expected is not None and old != expected:
            return False
        if new not in TRANSITIONS.get(old, set()):
            raise BadInputError(f"illegal status change {old} -> {new} for skill {skill_id}")
        cur = c.execute("UPDATE skills SET status=? WHERE id=? AND status=?", (new, skill_id, old))
        if cur.rowcount != 1:
            return False
        self._log(c, op or new, r["scope"], skill_id, actor=actor, reason=reason,
                  before={"status": old}, after={"status": new})
        return True

    def set_pinned(self, skill_id: str, pinned: bool, *, actor: str = "api") -> None:
        with self.transaction() as c:
            r = c.execute("SELECT scope, pinned FROM skills WHERE id=?", (skill_id,)).fetchone()
            if r is None:
                raise BadInputError(f"no skill with id {skill_id!r}")
            c.execute("UPDATE skills SET pinned=? WHERE id=?", (int(pinned), skill_id))
            self._log(c, "pin" if pinned else "unpin", r["scope"], skill_id, actor=actor,
                      before={"pinned": bool(r["pinned"])}, after={"pinned": pinned})

    # -- stats (SQL arithmetic, no read-modify-write in Python) ------------------------------
    def record_use(self, skill_id: str, *, credit: float, activations: int = 1, success: bool = False,
                   probation: bool = False) -> None:
        """Credit one episode to a skill."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE skill_stats SET n_activations = n_activations + ?, n_episodes = n_episodes + 1,"
                " n_success = n_success + ?, sum_credit = sum_credit + ?, sum_sq_credit = sum_sq_credit + ?,"
                " probation_uses = probation_uses + ?, last_used_at = ? WHERE skill_id = ?",
                (activations, int(success), credit, credit * credit, int(probation), utc_now(), skill_id),
            )
            if cur.rowcount == 0:  # a credit is never dropped silently
                raise BadInputError(f"no skill with id {skill_id!r} to credit")

    def age(self, scope: str) -> int:
        """One more iteration for every live skill of ``scope``; returns the scope's iteration counter."""
        with self.transaction() as c:
            c.execute("UPDATE skill_stats SET age_iters = age_iters + 1 WHERE skill_id IN"
                      " (SELECT id FROM skills WHERE scope=? AND status IN ('probation','active'))", (scope,))
            key = f"iter:{scope}"
            c.execute("INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE"
                      " SET value = CAST(value AS INTEGER) + 1", (key,))
            return int(c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def iteration(self, scope: str) -> int:
        return int(self.get_meta(f"iter:{scope}") or 0)

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        r = self.connection().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if r is None else r[0]

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, value))

    # -- retrieval -------------------------------------------------------------------------------
    def search(self, scope: str, text: str, *, k: int = 5, statuses: tuple[str, ...] = LIVE,
               query_vec: Any = None, embedding_model: str | None = None) -> list[tuple[Skill, float]]:
        """BM25 top-k over name/activation/steps/termination, unioned with cosine top-k when a query
        embedding is given (only against embeddings of the same model). Score: higher is better."""
        terms = [t for t in re.findall(r"\w+", text.lower()) if len(t) > 1][:64]
        found: dict[str, tuple[Skill, float]] = {}
        conn = self.connection()
        if terms:
            q = " OR ".join(f'"{t}"' for t in dict.fromkeys(terms))
            rows = conn.execute(
                "SELECT s.*, -bm25(skills_fts) AS score FROM skills_fts JOIN skills s ON s.rowid = skills_fts.rowid"
                f" WHERE skills_fts MATCH ? AND s.scope=? AND s.status IN ({','.join('?' * len(statuses))})"
                " ORDER BY bm25(skills_fts) LIMIT ?", (q, scope, *statuses, k)).fetchall()
            for r in rows:
                found[r["id"]] = (self._row_to_skill(r), float(r["score"]))
        if query_vec is not None and embedding_model:
            import numpy as np

            qv = np.asarray(query_vec, dtype=np.float32).reshape(-1)
            rows = conn.execute(
                f"SELECT * FROM skills WHERE scope=? AND status IN ({','.join('?' * len(statuses))})"
                " AND embedding IS NOT NULL AND embedding_model=?", (scope, *statuses, embedding_model)).fetchall()
            sims = []
            for r in rows:
                v = np.frombuffer(r["embedding"], dtype=np.float32)
                if v.shape == qv.shape:
                    sims.append((float(v @ qv / (np.linalg.norm(v) * np.linalg.norm(qv) + 1e-8)), r))
            for sim, r in sorted(sims, key=lambda x: -x[0])[:k]:
                prev = found.get(r["id"])
                found[r["id"]] = (self._row_to_skill(r), (prev[1] if prev else 0.0) + sim)
        return sorted(found.values(), key=lambda x: -x[1])

    def set_embedding(self, skill_id: str, vec: Any, model_name: str) -> None:
        """Store an embedding computed *outside* any transaction (model calls never hold a write lock)."""
        import numpy as np

        blob = np.asarray(vec, dtype=np.float32).reshape(-1).tobytes()
        with self.transaction() as c:
            c.execute("UPDATE skills SET embedding=?, embedding_model=? WHERE id=?", (blob, model_name, skill_id))

    def embedding(self, skill_id: str, model_name: str):
        import numpy as np

        r = self.connection().execute("SELECT embedding FROM skills WHERE id=? AND embedding_model=?",
                                 (skill_id, model_name)).fetchone()
        return None if r is None or r[0] is None else np.frombuffer(r[0], dtype=np.float32)

    # -- evidence -------------------------------------------------------------------------------
    def add_episode(self, ep_id: str, *, scope: str, env: str, task_family: str, iteration: int, reward: float,
                    success: bool, n_steps: int, trace_json: str) -> bool:
        """Keep an episode as evidence; False (nothing written) when one with this id is already kept."""
        with self.transaction() as c:
            cur = c.execute("INSERT OR IGNORE INTO episodes VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (ep_id, scope, env, task_family, iteration, reward, int(success), n_steps, trace_json,
                             utc_now()))
            return cur.rowcount == 1

    def commit_iteration(self, scope: str, *, episodes: Sequence[Mapping[str, Any]] = (),
                         uses: Sequence[Mapping[str, Any]] = (), meta: Mapping[str, str] | None = None) -> int:
        """One learning iteration's results as one transaction: its episodes (``add_episode`` arguments; an id
        already kept refuses the whole commit), the credit of every skill use (``record_use`` arguments), meta
        values (the baselines) and the scope's iteration counter. A kill leaves all of it or none of it, so the
        counter always says how many iterations are fully counted. Returns the new counter."""
        with self.transaction():
            for ep in episodes:
                if not self.add_episode(**{"scope": scope, **ep}):
                    raise BadInputError(f"episode {ep['ep_id']} is already recorded; nothing of this iteration "
                                        "was written")
            for use in uses:
                self.record_use(**use)
            for key, value in (meta or {}).items():
                self.set_meta(key, value)
            return self.age(scope)

    def episodes(self, scope: str, *, since_iteration: int = 0, limit: int = 1000) -> list[str]:
        rows = self.connection().execute(
            "SELECT trace_json FROM episodes WHERE scope=? AND iteration>=? ORDER BY iteration, created_at LIMIT ?",
            (scope, since_iteration, limit)).fetchall()
        return [r[0] for r in rows]

    def add_gate_result(self, skill_id: str, parent_id: str | None, accepted: bool, report: dict) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO gate_results (skill_id, parent_id, accepted, report_json, ts) VALUES (?,?,?,?,?)",
                      (skill_id, parent_id, int(accepted), json.dumps(report, sort_keys=True), utc_now()))

    def gate_results(self, skill_id: str | None = None, scope: str | None = None) -> list[dict]:
        sql = ("SELECT g.* FROM gate_results g JOIN skills s ON s.id = g.skill_id WHERE (? IS NULL OR g.skill_id=?)"
               " AND (? IS NULL OR s.scope=?) ORDER BY g.seq")
        rows = self.connection().execute(sql, (skill_id, skill_id, scope, scope)).fetchall()
        try:
            return [dict(json.loads(r["report_json"]), accepted=bool(r["accepted"]), skill_id=r["skill_id"])
                    for r in rows]
        except (ValueError, TypeError, RecursionError) as exc:
            raise CacheCorruptError(f"a gate report of {self.path} is unreadable ({type(exc).__name__})") from None

    # -- history & rollback -------------------------------------------------------------------
    def history(self, skill_or_lineage: str) -> list[Event]:
        """Events of every version in the skill's lineage, oldest first."""
        r = self.connection().execute("SELECT lineage_id FROM skills WHERE id=? OR lineage_id=? OR id LIKE ? LIMIT 1",
                                 (skill_or_lineage, skill_or_lineage, skill_or_lineage + "%")).fetchone()
        if r is None:
            raise BadInputError(f"no skill or lineage {skill_or_lineage!r}")
        ids = [s.id for s in self.lineage(r["lineage_id"])]
        return self.events(skill_ids=ids)

    def rollback(self, skill_or_lineage: str, version: int, *, reason: str = "", actor: str = "api") -> Skill:
        """Make ``version`` the live one of its lineage: archive the other live versions and re-activate it.
        Appends new events; nothing is deleted or rewritten."""
        r = self.connection().execute("SELECT lineage_id FROM skills WHERE id=? OR lineage_id=? OR id LIKE ? LIMIT 1",
                                 (skill_or_lineage, skill_or_lineage, skill_or_lineage + "%")).fetchone()
        if r is None:
            raise BadInputError(f"no skill or lineage {skill_or_lineage!r}")
        lineage_id = r["lineage_id"]
        why = reason or f"rollback to version {version}"
        with self.transaction() as c:
            rows = c.execute("SELECT id, status, version, scope FROM skills WHERE lineage_id=?",
                             (lineage_id,)).fetchall()
            target = [x for x in rows if x["version"] == version]
            if not target:
                raise BadInputError(f"lineage {lineage_id} has no version {version}")
            tid, tstatus, tscope = target[0]["id"], target[0]["status"], target[0]["scope"]
            for x in rows:
                if x["id"] != tid and x["status"] in LIVE:
                    self._set_status(c, x["id"], "archived", expected=x["status"], reason=why, actor=actor,
                                     op="archive")
            if tstatus == "rejected":
                self._set_status(c, tid, "archived", expected="rejected", reason=why, actor=actor, op="archive")
                tstatus = "archived"
            if tstatus != "active":
                self._set_status(c, tid, "active", expected=tstatus, reason=why, actor=actor, op="rollback")
            else:
                self._log(c, "rollback", tscope, tid, actor=actor, reason=why,
                          before={"status": "active"}, after={"status": "active"})
        return self.get(tid)

    # -- purge (always scoped) --------------------------------------------------------------------
    def purge(self, scope: str, *, actor: str = "api", reason: str = "") -> int:
        """Hard-delete every skill, stat, FTS row, episode and gate report of one scope. Logs a purge event."""
        if not scope:
            raise BadInputError("purge needs a scope")
        with self.transaction() as c:
            rowids = [r[0] for r in c.execute("SELECT rowid FROM skills WHERE scope=?", (scope,))]
            for rid in rowids:
                c.execute("DELETE FROM skills_fts WHERE rowid=?", (rid,))
            n = c.execute("DELETE FROM skills WHERE scope=?", (scope,)).rowcount
            c.execute("DELETE FROM episodes WHERE scope=?", (scope,))
            c.execute("DELETE FROM meta WHERE key LIKE ?", (f"%:{scope}",))
            self._log(c, "purge", scope, None, actor=actor, reason=reason or "purge", after={"deleted": n})
        return n

    # -- export / import ----------------------------------------------------------------------------
    def export(self, scope: str | None = None) -> dict[str, Any]:
        """A deterministic JSON document: header (format, schema_version) and skills with their stats.
        Embeddings are left out (they are re-computed on demand)."""
        skills = sorted(self.all(scope), key=lambda s: (s.scope, s.lineage_id, s.version, s.id))
        return self.envelope(scope=scope, skills=[
            dict(s.model_dump(mode="json"), stats=self.stats(s.id).model_dump(mode="json")) for s in skills])

    def export_file(self, path: str | Path, scope: str | None = None) -> Path:
        return atomic_write_text(path, json.dumps(self.export(scope), indent=2, sort_keys=True) + "\n")

    @classmethod
    def validate_export(cls, doc: Any) -> list[tuple[Skill, SkillStats]]:
        """Check an export document; errors name the field path (``skills[2].steps: ...``)."""
        cls.open_envelope(doc)
        items = doc.get("skills")
        if not isinstance(items, list):
            raise BadInputError("skills: must be a list")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise BadInputError(f"skills[{i}]: must be an object")
            item = dict(item)
            stats_raw = item.pop("stats", {})
            try:
                skill = Skill.model_validate(item)
            except ValidationError as exc:
                raise BadInputError(field_error(exc, f"skills[{i}]")) from exc
            try:
                stats = SkillStats.model_validate(stats_raw)
            except ValidationError as exc:
                raise BadInputError(field_error(exc, f"skills[{i}].stats")) from exc
            out.append((skill, stats))
        return out

    def import_doc(self, doc: Any, *, dry_run: bool = False, actor: str = "import") -> dict[str, int]:
        """Validate everything first, then insert in one transaction. Existing content (same scope+hash or
        same id) is skipped. Returns counts."""
        pairs = self.validate_export(doc)
        counts = {"created": 0, "skipped": 0}
        if dry_run:
            c = self.connection()
            for s, _ in pairs:
                hit = c.execute("SELECT 1 FROM skills WHERE (scope=? AND content_hash=?) OR id=?",
                                (s.scope, s.content_hash, s.id)).fetchone()
                counts["skipped" if hit else "created"] += 1
            return counts
        with self.transaction() as c:
            for s, st in pairs:
                _, created = self._insert(c, s, st, actor=actor, reason="import", op="import")
                counts["created" if created else "skipped"] += 1
        return counts

    def import_file(self, path: str | Path, **kw: Any) -> dict[str, int]:
        return self.import_doc(read_json(path, "skill file"), **kw)


"""The knowledge pool: pipelines that worked, keyed by the queries they worked on, in one SQLite file (WAL).

An entry holds a query text, task tags, a :class:`PipelineSpec`, outcome counts (trials, successes), summed
cost (tokens, seconds), a weight that decays while the entry keeps failing, and timestamps. Embeddings
(mean-pooled hidden states, ``Model.embed_text``) live in a side table keyed by the model's fingerprint key,
so entries embedded by one model are never compared with another model's vectors; missing ones are filled
lazily at search time.

Learning rule (all arithmetic in SQL, one statement or one ``BEGIN IMMEDIATE`` transaction, so concurrent
writers from several processes lose no update):

- every verified outcome of a pool entry: ``trials += 1``, ``successes += ok``, cost added;
  a success resets the failure streak and moves ``weight`` half-way back to 1; a failure multiplies
  ``weight`` by :data:`DECAY` (0.7) and extends the streak;
- a learned entry whose weight falls below :data:`RETIRE_WEIGHT` after at least :data:`RETIRE_MIN_TRIALS`
  trials is retired (kept for the record, no longer retrieved); seed entries decay but are never retired;
- a verified success adds (or bumps) an entry for that query with the pipeline that solved it.

The prior the organizer uses is ``weight * (successes + 1) / (trials + 2)``.

>>> import tempfile, os
>>> from kvmas.organizer.pool import KnowledgePool
>>> pool = KnowledgePool(os.path.join(tempfile.mkdtemp(), "pool.sqlite"))
>>> len(pool) > 10
True
>>> hit = pool.search("Tom buys 3 boxes of 12 eggs; how many eggs?", k=2)[0]
>>> hit.how
'lexical'
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvmas.clock import utc_now
from kvmas.db import SQLiteStore
from kvmas.errors import BadInputError, CacheCorruptError
from kvmas.organizer.spec import PipelineSpec
from kvmas.paths import atomic_write_text, kvmas_home, loads_json, read_json

POOL_SCHEMA_VERSION = 1
POOL_APP_ID = 0x6B766D70  # "kvmp": marks a kvmas pool file
EXPORT_FORMAT = "kvmas-pool"
DECAY = 0.7
RETIRE_WEIGHT = 0.2
RETIRE_MIN_TRIALS = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL DEFAULT '',
    query TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    spec TEXT NOT NULL,
    origin TEXT NOT NULL,
    trials INTEGER NOT NULL DEFAULT 0,
    successes INTEGER NOT NULL DEFAULT 0,
    fail_streak INTEGER NOT NULL DEFAULT 0,
    weight REAL NOT NULL DEFAULT 1.0,
    retired INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    time_s REAL NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    model_key TEXT NOT NULL,
    model_name TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY (entry_id, model_key));
CREATE TABLE IF NOT EXISTS outcomes (
    run_id TEXT PRIMARY KEY,
    entry_id INTEGER,
    success INTEGER NOT NULL,
    ts TEXT NOT NULL);
"""



def entry_key(query: str, spec: PipelineSpec) -> str:
    """Identity of an entry: the query (whitespace-normalised) plus the canonical spec JSON."""
    q = " ".join(query.split())
    return hashlib.sha256(f"{q}\n{spec.to_json()}".encode()).hexdigest()[:20]


class Entry(BaseModel):
    """One pool entry (read view; counts are the stored ones)."""

    model_config = ConfigDict(extra="forbid")

    id: int = 0
    key: str = ""
    name: str = ""
    query: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    spec: PipelineSpec
    origin: str = "user"
    trials: int = Field(0, ge=0)
    successes: int = Field(0, ge=0)
    fail_streak: int = Field(0, ge=0)
    weight: float = Field(1.0, ge=0.0, le=1.0)
    retired: bool = False
    tokens: int = Field(0, ge=0)
    time_s: float = Field(0.0, ge=0.0)
    created: str = ""
    updated: str = ""

    @property
    def prior(self) -> float:
        """``weight * (successes + 1) / (trials + 2)``: the Laplace success rate, discounted by decay."""
        return self.weight * (self.successes + 1) / (self.trials + 2)

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.trials if self.trials else 0.0


@dataclass
class Hit:
    """A retrieval result: the entry, its relevance score, and how it was scored (cosine or lexical)."""

    entry: Entry
    score: float
    how: str
    similarity: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of to in on and or is are be for with by at as it its this that how many much "
                  "what which who does do did from each then than there their they he she his her".split())


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


def infer_tags(text: str) -> list[str]:
    """Cheap task tags from a question's surface: ``choice`` (lettered options), ``math`` (two or more
    numbers), ``multi-step`` (math with four or more numbers), ``short`` / ``long``.

    >>> infer_tags("Tom has 3 boxes of 12 eggs and eats 5. How many are left?")
    ['math', 'short']
    """
    tags = []
    if re.search(r"(?m)^\s*\(?[A-E1-5][.)]\s+\S", text) or re.search(r"\(A\).*\(B\)", text, re.S):
        tags.append("choice")
    nums = re.findall(r"\d+(?:[.,]\d+)?", text)
    if len(nums) >= 2:
        tags.append("math")
    if len(nums) >= 4:
        tags.append("multi-step")
    tags.append("short" if len(text) < 160 else "long")
    return tags


def _vec_bytes(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype="<f4").reshape(-1).tobytes()


def _vec_from(blob: bytes, dim: int) -> np.ndarray:
    arr = np.frombuffer(blob, dtype="<f4")
    if arr.size != dim:
        raise CacheCorruptError(f"pool embedding has {arr.size} values, expected {dim}")
    return arr.astype(np.float64)


class KnowledgePool(SQLiteStore):
    """Entries in ``path`` (default ``kvmas_home()/pool.sqlite``); a new file is seeded unless ``seed=False``.

    A file that is not a kvmas pool, is corrupted, or has a newer schema raises and is left untouched.
    """

    kind, app_id, schema_version, schema, export_format = "pool", POOL_APP_ID, POOL_SCHEMA_VERSION, _SCHEMA, \
        EXPORT_FORMAT

    def __init__(self, path: str | Path | None = None, *, seed: bool = True, busy_timeout_s: float = 60.0):
        self._seed_new = seed
        super().__init__(Path(path) if path is not None else kvmas_home() / "pool.sqlite",
                         busy_timeout_s=busy_timeout_s)

    def on_create(self) -> None:
        """A new pool is seeded in the transaction that creates it (a kill never leaves it half-seeded)."""
        if self._seed_new:
            self.seed()

    # -- reading -----------------------------------------------------------------------------
    @staticmethod
    def _entry(row: sqlite3.Row) -> Entry:
        try:
            return Entry(
                id=row["id"], key=row["key"], name=row["name"], query=row["query"], tags=json.loads(row["tags"]),
                spec=PipelineSpec.model_validate_json(row["spec"]), origin=row["origin"], trials=row["trials"],
                successes=row["successes"], fail_streak=row["fail_streak"], weight=min(1.0, max(0.0, row["weight"])),
                retired=bool(row["retired"]), tokens=row["tokens"], time_s=row["time_s"], created=row["created"],
                updated=row["updated"])
        except (ValueError, TypeError, RecursionError) as exc:  # JSON and pydantic errors are ValueErrors
            raise CacheCorruptError(f"pool entry {str(row['id'])[:20]} is unreadable ({type(exc).__name__}); the "
                                    "pool was altered outside kvmas") from None

    def entries(self, include_retired: bool = False) -> list[Entry]:
        """All entries (oldest first)."""
        sql = "SELECT * FROM entries" + ("" if include_retired else " WHERE retired = 0") + " ORDER BY id"
        return [self._entry(r) for r in self.connection().execute(sql)]

    def get(self, entry_id: int) -> Entry:
        row = self.connection().execute("SELECT * FROM entries WHERE id = ?", (int(entry_id),)).fetchone()
        if row is None:
            raise BadInputError(f"no pool entry with id {entry_id}")
        return self._entry(row)

    def __len__(self) -> int:
        return int(self.connection().execute("SELECT COUNT(*) FROM entries WHERE retired = 0").fetchone()[0])

    def has_outcome(self, run_id: str) -> bool:
        """Whether :meth:`learn` already recorded the outcome of run ``run_id``."""
        row = self.connection().execute("SELECT 1 FROM outcomes WHERE run_id = ?", (str(run_id),)).fetchone()
        return row is not None

    def stats(self) -> dict[str, Any]:
        """Counts by origin, total trials/successes, embedded models."""
        c = self.connection()
        by_origin = {r[0]: r[1] for r in c.execute(
            "SELECT origin, COUNT(*) FROM entries WHERE retired = 0 GROUP BY origin")}
        t = c.execute("SELECT COALESCE(SUM(trials),0), COALESCE(SUM(successes),0), COUNT(*) FROM entries").fetchone()
        retired = c.execute("SELECT COUNT(*) FROM entries WHERE retired = 1").fetchone()[0]
        models = {r[0]: r[1] for r in c.execute("SELECT model_name, COUNT(*) FROM embeddings GROUP BY model_name")}
        return {"path": str(self.path), "entries": t[2] - retired, "retired": retired, "by_origin": by_origin,
                "trials": t[0], "successes": t[1], "embeddings": models, "schema": POOL_SCHEMA_VERSION}

    # -- writing -----------------------------------------------------------------------------
    def add(self, query: str, spec: PipelineSpec, *, tags: Sequence[str] = (), name: str = "",
            origin: str = "user", trials: int = 0, successes: int = 0) -> tuple[Entry, bool]:
        """Insert an entry; if the same query+spec exists, add the counts to it. Returns (entry, created)."""
        if not query or not query.strip():
            raise BadInputError("a pool entry needs a non-empty query")
        if successes > trials or min(trials, successes) < 0:
            raise BadInputError(f"bad counts: {successes} successes out of {trials} trials")
        key, now = entry_key(query, spec), utc_now()
        with self.transaction() as c:
            existed = c.execute("SELECT id FROM entries WHERE key = ?", (key,)).fetchone()
            c.execute(
                "INSERT INTO entries (key, name, query, tags, spec, origin, trials, successes, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "trials = trials + excluded.trials, successes = successes + excluded.successes, "
                "retired = 0, updated = excluded.updated",
                (key, name, query.strip(), json.dumps(sorted(set(tags))), spec.to_json(), origin, trials, successes,
                 now, now))
            row = c.execute("SELECT * FROM entries WHERE key = ?", (key,)).fetchone()
        return self._entry(row), existed is None

    def seed(self) -> int:
        """Add the classic designs of :mod:`kvmas.organizer.seeds` (idempotent). Returns how many are new."""
        from kvmas.organizer.seeds import seed_entries

        new = 0
        for d in seed_entries():
            _, created = self.add(d["query"], d["spec"], tags=d["tags"], name=d["name"], origin="seed")
            new += created
        return new

    def record(self, entry_id: int, success: bool, *, tokens: int = 0, time_s: float = 0.0) -> Entry:
        """Count one verified outcome of an entry (see the learning rule in the module doc)."""
        ok = 1 if success else 0
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE entries SET trials = trials + 1, successes = successes + :ok, "
                "tokens = tokens + :tok, time_s = time_s + :t, "
                "fail_streak = CASE WHEN :ok THEN 0 ELSE fail_streak + 1 END, "
                "weight = CASE WHEN :ok THEN weight + (1.0 - weight) / 2 ELSE weight * :decay END, "
                "updated = :now WHERE id = :id",
                {"ok": ok, "tok": int(tokens), "t": float(time_s), "decay": DECAY, "now": utc_now(), "id": int(entry_id)})
            if cur.rowcount == 0:
                raise BadInputError(f"no pool entry with id {entry_id}")
            c.execute("UPDATE entries SET retired = 1 WHERE id = ? AND origin != 'seed' AND weight < ? "
                      "AND trials >= ?", (int(entry_id), RETIRE_WEIGHT, RETIRE_MIN_TRIALS))
            row = c.execute("SELECT * FROM entries WHERE id = ?", (int(entry_id),)).fetchone()
        return self._entry(row)

    def learn(self, query: str, spec: PipelineSpec, success: bool, *, entry_id: int | None = None,
              tokens: int = 0, time_s: float = 0.0, tags: Sequence[str] = (), model=None,
              run_id: str | None = None) -> Entry | None:
        """Learn from one verified run: count it on the entry it came from, and keep a success as a new entry.

        ``run_id`` makes it idempotent per run: a second outcome for the same run is refused. The outcome row,
        its counts and the learned entry are one transaction, so a crash never records an outcome without
        counting it (and the retry after one is accepted). Returns the entry that now holds this query's
        success (None after a failure).
        """
        key = entry_key(query, spec)
        with self.transaction() as c:  # one logical operation: a kill leaves all of it or none of it
            if run_id is not None:
                try:
                    c.execute("INSERT INTO outcomes (run_id, entry_id, success, ts) VALUES (?, ?, ?, ?)",
                              (str(run_id), entry_id, int(bool(success)), utc_now()))
                except sqlite3.IntegrityError:
                    raise BadInputError(f"run {run_id} already has a recorded outcome") from None
            if entry_id is not None:
                self.record(entry_id, success, tokens=tokens, time_s=time_s)
            if not success:
                return None
            if entry_id is not None:
                used = c.execute("SELECT key FROM entries WHERE id = ?", (int(entry_id),)).fetchone()
                if used is not None and used[0] == key:  # the stored query+spec itself: already counted
                    return self.get(entry_id)
            entry, _ = self.add(query, spec, tags=tags, origin="learned", trials=1, successes=1)
            if tokens or time_s:
                c.execute("UPDATE entries SET tokens = tokens + ?, time_s = time_s + ? WHERE id = ?",
                          (int(tokens), float(time_s), entry.id))
        if model is not None:  # a model call never runs inside a transaction; a missing vector is filled later
            self.ensure_embeddings(model, [entry])
        return self.get(entry.id)

    def remove(self, entry_id: int) -> None:
        with self.transaction() as c:
            if c.execute("DELETE FROM entries WHERE id = ?", (int(entry_id),)).rowcount == 0:
                raise BadInputError(f"no pool entry with id {entry_id}")

    # -- embeddings & retrieval --------------------------------------------------------------
    @staticmethod
    def _model_key(model) -> str:
        return model.fingerprint.key

    def _embeddings(self, model_key: str) -> dict[int, np.ndarray]:
        rows = self.connection().execute("SELECT entry_id, dim, vec FROM embeddings WHERE model_key = ?", (model_key,))
        return {r[0]: _vec_from(r[2], r[1]) for r in rows}

    def ensure_embeddings(self, model, entries: Sequence[Entry] | None = None) -> int:
        """Embed entries that lack a vector from ``model`` (outside any transaction). Returns how many."""
        key = self._model_key(model)
        have = set(self._embeddings(key))
        todo = [e for e in (entries if entries is not None else self.entries()) if e.id not in have]
        rows = []
        for e in todo:
            vec = model.embed_text(e.query).detach().float().cpu().numpy()
            rows.append((e.id, key, model.name, int(vec.size), _vec_bytes(vec)))
        if rows:
            with self.transaction() as c:
                c.executemany("INSERT OR IGNORE INTO embeddings (entry_id, model_key, model_name, dim, vec) "
                              "VALUES (?, ?, ?, ?, ?)", rows)
        return len(rows)

    def search(self, query: str, *, model=None, k: int = 4, diversity: float = 0.3,
               tags: Sequence[str] = (), query_vec: np.ndarray | None = None) -> list[Hit]:
        """Top-``k`` entries for ``query`` by maximal marginal relevance.

        With a ``model`` (or a precomputed ``query_vec`` of that model): cosine similarity of mean-pooled
        embeddings, centred on the pool mean (tiny LMs give every text a similar direction; centring keeps the
        differences). Without one, or for entries that cannot be embedded, a lexical score (word overlap of
        query, name and tags). Lexical overlap also breaks ties. ``diversity`` (0..1) weighs the penalty for
        resembling an already chosen hit; identical specs count as fully redundant. ``tags`` restricts to
        entries sharing at least one tag.
        """
        if k <= 0:
            raise BadInputError(f"k must be positive, got {k}")
        if not 0.0 <= diversity <= 1.0:
            raise BadInputError(f"diversity must be within [0, 1], got {diversity}")
        cands = self.entries()
        if tags:
            want = set(tags)
            cands = [e for e in cands if want & set(e.tags)]
        if not cands:
            return []
        qwords = _words(query) | set(infer_tags(query))
        words = [_words(f"{e.query} {e.name} {' '.join(e.tags)}") for e in cands]
        lex = np.array([len(qwords & w) / math.sqrt(max(1, len(qwords)) * max(1, len(w))) for w in words])
        vecs = None
        if model is not None or query_vec is not None:
            if model is not None:
                self.ensure_embeddings(model, cands)
                store = self._embeddings(self._model_key(model))
                if query_vec is None:
                    query_vec = model.embed_text(query).detach().float().cpu().numpy()
                if all(e.id in store for e in cands):
                    vecs = np.stack([store[e.id] for e in cands])
        if vecs is not None and query_vec is not None:
            centre = vecs.mean(0) if len(cands) > 1 else np.zeros(vecs.shape[1])
            m = vecs - centre
            m /= np.linalg.norm(m, axis=1, keepdims=True) + 1e-12
            q = np.asarray(query_vec, dtype=np.float64) - centre
            q /= np.linalg.norm(q) + 1e-12
            rel = m @ q
            pair = m @ m.T
            how = "cosine"
            score = rel + 1e-3 * lex
        else:
            rel = lex
            pair = np.array([[len(a & b) / max(1, len(a | b)) for b in words] for a in words])
            how = "lexical"
            score = lex
        groups: dict[str, int] = {}
        gid = np.array([groups.setdefault(e.spec.to_json(), len(groups)) for e in cands])
        pair = np.where(gid[:, None] == gid[None, :], 1.0, pair)
        chosen: list[int] = []
        mmr_scores: list[float] = []
        left = list(range(len(cands)))
        while left and len(chosen) < k:
            best, best_val = None, -math.inf
            for i in left:
                red = max((pair[i, j] for j in chosen), default=0.0)
                val = (1 - diversity) * score[i] - diversity * red
                if val > best_val + 1e-12 or (abs(val - best_val) <= 1e-12 and best is not None
                                               and cands[i].id < cands[best].id):
                    best, best_val = i, val
            chosen.append(best)
            mmr_scores.append(best_val)
            left.remove(best)
        return [Hit(entry=cands[i], score=float(s), how=how, similarity=float(rel[i]),
                    extra={"lexical": float(lex[i])}) for i, s in zip(chosen, mmr_scores)]

    # -- export / import ---------------------------------------------------------------------
    def export_json(self, path: str | Path | None = None, include_embeddings: bool = True) -> str:
        """All entries (retired included) as JSON; written atomically to ``path`` when given."""
        c = self.connection()
        emb: dict[int, list[dict[str, Any]]] = {}
        if include_embeddings:
            for r in c.execute("SELECT entry_id, model_key, model_name, dim, vec FROM embeddings ORDER BY entry_id"):
                emb.setdefault(r[0], []).append({"model_key": r[1], "model_name": r[2], "dim": r[3],
                                                 "vec_b64": base64.b64encode(r[4]).decode()})
        out = []
        for e in self.entries(include_retired=True):
            d = e.model_dump(mode="json", exclude={"id"})
            d["embeddings"] = emb.get(e.id, [])
            out.append(d)
        text = json.dumps(self.envelope(entries=out), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def import_json(self, source: str | Path) -> dict[str, int]:
        """Merge an export (a path or JSON text). Counts of an existing entry take the larger of the two values,
        so importing the same file twice changes nothing. Returns ``{"added", "updated"}``."""
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            data = read_json(source, "pool export")
        else:
            data = loads_json(source, "pool export")
        self.open_envelope(data, legacy_version_key="schema")  # exports before kvmas 0.2 named it "schema"
        parsed: list[tuple[Entry, list[dict[str, Any]]]] = []
        entries = data.get("entries") or []
        if not isinstance(entries, list):
            raise BadInputError("entries: expected a list")
        for i, raw in enumerate(entries):
            if not isinstance(raw, dict):
                raise BadInputError(f"entries[{i}]: expected an object")
            raw = dict(raw)
            embs = raw.pop("embeddings", []) or []
            if not isinstance(embs, list) or not all(isinstance(em, dict) for em in embs):
                raise BadInputError(f"entries[{i}].embeddings: expected a list of objects")
            try:
                e = Entry.model_validate(raw)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise BadInputError(f"entries[{i}].{loc}: {str(err['msg']).removeprefix('Value error, ')}") from None
            if e.successes > e.trials:
                raise BadInputError(f"entries[{i}]: {e.successes} successes out of {e.trials} trials")
            for j, em in enumerate(embs):
                try:
                    blob = base64.b64decode(em["vec_b64"], validate=True)
                    _vec_from(blob, int(em["dim"]))
                    em = {"model_key": str(em["model_key"]), "model_name": str(em["model_name"]),
                          "dim": int(em["dim"]), "vec": blob}
                except (KeyError, ValueError, TypeError, CacheCorruptError) as exc:
                    raise BadInputError(f"entries[{i}].embeddings[{j}]: bad embedding ({exc})") from None
                embs[j] = em
            parsed.append((e, embs))
        added = updated = 0
        now = utc_now()
        with self.transaction() as c:
            for e, embs in parsed:
                key = entry_key(e.query, e.spec)
                row = c.execute("SELECT id FROM entries WHERE key = ?", (key,)).fetchone()
                if row is None:
                    cur = c.execute(
                        "INSERT INTO entries (key, name, query, tags, spec, origin, trials, successes, fail_streak, "
                        "weight, retired, tokens, time_s, created, updated) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key, e.name, e.query, json.dumps(sorted(set(e.tags))), e.spec.to_json(), e.origin,
                         e.trials, e.successes, e.fail_streak, e.weight, int(e.retired), e.tokens, e.time_s,
                         e.created or now, e.updated or now))
                    eid = cur.lastrowid
                    added += 1
                else:
                    eid = row[0]
                    c.execute("UPDATE entries SET trials = MAX(trials, ?), successes = MAX(successes, ?), "
                              "tokens = MAX(tokens, ?), time_s = MAX(time_s, ?), updated = ? WHERE id = ?",
                              (e.trials, e.successes, e.tokens, e.time_s, now, eid))
                    updated += 1
                for em in embs:
                    c.execute("INSERT OR IGNORE INTO embeddings (entry_id, model_key, model_name, dim, vec) "
                              "VALUES (?, ?, ?, ?, ?)", (eid, em["model_key"], em["model_name"], em["dim"], em["vec"]))
        return {"added": added, "updated": updated}

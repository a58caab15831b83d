"""Property-based: random and mutated input to every loader gives a valid object or a KvmasError, never
another exception (trace, pipeline spec, attribution log, task file, scorer weights, pool and skill exports,
state files, store files)."""

import contextlib
import copy
import itertools
import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmas.errors import KvmasError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
TEXT = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Z", "Cc", "Cf"]), max_size=12) \
    | st.sampled_from(["", "[/]", "[bold]x", "\x1b]0;x\x07", "../../x", "\ud800", "1e999", "-1", "NaN"])
SCALAR = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | TEXT
JSON = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                    max_leaves=12)
DIR = Path(tempfile.mkdtemp(prefix="kvmas-fuzz-"))
COUNT = itertools.count()
HOSTILE = ["[/]", "[bold]x[/bold", "\x1b]0;t\x07", "\x1b[2J", "\r", "\u202e", "\x00", "\ud800", "../../x", "", " "]


def paths(doc, prefix=()):
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def mutated(data, doc):
    """``doc`` with 1-4 random edits: a value replaced by random JSON or another type, a key or item deleted,
    a key added."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(list(paths(doc))))
        if not path:
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["json", "delete", "string", "null", "big", "add", "hostile"]))
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(TEXT)] = data.draw(JSON)
        else:
            parent[key] = {"json": lambda: data.draw(JSON), "string": lambda: str(parent[key]), "null": lambda: None,
                           "big": lambda: 10 ** 30, "add": lambda: data.draw(JSON),
                           "hostile": lambda: data.draw(st.sampled_from(HOSTILE))}[op]()
    return doc


def random_or_mutated(data, *valid):
    """Random JSON, or one of the ``valid`` documents with random edits."""
    pick = data.draw(st.integers(0, len(valid)))
    return data.draw(JSON) if pick == len(valid) else mutated(data, valid[pick])


def write(name, content):
    p = DIR / name
    p.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode("utf-8", "surrogatepass"))
    return p


def typed_or_valid(load, *args):
    """Call a loader: a KvmasError is a refusal, anything returned must be usable; other exceptions fail."""
    try:
        return load(*args)
    except KvmasError:
        return None


# -- valid documents to mutate --------------------------------------------------------------------------
def valid_trace():
    from kvmas.trace import Step, Trace, Usage

    t = Trace(method="latent:review", question="What is 2+3?", model={"name": "m"}, answer="5",
              outcome={"gold": "5", "correct": True})
    t.add(Step(agent="solver", role="solver", action="speak", writes=[0], text_out="5", usage=Usage(generated=2)))
    t.add(Step(agent="critic", role="critic", action="speak", reads=[0], writes=[1], text_out="ok"))
    return json.loads(t.model_dump_json())


def valid_spec():
    return {"version": 1, "nodes": [{"id": "a", "type": "plan", "params": {"k": 2}},
                                    {"id": "b", "type": "review", "params": {"rounds": 1}}], "edges": [["a", "b"]]}


def valid_whowhen():
    return {"question": "2+3?", "ground_truth": "5", "mistake_agent": "Solver", "mistake_step": "0",
            "history": [{"role": "Solver", "content": "It is 6"}, {"role": "Critic", "content": "fine"}]}


# -- JSON parsers ----------------------------------------------------------------------------------------
@FAST
@given(st.data())
def test_trace_loader(data):
    from kvmas.trace import Trace

    doc = random_or_mutated(data, valid_trace())
    t = typed_or_valid(Trace.load, write("t.json", doc))
    if t is not None:
        again = Trace.load(t.save(DIR / "t2.json"))  # what was accepted can be written and read back
        assert again.run_id == t.run_id and len(again.steps) == len(t.steps)
        _ = t.usage, t.agents()


@FAST
@given(st.data())
def test_trace_render_is_literal_for_any_accepted_trace(data):
    from rich.console import Console

    from kvmas.cli.render import print_trace
    from kvmas.trace import Trace

    t = typed_or_valid(Trace.load, write("r.json", mutated(data, valid_trace())))
    if t is not None:
        console = Console(record=True, width=100, file=open("/dev/null", "w"))
        print_trace(t, console, full_text=True)
        assert "\x1b" not in console.export_text(styles=False)


@FAST
@given(st.data())
def test_pipeline_spec_parser(data):
    from kvmas.organizer.spec import PipelineSpec

    doc = random_or_mutated(data, valid_spec())
    spec = typed_or_valid(PipelineSpec.load, write("s.json", doc))
    if spec is not None:
        assert PipelineSpec.from_json(spec.to_json()) == spec
        assert spec.describe() and spec.order() and spec.sink


@FAST
@given(st.data())
def test_attribution_log_parser(data):
    from kvmas.attribution.attributor import LogAttributor
    from kvmas.attribution.log import load_log

    doc = random_or_mutated(data, valid_whowhen(), valid_trace())
    log = typed_or_valid(load_log, write("log.json", doc))
    if log is not None:
        assert log.agents()
        typed_or_valid(LogAttributor().attribute, log)


@FAST
@given(st.lists(st.one_of(JSON, st.just({"id": "a", "question": "2+3?", "answer": "#### 5"})
                          .map(lambda d: {**d, "answer": d["answer"]})), min_size=1, max_size=4),
       st.binary(max_size=40))
def test_task_file_parser(records, junk):
    from kvmas.tasks.loaders import load_tasks

    lines = b"\n".join(json.dumps(r).encode("utf-8", "surrogatepass") for r in records) + b"\n" + junk
    tasks = typed_or_valid(load_tasks, str(write("tasks.jsonl", lines)))
    for t in tasks or []:
        assert t.question and t.answer is not None


@FAST
@given(st.data())
def test_scorer_weights_parser(data):
    from kvmas.attribution.scorer import StepScorer

    doc = random_or_mutated(data, {"schema": 1, "l2": 1.0, "weights": {"bias": 0.5}})
    typed_or_valid(StepScorer.load, write("w.json", doc))


@pytest.fixture(scope="module")
def export_docs():
    from kvmas.organizer.pool import KnowledgePool

    pool = KnowledgePool(DIR / "export-source.sqlite")
    skills = {"format": "kvmas-skills", "schema_version": 1, "skills": [
        {"scope": "s", "name": "N", "activation": "a", "steps": ["x"], "termination": "t", "stats": {}}]}
    return json.loads(pool.export_json()), skills


@FAST
@given(st.data())
def test_store_export_parsers(export_docs, data):
    from kvmas.memory.store import SkillStore
    from kvmas.organizer.pool import KnowledgePool

    pool_doc, skills_doc = export_docs
    n = next(COUNT)
    pool, skills = KnowledgePool(DIR / f"pool-{n}.sqlite", seed=False), SkillStore(DIR / f"skills-{n}.sqlite")
    typed_or_valid(pool.import_json, write("pool.json", random_or_mutated(data, pool_doc)))
    for e in pool.entries(include_retired=True):  # what was imported reads back
        assert e.spec.describe()
    typed_or_valid(skills.import_file, write("skills.json", random_or_mutated(data, skills_doc)))
    for s in skills.all():
        skills.stats(s.id)
    pool.close()
    skills.close()


# -- binary loaders ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state_bytes():
    from kvmas.agents.state import LatentState
    from kvmas.testing import tiny_model

    m = tiny_model("llama")
    return m, LatentState.empty(m).extend("Keep.").think(1).save(DIR / "valid.safetensors").read_bytes()


@FAST
@given(st.data())
def test_state_loader(state_bytes, data):
    from kvmas.agents.state import LatentState

    model, valid = state_bytes
    blob = bytes_mutated(data, valid) if data.draw(st.booleans()) else data.draw(st.binary(max_size=300))
    s = typed_or_valid(LatentState.load, write("s.safetensors", blob), model)
    if s is not None:
        assert blob == valid  # only the untouched file is accepted


def bytes_mutated(data, blob):
    blob = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "truncate", "append", "header"]))
        if op == "flip":
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del blob[data.draw(st.integers(0, len(blob) - 1)):]
        elif op == "append":
            blob += data.draw(st.binary(min_size=1, max_size=16))
        elif len(blob) > 16:  # somewhere in the JSON header
            blob[data.draw(st.integers(8, min(len(blob) - 1, 400)))] = data.draw(st.integers(0, 255))
        if not blob:
            break
    return bytes(blob)


@pytest.fixture(scope="module")
def store_files():
    from kvmas.memory.skill import Skill
    from kvmas.memory.store import SkillStore
    from kvmas.organizer.pool import KnowledgePool

    out = {}
    for kind, make in (("pool", lambda p: KnowledgePool(p)), ("skills", SkillStore)):
        p = DIR / f"orig-{kind}.sqlite"
        store = make(p)
        if kind == "skills":
            store.add(Skill(scope="s", name="N", activation="a", steps=["x"], termination="t", status="active"))
        store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        out[kind] = (make, p.read_bytes())
    return out


@FAST
@given(st.data(), st.sampled_from(["pool", "skills"]))
def test_store_loaders(store_files, data, kind):
    make, valid = store_files[kind]
    blob = bytes_mutated(data, valid) if data.draw(st.booleans()) else data.draw(st.binary(max_size=600))
    path = write(f"x-{kind}-{next(COUNT)}.sqlite", blob)
    store = typed_or_valid(make, path)
    if store is None:
        return
    try:  # opened: every read either works or is a typed refusal
        if kind == "pool":
            typed_or_valid(store.entries, True)
            typed_or_valid(store.stats)
            typed_or_valid(store.search, "eggs")
        else:
            for s in typed_or_valid(store.all) or []:
                typed_or_valid(store.stats, s.id)
                typed_or_valid(store.history, s.id)
            typed_or_valid(store.scopes)
    finally:
        store.close()


CELLS = {"pool": [("entries", c) for c in ("query", "tags", "spec", "trials", "weight", "name", "origin", "tokens")]
         + [("embeddings", "vec"), ("embeddings", "dim")],
         "skills": [("skills", c) for c in ("body", "name", "scope", "status", "version", "id", "lineage_id")]
         + [("skill_stats", "n_episodes"), ("skill_stats", "sum_credit"), ("events", "after_json"),
            ("events", "before_json"), ("meta", "value")]}


@FAST
@given(st.data(), st.sampled_from(["pool", "skills"]))
def test_store_rows_altered_outside_kvmas(store_files, data, kind):
    """A sound SQLite file whose rows another program rewrote: every read is valid or a typed refusal."""
    make, valid = store_files[kind]
    path = write(f"rows-{kind}-{next(COUNT)}.sqlite", valid)  # a fresh file: no connection of an earlier example
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        for table, col in data.draw(st.lists(st.sampled_from(CELLS[kind]), min_size=1, max_size=3)):
            value = data.draw(st.one_of(SCALAR.filter(lambda v: not isinstance(v, str) or "\ud800" not in v),
                                        st.binary(max_size=8), JSON.map(json.dumps)))
            if isinstance(value, int) and abs(value) >= 2**63:
                value = str(value)
            try:
                c.execute(f"UPDATE {table} SET {col} = ?", (value,))
            except sqlite3.IntegrityError:  # a constraint of the schema refuses it: that alteration is impossible
                pass
    store = typed_or_valid(make, path)
    if store is None:
        return
    if kind == "pool":
        typed_or_valid(store.entries, True)
        typed_or_valid(store.search, "eggs")
        typed_or_valid(store.stats)
    else:
        for s in typed_or_valid(store.all) or []:
            typed_or_valid(store.stats, s.id)
            typed_or_valid(store.history, s.id)
        typed_or_valid(store.events)
        typed_or_valid(store.export)
    store.close()


def test_a_refused_store_file_is_left_byte_identical(store_files):
    make, valid = store_files["pool"]
    blob = bytearray(valid)
    blob[100:200] = b"\xee" * 100
    path = write("refused.sqlite", bytes(blob))
    with pytest.raises(KvmasError):
        make(path)
    assert path.read_bytes() == bytes(blob)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
        with pytest.raises(sqlite3.DatabaseError):
            c.execute("PRAGMA quick_check").fetchone()

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from kvmas.cli.pool_cmd import app
from kvmas.organizer import KnowledgePool, Organizer, PipelineSpec
from kvmas.testing import tiny_model

runner = CliRunner(env={"COLUMNS": "250"})


def test_pool_commands(tmp_path):
    pool = str(tmp_path / "p.sqlite")
    res = runner.invoke(app, ["list", "--pool", pool])
    assert res.exit_code == 0 and "self-consistency" in res.output
    spec = tmp_path / "s.json"
    PipelineSpec.chain(("vote", {"n": 2}), "review").save(spec)
    res = runner.invoke(app, ["add", "--query", "odd puzzles", "--spec", str(spec), "--tags", "puzzle", "--pool", pool])
    assert res.exit_code == 0 and "added" in res.output
    eid = KnowledgePool(pool).search("odd puzzles", k=1)[0].entry.id
    res = runner.invoke(app, ["show", str(eid), "--pool", pool])
    assert res.exit_code == 0 and "odd puzzles" in res.output and '"vote"' in res.output
    res = runner.invoke(app, ["search", "odd puzzles", "--pool", pool, "-k", "2"])
    assert res.exit_code == 0 and str(eid) in res.output
    out = tmp_path / "x.json"
    assert runner.invoke(app, ["export", str(out), "--pool", pool]).exit_code == 0
    res = runner.invoke(app, ["import", str(out), "--pool", str(tmp_path / "q.sqlite")])
    assert res.exit_code == 0 and "1 added" in res.output  # the seeds were there already
    res = runner.invoke(app, ["stats", "--pool", pool])
    assert res.exit_code == 0 and "entries 14" in res.output


def test_pool_bad_inputs_give_one_line(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"garbage" * 200)
    res = runner.invoke(app, ["list", "--pool", str(junk)])
    assert res.exit_code != 0 and "left untouched" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [{"id": "a", "type": "single", "params": {"max_new_tokens": -1}}]}')
    res = runner.invoke(app, ["add", "-q", "x", "--spec", str(bad), "--pool", str(tmp_path / "p.sqlite")])
    assert res.exit_code == 2 and "nodes[0].params.max_new_tokens: must be >= 1" in res.output
    res = runner.invoke(app, ["show", "999", "--pool", str(tmp_path / "p.sqlite")])
    assert res.exit_code == 2 and "no pool entry" in res.output
    res = runner.invoke(app, ["feedback", "abc123", "--good", "--pool", str(tmp_path / "p.sqlite")])
    assert res.exit_code == 2 and "no auto run" in res.output


def test_feedback_from_a_saved_trace(tmp_path):
    pool_path = tmp_path / "p.sqlite"
    pool = KnowledgePool(pool_path, seed=False)
    pool.add("sums", PipelineSpec.chain("single"))
    r = Organizer(pool, node_params={"max_new_tokens": 3}).run("What is 2+2?", model=tiny_model())
    trace = tmp_path / "t.json"
    r.trace.save(trace)
    res = runner.invoke(app, ["feedback", str(trace), "--good", "--pool", str(pool_path)])
    assert res.exit_code == 0 and "recorded success" in res.output
    learned = [e for e in KnowledgePool(pool_path).entries() if e.origin == "learned"]
    assert len(learned) == 1 and learned[0].query == "What is 2+2?"


def test_run_auto_then_feedback_by_run_id(tmp_path, monkeypatch):
    from kvmas.organizer import feedback, run_auto

    monkeypatch.setenv("KVMAS_HOME", str(tmp_path / "home"))
    pool_path = tmp_path / "p.sqlite"
    pool = KnowledgePool(pool_path, seed=False)
    pool.add("sums", PipelineSpec.chain("single"))
    pool.add("choices", PipelineSpec.chain(("vote", {"n": 2})))
    r = run_auto("What is 2+2?", model=tiny_model(), max_new_tokens=3, latent_steps=1, pool_path=pool_path)
    assert r.trace.steps[0].action == "organize"
    assert (tmp_path / "home" / "runs" / f"{r.trace.run_id}.json").is_file()
    res = runner.invoke(app, ["feedback", r.trace.run_id, "--bad", "--pool", str(pool_path)])
    assert res.exit_code == 0 and "recorded failure" in res.output
    assert sum(e.trials for e in KnowledgePool(pool_path).entries()) == 1
    res = runner.invoke(app, ["feedback", r.trace.run_id, "--good", "--pool", str(pool_path)])
    assert res.exit_code == 2 and "already has a recorded outcome" in res.output
    assert sum(e.trials for e in KnowledgePool(pool_path).entries()) == 1

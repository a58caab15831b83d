import json
from importlib import resources

import pytest
from typer.testing import CliRunner

from kvmas.bench.harness import BenchConfig, run_bench
from kvmas.bench.lessons import method_spec, teach_pool
from kvmas.cli.pool_cmd import app
from kvmas.errors import BadInputError
from kvmas.organizer import KnowledgePool, Organizer, PipelineSpec
from kvmas.tasks import format_question, load_tasks
from kvmas.testing import tiny_model

CFG = BenchConfig(max_new_tokens=4, latent_steps=1)
DATA = "synthetic-choice"  # rebuilt by teach_pool from the run's own n and seed


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def run(model, tmp_path):
    """A finished run of two fixed methods and loglik on three tasks, with chosen items marked right (the
    tiny random model's own answers are arbitrary, so which outcomes are successes is set in the record)."""
    tasks = load_tasks(DATA, n=3, seed=CFG.seed)
    out = tmp_path / "run"
    run_bench(tasks, "single,kv:vote,loglik", model, out, CFG, data_name=DATA)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for it in items:
        it["correct"] = (it["method"], it["task_id"]) in {("single", tasks[0].id), ("kv:vote", tasks[2].id)}
    (out / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    return out, tasks


def test_method_spec_is_the_pipeline_the_bench_ran(tmp_path):
    assert method_spec("single") == PipelineSpec.chain("single")
    assert method_spec("kv:vote") == PipelineSpec.chain(("vote", {"comm": "kv"}))
    assert method_spec("text:review").describe() == "review(comm=text)"
    spec = PipelineSpec.chain(("plan", {"k": 2}), "review")
    spec.save(tmp_path / "s.json")
    assert method_spec(f"pipeline:{tmp_path / 's.json'}") == spec
    for name in ("auto", "random", "loglik"):
        with pytest.raises(BadInputError, match="not a fixed pipeline"):
            method_spec(name)


def test_teach_pool_learns_every_outcome_once(run, tmp_path):
    out, tasks = run
    pool = KnowledgePool(tmp_path / "pool.sqlite", seed=False)
    lessons = teach_pool(out, pool)
    assert (lessons.taught, lessons.successes) == (6, 2)
    assert lessons.per_method == {"single": [3, 1], "kv:vote": [3, 1]}
    assert lessons.skipped == {"method 'loglik' is not a fixed pipeline": 3}
    learned = {(e.query, e.spec.describe()) for e in pool.entries()}
    assert learned == {(format_question(tasks[0]), "single()"), (format_question(tasks[2]), "vote(comm=kv)")}
    assert all(e.origin == "learned" and (e.trials, e.successes) == (1, 1) for e in pool.entries())
    # the same run again teaches nothing new
    again = teach_pool(out, pool)
    assert again.taught == 0 and again.skipped["already taught"] == 6
    assert pool.stats()["trials"] == 2 and len(pool) == 2


def test_teach_pool_counts_what_it_cannot_teach(run, tmp_path):
    out, tasks = run
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    items[0]["task_id"] = "not-in-data"
    items[1]["gold"] = "Z"
    items[2]["error"] = "boom"
    (out / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    lessons = teach_pool(out, KnowledgePool(tmp_path / "pool.sqlite", seed=False))
    assert lessons.taught == 3
    assert lessons.skipped["task not in the data"] == 1
    assert lessons.skipped["gold answer differs from the data's"] == 1
    assert lessons.skipped["the item failed to run"] == 1
    with pytest.raises(BadInputError, match="not a finished accuracy run"):
        teach_pool(tmp_path / "nowhere", KnowledgePool(tmp_path / "pool.sqlite", seed=False))


def test_learned_comm_survives_the_organizer(run, tmp_path, model):
    """The organizer's ``comm`` fills nodes that name none; a pipeline learned as kv:vote stays kv."""
    out, tasks = run
    pool = KnowledgePool(tmp_path / "pool.sqlite", seed=False)
    teach_pool(out, pool)
    org = Organizer(pool, k=1, node_params={"max_new_tokens": 4}, comm="latent")
    kv = org.choose(format_question(tasks[2]), model)
    assert kv.spec.nodes[0].params == {"comm": "kv", "max_new_tokens": 4}
    assert org.choose(format_question(tasks[0]), model).spec.nodes[0].params["comm"] == "latent"


def test_cli_pool_learn(run, tmp_path):
    out, _ = run
    pool = str(tmp_path / "pool.sqlite")
    runner = CliRunner(env={"COLUMNS": "250"})
    res = runner.invoke(app, ["learn", str(out), "--pool", pool])
    assert res.exit_code == 0, res.output
    assert "taught 6 verified outcomes (2 successes kept as pool entries)" in res.output
    assert "kv:vote: 1/3 right" in res.output and "skipped 3: method 'loglik' is not a fixed pipeline" in res.output
    res = runner.invoke(app, ["learn", str(tmp_path / "nowhere"), "--pool", pool])
    assert res.exit_code != 0 and "not a finished accuracy run" in res.output


def test_teach_pool_reads_the_tasks_the_run_took(model, tmp_path):
    """The run's own start and n: a damaged line elsewhere in the file does not stop the lesson; an older
    run with no recorded start falls back to the whole file, whose damage is then a clear error."""
    sample = resources.files("kvmas").joinpath("data", "gsm8k_sample.jsonl").read_text().splitlines()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(sample[:4] + ['{"id": "broken", "question": "unterminated']) + "\n")
    tasks = load_tasks(str(data), n=2, start=1)
    run_bench(tasks, "single", model, tmp_path / "run", CFG, data_name=str(data), start=1)
    lessons = teach_pool(tmp_path / "run", KnowledgePool(tmp_path / "pool.sqlite", seed=False))
    assert lessons.taught == 2 and not lessons.skipped
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (summary["config"]["start"], summary["config"]["shuffle"]) == (1, False)
    del summary["config"]["start"]
    (tmp_path / "run" / "results.json").write_text(json.dumps(summary))
    with pytest.raises(BadInputError, match="data.jsonl:5: not valid JSON"):
        teach_pool(tmp_path / "run", KnowledgePool(tmp_path / "other.sqlite", seed=False))

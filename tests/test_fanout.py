"""Work over Ray workers (a local 2-CPU cluster, tiny models): `kvmas batch run` and `kvmas bench accuracy
--workers` give the same results as one process, and a worker killed mid-run has its question (its chunk of
tasks) run again elsewhere, said so in the report."""

import pytest
import ray

from kvmas.bench.fanout import Item, fan_out
from kvmas.testing import save_tiny_model

QS = ["2+3?", "What is 12 times 7?", "9-4?", "Tom has 5 apples and eats 2.", "7*6?", "1+1?"]
PARAMS = {"max_new_tokens": 5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model"), "qwen", seed=1))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def items():
    return [Item(f"q{i}", q, seed=i) for i, q in enumerate(QS)]


@pytest.mark.parametrize("method", ["single", "text:vote"])
def test_two_workers_equal_one_process(model_dir, cluster, method):
    one, _ = fan_out(model_dir, method, items(), workers=1, params=PARAMS)
    two, report = fan_out(model_dir, method, items(), workers=2, params=PARAMS)
    strip = lambda rs: [(r.id, r.answer, r.usage, r.error) for r in rs]  # noqa: E731
    assert strip(two) == strip(one)
    assert {r.worker for r in two} == {0, 1} and report.reruns == [] and report.dead_workers == []


def test_a_dead_worker_has_its_question_rerun(model_dir, cluster):
    killed = []

    def kill_once(actor, index):
        if index == 3 and not killed:  # the worker just handed item 3 dies while running it
            killed.append(index)
            ray.kill(actor, no_restart=True)

    one, _ = fan_out(model_dir, "single", items(), workers=1, params=PARAMS)
    got, report = fan_out(model_dir, "single", items(), workers=2, params=PARAMS, after_submit=kill_once)
    assert [(r.id, r.answer) for r in got] == [(r.id, r.answer) for r in one]
    # q3, or, when it finished before the kill landed, the next question that worker was handed
    assert len(report.dead_workers) == 1 and len(report.reruns) == 1 and report.reruns[0] in ("q3", "q4", "q5")


def test_more_workers_than_the_cluster_can_place_are_refused(model_dir, cluster):
    from kvmas.bench.fanout import Replicas
    from kvmas.errors import BadInputError

    with pytest.raises(BadInputError, match="needs 3 CPUs.*cluster has 2"):
        Replicas(model_dir, 3)


def test_batch_run_command(model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from kvmas.cli.app import app

    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "seed": i}) + "\n" for i, q in enumerate(QS)))
    res = CliRunner().invoke(app, ["batch", "run", str(src), "--model", model_dir, "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in (tmp_path / "q.answers.jsonl").read_text().splitlines()]
    one, _ = fan_out(model_dir, "single", items(), workers=1, params=PARAMS)
    assert [(g["id"], g["answer"]) for g in got] == [(r.id, r.answer) for r in one]
    src.write_text('{"question": "a", "id": "x"}\n{"question": "b", "id": "x"}\n')
    res = CliRunner().invoke(app, ["batch", "run", str(src), "--model", model_dir])
    assert res.exit_code == 2 and "duplicate id" in res.output


# -- bench accuracy over workers ------------------------------------------------------------------------------
BENCH = "single,latent:vote,text:review,auto,auto-empty,random"


def _items(d):
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (d / "items.jsonl").read_text().splitlines()]


def _timeless(summary):
    """A summary bar wall time (and what follows from it: seconds per question, the front by seconds)."""
    methods = {name: {k: v for k, v in m.items() if not k.startswith("wall_s") and k != "seconds_per_question"}
               for name, m in summary["methods"].items()}
    return methods, summary["paired"], summary["pareto"]["tokens"]


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory, small_pool):
    from kvmas.agents.model import Model
    from kvmas.bench.harness import BenchConfig, run_bench
    from kvmas.tasks import load_tasks

    out = tmp_path_factory.mktemp("one")
    cfg = BenchConfig(max_new_tokens=4, latent_steps=1, batch_size=2, pool_path=small_pool(out / "start.sqlite"))
    tasks = load_tasks("synthetic", n=5, seed=3)
    return tasks, cfg, run_bench(tasks, BENCH, Model.load(model_dir), out / "run", cfg), out / "run"


def test_bench_on_two_workers_equals_one_process(model_dir, cluster, one_process, tmp_path):
    from dataclasses import replace

    from kvmas.bench.harness import run_bench

    tasks, cfg, want, want_dir = one_process
    got = run_bench(tasks, BENCH, model_dir, tmp_path / "two", replace(cfg, workers=2))
    assert _items(tmp_path / "two") == _items(want_dir)  # every item, in task order
    assert _timeless(got) == _timeless(want)
    for key in ("model", "model_key", "n", "seed", "methods", "batch_size"):
        assert got["config"][key] == want["config"][key]
    # auto teaches its pool after each item: it ran here, one item at a time; no worker died
    assert got["config"]["fanout"] == {"workers": 2, "workers_died": 0, "reruns": {}, "in_process": ["auto"]}
    assert "fanout" not in want["config"]
    assert "Run on 2 Ray workers (in this process, learning online: auto)." in (tmp_path / "two" / "results.md").read_text()


def test_bench_dead_worker_has_its_tasks_rerun(model_dir, cluster, one_process, tmp_path):
    from dataclasses import replace

    from kvmas.bench.harness import run_bench

    tasks, cfg, want, want_dir = one_process
    killed = []

    def kill_once(actor, chunk):
        if chunk == 1 and not killed:  # the worker just handed the second chunk (tasks 2 and 3) dies
            killed.append(chunk)
            ray.kill(actor, no_restart=True)

    got = run_bench(tasks, "single,latent:vote", model_dir, tmp_path / "two", replace(cfg, workers=2),
                    after_submit=kill_once)
    keep = {"single", "latent:vote"}
    assert _items(tmp_path / "two") == [i for i in _items(want_dir) if i["method"] in keep]
    assert _timeless(got)[0] == {k: v for k, v in _timeless(want)[0].items() if k in keep}
    fanout = got["config"]["fanout"]
    assert fanout["workers_died"] == 1 and list(fanout["reruns"]) == ["single"]
    # the chunk it held, or, when that finished before the kill landed, the next one it was handed
    assert fanout["reruns"]["single"] in ([t.id for t in tasks[2:4]], [t.id for t in tasks[4:]])
    assert "1 worker(s) died; re-run elsewhere: single: " in (tmp_path / "two" / "results.md").read_text()


def test_bench_accuracy_command_on_workers(model_dir, cluster, one_process, tmp_path):
    import json

    from typer.testing import CliRunner

    from kvmas.cli.app import app

    tasks, cfg, want, want_dir = one_process
    res = CliRunner().invoke(app, ["bench", "accuracy", "--model", model_dir, "--data", "synthetic", "--n", "5",
                                   "--seed", "3", "--methods", "single,text:review", "--max-new-tokens", "4",
                                   "--latent-steps", "1", "--batch-size", "2", "--workers", "2",
                                   "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "Run on 2 Ray workers." in res.output
    keep = {"single", "text:review"}
    assert _items(tmp_path / "cli") == [i for i in _items(want_dir) if i["method"] in keep]
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["config"]["fanout"]["workers"] == 2
    bad = CliRunner().invoke(app, ["bench", "accuracy", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                                   "--model", "single", "--workers", "2", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--workers goes with --backend local" in bad.output

"""Questions over Ray workers (a local 2-CPU cluster, tiny models): the same results as one process, and a
worker killed mid-run has its question run again elsewhere, said so in the report."""

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

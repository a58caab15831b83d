"""CLI: `attribute FILE`, `attribute eval`, one-line errors."""

import json

from typer.testing import CliRunner

from kvmas.cli.attribute_cmd import app
from test_attribution_eval import synthetic

runner = CliRunner()


def test_report_json_and_rich(tmp_path):
    log = tmp_path / "run.json"
    log.write_text(json.dumps([{"agent": "planner", "content": "Let's assume the value is 41."},
                               {"agent": "Computer_terminal", "content": "exitcode: 0\nCode output: 41"},
                               {"agent": "checker", "content": "Verified, the answer is 41."}]))
    r = runner.invoke(app, [str(log), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["agent"] == "planner" and out["step"] == 0 and out["blame"][0]["agent"] == "planner"
    r = runner.invoke(app, [str(log)])
    assert r.exit_code == 0 and "critical step 0" in r.output and "suggested fix" in r.output


def test_eval_writes_json(tmp_path):
    data = synthetic(tmp_path / "s.jsonl", n=20)
    out = tmp_path / "ev.json"
    r = runner.invoke(app, ["eval", "--data", str(data), "--no-gt", "--folds", "4", "--seeds", "1",
                            "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert list(res) == ["without_gt"] and res["without_gt"]["n"] == 20


def test_errors_are_one_line(tmp_path):
    r = runner.invoke(app, [str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "not found" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"foo": 1}')
    r = runner.invoke(app, [str(bad)])
    assert r.exit_code == 2 and "not a trace" in r.output


def test_replay_of_a_saved_trace(tmp_path):
    from kvmas.agents.agent import Intervention
    from kvmas.cli.attribute_cmd import _replay
    from kvmas.primitives import build
    from kvmas.testing import tiny_model
    from kvmas.errors import BadInputError

    import pytest

    model = tiny_model("llama")
    prim = build("single", max_new_tokens=3, latent_steps=1)
    r = prim("What is 2+3?", model=model, seed=0, interventions={"solver": Intervention("replace", "6", {2})})
    p = r.trace.save(tmp_path / "t.json")
    with pytest.raises(BadInputError, match="--gold"):
        _replay(p, None, 8, model=model)
    res = _replay(p, "6", 8, model=model)  # judged against 6: the faulted run "succeeds", the rest fails
    assert res.method == "replay" and res.blame[0].agent == "solver" and res.blame[0].delta <= 0


def test_default_command_survives_mounting(tmp_path):
    import typer

    root = typer.Typer()
    root.add_typer(app, name="attribute")

    @root.command()
    def other() -> None:  # a second command so the root stays a group
        pass

    log = tmp_path / "run.json"
    log.write_text(json.dumps([{"agent": "a", "content": "Assume 12."}, {"agent": "b", "content": "So 12."}]))
    r = runner.invoke(root, ["attribute", str(log), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["step"] == 0


def test_a_run_with_no_recorded_failure_blames_no_one(tmp_path):
    from kvmas.primitives import build
    from kvmas.testing import tiny_model

    r = build("review", rounds=1, max_new_tokens=3, latent_steps=1)("What is 2+3?", model=tiny_model("llama"))
    path = r.trace.save(tmp_path / "t.json")
    res = runner.invoke(app, [str(path)])
    assert res.exit_code == 2 and "no recorded failure" in res.output and "blame" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    r.trace.answer = "The answer is 5."
    r.trace.outcome = {"gold": "5"}
    r.trace.save(path)
    res = runner.invoke(app, [str(path)])
    assert res.exit_code == 2 and "it succeeded" in res.output
    judged = runner.invoke(app, [str(path), "--gold", "6", "--json"])  # the answer misses 6: a failure to attribute
    assert judged.exit_code == 0, judged.output
    assert json.loads(judged.output)["agent"] in {"user", "solver", "critic"}
    r.trace.outcome = {"success": False}
    r.trace.save(path)
    assert runner.invoke(app, [str(path), "--json"]).exit_code == 0

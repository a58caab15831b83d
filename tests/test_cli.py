"""`kvmas run` and `kvmas trace show` end to end, on a tiny model saved as a local HF directory."""

import json

import pytest
from typer.testing import CliRunner

from kvmas.cli.app import app
from kvmas.testing import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_run_and_trace_show(model_dir, tmp_path):
    trace = tmp_path / "t.json"
    res = runner.invoke(app, ["run", "What is 2+3?", "--model", str(model_dir), "--max-new-tokens", "5",
                              "--trace", str(trace)])
    assert res.exit_code == 0, res.output
    assert ("answer:" in res.output or "answer · solver ▸" in res.output) and "generated" in res.output
    data = json.loads(trace.read_text())
    assert data["method"] == "single" and data["steps"][-1]["action"] == "speak"
    shown = runner.invoke(app, ["trace", "show", str(trace)])
    assert shown.exit_code == 0 and "solver" in shown.output and "total" in shown.output


@pytest.mark.parametrize("prim,comm", [("review", "latent"), ("vote", "text"), ("plan", "latent")])
def test_run_primitives(model_dir, prim, comm):
    res = runner.invoke(app, ["run", "Q?", "--model", str(model_dir), "-p", prim, "-c", comm,
                              "--max-new-tokens", "3", "--latent-steps", "1"])
    assert res.exit_code == 0, res.output
    assert f"{comm}:{prim}" in res.output


def test_errors_are_one_line_and_nonzero(model_dir, tmp_path):
    cases = [
        ["run", "   ", "--model", str(model_dir)],
        ["run", "Q?", "--model", "no-such-model"],
        ["run", "Q?", "--model", str(model_dir), "-p", "debate"],
        ["run", "Q?", "--model", str(model_dir), "-p", "review", "-c", "telepathy"],
        ["trace", "show", str(tmp_path / "missing.json")],
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases.append(["trace", "show", str(bad)])
    for args in cases:
        res = runner.invoke(app, args)
        assert res.exit_code != 0, args
        assert "Traceback" not in res.output
        assert "error" in res.output.lower(), (args, res.output)
    res = runner.invoke(app, ["run", "Q?", "--model", "no-such-model"])
    assert "smollm2-135m" in res.output  # lists what exists

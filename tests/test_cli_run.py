"""`kvmas run` as a user meets it: live steps and speech, --quiet, --json, choices, per-primitive options,
saving and resuming a state; `kvmas trace show` readable (no template markup, labelled segments, no zero
counters, filters); help on every option; a fast `kvmas --help`."""

import json
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from kvmas.cli.app import app
from kvmas.testing import save_tiny_model
from kvmas.trace import COMMS, Trace

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))


def run(*args, env=None):
    return runner.invoke(app, ["run", *args], env={"COLUMNS": "120", **(env or {})})


def test_live_output_shows_every_step_and_the_streamed_answer(model_dir, tmp_path):
    res = run("What is 2+3?", "--model", model_dir, "-p", "review", "--rounds", "1", "--max-new-tokens", "6",
              "--trace", str(tmp_path / "t.json"))
    assert res.exit_code == 0, res.output
    trace = Trace.load(tmp_path / "t.json")
    lines = res.output.splitlines()
    step_lines = [ln for ln in lines if ln[:2].strip().isdigit()]
    shown = [[w for w in ln.split() if not w.startswith("[")][:3] for ln in step_lines]  # [role] when not the agent
    assert shown == [[str(s.index), s.agent, s.action] for s in trace.steps]
    assert all(ln.rstrip().endswith(("ms", "tok/s")) for ln in step_lines)
    spoken = next(ln for ln in lines if ln.startswith("answer · solver ▸ "))
    assert spoken.removeprefix("answer · solver ▸ ") == trace.answer.strip()  # the stream adds up to the answer
    assert "reused 0" not in res.output and "latent 0" not in res.output  # zero counters hidden
    assert not any(ln.startswith("answer:") for ln in lines)  # streamed once, not printed again
    assert res.output.count(trace.answer.strip()) == 1 and "usage per agent" in res.output


def test_an_answer_not_streamed_whole_is_printed_after_the_steps(model_dir):
    # consistency's answer is one of several rows decoded at once: nothing streams, so the answer line says it
    res = run("What is 2+3?", "--model", model_dir, "-p", "consistency", "--n", "2", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(ln.startswith("answer:") for ln in lines) and not any(" ▸ " in ln for ln in lines)


def test_a_pipeline_runs_live_too(model_dir, tmp_path):
    spec = tmp_path / "p.json"
    spec.write_text(json.dumps({"nodes": [{"id": "a", "type": "single", "params": {"max_new_tokens": 3}}]}))
    res = run("What is 2+3?", "--model", model_dir, "--pipeline", str(spec))
    assert res.exit_code == 0, res.output
    assert any(ln[:2].strip().isdigit() for ln in res.output.splitlines())  # its steps, as they finish


def test_quiet_prints_the_answer_alone_and_json_one_object(model_dir):
    quiet = run("What is 2+3?", "--model", model_dir, "--max-new-tokens", "5", "-q")
    loud = run("What is 2+3?", "--model", model_dir, "--max-new-tokens", "5", "--json")
    assert quiet.exit_code == loud.exit_code == 0, quiet.output + loud.output
    data = json.loads(loud.stdout)
    assert quiet.stdout == data["answer"].strip() + "\n"
    assert data["method"] == "single" and data["usage"]["generated"] == data["agents"]["solver"]["generated"] > 0
    assert set(data) >= {"answer", "run_id", "wall_s", "usage", "agents", "model", "steps"}


def test_choices_and_per_primitive_options(model_dir):
    res = run("Q?", "--model", model_dir, "-c", "telepathy")
    assert res.exit_code == 2 and all(c in res.output for c in COMMS)
    assert run("Q?", "--model", model_dir, "-p", "debate").exit_code == 2
    assert run("Q?", "--model", model_dir, "-p", "vote", "--merge-policy", "glue").exit_code == 2
    wrong = run("Q?", "--model", model_dir, "-p", "review", "--n", "3")
    assert wrong.exit_code == 2 and "--n is for vote" in wrong.output
    ok = run("Q?", "--model", model_dir, "-p", "vote", "--n", "2", "--merge-policy", "rerotate",
             "--max-new-tokens", "2", "--latent-steps", "1", "--json")
    assert ok.exit_code == 0, ok.output
    trace = json.loads(ok.stdout)
    assert trace["method"] == "latent:vote" and trace["steps"] > 0


def test_save_state_then_resume_from_it(model_dir, tmp_path):
    state = tmp_path / "s.safetensors"
    first = run("What is 2+3?", "--model", model_dir, "--max-new-tokens", "4", "--save-state", str(state), "-q")
    assert first.exit_code == 0 and state.is_file(), first.output
    again = run("And 3+4?", "--model", model_dir, "-p", "review", "--rounds", "1", "--max-new-tokens", "4",
                "--from-state", str(state), "--trace", str(tmp_path / "t.json"), "-q")
    assert again.exit_code == 0, again.output
    steps = Trace.load(tmp_path / "t.json").steps
    # the saved positions are counted once, as reused, by the step that reads them
    assert steps[0].meta["resumed_from"] > 0 and steps[0].usage.reused == steps[0].meta["resumed_from"]
    assert steps[0].reads  # the saved segments are read, not recomputed
    bad = run("Q?", "--model", model_dir, "--from-state", str(tmp_path / "t.json"))
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1


def test_trace_show_is_readable_and_filters(model_dir, tmp_path):
    path = tmp_path / "t.json"
    assert run("What is 2+3?", "--model", model_dir, "-p", "review", "--rounds", "1", "--max-new-tokens", "4",
               "--trace", str(path), "-q").exit_code == 0
    shown = runner.invoke(app, ["trace", "show", str(path)], env={"COLUMNS": "100"})
    out = shown.output
    assert shown.exit_code == 0 and "<|" not in out and "You are the Critic." in out
    assert "agent/kind" in out and "critic/thought" in out and "solver/prompt" in out
    assert " 0 ·" not in out and "· 0 " not in out
    only = runner.invoke(app, ["trace", "show", str(path), "--agent", "critic"], env={"COLUMNS": "100"})
    trace = Trace.load(path)
    critic = [s for s in trace.steps if s.agent == "critic"]
    assert f"{len(critic)} of {len(trace.steps)} steps shown" in only.output and "Solver. Work out" not in only.output
    first = runner.invoke(app, ["trace", "show", str(path), "--steps", "0-1"], env={"COLUMNS": "100"})
    assert "2 of" in first.output
    bad = runner.invoke(app, ["trace", "show", str(path), "--steps", "two"])
    assert bad.exit_code == 2 and "--steps" in bad.output
    nobody = runner.invoke(app, ["trace", "show", str(path), "--agent", "planner"])  # not "0 steps shown"
    assert nobody.exit_code == 2 and "its agents: user, solver, critic" in nobody.output


def _commands(group: click.Group, ctx: click.Context, prefix=()):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, ctx, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_option_has_help():
    root = typer.main.get_command(app)
    missing = []
    with click.Context(root) as ctx:
        for path, cmd in _commands(root, ctx):
            for p in cmd.get_params(ctx):
                if isinstance(p, click.Option) and not p.help and p.name != "help":
                    missing.append(f"{' '.join(path)} --{p.name}")
    assert missing == []


def test_top_level_help_imports_no_model_code():
    code = ("import sys; sys.argv = ['kvmas', '--help']\nfrom kvmas.cli.app import main\ntry: main()\n"
            "except SystemExit: pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers', 'kvmas.primitives',"
            " 'kvmas.organizer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out and "run" in out and "trace" in out


def test_verbose_logs_the_run_and_third_party_warnings_are_hidden_by_default(model_dir):
    import warnings

    from kvmas.cli.logs import setup_logging

    plain = runner.invoke(app, ["run", "Q?", "--model", model_dir, "--max-new-tokens", "2", "-q"])
    loud = runner.invoke(app, ["-v", "run", "Q?", "--model", model_dir, "--max-new-tokens", "2", "-q"])
    assert plain.exit_code == loud.exit_code == 0, plain.output + loud.output
    assert "done:" not in plain.stderr and "done: 2 steps" in loud.stderr
    assert loud.stdout == plain.stdout  # logging never mixes into the answer
    for verbose, shown in ((False, ["ours"]), (True, ["noise", "ours"])):
        with warnings.catch_warnings(record=True) as seen:
            setup_logging(verbose)
            warnings.warn_explicit("noise", UserWarning, "t.py", 1, module="transformers.generation")
            warnings.warn_explicit("ours", UserWarning, "t.py", 2, module="kvmas.agents")
        assert [str(w.message) for w in seen] == shown
    setup_logging(False)

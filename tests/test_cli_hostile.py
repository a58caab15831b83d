"""Every CLI table and line shows hostile data literally: markup is text, control characters never reach the
terminal, errors are one line with a non-zero exit, and computed answers survive an unwritable output."""

import ast
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmas.cli.app import app
from kvmas.memory.skill import Skill
from kvmas.memory.store import SkillStore
from kvmas.organizer.pool import KnowledgePool
from kvmas.organizer.spec import PipelineSpec
from kvmas.testing import save_tiny_model
from kvmas.trace import Step, Trace

runner = CliRunner()
ENV = {"COLUMNS": "400"}  # wide enough that no table cell is folded
MARKUP = ["[/]", "[bold red]loud[/]", "[link=file:///etc]x[/link]", "\\[/]", "[/bold"]
CONTROLS = ["\x1b]0;pwned\x07", "\x1b[2J", "\rOVER", "\u202eevil", "\x9b31m", "\x00nul"]
HOSTILE = " ".join(MARKUP) + " " + "".join(CONTROLS)
SHORT = " ".join(MARKUP) + " \x1b]0;p\x07\x1b[2J"  # fits a skill's name
FORBIDDEN = ["\x1b", "\x07", "\r", "\u202e", "\x9b", "\x00"]


def shown_literally(res, *, code=0):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and "MarkupError" not in res.output
    for ch in FORBIDDEN:
        assert ch not in res.output, (repr(ch), res.output)
    flat = " ".join(res.output.split())
    for m in MARKUP:
        assert m in flat, (m, res.output)
    return res.output


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_pool_tables(tmp_path):
    path = tmp_path / "pool.sqlite"
    e, _ = KnowledgePool(path).add(HOSTILE, PipelineSpec.chain("review"), tags=[HOSTILE], name=HOSTILE)
    shown_literally(invoke("pool", "list", "--pool", path))
    shown_literally(invoke("pool", "show", e.id, "--pool", path))
    shown_literally(invoke("pool", "search", HOSTILE, "--pool", path))
    assert invoke("pool", "add", "--query", HOSTILE, "--spec", _spec(tmp_path), "--name", HOSTILE,
                  "--pool", path).exit_code == 0
    out = shown_literally(invoke("pool", "list", "--pool", path))
    assert out.count("[bold red]loud[/]") >= 5  # query, name and tag of one entry, query and name of the other


def _spec(tmp_path):
    p = tmp_path / "spec.json"
    PipelineSpec.chain("vote").save(p)
    return p


def test_skill_tables(tmp_path):
    path = tmp_path / "skills.sqlite"
    st = SkillStore(path)
    s, _ = st.add(Skill(scope="h", name=SHORT, activation=SHORT, steps=["\x1b[2J [/] x"], termination="[/]",
                        status="active"), reason=HOSTILE)
    st.record_use(s.id, credit=0.5)
    st.set_status(s.id, "archived", reason=HOSTILE)
    for cmd in (["list"], ["show", s.id], ["history", s.id], ["stats"]):
        out = invoke("skills", *cmd, "--store", path)
        assert out.exit_code == 0 and not any(ch in out.output for ch in FORBIDDEN), out.output
    shown_literally(invoke("skills", "show", s.id, "--store", path))
    shown_literally(invoke("skills", "list", "--store", path))


def hostile_trace():
    t = Trace(method=HOSTILE, question=HOSTILE, model={"name": HOSTILE, "arch": HOSTILE}, answer=HOSTILE,
              outcome={"gold": HOSTILE})
    t.add(Step(agent=HOSTILE, role=HOSTILE, action=HOSTILE, text_in=HOSTILE, text_out=HOSTILE,
               meta={"intervention": HOSTILE}))
    return t


@pytest.mark.parametrize("full", [False, True])
def test_trace_show(tmp_path, full):
    path = hostile_trace().save(tmp_path / "t.json")
    shown_literally(invoke("trace", "show", path, *(["--full"] if full else [])))


def test_attribute_report(tmp_path):
    log = tmp_path / "log.json"
    log.write_text(json.dumps([{"agent": HOSTILE, "content": "Assume x = 12. " + HOSTILE},
                               {"agent": "b", "content": "So 12."}]))
    shown_literally(invoke("attribute", log))


def test_the_error_printer_shows_messages_literally(tmp_path):
    res = invoke("run", "hi", "--model", HOSTILE)
    shown_literally(res, code=res.exit_code)
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1
    odd = tmp_path / ("[/]\x1b[2J" + "x.json")
    res = invoke("trace", "show", odd)
    assert res.exit_code != 0 and "[/]" in res.output and "\x1b" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_run_prints_the_answer_before_an_output_failure(model_dir, tmp_path):
    res = invoke("run", HOSTILE, "--model", model_dir, "--max-new-tokens", "3", "--trace", tmp_path,
                 "--show-trace")
    out = shown_literally(res, code=1)
    answer = re.search(r"^answer(:| · solver ▸)", out, re.M)  # printed, or streamed live
    assert answer and "error:" in out and str(tmp_path) in out
    assert answer.start() < out.index("error:")


@pytest.mark.parametrize("args,code,match", [
    (["run", "hi \udcff", "--model", "{model}"], 2, "UTF-8"),
    (["pool", "export", "{tmp}/afile/x.json", "--pool", "{tmp}/p.sqlite"], 1, "cannot write"),
    (["skills", "export", "{tmp}", "--store", "{tmp}/s.sqlite"], 1, "cannot write"),
    (["trace", "show", "{tmp}/schema.json"], 2, "schema_version"),
    (["pool", "list", "--pool", "{tmp}"], 2, "directory"),
    (["pool", "list", "--pool", "{tmp}/afile/p.sqlite"], 1, "cannot"),
    (["pool", "import", "{tmp}/deep.json", "--pool", "{tmp}/p.sqlite"], 2, "nested too deeply"),
])
def test_edge_errors_are_one_line(model_dir, tmp_path, args, code, match):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "schema.json").write_text(json.dumps({"schema_version": "one", "steps": []}))
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    args = [a.format(tmp=tmp_path, model=model_dir) for a in args]
    res = runner.invoke(app, args, env=ENV)
    assert res.exit_code == code, res.output
    assert match in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_cli_code_prints_only_through_the_renderer():
    """No command builds its own Console or plain rich Table: everything goes through kvmas.cli.render."""
    bad = []
    for path in Path(__file__).resolve().parents[1].joinpath("kvmas", "cli").glob("*.py"):
        if path.name == "render.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("Console", "Table") or (name == "echo" and path.name != "attribute_cmd.py"):
                    bad.append(f"{path.name}:{node.lineno} {name}()")
    assert bad == []

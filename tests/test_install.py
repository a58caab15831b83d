"""Installing without make: the extras resolve, `all` holds every user extra, the Makefile and README agree
with pyproject, package data is where an installed kvmas looks, and the README's Python snippet runs."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_extras_parse_and_all_holds_every_user_extra():
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    for reqs in extras.values():
        for r in reqs:
            Requirement(r)
    (only,) = extras["all"]
    req = Requirement(only)
    assert req.name == project["name"] and req.extras == set(extras) - {"all", "test"}
    assert {"convert", "telemetry", "serve"} <= req.extras
    torch = next(Requirement(d) for d in project["dependencies"] if d.startswith("torch"))
    assert "+cpu" not in str(torch) and not str(torch.specifier).startswith("==")  # any build, CPU or CUDA


def test_makefile_installs_extras_that_exist_and_the_readme_documents_pip():
    extras = set(_pyproject()["project"]["optional-dependencies"])
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    installed = re.search(r'install -q -e "\.\[([a-z,]+)\]"', make).group(1).split(",")
    assert set(installed) <= extras and "test" in installed
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install ".[all]"' in readme and "kvmas models install qwen2.5-coder-0.5b" in readme
    assert "download.pytorch.org" in readme  # how a GPU user gets a CUDA torch
    assert "kvmas models install qwen2.5-coder-0.5b" in make  # make run installs the default model


def test_package_data_defaults_exist_wherever_kvmas_is_installed(tmp_path, monkeypatch):
    import typer

    from kvmas.cli.app import app
    from kvmas.tasks import load_tasks

    monkeypatch.chdir(tmp_path)  # nowhere near this repository
    bench = typer.main.get_command(app).commands["bench"]
    default = next(p.default for p in bench.commands["latent-steps"].params if p.name == "data")
    tasks = load_tasks(default, n=3)
    assert len(tasks) == 3 and all(t.meta.get("solution") for t in tasks)
    assert not default.startswith((".", "/"))


def _readme_python() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import kvmas.primitives" in b]
    return block  # the in-process snippet (the serving one needs a server)


def test_the_readme_snippet_runs_on_a_tiny_model(tmp_path, monkeypatch):
    from kvmas.testing import tiny_hf_model, tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tok = tiny_tokenizer()
    tiny_hf_model("qwen", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setenv("KVMAS_MODEL", str(model_dir))  # the snippet's default model, a real model on disk
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code = _readme_python()
    assert "max_new_tokens" in code.split("Review(")[1].split(")")[0]  # never waits on the 512-token default
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["r"].trace.method == "latent:review" and (tmp_path / "runs" / "review.json").is_file()
    assert scope["more"].trace.steps[0].meta["resumed_from"] == scope["r"].state.length
    assert len(scope["rs"]) == 2


def _readme_commands() -> list[list[str]]:
    """Every ``kvmas`` line of the README's shell blocks, and every inline ``kvmas`` example of six words or
    more (the shorter inline ones name a command, not a whole invocation)."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [ln for b in re.findall(r"```bash\n(.*?)```", readme, re.S) for ln in b.splitlines()]
    lines += [span for span in re.findall(r"`(kvmas [^`]+)`", readme) if len(span.split()) >= 6]
    return [w for ln in lines if (w := shlex.split(ln, comments=True))[:1] == ["kvmas"]]


def _parse(root, words: list[str]) -> str:
    """Parse a command line as `kvmas` would (options, choices, types, arguments) without running anything:
    every command's body is replaced by one that records which command it was."""
    import click

    try:  # newer typer parses with its own copy of click (as kvmas.cli.boundary)
        from typer.exceptions import TyperException as usage_error
    except ImportError:  # pragma: no cover - older typer raises click's own
        usage_error = click.ClickException
    called: list[str] = []

    def stub(cmd, path):
        cmd.callback = lambda *a, _name=" ".join(path), **kw: called.append(_name)
        for name, sub in getattr(cmd, "commands", {}).items():
            stub(sub, [*path, name])

    stub(root, [])
    try:
        root.main(words[1:], prog_name="kvmas", standalone_mode=False)
    except (click.ClickException, usage_error) as exc:
        raise AssertionError(f"{' '.join(words)}: {exc.format_message()}") from None
    return called[-1]


def test_every_readme_command_parses_as_written():
    import typer

    from kvmas.cli.app import app

    commands = _readme_commands()
    assert len(commands) >= 25 and ["kvmas", "models"] in commands
    reached = {_parse(typer.main.get_command(app), words) for words in commands}
    assert {"run", "trace show", "trace export", "models install", "bench accuracy", "serve", "batch run"} <= reached
    with pytest.raises(AssertionError, match="No such option"):  # the check can fail
        _parse(typer.main.get_command(app), ["kvmas", "run", "Q?", "--roundz", "1"])
    root = typer.main.get_command(app)  # `kvmas --install-completion`, named in the prose, is an option
    assert any("--install-completion" in p.opts for p in root.params)

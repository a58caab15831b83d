"""Text-mode primitives on an OpenAI-compatible endpoint (RemoteModel), tested against kvmas serve itself:
each agent's turn is a `single` request to the server, so a run gives the answers, messages and decoded token
counts of the same run in process, and its trace counts the prompt tokens the server reports as prefilled (the
same count as in process); latent and kv hand-offs refuse, endpoint errors are typed."""

import pytest

from kvmas.agents.remote import RemoteError, RemoteModel, RemoteTextOnly
from kvmas.primitives import parse_method
from kvmas.serve import BackgroundServer, ServeConfig, create_app
from kvmas.testing import tiny_model

KEY = "remote-key"
QS = ["What is 12 times 7?", "Tom has 5 apples and eats 2. How many are left?"]
BUDGET = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen", seed=1)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with BackgroundServer(create_app(model, ServeConfig(api_key=KEY, trace_dir=tmp_path_factory.mktemp("t")))) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server):
    return RemoteModel(server.url + "/v1", "single", api_key=KEY)


class Recording(RemoteModel):
    """Keeps the ``usage.prompt_tokens`` the server reported for each request."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.prompt_tokens: list[int] = []

    def complete(self, messages, **kw):
        text, prompt_tokens, completion_tokens = super().complete(messages, **kw)
        self.prompt_tokens.append(prompt_tokens)
        return text, prompt_tokens, completion_tokens


def speeches(trace):
    return [(s.agent, s.text_out, s.usage.generated) for s in trace.steps if s.action == "speak"]


@pytest.mark.parametrize("method", ["single", "text:review", "text:vote", "text:plan"])
@pytest.mark.parametrize("question", QS)
def test_remote_text_run_equals_local(model, remote, method, question):
    prim = parse_method(method, max_new_tokens=BUDGET)
    got, want = prim(question, model=remote), prim(question, model=model)
    assert got.answer == want.answer
    assert speeches(got.trace) == speeches(want.trace)  # every agent's message and its decoded tokens
    assert got.trace.model == {"backend": "openai", "base_url": remote.base_url, "model": "single"}


@pytest.mark.parametrize("method", ["single", "text:review", "text:vote", "text:plan"])
def test_prompt_tokens_are_the_traces_prefilled(model, server, method):
    remote = Recording(server.url + "/v1", "single", api_key=KEY)
    prim = parse_method(method, max_new_tokens=BUDGET)
    got, want = prim(QS[1], model=remote), prim(QS[1], model=model)
    assert remote.prompt_tokens and min(remote.prompt_tokens) > 0
    assert got.trace.usage.prefilled == sum(remote.prompt_tokens)  # what the server reported, every request
    assert got.trace.usage == want.trace.usage  # the server prefilled what the run in process prefills
    # on the speak step that sent each request; in process, on the read step before it
    assert [s.usage.prefilled for s in got.trace.steps if s.action == "speak"] == \
        [s.usage.prefilled for s in want.trace.steps if s.action == "read"]


def test_batch_of_remote_runs(model, remote):
    prim = parse_method("text:vote", max_new_tokens=BUDGET, n=2)
    assert [r.answer for r in prim.batch(QS, model=remote, batch_size=2)] == [prim(q, model=model).answer for q in QS]


def test_majority_vote_streams_nothing_but_answers(model, remote):
    prim = parse_method("text:vote", max_new_tokens=BUDGET, aggregate="majority")
    assert prim(QS[0], model=remote).answer == prim(QS[0], model=model).answer


@pytest.mark.parametrize("method, kw", [("latent:review", {}), ("latent:vote", {}), ("latent:plan", {}),
                                        ("kv:review", {}), ("kv:vote", {}), ("kv:plan", {}),
                                        ("single", {"latent_steps": 2}), ("text:review", {"early_stop": True})])
def test_latent_needs_local_kv(remote, method, kw):
    with pytest.raises(RemoteTextOnly, match="text-mode primitives only"):
        parse_method(method, max_new_tokens=BUDGET, **kw)(QS[0], model=remote)


def test_endpoint_errors_are_typed(server):
    with pytest.raises(RemoteError, match="401"):
        parse_method("single", max_new_tokens=BUDGET)(QS[0], model=RemoteModel(server.url + "/v1", "single"))
    with pytest.raises(RemoteError, match="404"):
        parse_method("single", max_new_tokens=BUDGET)(QS[0], model=RemoteModel(server.url + "/v1", "nope",
                                                                               api_key=KEY))
    with pytest.raises(RemoteError, match="cannot reach"):
        parse_method("single", max_new_tokens=BUDGET)(QS[0], model=RemoteModel("http://127.0.0.1:9/v1", "single"))



def test_bench_accuracy_on_the_endpoint_equals_local(model, remote, server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvmas.bench.harness import BenchConfig, run_bench
    from kvmas.cli.app import app
    from kvmas.tasks import load_tasks

    tasks = load_tasks("gsm8k-sample", n=2)
    cfg = BenchConfig(max_new_tokens=BUDGET, batch_size=2)
    got = run_bench(tasks, "single,text:vote", remote, tmp_path / "remote", cfg)
    want = run_bench(tasks, "single,text:vote", model, tmp_path / "local", cfg)
    for name in ("single", "text:vote"):
        assert got["methods"][name]["correct"] == want["methods"][name]["correct"]
        assert got["methods"][name]["samples"] == want["methods"][name]["samples"]
        assert got["methods"][name]["tokens_total"] == want["methods"][name]["tokens_total"]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    res = CliRunner().invoke(app, ["bench", "accuracy", "--backend", "openai", "--base-url", server.url + "/v1",
                                   "--model", "single", "--data", "gsm8k-sample", "--n", "1", "--methods",
                                   "text:review", "--max-new-tokens", str(BUDGET), "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "results.json").is_file()


def test_cli_run_on_the_openai_backend(model, server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvmas.cli.app import app
    from kvmas.trace import Trace

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    base = ["run", QS[0], "--backend", "openai", "--base-url", server.url + "/v1", "--model", "single",
            "--max-new-tokens", str(BUDGET)]
    res = CliRunner().invoke(app, base + ["-p", "review", "-c", "text", "--trace", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    want = parse_method("text:review", max_new_tokens=BUDGET)(QS[0], model=model)
    assert Trace.load(tmp_path / "t.json").answer == want.answer
    res = CliRunner().invoke(app, base + ["-p", "review", "-c", "latent"])
    assert res.exit_code == 2 and "text-mode primitives only" in res.output
    res = CliRunner().invoke(app, ["run", QS[0], "--backend", "openai", "--model", "single"])
    assert res.exit_code == 2 and "--base-url" in res.output

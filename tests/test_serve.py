"""kvmas serve called with the official openai client: answers equal in-process runs of the same method and
seed, streaming adds up to the answer, every error is an OpenAI-style JSON body, concurrent requests batch
and still give the sequential answers, a full queue is a 429 and a client that goes away stops its run."""

import threading
import time

import httpx
import openai
import pytest

from kvmas.organizer import PipelineSpec
from kvmas.organizer.pipeline import Pipeline
from kvmas.primitives import Single, parse_method
from kvmas.serve import BackgroundServer, ServeConfig, create_app
from kvmas.testing import tiny_model

KEY = "test-key-123"
QS = ["2+3?", "What is 12 times 7?", "Tom has 5 apples and eats 2. How many are left?", "9-4?",
      "A train leaves at 3 pm and arrives at 7 pm. How long is the trip?", "7*6?"]
BUDGET = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen", seed=1)


@pytest.fixture(scope="module")
def spec():
    return PipelineSpec.chain(("vote", {"n": 2}), "single")


@pytest.fixture(scope="module")
def server(model, spec, tmp_path_factory):
    cfg = ServeConfig(api_key=KEY, trace_dir=tmp_path_factory.mktemp("traces"), max_tokens_limit=64,
                      max_request_bytes=4096, pipelines={"vote-then-single": spec})
    with BackgroundServer(create_app(model, cfg)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def local(method: str, question: str, model, seed: int = 0, budget: int = BUDGET):
    return parse_method(method, max_new_tokens=budget)(question, model=model, seed=seed)


def ask(client, method: str, question: str, **kw):
    return client.chat.completions.create(model=method, messages=[{"role": "user", "content": question}],
                                          max_tokens=kw.pop("max_tokens", BUDGET), **kw)


@pytest.mark.parametrize("method", ["single", "latent:review", "text:vote", "text:plan", "kv:review", "kv:vote"])
def test_answer_equals_in_process_run(client, model, method):
    resp = ask(client, method, QS[1], seed=0)
    want = local(method, QS[1], model)
    assert resp.choices[0].message.content == want.answer
    u = want.trace.usage
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (u.prefilled, u.generated)
    assert resp.usage.total_tokens == u.prefilled + u.generated
    assert resp.usage.model_extra["kvmas"] == {"prefilled": u.prefilled, "reused": u.reused, "latent": u.latent,
                                               "generated": u.generated, "computed": u.computed}
    assert resp.model_extra["kvmas"]["method"] == want.trace.method


def test_system_message_is_the_run_system(client, model):
    from kvmas.primitives.run import Output, close_run, open_run

    resp = client.chat.completions.create(model="single", max_tokens=BUDGET, messages=[
        {"role": "system", "content": "You answer in one word."}, {"role": "user", "content": QS[0]}])
    prim = Single(max_new_tokens=BUDGET)
    ctx = open_run(model, QS[0], method=prim.method, params=prim.params(), system="You answer in one word.")
    assert resp.choices[0].message.content == close_run(ctx, prim.forward(ctx, Output.start(model))).answer


def test_registered_pipeline(client, model, spec):
    resp = ask(client, "vote-then-single", QS[2])
    want = Pipeline(spec.with_params(max_new_tokens=BUDGET, temperature=0.0, top_p=1.0))(QS[2], model=model)
    assert resp.choices[0].message.content == want.answer
    assert "vote-then-single" in [m.id for m in client.models.list().data]


def test_seed_reaches_the_run(client, model):
    prim_kw = dict(model="single", messages=[{"role": "user", "content": QS[3]}], max_tokens=BUDGET,
                   temperature=1.0)
    for seed in (1, 2):
        got = client.chat.completions.create(seed=seed, **prim_kw).choices[0].message.content
        assert got == Single(max_new_tokens=BUDGET, temperature=1.0)(QS[3], model=model, seed=seed).answer


@pytest.mark.parametrize("method", ["single", "text:review", "latent:vote"])
def test_stream_adds_up_to_the_answer(client, model, method):
    chunks = list(ask(client, method, QS[4], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = local(method, QS[4], model)
    assert text == want.answer
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["kvmas"]["method"] == want.trace.method
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.trace.usage.generated


def test_trace_of_a_run(client, server):
    resp = ask(client, "single", QS[0])
    run_id = resp.model_extra["kvmas"]["trace_id"]
    got = httpx.get(f"{server.url}/v1/traces/{run_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == 200 and got.json()["question"] == QS[0] and got.json()["run_id"] == run_id
    assert got.json()["answer"] == resp.choices[0].message.content


@pytest.mark.parametrize("bad, status", [("..%2F..%2Fetc%2Fpasswd", 404), ("not-hex", 400),
                                         ("deadbeefdeadbeef", 404), ("DEADBEEF00", 400)])
def test_trace_ids_are_checked(server, bad, status):
    got = httpx.get(f"{server.url}/v1/traces/{bad}", headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == status and set(got.json()["error"]) >= {"message", "type", "code"}


def test_models_lists_the_methods(client):
    ids = [m.id for m in client.models.list().data]
    assert {"single", "latent:review", "text:review", "latent:vote", "text:plan", "kv:plan"} <= set(ids)


@pytest.mark.parametrize("name", ["nonsense", "bogus:review", "text:nothing", ""])
def test_bad_model_name(client, name):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, name, QS[0])
    assert err.value.body["code"] == "model_not_found"


def test_missing_or_wrong_key(server):
    for key in ("wrong", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            ask(openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0), "single", QS[0])
        assert err.value.body["code"] == "invalid_api_key"
    got = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "single", "messages": []})
    assert got.status_code == 401 and got.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


def post(server, content: bytes | str):
    return httpx.post(f"{server.url}/v1/chat/completions", content=content,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'{"model": "single"}'])
def test_bad_json(server, body):
    got = post(server, body)
    assert got.status_code == 400
    assert got.json()["error"]["code"] in ("invalid_json", "invalid_request")


def test_request_too_large(server):
    got = post(server, '{"model": "single", "messages": [{"role": "user", "content": "' + "x" * 5000 + '"}]}')
    assert got.status_code == 413 and got.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("extra, code", [({"max_tokens": 65}, "budget_exceeded"),
                                         ({"max_tokens": 0}, "budget_exceeded"),
                                         ({"n": 2}, "invalid_request"), ({"stop": ["x"]}, "invalid_request")])
def test_limits(client, extra, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="single", messages=[{"role": "user", "content": QS[0]}], **extra)
    assert err.value.body["code"] == code


def test_one_question_per_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="single", max_tokens=4, messages=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])


def test_concurrent_requests_batch_and_equal_sequential(model, tmp_path):
    jobs = [("single", q) for q in QS] + [("latent:review", QS[0]), ("text:vote", QS[1])]
    want = [local(m, q, model).answer for m, q in jobs]
    # the dispatcher waits until every request is queued, so they all run as rows of the same batch
    cfg = ServeConfig(trace_dir=tmp_path, max_batch=len(jobs), collect_ms=60_000)
    before = model.engine.forwards
    for m, q in jobs:
        local(m, q, model)
    alone = model.engine.forwards - before
    got = [None] * len(jobs)
    with BackgroundServer(create_app(model, cfg)) as srv:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def one(i):
            got[i] = ask(cl, *jobs[i]).choices[0].message.content

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        before = model.engine.forwards
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batched = model.engine.forwards - before
    assert got == want
    assert batched < alone  # rows of shared forwards, not one request after another


def test_full_queue_is_429(model, tmp_path):
    release = threading.Event()
    with BackgroundServer(create_app(model, ServeConfig(trace_dir=tmp_path, max_batch=1, max_queue=0,
                                                        collect_ms=0))) as srv:
        sched = srv.server.config.app.state.scheduler
        held = sched.submit(lambda: release.wait(60))
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        try:
            with pytest.raises(openai.RateLimitError) as err:
                ask(cl, "single", QS[0])
            assert err.value.body["code"] == "queue_full"
        finally:
            release.set()
        held.result(10)
        assert ask(cl, "single", QS[0]).choices[0].message.content == local("single", QS[0], model).answer


def test_client_disconnect_stops_the_run(model, tmp_path):
    budget = 1024
    prim = Single(max_new_tokens=budget)
    question = next(q for q in QS if prim(q, model=model).usage.generated == budget)  # decodes the whole budget
    with BackgroundServer(create_app(model, ServeConfig(trace_dir=tmp_path, max_tokens_limit=budget))) as srv:
        sched = srv.server.config.app.state.scheduler
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        stream = ask(cl, "single", question, max_tokens=budget, stream=True)
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                break
        stream.close()
        deadline = time.monotonic() + 60
        while sched.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.running == 0
        assert list(tmp_path.iterdir()) == []  # a cancelled run writes no trace: it did not run to its end


def test_run_errors_are_json(model, tmp_path):
    """A question too long for the context is a 400 with its code; a run that fails in a way kvmas did not
    plan for is a 500 with the same body shape, and the server keeps serving."""
    with BackgroundServer(create_app(model, ServeConfig(trace_dir=tmp_path, max_request_bytes=1 << 16))) as srv:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            ask(cl, "single", "1+" * (model.max_context // 2))
        assert err.value.body["code"] == "context_length_exceeded"
        srv.server.config.app.state.methods.pipelines["broken"] = None  # with_params on None: AttributeError
        with pytest.raises(openai.InternalServerError) as err:
            ask(cl, "broken", QS[0])
        assert err.value.body["code"] == "internal_error"
        assert ask(cl, "single", QS[0]).choices[0].message.content == local("single", QS[0], model).answer


def test_the_readme_client_snippet_runs(model, capsys):
    """The README's openai-client snippet, as written, against a server started as the README starts it (its
    key; the port is a free one)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import OpenAI" in b]
    assert "--api-key secret" in readme and 'api_key="secret"' in code
    with BackgroundServer(create_app(model, ServeConfig(api_key="secret"))) as srv:
        exec(compile(code.replace("http://127.0.0.1:8000/v1", srv.url + "/v1"), "README.md", "exec"), {})
        out = capsys.readouterr().out
    want = parse_method("latent:review", max_new_tokens=256)("What is 17*3?", model=model)
    u = want.trace.usage
    assert out.startswith(f"{want.answer}\n{u.prefilled + u.generated} {{'prefilled': {u.prefilled}, ")
    # the stream, under the server's default budget (256 tokens an agent)
    assert out.endswith(parse_method("single", max_new_tokens=256)("2+3?", model=model).answer)

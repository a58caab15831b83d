"""Golden tests of the batched engine: a batch of runs equals the same runs alone (tokens, usage, whole trace)."""

import pytest

from kvmas.agents.engine import run_batched
from kvmas.errors import BadInputError, ContextOverflowError
from kvmas.organizer import KnowledgePool, Organizer, PipelineSpec
from kvmas.organizer.pipeline import Pipeline
from kvmas.primitives import PlanExecute, Review, SelfConsistency, Sequence, Single, Vote
from kvmas.testing import tiny_model

QS = ["2+3?", "What is 12 times 7?", "Tom has 5 apples and eats 2. How many are left?", "9-4?",
      "A train leaves at 3 pm and arrives at 7 pm. How long is the trip, in hours?"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen", seed=1)


def stable(trace, approx: bool = False):
    """The trace without timings; scores (sums of many log-probs) kept apart: fp32 reduction order differs
    between batch shapes, so they agree to ~1e-4, while every token, count and provenance id is exact."""
    d = trace.model_dump(exclude={"run_id", "created", "wall_s", "versions"})
    for s in d["steps"]:
        s.pop("wall_s")
        if approx and "scores" in s["meta"]:
            s["meta"]["scores"] = pytest.approx(s["meta"]["scores"], abs=1e-3)
        for option in s["meta"].get("options", []) if approx else []:  # the organizer's scored choices
            for k in ("logprob", "calibrated", "score"):
                if k in option:
                    option[k] = pytest.approx(option[k], abs=1e-3)
    return d


def same_facts(a: dict, b: dict) -> bool:
    """Equal facts, log-probabilities within fp tolerance (batched reductions differ in order)."""
    scored = ("review_verdict_margins", "vote_likelihoods")
    return ({k: v for k, v in a.items() if k not in scored} == {k: v for k, v in b.items() if k not in scored}
            and all(b.get(k) == pytest.approx(a.get(k), abs=2e-3) for k in scored))


def small(cls, comm="latent", **kw):
    return cls(comm=comm, **{"max_new_tokens": 5, "latent_steps": 2, **kw})


PRIMS = {
    "single": lambda: Single(max_new_tokens=6),
    "latent:review": lambda: small(Review, rounds=2),
    "latent:review-early-stop": lambda: small(Review, rounds=2, early_stop=True, stop_margin=0.0),
    "text:review": lambda: small(Review, "text", rounds=1, early_stop=True, stop_margin=0.0),
    "latent:vote": lambda: small(Vote, n=3),
    "latent:vote-reprefill": lambda: small(Vote, n=2, merge_policy="reprefill"),
    "text:vote": lambda: small(Vote, "text", n=3, temperature=0.9, top_p=0.9),
    "text:vote-majority": lambda: small(Vote, "text", n=3, aggregate="majority"),
    "latent:plan": lambda: small(PlanExecute, k=2),
    "text:plan": lambda: small(PlanExecute, "text", k=2),
    "kv:review": lambda: small(Review, "kv", rounds=2),
    "kv:review-early-stop": lambda: small(Review, "kv", rounds=2, early_stop=True, stop_margin=0.0),
    "kv:review-question-draft": lambda: small(Review, "kv", rounds=1, draft="question"),
    "latent:review-question-draft": lambda: small(Review, rounds=1, draft="question"),
    "kv:vote": lambda: small(Vote, "kv", n=3),
    "kv:vote-majority": lambda: small(Vote, "kv", n=3, aggregate="majority", temperature=0.9),
    # answer keys from the text's length, so random tiny-model candidates differ and the selector scores them
    "kv:vote-likelihood": lambda: small(Vote, "kv", n=3, aggregate="likelihood", temperature=0.9,
                                        answer_key=lambda t: str(len(t) % 3)),
    "text:vote-likelihood": lambda: small(Vote, "text", n=3, aggregate="likelihood", temperature=0.9,
                                          answer_key=lambda t: str(len(t) % 3)),
    "kv:vote-question": lambda: small(Vote, "kv", n=3, candidates="question", aggregate="majority", temperature=0.9),
    "text:vote-question": lambda: small(Vote, "text", n=2, candidates="question", temperature=0.9),
    "kv:plan": lambda: small(PlanExecute, "kv", k=2),
    "consistency": lambda: SelfConsistency(n=3, max_new_tokens=5),
    "kv-sequence": lambda: Sequence(small(PlanExecute, "kv", k=2), small(Review, "kv", rounds=1)),
    "sequence": lambda: Sequence(small(PlanExecute, k=2), small(Review, "text", rounds=1)),
    "dag": lambda: Pipeline(PipelineSpec.from_dict({
        "nodes": [{"id": "p", "type": "plan", "params": {"k": 2}}, {"id": "a", "type": "single"},
                  {"id": "b", "type": "vote", "params": {"n": 2}}, {"id": "f", "type": "single", "merge": "shared"}],
        "edges": [["p", "a"], ["p", "b"], ["a", "f"], ["b", "f"]]}).with_params(max_new_tokens=4, latent_steps=1)),
}


@pytest.mark.parametrize("name", list(PRIMS))
def test_a_batch_equals_its_runs_alone(model, name):
    prim = PRIMS[name]()
    seeds = [3, 1, 4, 1, 5]
    before = model.engine.forwards
    alone = [prim(q, model=model, seed=s) for q, s in zip(QS, seeds)]
    alone_forwards = model.engine.forwards - before
    before = model.engine.forwards
    together = prim.batch(QS, model=model, seeds=seeds)
    batched_forwards = model.engine.forwards - before
    for a, b in zip(alone, together):
        assert b.answer == a.answer
        assert b.usage == a.usage
        assert stable(b.trace) == stable(a.trace, approx=True)
        assert same_facts(a.meta, b.meta)
    assert batched_forwards < alone_forwards / 2, (batched_forwards, alone_forwards)  # 5 runs share forwards


def test_a_small_batch_size_refills_and_still_equals_the_runs_alone(model):
    prim = PRIMS["latent:vote"]()
    alone = [prim(q, model=model) for q in QS]
    for size in (1, 2):
        assert [stable(r.trace) for r in prim.batch(QS, model=model, batch_size=size)] == \
            [stable(r.trace, approx=True) for r in alone]


def test_runs_of_different_shapes_and_budgets_share_a_batch(model):
    """Rows finishing at different steps: runs with budgets 1..9 and different primitives, one batch."""
    jobs = [lambda b=b, q=q: Single(max_new_tokens=b)(q, model=model) for b, q in zip((1, 9, 3, 7, 5), QS)]
    jobs += [lambda: PRIMS["text:review"]()(QS[1], model=model), lambda: PRIMS["latent:plan"]()(QS[2], model=model)]
    alone = [job() for job in jobs]
    together = run_batched(model, jobs)
    assert [stable(r.trace) for r in together] == [stable(r.trace, approx=True) for r in alone]
    assert [r.usage.generated for r in together[:5]] == [r.usage.generated for r in alone[:5]]


def test_organizer_batch_equals_its_runs_alone(model, tmp_path):
    org = Organizer(KnowledgePool(tmp_path / "p.sqlite"), k=3, node_params={"max_new_tokens": 4, "latent_steps": 1})
    alone = [org.run(q, model=model) for q in QS[:3]]
    together = org.batch(QS[:3], model=model)
    assert [stable(r.trace) for r in together] == [stable(r.trace, approx=True) for r in alone]
    assert [r.meta["organizer"] for r in together] == [r.meta["organizer"] for r in alone]


def test_bad_batches_fail_before_anything_runs(model):
    prim = Single(max_new_tokens=4)
    before = model.engine.forwards
    with pytest.raises(BadInputError, match="question 1 of the batch is empty"):
        prim.batch(["2+2?", "  "], model=model)
    with pytest.raises(ContextOverflowError, match="question 1 of the batch"):
        Single(max_new_tokens=3700).batch(["2+2?", "x" * 200], model=model)
    with pytest.raises(BadInputError, match="seeds"):
        prim.batch(["a", "b"], model=model, seeds=[1])
    with pytest.raises(BadInputError, match="list of questions"):
        prim.batch("2+2?", model=model)
    with pytest.raises(BadInputError, match="batch_size"):
        prim.batch(["a"], model=model, batch_size=0)
    assert model.engine.forwards == before


def test_an_error_in_one_run_reaches_the_caller_and_frees_the_others(model):
    def bad():
        raise BadInputError("planted")

    jobs = [lambda: Single(max_new_tokens=3)(QS[0], model=model), bad,
            lambda: Single(max_new_tokens=3)(QS[1], model=model)]
    with pytest.raises(BadInputError, match="planted"):
        run_batched(model, jobs)


def test_a_batch_inside_a_batch_job_runs_in_its_slot(model):
    prim = Single(max_new_tokens=3)
    inner = [prim(q, model=model).answer for q in QS[:2]]
    outer = run_batched(model, [lambda: [r.answer for r in prim.batch(QS[:2], model=model)],
                                lambda: prim(QS[2], model=model).answer])
    assert outer[0] == inner and outer[1] == prim(QS[2], model=model).answer


def test_decode_ticks_continue_the_batch_buffer_and_equal_runs_alone(model):
    """Decode ticks write into the previous tick's KV buffer (no copy of the past) and still equal the runs
    alone; the state a run keeps after speaking owns its memory (it does not pin the batch's buffer)."""
    from kvmas.agents.state import LatentState

    def one(q):
        return LatentState.empty(model).extend(q).speak(6, min_new_tokens=6)

    alone = [one(q).token_ids for q in QS]
    before = model.engine.continued
    speeches = run_batched(model, [lambda q=q: one(q) for q in QS])
    assert [s.token_ids for s in speeches] == alone
    assert model.engine.continued - before >= 4  # the ticks after the first continued the buffer
    for s in speeches:
        for t in s.state.keys + s.state.values:
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_a_state_continued_twice_keeps_each_continuation_exact(model):
    """Copy-on-use in the engine's buffer: the first continuation of a state writes into the buffer it views,
    a second one of the same state gets a fresh buffer; both equal a recomputation from scratch, and the
    state itself is unchanged."""
    from kvmas.agents.state import LatentState

    s = LatentState.empty(model).extend([5, 6, 7]).extend([8])  # a 1-column forward: a decode buffer
    keys = [t.clone() for t in s.keys]
    before = model.engine.continued
    a = s.extend([9])
    assert model.engine.continued == before + 1  # written in place after s's columns
    b = s.extend([10])
    assert model.engine.continued == before + 1  # s no longer ends where the buffer does
    for state, ids in ((a, [5, 6, 7, 8, 9]), (b, [5, 6, 7, 8, 10])):
        fresh = LatentState.empty(model).extend(ids)
        assert (state.last_logits - fresh.last_logits).abs().max() < 1e-4
        for x, y in zip(state.keys, fresh.keys):
            assert (x - y).abs().max() < 1e-4
    assert all(bool((x == y).all()) for x, y in zip(s.keys, keys))


def test_rows_that_finish_leave_the_decode_and_the_rest_continue_the_buffer(model):
    """A multi-row speak whose rows stop at different ticks: after a row stops, the live rows still continue
    the engine's buffer tick after tick (no rebuild of every row's past per tick), and the state it returns
    lays the stopped row back in place: its columns after the stop are padding (masked, zero KV, at the row's
    next position), exactly as if it had been fed masked columns."""
    from kvmas.agents.state import LatentState

    prefix = LatentState.empty(model).extend("Shared question: name a colour.")
    suffixes = ["A:", "Persona two says:", "B?"]
    full = prefix.fork(3).extend(suffixes).speak(12, min_new_tokens=12)
    stop = full.texts[0][1:3]
    assert stop and stop not in full.texts[1][:4] + full.texts[2][:4]
    rows = prefix.fork(3).extend(suffixes)
    before_fwd, before_cont = model.engine.forwards, model.engine.continued
    sp = rows.speak(12, stop=[stop])
    forwards, continued = model.engine.forwards - before_fwd, model.engine.continued - before_cont
    lengths = [len(t) for t in sp.token_ids]
    assert min(lengths) < max(lengths)
    stops = len(set(lengths)) - 1  # ticks at which the live rows changed: each rebuilds the buffer once
    assert continued >= forwards - 2 - stops  # first tick, the tail feed and each change start a new buffer
    st = sp.state
    assert st.rows == 3 and rows.length + max(lengths) <= st.length <= rows.length + max(lengths) + 1
    short = lengths.index(min(lengths))
    gen = st.mask[short, rows.length:]
    assert int(gen.sum()) == lengths[short]  # every token it said, each once
    pads = (gen == 0).nonzero().flatten() + rows.length
    fed = int(pads[0]) - rows.length  # the columns it was fed before it stopped
    assert bool(st.mask[short, rows.length: rows.length + fed].all())
    assert bool((st.positions[short, pads] == rows.next_pos[short] + fed).all())
    assert all(not t[short, :, pads].any() for t in st.keys + st.values)
    for t in st.keys + st.values:
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


FANOUTS = {
    "consistency": lambda: SelfConsistency(n=8, max_new_tokens=40),
    "kv:vote-question": lambda: Vote("kv", n=6, candidates="question", max_new_tokens=40, temperature=0.9),
    "text:vote": lambda: Vote("text", n=6, max_new_tokens=40, temperature=0.9),
    "latent:vote": lambda: Vote(n=6, latent_steps=8, max_new_tokens=40),
    "kv:plan": lambda: PlanExecute("kv", k=5, max_new_tokens=40),
    "kv-sequence": lambda: Sequence(SelfConsistency(n=6, max_new_tokens=40),
                                    Review("kv", rounds=1, max_new_tokens=40)),
    "dag": lambda: Pipeline(PipelineSpec.from_dict({
        "nodes": [{"id": "v", "type": "vote", "params": {"n": 6, "comm": "kv"}}, {"id": "s", "type": "single"}],
        "edges": [["v", "s"]]}).with_params(max_new_tokens=40)),
}


@pytest.mark.parametrize("name", list(FANOUTS))
def test_kv_positions_bound_every_forward_of_a_run(model, name, monkeypatch):
    """``kv_positions`` (what sizes the default batch) bounds the KV any one forward of a run spans, summed
    over its rows; for these fan-outs that is more than one row's ``positions_needed``."""
    from kvmas.agents.engine import Engine
    spans, forward = [], Engine.forward

    def counting(self, req):
        spans.append(req.rows * (req.past + req.width))
        return forward(self, req)

    monkeypatch.setattr(Engine, "forward", counting)
    prim, q = FANOUTS[name](), QS[2]
    prim(q, model=model, seed=1)
    tokens = len(model.encode(q))
    assert max(spans) <= prim.kv_positions(tokens)
    if name in ("consistency", "kv:vote-question", "text:vote", "kv:plan"):
        assert max(spans) > prim.positions_needed(tokens)


def test_the_bench_default_batch_counts_a_methods_rows(model):
    from kvmas.agents.engine import default_batch_size
    one = default_batch_size(model, Single(max_new_tokens=512).kv_positions(200), limit=10**6)
    five = default_batch_size(model, SelfConsistency(n=5, max_new_tokens=512).kv_positions(200), limit=10**6)
    assert five <= one // 4


def test_a_one_node_pipeline_holds_what_its_primitive_holds():
    vote = Vote("kv", n=5, candidates="question", max_new_tokens=512)
    spec = PipelineSpec.from_dict({"nodes": [{"id": "v", "type": "vote", "params": {
        "comm": "kv", "n": 5, "candidates": "question"}}]}).with_params(max_new_tokens=512)
    assert Pipeline(spec).kv_positions(150) == vote.kv_positions(150)
    assert Sequence(vote).kv_positions(150) == vote.kv_positions(150)

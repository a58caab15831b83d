import pytest

from kvmas.errors import BadInputError
from kvmas.organizer import DEFAULT_SPEC, KnowledgePool, Organizer, PipelineSpec
from kvmas.organizer.organizer import describe_in_words
from kvmas.testing import tiny_model

SMALL = {"max_new_tokens": 4, "latent_steps": 1}
Q = "What is 12 * 7?"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def pool(tmp_path):
    p = KnowledgePool(tmp_path / "p.sqlite", seed=False)
    for q, spec in [("sums", PipelineSpec.chain("single")),
                    ("long sums", PipelineSpec.chain(("review", {"rounds": 1}))),
                    ("options", PipelineSpec.chain(("vote", {"n": 2})))]:
        p.add(q, spec)
    return p


def test_constrained_choice_scores_every_option(pool, model):
    org = Organizer(pool, k=3, node_params=SMALL)
    d = org.choose(Q, model)
    assert d.how == "constrained" and len(d.options) == 3
    assert [o["letter"] for o in d.options] == ["A", "B", "C"]
    assert all({"logprob", "calibrated", "score"} <= set(o) for o in d.options)
    chosen = [o for o in d.options if o.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["score"] == max(o["score"] for o in d.options)
    assert d.entry_id == chosen[0]["entry_id"]
    assert d.usage.prefilled > 2 * len(model.encode(Q))  # query embedding + two scoring prompts
    assert d.spec.nodes[0].params["comm"] == "latent" and d.spec.nodes[0].params["max_new_tokens"] == 4
    # the decision is a deterministic function of question, pool and model
    assert org.choose(Q, model).entry_id == d.entry_id
    # calibration: the raw letter log-probs alone would not be the score
    assert any(o["calibrated"] != o["logprob"] for o in d.options)


def test_pool_prior_steers_the_choice(pool, model):
    org = Organizer(pool, k=3, node_params=SMALL)
    first = org.choose(Q, model).entry_id
    for _ in range(12):
        pool.record(first, False)
    assert org.choose(Q, model).entry_id != first


def test_fallbacks(tmp_path, model, monkeypatch):
    empty = Organizer(KnowledgePool(tmp_path / "e.sqlite", seed=False))
    d = empty.choose(Q, model)
    assert d.how == "fallback-empty" and d.spec.types() == DEFAULT_SPEC.types() and d.entry_id is None
    assert Organizer(None).choose(Q, model).how == "fallback-empty"
    one = KnowledgePool(tmp_path / "o.sqlite", seed=False)
    one.add("anything", PipelineSpec.chain(("vote", {"n": 2})))
    assert Organizer(one).choose(Q, model).how == "single-candidate"
    # an option list that overflows the model's context: the candidate with the best prior instead
    short = model
    monkeypatch.setattr(short, "max_context", 600)
    seeded_pool = KnowledgePool(tmp_path / "s.sqlite")
    best = seeded_pool.entries()[5]
    seeded_pool.record(best.id, True)
    d = Organizer(seeded_pool, k=4).choose("Which option, A or B, and how many sums and steps?", short)
    assert d.how == "fallback-prior" and len(d.options) == 4
    if best.id in [o["entry_id"] for o in d.options]:
        assert d.entry_id == best.id
    with pytest.raises(BadInputError):
        Organizer(None).choose("  ", model)
    with pytest.raises(BadInputError):
        Organizer(None, k=0)


def test_random_composition_is_seeded_and_uses_no_model(pool, model):
    org = Organizer(pool, k=3, random_choice=True)
    picks = {org.choose(f"q{i}", model, seed=1).entry_id for i in range(12)}
    assert len(picks) > 1
    assert org.choose("q3", model, seed=1).entry_id == org.choose("q3", model, seed=1).entry_id
    assert org.choose("q3", model, seed=1).usage.prefilled == 0


def test_run_counts_the_organizer_and_feedback_learns(pool, model):
    org = Organizer(pool, k=3, node_params=SMALL)
    r = org.run(Q, model=model, seed=0)
    first = r.trace.steps[0]
    assert first.action == "organize" and first.agent == "organizer"
    assert first.usage.prefilled > 0 and r.trace.usage.prefilled >= first.usage.prefilled
    assert r.trace.method == "auto" and r.meta["organizer"]["entry_id"] == first.meta["entry_id"]
    n0 = len(pool)
    used = r.meta["organizer"]["entry_id"]
    trials0 = pool.get(used).trials
    learned = org.feedback(r, True)
    assert len(pool) == n0 + 1 and learned.query == Q and learned.successes == 1
    assert pool.get(used).trials == trials0 + 1
    with pytest.raises(BadInputError, match="already has a recorded outcome"):
        org.feedback(r, False)
    assert pool.get(used).trials == trials0 + 1


def test_describe_in_words():
    assert "3 solvers" in describe_in_words(PipelineSpec.chain(("vote", {"n": 3})))
    assert "then" in describe_in_words(PipelineSpec.chain("plan", "review"))
    # every primitive a spec may hold has words (a pool learned from a consistency run once crashed here)
    from kvmas.organizer.spec import PRIMITIVE_PARAMS

    for typ in PRIMITIVE_PARAMS:
        assert describe_in_words(PipelineSpec.chain(typ))
    assert "5 times" in describe_in_words(PipelineSpec.chain("consistency"))

import pytest

from kvmas.errors import BadInputError
from kvmas.organizer.pipeline import Pipeline, run_pipeline
from kvmas.organizer.spec import PipelineSpec
from kvmas.primitives import PlanExecute, Sequence, Vote
from kvmas.testing import tiny_model

SMALL = dict(max_new_tokens=5, latent_steps=2)
Q = "What is 2+3?"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _dag(policy="shared", comm="latent"):
    return PipelineSpec.from_dict({
        "nodes": [{"id": "p", "type": "plan", "params": {"k": 2}},
                  {"id": "a", "type": "vote", "params": {"n": 2}},
                  {"id": "b", "type": "single"},
                  {"id": "f", "type": "single", "merge": policy}],
        "edges": [["p", "a"], ["p", "b"], ["a", "f"], ["b", "f"]]}).with_params(comm=comm, **SMALL)


def test_chain_equals_sequence_of_the_same_primitives(model):
    spec = PipelineSpec.chain(("plan", {"k": 1}), ("vote", {"n": 2})).with_params(**SMALL)
    got = Pipeline(spec)(Q, model=model, seed=3)
    want = Sequence(PlanExecute(k=1, **SMALL), Vote(n=2, **SMALL))(Q, model=model, seed=3)
    assert got.answer == want.answer
    assert [(s.agent, s.action, s.usage) for s in got.trace.steps] == \
        [(s.agent, s.action, s.usage) for s in want.trace.steps]
    assert got.trace.method == "latent:plan>latent:vote"


def test_fan_out_and_fan_in_read_both_branches(model):
    r = Pipeline(_dag("shared"))(Q, model=model)
    steps = r.trace.steps
    merge = [s for s in steps if s.action == "merge" and s.agent.startswith("pipeline:")]
    assert len(merge) == 1 and merge[0].meta["branches"] == 2 and merge[0].usage.prefilled == 0
    plan_writes = {i for s in steps if s.agent.startswith(("planner", "executor")) and s.action == "think"
                   for i in s.writes}
    # the merge reads what the plan thought (shared by both branches; its role prompts are dropped at the
    # hand-off) and what each branch added
    assert plan_writes and plan_writes <= set(merge[0].reads)
    assert len(set(merge[0].writes)) >= len(plan_writes) + 2
    assert r.trace.method.startswith("dag:")
    speak = [s for s in steps if s.action == "speak"]
    assert speak and r.answer == speak[-1].text_out  # the answer is what the last speaker said


def _singles(policy):
    return PipelineSpec.from_dict({
        "nodes": [{"id": "p", "type": "single"}, {"id": "a", "type": "single"}, {"id": "b", "type": "single"},
                  {"id": "f", "type": "single", "merge": policy}],
        "edges": [["p", "a"], ["p", "b"], ["a", "f"], ["b", "f"]]}).with_params(**SMALL)


def test_merge_policy_is_used_and_reprefill_is_counted(model):
    shared = Pipeline(_singles("shared"))(Q, model=model)
    reprefill = Pipeline(_singles("reprefill"))(Q, model=model)
    m = [s for s in reprefill.trace.steps if s.action == "merge"][0]
    assert m.meta["policy"] == "reprefill" and m.usage.prefilled > 0
    assert reprefill.trace.usage.prefilled == shared.trace.usage.prefilled + m.usage.prefilled


def test_text_branches_do_not_see_each_other(model):
    r = Pipeline(_dag(comm="text"))(Q, model=model)
    assert not [s for s in r.trace.steps if s.action == "merge"]
    reads = [s.text_in for s in r.trace.steps if s.action == "read" and s.agent == "solver"]
    assert len(reads) == 2  # branch b, then the final node
    assert "Integrated solution" in reads[0] and "Selected solution" not in reads[0]  # b never sees branch a
    assert "Integrated solution" in reads[1] and "Selected solution" in reads[1] and "Solver:" in reads[1]
    assert reads[1].count("Integrated solution") == 1  # the shared history is joined once
    assert r.trace.usage.reused == 0


def test_run_pipeline_from_file_and_bad_file(model, tmp_path):
    path = tmp_path / "spec.json"
    PipelineSpec.chain("single").with_params(**SMALL).save(path)
    r = run_pipeline(str(path), Q, model=model)
    assert r.trace.method == "single"
    (tmp_path / "bad.json").write_text('{"nodes": [{"id": "x", "type": "nope"}]}')
    with pytest.raises(BadInputError, match=r"bad.json: invalid pipeline spec: nodes\[0\]\.type"):
        run_pipeline(str(tmp_path / "bad.json"), Q, model=model)
    with pytest.raises(BadInputError, match="not found"):
        run_pipeline(str(tmp_path / "missing.json"), Q, model=model)


def test_seeded_runs_are_reproducible(model):
    a = Pipeline(_singles("rerotate"))(Q, model=model, seed=5)
    b = Pipeline(_singles("rerotate"))(Q, model=model, seed=5)
    assert a.answer == b.answer and a.trace.usage == b.trace.usage

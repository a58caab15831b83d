"""Live speech: a run's listener hears the answer as it is decoded, and the deltas add up to the answer."""

import pytest

from kvmas.agents.stream import TextStream
from kvmas.primitives import PlanExecute, Review, Sequence, Single, Vote
from kvmas.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen", seed=1)


PRIMS = [Single(max_new_tokens=6), Single(comm="text", max_new_tokens=6), Review(max_new_tokens=6),
         Review(comm="text", max_new_tokens=6), Vote(max_new_tokens=6), Vote(comm="text", max_new_tokens=6),
         PlanExecute(max_new_tokens=6), PlanExecute(comm="text", max_new_tokens=6),
         Review(comm="kv", max_new_tokens=6), Vote(comm="kv", max_new_tokens=6), PlanExecute(comm="kv", max_new_tokens=6),
         Sequence(PlanExecute(comm="text", max_new_tokens=5), Review(comm="text", max_new_tokens=5)),
         Sequence(PlanExecute(comm="kv", max_new_tokens=5), Review(comm="kv", max_new_tokens=5))]


@pytest.mark.parametrize("prim", PRIMS, ids=lambda p: p.method)
def test_the_final_deltas_are_the_answer_and_listening_changes_nothing(model, prim):
    heard = []
    res = prim("What is 12 times 7?", model=model, listener=lambda a, d, f: heard.append((a, d, f)))
    alone = prim("What is 12 times 7?", model=model)
    assert res.answer == alone.answer
    final = "".join(d for _, d, f in heard if f)
    assert final == res.answer and res.answer
    assert {a for a, _, f in heard if f} == {res.trace.steps[-1].agent}  # one agent answers


def test_a_listener_that_raises_stops_the_run(model):
    class Stop(Exception):
        pass

    def stop(agent, delta, final):
        raise Stop

    with pytest.raises(Stop):
        Single(max_new_tokens=6)("2+3?", model=model, listener=stop)


def test_text_stream_holds_back_a_possible_stop_string(model):
    s = TextStream(model, stop=("STOP",))
    ids = model.encode("hello STOP world")
    sent = "".join(s.push(i) for i in ids)
    assert "S" not in sent and sent + s.close("hello ") == "hello "

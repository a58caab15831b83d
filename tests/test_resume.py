"""A primitive continues from a saved LatentState (same model, checked); short reprs."""

import pytest

from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError, FingerprintMismatchError
from kvmas.primitives import Review, Single
from kvmas.testing import tiny_model


def test_a_run_continues_from_a_state_loaded_from_disk(tmp_path):
    m = tiny_model("llama")
    first = Single(max_new_tokens=4)("What is 2+3?", model=m)
    first.state.save(tmp_path / "s.safetensors")
    saved = LatentState.load(tmp_path / "s.safetensors", m)
    again = Review(rounds=1, max_new_tokens=3, latent_steps=1)("And 3+4?", model=m, state=saved)
    resume = again.trace.steps[0]
    assert resume.agent == "user" and resume.meta["resumed_from"] == first.state.length
    assert resume.reads == saved.segment_ids() and resume.usage.prefilled > 0
    # nothing saved is computed again: the resume step prefills its own turn alone, and the saved answer's
    # segment is still in the final state (the latent hand-off drops only the earlier role prompt)
    assert resume.usage.prefilled == len(m.encode(resume.text_in))
    assert saved.segments[-1].id in again.state.segment_ids()
    in_memory = Review(rounds=1, max_new_tokens=3, latent_steps=1)("And 3+4?", model=m, state=first.state)
    assert in_memory.answer == again.answer  # a state from disk is the state


def test_a_resumed_state_counts_as_reused_once_whoever_wrote_it():
    from kvmas.agents.state import LatentState

    m = tiny_model("llama")
    first = Single(max_new_tokens=4)("What is 2+3?", model=m)
    again = Single(max_new_tokens=2)("And 3+4?", model=m, state=first.state)  # the saved solver's name
    resume, rest = again.trace.steps[0], again.trace.steps[1:]
    assert resume.usage.reused == first.state.length  # read from the saved cache, not recomputed
    # later the solver reads the question turn this run wrote for it, and never the saved positions again
    assert sum(s.usage.reused for s in rest) == resume.usage.prefilled
    for prim in (Review(rounds=1, max_new_tokens=2, latent_steps=1), Review(comm="kv", rounds=1, max_new_tokens=2)):
        counts = set()
        for writer in ("solver", "critic", "someone"):  # whoever wrote the saved state: the same count
            saved = LatentState.empty(m).extend("Earlier: 2+3 is 5.", agent=writer)
            r = prim("And 3+4?", model=m, state=saved)
            assert r.trace.steps[0].usage.reused == saved.length
            counts.add(r.usage.reused)
        assert len(counts) == 1, (prim.method, counts)


def test_a_text_team_refuses_a_state_it_would_ignore():
    m = tiny_model("llama")
    first = Single(max_new_tokens=4)("What is 2+3?", model=m)
    with pytest.raises(BadInputError, match="text:review re-reads decoded text"):
        Review(comm="text", rounds=1, max_new_tokens=2)("And 3+4?", model=m, state=first.state)
    # one agent reads on top of its input in every mode
    again = Single(comm="text", max_new_tokens=2)("And 3+4?", model=m, state=first.state)
    assert first.state.segments[-1].id in again.state.segment_ids()
    assert again.trace.steps[0].usage.reused == first.state.length


def test_a_state_from_another_model_is_refused(tmp_path):
    llama, qwen = tiny_model("llama"), tiny_model("qwen")
    state = LatentState.empty(llama).extend("hello")
    with pytest.raises(FingerprintMismatchError):
        Single(max_new_tokens=2)("Q?", model=qwen, state=state)


def test_reprs_are_short():
    m = tiny_model("llama")
    r = Review(rounds=1, max_new_tokens=3, latent_steps=1)("What is 2+3?", model=m)
    for text in (repr(r), repr(r.state), repr(Review(rounds=1))):
        assert len(text) < 400 and "tensor" not in text and "Step(" not in text
    assert repr(r).startswith("RunResult(answer=") and "method='latent:review'" in repr(r)
    assert repr(Review(rounds=1)).startswith("Review(comm='latent'") and "rounds=1" in repr(Review(rounds=1))
    assert repr(r.state).startswith("LatentState(model=")

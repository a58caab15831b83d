"""A primitive continues from a saved LatentState (same model, checked); short reprs."""

import pytest

from kvmas.agents.state import LatentState
from kvmas.errors import FingerprintMismatchError
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

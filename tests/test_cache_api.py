"""kvmas calls transformers through the cache API it names today (``cache=``): no deprecation warning on any run."""

import logging
import warnings

import pytest
from transformers.utils import logging as hf_logging

from kvmas.agents.state import LatentState
from kvmas.primitives import PlanExecute, Review, Vote
from kvmas.testing import tiny_model


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_forwards_decoding_scoring_and_merges_warn_nothing(arch):
    model = tiny_model(arch)
    hf_logging.warning_once.cache_clear()  # a warning already given once would otherwise stay silent
    handler = _Collect()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # FutureWarning / DeprecationWarning from transformers fail the test
            s = LatentState.empty(model).extend("2+3?").think(2)
            s.speak(4)
            s.score(["yes", "no"])
            rows = s.fork(3).extend(["a", "bb", "ccc"]).think(1)
            for policy in ("shared", "rerotate", "reprefill"):
                rows.merge_rows(policy).extend("ok").speak(2)
            for prim in (Review(max_new_tokens=3, latent_steps=1, early_stop=True), Vote(n=2, max_new_tokens=3),
                         PlanExecute(comm="text", k=2, max_new_tokens=3), Vote(comm="kv", n=2, max_new_tokens=3)):
                prim.batch(["2+3?", "What is 4 times 5?"], model=model)
    finally:
        root.removeHandler(handler)
    assert not [m for m in handler.messages if "deprecat" in m.lower()], handler.messages

"""Organizer: pipeline specs (validated DAGs of primitives), the learning knowledge pool, and the Organizer.

>>> from kvmas.organizer import PipelineSpec
>>> PipelineSpec.chain(("vote", {"n": 3}), "review").describe()
'vote(n=3) -> review()'
"""

from kvmas.organizer.organizer import DEFAULT_SPEC, Decision, Organizer, feedback, run_auto
from kvmas.organizer.pool import Entry, Hit, KnowledgePool, infer_tags
from kvmas.organizer.spec import PRIMITIVE_PARAMS, Node, PipelineSpec

__all__ = ["PipelineSpec", "Node", "PRIMITIVE_PARAMS", "KnowledgePool", "Entry", "Hit", "infer_tags", "Organizer",
           "Decision", "DEFAULT_SPEC", "Pipeline", "run_pipeline", "run_pipeline_file", "run_auto", "feedback"]


def __getattr__(name):  # the executor imports the primitives (and torch) only when asked for
    if name == "Pipeline":
        from kvmas.organizer.pipeline import Pipeline

        return Pipeline
    if name in ("run_pipeline", "run_pipeline_file"):
        from kvmas.organizer.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(name)

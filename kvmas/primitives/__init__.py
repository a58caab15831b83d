"""The latent primitives and their text twins: Single, Review, Vote, PlanExecute, composed with Sequence.

>>> from kvmas.primitives import build
>>> build("review", comm="text", rounds=1).method
'text:review'
"""

from kvmas.errors import BadInputError
from kvmas.primitives.base import COMMS, Primitive, RunResult, Sequence
from kvmas.primitives.consistency import SelfConsistency
from kvmas.primitives.plan import PlanExecute
from kvmas.primitives.review import Review
from kvmas.primitives.single import Single
from kvmas.primitives.vote import Vote

PRIMITIVES: dict[str, type[Primitive]] = {"single": Single, "review": Review, "vote": Vote, "plan": PlanExecute,
                                          "consistency": SelfConsistency}


def build(type_name: str, **params) -> Primitive:
    """A primitive from its name and parameters (as in a pipeline spec node)."""
    cls = PRIMITIVES.get(type_name)
    if cls is None:
        raise BadInputError(f"unknown primitive {type_name!r} (one of {', '.join(PRIMITIVES)})")
    try:
        return cls(**params)
    except TypeError as exc:
        raise BadInputError(f"bad parameters for {type_name}: {exc}") from exc


def parse_method(method: str, **params) -> Primitive:
    """``single``, ``latent:review``, ``text:vote``, ... -> a primitive (``comm:name``, comm defaults latent)."""
    comm, _, name = method.rpartition(":")
    return build(name, **({"comm": comm} if comm else {}), **params)


__all__ = ["COMMS", "Primitive", "RunResult", "Sequence", "Single", "Review", "Vote", "PlanExecute", "SelfConsistency", "PRIMITIVES",
           "build", "parse_method"]

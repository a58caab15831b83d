"""What the ``model`` field of a request names: a primitive (``single``, ``latent:review``, ``text:vote``, any
``comm:name`` the primitives accept), ``auto`` (the organizer picks a pipeline) or a pipeline registered at
start-up. The backing LLM is the server's; a method is built per request with that request's budget.

>>> table = Methods()
>>> table.resolve("text:review", max_new_tokens=4).method
'text:review'
>>> "latent:vote" in table.names()
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kvmas.errors import BadInputError
from kvmas.primitives import PRIMITIVES, parse_method
from kvmas.primitives.base import Primitive
from kvmas.primitives.run import TEAM_SYSTEM, Output, RunResult, close_run, open_run
from kvmas.trace import COMMS


class UnknownMethod(BadInputError):
    """The ``model`` of a request names nothing this server runs (an HTTP 404, as OpenAI answers)."""


@dataclass
class Runner:
    """One request's method: ``run(model, question, seed=, listener=, system=) -> RunResult``."""

    method: str
    run: Callable[..., RunResult]


def _primitive_runner(prim: Primitive) -> Runner:
    def run(model, question: str, *, seed: int = 0, listener=None, system: str | None = None) -> RunResult:
        # the lifecycle Primitive.__call__ uses, with the request's system prompt when it sends one
        ctx = open_run(model, question, method=prim.method, params=prim.params(), seed=seed, listener=listener,
                       positions=prim.positions_needed(len(model.encode(question))),
                       system=system or TEAM_SYSTEM)
        return close_run(ctx, prim.forward(ctx, Output.start(model), final=True))

    return Runner(prim.method, run)


@dataclass
class Methods:
    """The names a server answers to. ``pipelines``: name -> ``PipelineSpec`` registered at start-up;
    ``pool``: the knowledge pool ``auto`` chooses from (None: no ``auto``)."""

    pipelines: dict[str, Any] = field(default_factory=dict)
    pool: Any = None

    def names(self) -> list[str]:
        """Every name ``GET /v1/models`` lists (each primitive in every comm mode, ``kvmas.trace.COMMS``)."""
        out = ["single"] + [f"{c}:{p}" for p in PRIMITIVES if p != "single" for c in COMMS]
        return out + (["auto"] if self.pool is not None else []) + sorted(self.pipelines)

    def resolve(self, name: str, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Runner:
        """The runner ``name`` names, built with this request's budget; :class:`UnknownMethod` otherwise."""
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if not isinstance(name, str) or not name:
            raise UnknownMethod("model must name a method (e.g. single, latent:review, text:vote, auto)")
        if name in self.pipelines:
            from kvmas.organizer.pipeline import Pipeline

            return _primitive_runner(Pipeline(self.pipelines[name].with_params(**params)))
        if name == "auto":
            if self.pool is None:
                raise UnknownMethod("auto is not served here (the server was started without a pool)")
            return self._auto(params)
        try:
            return _primitive_runner(parse_method(name, **params))
        except BadInputError as exc:  # an unknown comm mode or primitive: the primitives' own checks say which
            raise UnknownMethod(f"unknown model {name!r}: {exc} (GET /v1/models lists what runs here)") from exc

    def _auto(self, params: dict) -> Runner:
        from kvmas.organizer import Organizer

        org = Organizer(self.pool, node_params=params)

        def run(model, question: str, *, seed: int = 0, listener=None, system: str | None = None) -> RunResult:
            if system:
                raise BadInputError("auto runs the organizer's pipelines with their own system prompt; "
                                    "send no system message")
            return org.run(question, model=model, seed=seed, listener=listener)

        return Runner("auto", run)

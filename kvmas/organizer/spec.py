"""Pipeline specs: a validated DAG of primitive nodes, stored as JSON (never executed as code).

A node names a primitive (``single | review | vote | plan``) and its parameters; edges pass the latent state
from one node to the next. A node with several inputs merges them with its ``merge`` policy (see
``LatentState.merge``). Validation: unique node ids, known types, parameter names, types and bounds, edges
between existing nodes, no cycles, exactly one sink. Every error names the offending field
(``nodes[1].params.rounds: ...``).

>>> from kvmas.organizer.spec import PipelineSpec
>>> spec = PipelineSpec.chain(("plan", {"k": 3}), ("review", {"rounds": 2}))
>>> spec.describe()
'plan(k=3) -> review(rounds=2)'
>>> PipelineSpec.from_json(spec.to_json()) == spec
True
>>> PipelineSpec.from_dict({"nodes": [{"id": "a", "type": "debate"}]})
Traceback (most recent call last):
...
kvmas.errors.BadInputError: invalid pipeline spec: nodes[0].type: unknown primitive 'debate' (known: single, review, vote, plan, consistency)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvmas.errors import BadInputError
from kvmas.paths import atomic_write_text, loads_json
from kvmas.trace import COMMS

SPEC_VERSION = 1
MAX_NODES = 32
MergePolicy = Literal["shared", "rerotate", "reprefill"]


@dataclass(frozen=True)
class Param:
    """Type and bounds of one primitive parameter."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any) -> str | None:
        """An error message for ``value``, or None when it is acceptable."""
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"expected an integer, got {type(value).__name__} {value!r}"
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"expected a number, got {type(value).__name__} {value!r}"
        if self.kind is str and not isinstance(value, str):
            return f"expected a string, got {type(value).__name__} {value!r}"
        if self.kind is bool and not isinstance(value, bool):
            return f"expected true/false, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.lo is not None and value < self.lo:
            return f"must be >= {self.lo:g}, got {value}"
        if self.hi is not None and value > self.hi:
            return f"must be <= {self.hi:g}, got {value}"
        return None


_COMMON = {
    "comm": Param(str, choices=COMMS),
    "latent_steps": Param(int, 0, 256),
    "max_new_tokens": Param(int, 1, 4096),
    "temperature": Param(float, 0.0, 2.0),
    "top_p": Param(float, 0.0, 1.0),
}

#: Parameters each primitive accepts in a spec (names, types, bounds). Kept in step with kvmas.primitives.
PRIMITIVE_PARAMS: dict[str, dict[str, Param]] = {
    "single": dict(_COMMON),
    "review": {**_COMMON, "rounds": Param(int, 1, 8), "early_stop": Param(bool),
               "stop_margin": Param(float, 0.0, 100.0), "draft": Param(str, choices=("question", "solver"))},
    "vote": {**_COMMON, "n": Param(int, 1, 16), "merge_policy": Param(str, choices=("shared", "rerotate", "reprefill")),
             "aggregate": Param(str, choices=("selector", "majority", "likelihood")),
             "candidates": Param(str, choices=("persona", "question"))},
    "plan": {**_COMMON, "k": Param(int, 1, 16), "merge_policy": Param(str, choices=("shared", "rerotate", "reprefill"))},
    "consistency": {**_COMMON, "n": Param(int, 1, 16)},
}


class Node(BaseModel):
    """One primitive in the pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    merge: MergePolicy = "shared"

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.type}({inner})"


class PipelineSpec(BaseModel):
    """A DAG of primitive nodes; ``edges`` are ``[from_id, to_id]`` pairs; one sink gives the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = SPEC_VERSION
    nodes: tuple[Node, ...] = Field(min_length=1, max_length=MAX_NODES)
    edges: tuple[tuple[str, str], ...] = ()

    @model_validator(mode="after")
    def _validate(self) -> "PipelineSpec":
        if self.version > SPEC_VERSION:
            raise ValueError(f"version: spec version {self.version} is newer than this kvmas reads ({SPEC_VERSION})")
        ids: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.id in ids:
                raise ValueError(f"nodes[{i}].id: duplicate node id {node.id!r}")
            ids[node.id] = i
            schema = PRIMITIVE_PARAMS.get(node.type)
            if schema is None:
                raise ValueError(f"nodes[{i}].type: unknown primitive {node.type!r} "
                                 f"(known: {', '.join(PRIMITIVE_PARAMS)})")
            for name, value in node.params.items():
                if name not in schema:
                    raise ValueError(f"nodes[{i}].params.{name}: unknown parameter of {node.type} "
                                     f"(known: {', '.join(sorted(schema))})")
                msg = schema[name].check(value)
                if msg:
                    raise ValueError(f"nodes[{i}].params.{name}: {msg}")
        seen: set[tuple[str, str]] = set()
        for j, (src, dst) in enumerate(self.edges):
            for side, end in ((0, src), (1, dst)):
                if end not in ids:
                    raise ValueError(f"edges[{j}][{side}]: no node with id {end!r}")
            if src == dst:
                raise ValueError(f"edges[{j}]: self-loop on {src!r}")
            if (src, dst) in seen:
                raise ValueError(f"edges[{j}]: duplicate edge {src!r} -> {dst!r}")
            seen.add((src, dst))
        g = self.graph()
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            path = " -> ".join([e[0] for e in cycle] + [cycle[-1][1]])
            raise ValueError(f"edges: cycle {path}")
        sinks = [n for n in g.nodes if g.out_degree(n) == 0]
        if len(sinks) != 1:
            raise ValueError(f"edges: a pipeline needs exactly one sink (a node without outgoing edges), "
                             f"found {len(sinks)}: {', '.join(sorted(sinks))}")
        return self

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> "PipelineSpec":
        """Validate a plain dict (e.g. parsed JSON); errors become :class:`BadInputError` with a field path."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BadInputError(f"invalid pipeline spec: {_first_error(exc)}") from None

    @classmethod
    def from_json(cls, text: str) -> "PipelineSpec":
        """Parse and validate JSON text."""
        return cls.from_dict(loads_json(text, "invalid pipeline spec"))

    @classmethod
    def chain(cls, *steps: tuple[str, dict[str, Any]] | str) -> "PipelineSpec":
        """A linear pipeline: ``chain("plan", ("review", {"rounds": 2}))``; node ids ``n0, n1, ...``."""
        nodes = []
        for i, step in enumerate(steps):
            typ, params = (step, {}) if isinstance(step, str) else step
            nodes.append({"id": f"n{i}", "type": typ, "params": dict(params)})
        edges = [(f"n{i}", f"n{i + 1}") for i in range(len(nodes) - 1)]
        return cls.from_dict({"nodes": nodes, "edges": edges})

    @classmethod
    def load(cls, path: str | Path) -> "PipelineSpec":
        """Read and validate a spec JSON file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadInputError(f"pipeline spec not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInputError(f"unreadable pipeline spec {path}: {exc}") from None
        try:
            return cls.from_json(text)
        except BadInputError as exc:
            raise BadInputError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (atomically)."""
        return atomic_write_text(path, self.to_json(indent=2))

    def to_json(self, indent: int | None = None) -> str:
        return self.model_dump_json(indent=indent)

    # -- views -------------------------------------------------------------------------------
    def graph(self) -> nx.DiGraph:
        """The spec as a networkx DiGraph (node attribute ``node`` holds the :class:`Node`)."""
        g = nx.DiGraph()
        for node in self.nodes:
            g.add_node(node.id, node=node)
        g.add_edges_from(self.edges)
        return g

    @property
    def sink(self) -> str:
        g = self.graph()
        return next(n for n in g.nodes if g.out_degree(n) == 0)

    def order(self) -> list[str]:
        """Node ids in a deterministic topological order (ties broken by declaration order)."""
        pos = {n.id: i for i, n in enumerate(self.nodes)}
        return list(nx.lexicographical_topological_sort(self.graph(), key=lambda n: pos[n]))

    def describe(self) -> str:
        """A one-line human description: ``plan(k=3) -> review(rounds=2)``; branches in braces."""
        g = self.graph()
        by_id = {n.id: n for n in self.nodes}
        if all(g.out_degree(n) <= 1 and g.in_degree(n) <= 1 for n in g.nodes):
            return " -> ".join(by_id[n].describe() for n in self.order())
        parts = []
        for nid in self.order():
            preds = sorted(g.predecessors(nid))
            src = f"[{', '.join(preds)}] => " if preds else ""
            parts.append(f"{nid}: {src}{by_id[nid].describe()}")
        return "; ".join(parts)

    def types(self) -> list[str]:
        return [self.nodes[i].type for i in range(len(self.nodes))]

    def with_params(self, **params: Any) -> "PipelineSpec":
        """The same DAG with ``params`` set on every node that accepts them (e.g. ``comm="text"``)."""
        return self._set(params, keep_own=False)

    def with_defaults(self, **params: Any) -> "PipelineSpec":
        """The same DAG with ``params`` set on every node that accepts them and does not set them already
        (a learned ``vote(comm=kv)`` keeps its ``kv``; a node with no ``comm`` takes the one given)."""
        return self._set(params, keep_own=True)

    def _set(self, params: dict[str, Any], keep_own: bool) -> "PipelineSpec":
        nodes = []
        for n in self.nodes:
            extra = {k: v for k, v in params.items()
                     if k in PRIMITIVE_PARAMS[n.type] and not (keep_own and k in n.params)}
            nodes.append(n.model_copy(update={"params": {**n.params, **extra}}).model_dump())
        return PipelineSpec.from_dict({"version": self.version, "nodes": nodes, "edges": self.edges})


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    return f"{loc}: {msg}" if loc else msg

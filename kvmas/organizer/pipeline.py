"""Running a :class:`PipelineSpec`: a DAG of primitives over one shared latent state (or message list).

Nodes run in a deterministic topological order. A node with no inputs starts from the empty state (its
primitive prefills the question once); a node with one input continues that node's output state; a node with
several inputs (fan-in) reads their outputs merged by its ``merge`` policy (``LatentState.merge``: ``shared``
keeps each branch at the positions it was computed at, ``rerotate`` lays branches end to end with re-rotated
keys, ``reprefill`` recomputes them exactly). Fan-out hands the same immutable state to every successor.
In text mode a node sees the messages of its ancestors only (branches' messages are joined at fan-in, shared
history once). Only the sink speaks the final answer; every other node leaves its work for its successors.

>>> from kvmas.organizer.pipeline import Pipeline
>>> from kvmas.organizer.spec import PipelineSpec
>>> Pipeline(PipelineSpec.chain(("vote", {"n": 2}), "single")).method
'latent:vote>single'
"""

from __future__ import annotations

from kvmas.agents.agent import Agent, RunContext
from kvmas.agents.state import LatentState
from kvmas.organizer.spec import PipelineSpec
from kvmas.primitives import build
from kvmas.primitives.base import Primitive, chained_kv_positions
from kvmas.primitives.run import Message, Output, merge_facts


def build_node(node) -> Primitive:
    """The primitive a spec node names (through ``kvmas.primitives.build``)."""

    return build(node.type, **node.params)


def _join_messages(lists: list[tuple[Message, ...]]) -> tuple[Message, ...]:
    """Concatenate branch histories, keeping their shared prefix once."""
    out = list(lists[0])
    for other in lists[1:]:
        common = 0
        while common < min(len(out), len(other)) and out[common] is other[common]:
            common += 1
        out.extend(other[common:])
    return tuple(out)


class Pipeline(Primitive):
    """A validated DAG of primitives, callable like any primitive: ``Pipeline(spec)(question, model=m)``."""

    name = "pipeline"

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.order = spec.order()
        self.nodes = {n.id: n for n in spec.nodes}
        self.prims = {n.id: build_node(n) for n in spec.nodes}
        sink = self.prims[spec.sink]
        super().__init__(comm=sink.comm, latent_steps=max(p.latent_steps for p in self.prims.values()),
                         max_new_tokens=max(p.max_new_tokens for p in self.prims.values()))
        self.graph = spec.graph()

    @property
    def method(self) -> str:
        if all(self.graph.in_degree(n) <= 1 and self.graph.out_degree(n) <= 1 for n in self.order):
            return ">".join(self.prims[n].method for n in self.order)
        return "dag:" + ",".join(f"{n}={self.prims[n].method}" for n in self.order)

    def params(self) -> dict:
        return {"pipeline": self.spec.model_dump(mode="json")}

    def positions_needed(self, question_tokens: int) -> int:
        return question_tokens + sum(p.positions_needed(0) for p in self.prims.values())

    def kv_positions(self, question_tokens: int) -> int:
        return chained_kv_positions(question_tokens, [self.prims[n] for n in self.order])

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        outs: dict[str, Output] = {}
        sink = self.spec.sink
        for nid in self.order:
            prim, node = self.prims[nid], self.nodes[nid]
            preds = list(self.graph.predecessors(nid))
            if not preds:
                x = inp
            elif len(preds) == 1:
                x = outs[preds[0]]
            else:  # fan-in: branch states merged for a latent reader, branch messages joined for a text one
                branches = [outs[p] for p in preds]
                state = LatentState.empty(ctx.model)
                if any(b.state.length for b in branches) and prim.comm == "latent":
                    merger = Agent(f"pipeline:{nid}", role="merge")
                    rows = [merger.merge(ctx, b.state, node.merge) if b.state.rows > 1 else b.state
                            for b in branches]
                    state = merger.merge(ctx, rows, node.merge)
                x = Output(state=state, messages=_join_messages([b.messages for b in branches]),
                           answer=branches[-1].answer, facts=merge_facts(*(b.facts for b in branches)))
            if prim.comm == "text" and x.state.length:
                x = x.then(LatentState.empty(ctx.model))  # text mode re-reads messages, never KV
            outs[nid] = prim.forward(ctx, x, final=final and nid == sink)
        return outs[sink]


def run_pipeline(spec: PipelineSpec | str, question: str, model=None, *, seed: int = 0, **kwargs):
    """Run a spec (or a path to a spec JSON file) on one question; returns the primitives' ``RunResult``."""
    if not isinstance(spec, PipelineSpec):
        spec = PipelineSpec.load(spec)
    return Pipeline(spec)(question, model=model, seed=seed, **kwargs)

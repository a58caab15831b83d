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

import time

from kvmas.agents.agent import RunContext
from kvmas.agents.state import LatentState
from kvmas.organizer.spec import PipelineSpec
from kvmas.primitives.base import Primitive
from kvmas.trace import Step, Usage


def build_node(node) -> Primitive:
    """The primitive a spec node names (through ``kvmas.primitives.build``)."""
    from kvmas.primitives import build

    return build(node.type, **node.params)


def _join_messages(lists: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Concatenate branch histories, keeping their shared prefix once."""
    out = list(lists[0])
    for other in lists[1:]:
        common = 0
        while common < min(len(out), len(other)) and out[common] is other[common]:
            common += 1
        out.extend(other[common:])
    return out


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

    def _merge(self, ctx: RunContext, nid: str, branches: list[LatentState], policy: str) -> LatentState:
        """Fan-in: merge single-row branch outputs (multi-row outputs are first merged row-wise)."""
        t0 = time.perf_counter()
        branches = [b.merge_rows(policy) if b.rows > 1 else b for b in branches]
        merged = LatentState.merge(branches, policy=policy)
        _merge_step(ctx, nid, branches, merged, policy, time.perf_counter() - t0)
        return merged

    def forward(self, ctx: RunContext, state: LatentState, final: bool = True) -> LatentState:
        out_state: dict[str, LatentState] = {}
        out_msgs: dict[str, list[tuple[str, str]]] = {}
        start_msgs = list(ctx.messages)
        sink = self.spec.sink
        for nid in self.order:
            prim, node = self.prims[nid], self.nodes[nid]
            preds = list(self.graph.predecessors(nid))
            if not preds:
                inp, msgs = state, start_msgs
            elif len(preds) == 1:
                inp, msgs = out_state[preds[0]], out_msgs[preds[0]]
            else:
                branches = [out_state[p] for p in preds]
                if any(b.length for b in branches) and prim.comm == "latent":
                    inp = self._merge(ctx, nid, branches, node.merge)
                else:
                    inp = LatentState.empty(ctx.model)
                msgs = _join_messages([out_msgs[p] for p in preds])
            if prim.comm == "text" and inp.length:
                inp = LatentState.empty(ctx.model)  # text mode re-reads messages, never KV
            ctx.messages = list(msgs)
            out_state[nid] = prim.forward(ctx, inp, final=final and nid == sink)
            out_msgs[nid] = list(ctx.messages)
        ctx.messages = out_msgs[sink]
        return out_state[sink]


def _merge_step(ctx: RunContext, nid: str, branches: list[LatentState], merged: LatentState, policy: str,
                wall_s: float) -> None:
    common = set.intersection(*(set(b.segment_ids()) for b in branches))
    prefix = sum(seg.length for seg in merged.segments if seg.id in common)
    recomputed = merged.length - prefix if policy == "reprefill" else 0
    ctx.trace.add(Step(agent=f"pipeline:{nid}", role="merge", action="merge",
                       reads=sorted({i for b in branches for i in b.segment_ids()}), writes=merged.segment_ids(),
                       usage=Usage(prefilled=recomputed), wall_s=wall_s,
                       meta={"policy": policy, "branches": len(branches), "columns": merged.length}))


def run_pipeline(spec: PipelineSpec | str, question: str, model=None, *, seed: int = 0, **kwargs):
    """Run a spec (or a path to a spec JSON file) on one question; returns the primitives' ``RunResult``."""
    if not isinstance(spec, PipelineSpec):
        spec = PipelineSpec.load(spec)
    return Pipeline(spec)(question, model=model, seed=seed, **kwargs)

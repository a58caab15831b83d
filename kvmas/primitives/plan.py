"""PlanExecute: a planner writes a (latent) plan; K executors work on it as batch rows; an integrator merges."""

from __future__ import annotations

from kvmas.agents.agent import Agent, RunContext
from kvmas.agents.state import MERGE_POLICIES, LatentState
from kvmas.errors import BadInputError
from kvmas.primitives.base import Output, Primitive, check_param

PLAN = "You are the Planner. Break the problem into a short numbered list of steps. Do not solve it yet."
EXECUTE = ("You are Executor {i} of {k}. Follow the plan and carry out the work, paying special attention to "
           "step {i} of the plan, and state the result you get.")
INTEGRATE = ("You are the Integrator. Using the plan and the executors' work as a reference, solve the problem step "
             "by step and give the final answer in the format the problem asks for.")


class PlanExecute(Primitive):
    """Planner -> K executors (default 3, batch rows reading the plan) -> integrator reading all of them.

    No executor is thrown away: their rows are merged (``merge_policy``, default ``shared``) into the
    integrator's context in latent mode, and all their texts are shown to it in text mode. KV: the plan and
    the executors' work are decoded into the shared state (executors as rows, merged) and read there.
    """

    name = "plan"

    def __init__(self, comm="latent", k: int = 3, merge_policy: str = "shared", **kw):
        super().__init__(comm=comm, **kw)
        self.k = check_param("k", k)
        if merge_policy not in MERGE_POLICIES:
            raise BadInputError(f"unknown merge policy {merge_policy!r} (one of {', '.join(MERGE_POLICIES)})")
        self.merge_policy = merge_policy

    def params(self) -> dict:
        return {**super().params(), "k": self.k, "merge_policy": self.merge_policy}

    def positions_needed(self, question_tokens: int) -> int:
        return question_tokens + 256 + (self.k + 1) * self.turn_positions() + self.max_new_tokens

    def kv_positions(self, question_tokens: int) -> int:
        executors = self.k * (question_tokens + 256 + 2 * self.turn_positions())  # each forks the plan
        return self.positions_needed(question_tokens) + executors

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        kw = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                  latent_steps=self.latent_steps)
        planner, executors, integrator = Agent("planner", **kw), Agent("executors", role="executor", **kw), \
            Agent("integrator", **kw)
        tasks = [EXECUTE.format(i=i + 1, k=self.k) for i in range(self.k)]
        if self.comm == "latent":
            state = self.shared_prefix(ctx, inp)
            state = planner.think(ctx, planner.read(ctx, state, PLAN))
            merged = self.fan_out(ctx, self.handoff(state), executors, tasks, self.merge_policy)
            state = integrator.read(ctx, merged, self.final_instruction(ctx, INTEGRATE), fresh=False)
            return self.conclude(ctx, integrator, inp, state, speak=final)
        if self.comm == "kv":
            state = planner.read(ctx, self.shared_prefix(ctx, inp), PLAN)
            _, state = planner.speak(ctx, state, close_turn=True)
            rows = executors.read(ctx, state.fork(self.k), tasks, fresh=False)
            _, rows = executors.speak(ctx, rows, close_turn=True)
            state = integrator.read(ctx, executors.merge(ctx, rows, self.merge_policy),
                                    self.final_instruction(ctx, INTEGRATE), fresh=False)
            return self.conclude(ctx, integrator, inp, state, speak=True, final=final, label="Integrated solution")
        base = LatentState.empty(ctx.model)
        plan, _ = planner.speak(ctx, planner.read(ctx, base, self.text_context(ctx, inp) + "\n\n" + PLAN))
        shown = [("Planner's plan", plan)]
        prompts = [self.text_context(ctx, inp, shown) + "\n\n" + t for t in tasks]
        results, _ = executors.speak(ctx, executors.read(ctx, base.fork(self.k), prompts))
        results = results if isinstance(results, list) else [results]
        shown += [(f"Executor {i + 1}'s work", r) for i, r in enumerate(results)]
        state = integrator.read(ctx, base, self.text_context(ctx, inp, shown) + "\n\n"
                                + self.final_instruction(ctx, INTEGRATE))
        return self.conclude(ctx, integrator, inp, state, speak=True, final=final, label="Integrated solution")

"""Run one episode of a text environment with the acting policy (and optionally a skill memory); the record
is a kvmas :class:`~kvmas.trace.Trace` whose steps carry the exact prompt inputs for replay.

>>> import random
>>> from kvmas.testing import tiny_model
>>> from kvmas.memory.envs import make_env
>>> from kvmas.memory.policy import ActionPolicy
>>> from kvmas.memory.episode import run_episode
>>> tr = run_episode(make_env("codebreaker", 1), ActionPolicy(tiny_model()), None, random.Random(0))
>>> tr.outcome["n_steps"] == len(tr.steps) > 0
True
"""

from __future__ import annotations

import random
import time
from kvmas.memory.policy import ActionPolicy, StepInputs, sample
from kvmas.memory.runtime import SkillMemory, step_hint
from kvmas.trace import Step, Trace, Usage


STEP_COST = 0.02  # per action: among successes, the shorter procedure is the better one


def episode_return(outcome: dict, step_cost: float = STEP_COST) -> float:
    """What learning credits an episode with: the environment's reward minus a small cost per step.

    With the reward alone, a family the policy always solves gives every transition the same advantage, so
    the gate has no contrast to judge a candidate by (it defers forever); the step cost ranks those episodes
    by how directly they got there — what a procedure is for.

    >>> episode_return({"reward": 1.0, "n_steps": 6}), episode_return({"reward": 0.0, "n_steps": 10})
    (0.88, -0.2)
    """
    return round(float(outcome.get("reward", 0.0)) - step_cost * int(outcome.get("n_steps", 0)), 10)


def run_episode(env, policy: ActionPolicy, memory: SkillMemory | None, rng: random.Random, *,
                greedy: bool = False, iteration: int = 0) -> Trace:
    """Play one episode; actions are sampled from the policy (or argmax when ``greedy``)."""
    t0 = time.perf_counter()
    obs = env.reset()
    trace = Trace(method=f"skills:{env.name}", question=env.task, seed=env.seed,
                  model={"name": policy.model.name, "key": policy.model.fingerprint.key},
                  params={"split": env.split, "task_family": env.task_family, "greedy": greedy,
                          "iteration": iteration, "kv_prefix": policy.kv_prefix})
    history: list[list[str]] = []
    active, age, since, invocations, done_ids = None, 0, 0, [], set()
    reward, done = 0.0, False
    while not done:
        selected = False
        admissible = env.admissible()
        actions = [a for a, _ in history]
        transcript = " ".join(o for _, o in history)
        hint = None
        if memory is not None:
            if active is not None:
                hint = step_hint(active, actions[since:], admissible, env.slots)
                why = memory.stop_reason(active, env.task, f"{transcript} {obs}", age, env.slots, hint)
                if why:
                    invocations[-1]["ended_by"] = why
                    done_ids.add(active.id)
                    active = None
            if active is None:
                active, sel = memory.select(env.task, f"{transcript} {obs}", rng, exclude=done_ids)
                selected = True
                age, since = 0, len(history)
                if active is not None:
                    invocations.append({"skill_id": active.id, "source": active.source, "t_start": len(trace.steps),
                                        "ended_by": "env_done", "select": sel})
                    hint = step_hint(active, [], admissible, env.slots)
        inputs = StepInputs(task=env.task, history=history, obs=obs, admissible=admissible, hint=hint)
        ts = time.perf_counter()
        scored = policy.score(inputs, active.render() if active else None)
        idx = max(range(len(scored.logp)), key=lambda i: scored.logp[i]) if greedy else sample(scored.logp, rng)
        action = inputs.admissible[idx]
        res = env.step(action)
        trace.add(Step(
            agent="actor", role="actor", action="score", text_in=obs, text_out=action,
            usage=Usage(prefilled=scored.prefilled, reused=scored.reused), wall_s=time.perf_counter() - ts,
            meta={"inputs": inputs.model_dump(), "choice": idx, "logp": scored.logp[idx],
                  "skill_id": active.id if active else None, "skill_source": active.source if active else None,
                  "skill_tokens": scored.skill_tokens, "skill_since": since, "context": scored.context,
                  "selected": selected,
                  "event": res.event, "obs_after": res.obs, "reward": res.reward, "slots": env.slots},
        ))
        history = history + [[action, res.obs]]
        obs, reward, done = res.obs, res.reward, res.done
        age += 1
    trace.answer = trace.steps[-1].text_out
    trace.outcome = {"reward": reward, "success": reward > 0, "n_steps": len(trace.steps),
                     "task_family": env.task_family, "invocations": invocations}
    trace.wall_s = time.perf_counter() - t0
    return trace

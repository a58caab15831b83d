"""Run one episode of a text environment with the acting policy (and optionally a skill memory); the record
is a kvmas :class:`~kvmas.trace.Trace` whose steps carry the exact prompt inputs for replay.

>>> import random
>>> from kvmas.testing import tiny_model
>>> from kvmas.envs import make_env
>>> from kvmas.memory.policy import ActionPolicy
>>> from kvmas.memory.episode import run_episode
>>> tr = run_episode(make_env("codebreaker", 1), ActionPolicy(tiny_model()), None, random.Random(0))
>>> tr.outcome["n_steps"] == len(tr.steps) > 0
True
>>> from kvmas.memory.episode import play_script
>>> env = make_env("house", 1)
>>> play_script(env, ["look"]).steps[0].meta["template"]
'look'
"""

from __future__ import annotations

import random
import time

from kvmas.envs.base import abstract
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
    """Play one episode of ``env`` (a :class:`~kvmas.envs.base.TextEnv`); actions are sampled from the policy
    (or argmax when ``greedy``). The world is closed afterwards, whatever happens.

    Every step records the skill active when the action was chosen (``skill_id``, ``skill_name``,
    ``skill_source``; None without one), the step hint it gave, and the action as a skill would write it
    (``template``: the world's own ``template(action)`` when it has one, else the slots abstracted)."""
    try:
        return _play(env, policy, memory, rng, greedy=greedy, iteration=iteration)
    finally:
        close = getattr(env, "close", None)
        if close is not None:
            close()


def play_script(env, actions: list[str]) -> Trace:
    """Play ``actions`` in ``env`` (a gold walkthrough, a scripted plan) with no model: a trace of the shape
    :func:`run_episode` writes (template, event, slots, observation after each step), for extraction and its
    checks. Decisions carry no log-prob or model key, so the gate never replays them. Stops when the episode
    ends; the world is closed afterwards."""
    try:
        obs = env.reset()
        template = getattr(env, "template", None)
        trace = Trace(method=f"skills:{env.name}", question=env.task, seed=env.seed,
                      params={"split": env.split, "task_family": env.task_family, "script": True})
        history: list[list[str]] = []
        last = None
        for action in actions:
            admissible = env.admissible()
            inputs = StepInputs(task=env.task, history=history, obs=obs, admissible=admissible)
            slots = env.slots
            tpl = template(action) if template is not None else abstract(action, slots)
            last = env.step(action)
            trace.add(Step(agent="actor", role="actor", action="script", text_in=obs, text_out=action,
                           meta={"inputs": inputs.model_dump(), "choice": admissible.index(action),
                                 "skill_id": None, "skill_name": None, "skill_source": None, "template": tpl,
                                 **_result_meta(last, slots)}))
            history = history + [[action, last.obs]]
            obs = last.obs
            if last.done:
                break
        trace.answer = trace.steps[-1].text_out if trace.steps else None
        trace.outcome = _outcome(last, len(trace.steps), env.task_family, [])
        return trace
    finally:
        close = getattr(env, "close", None)
        if close is not None:
            close()


def _result_meta(res, slots: dict[str, str]) -> dict:
    return {"event": res.event, "obs_after": res.obs, "reward": res.reward, "score": res.score, "slots": slots}


def _outcome(last, n_steps: int, family: str, invocations: list) -> dict:
    reward = last.reward if last is not None else 0.0
    won = reward > 0 if last is None or last.won is None else bool(last.won)
    score = reward if last is None or last.score is None else last.score
    return {"reward": reward, "success": won, "score": score, "n_steps": n_steps, "task_family": family,
            "invocations": invocations}


def _play(env, policy: ActionPolicy, memory: SkillMemory | None, rng: random.Random, *, greedy: bool,
          iteration: int) -> Trace:
    t0 = time.perf_counter()
    obs = env.reset()
    template = getattr(env, "template", None)
    trace = Trace(method=f"skills:{env.name}", question=env.task, seed=env.seed,
                  model={"name": policy.model.name, "key": policy.model.fingerprint.key},
                  params={"split": env.split, "task_family": env.task_family, "greedy": greedy,
                          "iteration": iteration, "kv_prefix": policy.kv_prefix})
    history: list[list[str]] = []
    active, age, since, invocations, done_ids = None, 0, 0, [], set()
    done = False
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
                active, sel = memory.select(env.task, f"{transcript} {obs}", rng, exclude=done_ids,
                                            admissible=admissible, slots=env.slots)
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
        slots = env.slots  # as they were when the action was chosen (a step may bind new ones)
        tpl = template(action) if template is not None else abstract(action, slots)
        res = env.step(action)
        trace.add(Step(
            agent="actor", role="actor", action="score", text_in=obs, text_out=action,
            usage=Usage(prefilled=scored.prefilled, reused=scored.reused), wall_s=time.perf_counter() - ts,
            meta={"inputs": inputs.model_dump(), "choice": idx, "logp": scored.logp[idx],
                  "skill_id": active.id if active else None, "skill_name": active.name if active else None,
                  "skill_source": active.source if active else None,
                  "skill_tokens": scored.skill_tokens, "skill_since": since, "context": scored.context,
                  "selected": selected, "template": tpl, **_result_meta(res, slots)},
        ))
        history = history + [[action, res.obs]]
        obs, done, last = res.obs, res.done, res
        age += 1
    trace.answer = trace.steps[-1].text_out
    trace.outcome = _outcome(last, len(trace.steps), env.task_family, invocations)
    trace.wall_s = time.perf_counter() - t0
    return trace

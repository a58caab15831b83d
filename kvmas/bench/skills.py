"""`kvmas skills eval`: build skill pools, freeze them, evaluate on held-out seeds paired across conditions.

Conditions: ``none`` (no memory), ``ours`` (extract + critic + gate + probation + maintenance), ``nogate``
(same, every candidate accepted), ``seeds`` (the hand-written seed skills only).

Metrics per condition (definitions):
- success rate with a 95% Wilson interval; paired difference vs ``none`` (same seeds) with a normal 95% CI;
- episode reuse rate: share of episodes with >= 1 activation of a *learned* skill (source != seed);
- step reuse rate: steps executed under a learned skill / all steps; skill step share: under any skill;
- extra prompt tokens per step: skill-block tokens in context, averaged over all steps;
- prefilled tokens per step with the cached KV prefix vs with the text block (activation prefill cost);
- active pool tokens: model tokens of the rendered live skills; gate pass rate: accepted / gated.

>>> from kvmas.bench.skills import CONDITIONS
>>> CONDITIONS
('none', 'ours', 'nogate', 'seeds')
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Callable

from pydantic import BaseModel, Field

from kvmas.memory.envs import make_env
from kvmas.memory.episode import run_episode
from kvmas.memory.gate import GateConfig
from kvmas.memory.lifecycle import LearnConfig, Learner
from kvmas.memory.policy import ActionPolicy, StepInputs
from kvmas.memory.runtime import SkillMemory
from kvmas.memory.store import SkillStore
from kvmas.stats import wilson

CONDITIONS = ("none", "ours", "nogate", "seeds")
EVAL_SEED_BASE = 100_000  # held out: build seeds start at 0


class EvalConfig(BaseModel):
    env: str = "house"
    split: str = "train"
    iterations: int = 2
    build_episodes: int = 6
    eval_episodes: int = 8
    conditions: tuple[str, ...] = CONDITIONS
    judge: bool = True
    temperature: float = 0.3  # policy softmax temperature (sampling in the build phase; eval is greedy)
    gate: GateConfig = Field(default_factory=lambda: GateConfig(min_transitions=8, max_transitions=24))


class ConditionResult(BaseModel):
    condition: str
    episodes: int
    success: float
    ci95: tuple[float, float]
    paired_diff_vs_none: float | None = None
    paired_ci95: tuple[float, float] | None = None
    episode_reuse: float
    step_reuse: float
    skill_step_share: float
    extra_prompt_tokens_per_step: float
    prefilled_per_step: float
    pool_skills: int
    pool_tokens: int
    gate_pass_rate: float | None = None
    gated: int = 0
    wall_s: float = 0.0


def _pool_tokens(model, mem: SkillMemory | None) -> tuple[int, int]:
    if mem is None or not mem.snapshot:
        return 0, 0
    return len(mem.snapshot), sum(len(model.encode(s.render())) for s in mem.snapshot)


def run_eval(model, store: SkillStore, cfg: EvalConfig, *,
             progress: Callable[[str, int, int], None] | None = None) -> list[ConditionResult]:
    """Build (for ``ours``/``nogate``), freeze, evaluate every condition on the same held-out seeds."""
    import time

    policy = ActionPolicy(model, temperature=cfg.temperature)
    mems: dict[str, SkillMemory | None] = {}
    gate_rates: dict[str, tuple[float | None, int]] = {}
    for cond in cfg.conditions:
        if cond == "none":
            mems[cond] = None
            continue
        scope = f"bench/{cfg.env}/{cond}"
        store.purge(scope, actor="bench", reason="fresh build for skills eval")
        learner = Learner(store, policy, cfg.env, scope,
                          LearnConfig(episodes_per_iter=cfg.build_episodes, use_gate=cond != "nogate",
                                      judge=cfg.judge, gate=cfg.gate),
                          split="train")
        learner.install_seeds()
        if cond in ("ours", "nogate"):
            for it in range(cfg.iterations):
                learner.progress = (lambda i, n, it=it, cond=cond:
                                    progress and progress(f"build {cond} it{it}", i, n))
                learner.iterate()
        reps = store.gate_results(scope=scope)
        gate_rates[cond] = ((sum(r["accepted"] for r in reps) / len(reps)) if reps else None, len(reps))
        mems[cond] = SkillMemory(store, scope, policy, explore_eps=0.0, judge=cfg.judge,
                                 sources=("seed",) if cond == "seeds" else None).freeze()
    seeds = [EVAL_SEED_BASE + i for i in range(cfg.eval_episodes)]
    raw: dict[str, list] = {}
    out = []
    for cond in cfg.conditions:
        mem = mems[cond]
        t0 = time.perf_counter()
        traces = []
        for i, seed in enumerate(seeds):
            traces.append(run_episode(make_env(cfg.env, seed, cfg.split), policy, mem, random.Random(seed),
                                      greedy=True))
            if progress:
                progress(f"eval {cond}", i + 1, len(seeds))
        raw[cond] = traces
        wins = [int(t.outcome["success"]) for t in traces]
        steps = [s for t in traces for s in t.steps]
        learned = [s for s in steps if s.meta.get("skill_id") and s.meta.get("skill_source") != "seed"]
        n_sk, n_tok = _pool_tokens(model, mem)
        res = ConditionResult(
            condition=cond, episodes=len(traces), success=statistics.fmean(wins), ci95=wilson(sum(wins), len(wins)),
            episode_reuse=statistics.fmean(
                any(inv["source"] != "seed" for inv in t.outcome["invocations"]) for t in traces),
            step_reuse=len(learned) / max(1, len(steps)),
            skill_step_share=sum(bool(s.meta.get("skill_id")) for s in steps) / max(1, len(steps)),
            extra_prompt_tokens_per_step=statistics.fmean(s.meta.get("skill_tokens", 0) for s in steps),
            prefilled_per_step=statistics.fmean(s.usage.prefilled for s in steps),
            pool_skills=n_sk, pool_tokens=n_tok,
            gate_pass_rate=gate_rates.get(cond, (None, 0))[0], gated=gate_rates.get(cond, (None, 0))[1],
            wall_s=time.perf_counter() - t0)
        if cond != "none" and "none" in raw:
            diffs = [int(a.outcome["success"]) - int(b.outcome["success"]) for a, b in zip(traces, raw["none"])]
            mu = statistics.fmean(diffs)
            half = 1.96 * (statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0)
            res.paired_diff_vs_none, res.paired_ci95 = mu, (mu - half, mu + half)
        out.append(res)
    return out


def activation_prefill(model, store: SkillStore, scope: str, env: str = "house", seed: int = EVAL_SEED_BASE) -> dict:
    """Measure what one decision under a skill costs: prefilled tokens with the cached KV prefix vs the text
    block, on the same prompt (the scores are identical; only the work differs)."""
    import time

    skills = store.all(scope, ("active", "probation"))
    if not skills:
        return {}
    sk = skills[0]
    env_ = make_env(env, seed)
    obs = env_.reset()

    inp = StepInputs(task=env_.task, obs=obs, admissible=env_.admissible())
    out = {}
    for mode in (True, False):
        pol = ActionPolicy(model, kv_prefix=mode)
        pol.prefix(sk.render())  # the one-off prefix computation is not part of an activation
        t0 = time.perf_counter()
        sc = pol.score(inp, sk.render())
        out["kv" if mode else "text"] = {"prefilled": sc.prefilled, "reused": sc.reused,
                                         "skill_tokens": sc.skill_tokens,
                                         "wall_s": round(time.perf_counter() - t0, 3), "logp": sc.logp}
    base = ActionPolicy(model, kv_prefix=True).score(inp, None)
    out["no_skill_prefilled"] = base.prefilled
    out["max_abs_logp_diff"] = max(abs(a - b) for a, b in zip(out["kv"]["logp"], out["text"]["logp"]))
    for k in ("kv", "text"):
        out[k].pop("logp")
    return out

"""`kvmas skills eval`: build skill pools, freeze them, evaluate on held-out seeds paired across conditions.

Conditions: ``none`` (no memory), ``ours`` (extract + critic + gate + probation + maintenance), ``nogate``
(same, every candidate accepted), ``seeds`` (the hand-written seed skills only).

Environments: any of :data:`kvmas.envs.ENVS` (``house``, ``codebreaker``, ``textworld``, ``scienceworld``);
skills are built on the ``train`` split (seeds 0..) and evaluated on ``split`` at held-out seeds
(``EVAL_SEED_BASE`` + i), the same seeds for every condition.

Metrics per condition (definitions):
- success rate with a 95% Wilson interval; paired difference vs ``none`` and vs ``seeds`` (same seeds) with a
  normal 95% CI;
- score: the world's normalised final score (TextWorld: points / max; ScienceWorld: 0-100 as 0-1, failure 0;
  house: = success), mean with a bootstrap 95% CI, and its paired differences vs ``none`` and ``seeds``;
- episode reuse rate: share of episodes with >= 1 activation of a *learned* skill (source != seed);
- step reuse rate: steps executed under a learned skill / all steps; skill step share: under any skill;
- extra prompt tokens per step: skill-block tokens in context, averaged over all steps;
- prefilled tokens per step with the cached KV prefix vs with the text block (activation prefill cost);
- active pool tokens: model tokens of the rendered live skills; gate pass rate: accepted / gated;
- the gate log of each built condition: every candidate's decision (accept / reject / defer) with Δ and the
  reason, rejected ones included.

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

from kvmas.envs import make_env
from kvmas.memory.episode import run_episode
from kvmas.memory.gate import GateConfig
from kvmas.memory.lifecycle import LearnConfig, Learner
from kvmas.memory.policy import ActionPolicy, StepInputs
from kvmas.memory.runtime import SkillMemory
from kvmas.memory.store import SkillStore
from kvmas.stats import bootstrap_ci, wilson
from kvmas.trace import Trace

CONDITIONS = ("none", "ours", "nogate", "seeds")
EVAL_SEED_BASE = 100_000  # held out: build seeds start at 0


class EvalConfig(BaseModel):
    env: str = "house"
    split: str = "train"  # the evaluation split(s), comma-separated; skills are always built on "train", once

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.split.split(",") if x.strip())
    env_options: dict = Field(default_factory=dict)  # for make_env (ScienceWorld: tasks=, unseen=, max_steps=...)
    iterations: int = 2
    build_episodes: int = 6
    eval_episodes: int = 8
    conditions: tuple[str, ...] = CONDITIONS
    judge: bool = True
    temperature: float = 0.3  # policy softmax temperature (sampling in the build phase; eval is greedy)
    gate: GateConfig = Field(default_factory=lambda: GateConfig(min_transitions=8, max_transitions=24))


class ConditionResult(BaseModel):
    condition: str
    split: str = "train"
    episodes: int
    success: float
    ci95: tuple[float, float]
    paired_diff_vs_none: float | None = None
    paired_ci95: tuple[float, float] | None = None
    paired_diff_vs_seeds: float | None = None
    paired_ci95_vs_seeds: tuple[float, float] | None = None
    score: float = 0.0
    score_ci95: tuple[float, float] = (0.0, 0.0)
    score_diff_vs_none: float | None = None
    score_ci95_vs_none: tuple[float, float] | None = None
    score_diff_vs_seeds: float | None = None
    score_ci95_vs_seeds: tuple[float, float] | None = None
    episode_reuse: float
    step_reuse: float
    skill_step_share: float
    extra_prompt_tokens_per_step: float
    prefilled_per_step: float
    pool_skills: int
    pool_tokens: int
    gate_pass_rate: float | None = None
    gated: int = 0
    gate_log: list[dict] = Field(default_factory=list)  # every gated candidate of the build, rejected ones too
    pool: list[dict] = Field(default_factory=list)  # the frozen pool evaluated: name, source, status, tokens
    wall_s: float = 0.0


def _paired(a: list[float], b: list[float]) -> tuple[float, tuple[float, float]]:
    """Mean of a − b over paired episodes with a normal 95% interval."""
    diffs = [x - y for x, y in zip(a, b)]
    mu = statistics.fmean(diffs)
    half = 1.96 * (statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0)
    return mu, (mu - half, mu + half)


def gate_log(store: SkillStore, scope: str) -> list[dict]:
    """Every gate decision of a scope, oldest first: accepted and rejected reports, and deferrals (too little
    evidence yet), each with the candidate's name and source."""
    names = {s.id: s for s in store.all(scope)}
    out = []
    for g in store.gate_results(scope=scope):
        sk = names.get(g["skill_id"])
        out.append({"skill_id": g["skill_id"], "name": sk.name if sk else "?", "source": sk.source if sk else "?",
                    "decision": g["decision"], "delta": round(float(g.get("delta", 0.0)), 6),
                    "n_transitions": g.get("n_transitions", 0), "reason": g.get("reason", "")})
    for e in store.events(scope=scope, limit=100_000):
        if e.op == "defer":
            sk = names.get(e.skill_id or "")
            out.append({"skill_id": e.skill_id, "name": sk.name if sk else "?", "source": sk.source if sk else "?",
                        "decision": "defer", "delta": None, "n_transitions": None, "reason": e.reason})
    return out

def _pool_tokens(model, mem: SkillMemory | None) -> tuple[int, int]:
    if mem is None or not mem.snapshot:
        return 0, 0
    return len(mem.snapshot), sum(len(model.encode(s.render())) for s in mem.snapshot)


def run_eval(model, store: SkillStore, cfg: EvalConfig, *,
             progress: Callable[[str, int, int], None] | None = None,
             trace_dir: str | None = None) -> list[ConditionResult]:
    """Build (for ``ours``/``nogate``), freeze, evaluate every condition on the same held-out seeds.

    ``cfg.split`` may name several splits (``train,test,ood``): the pools are built once and each split is
    evaluated on the same held-out seeds. ``trace_dir``: also save every evaluation episode's trace there
    (``COND-SPLIT-SEED.json``; ``kvmas trace show`` prints the skill active at each step)."""
    policy = ActionPolicy(model, temperature=cfg.temperature)
    mems: dict[str, SkillMemory | None] = {}
    gate_rates: dict[str, tuple[float | None, int]] = {}
    logs: dict[str, list[dict]] = {}
    for cond in cfg.conditions:
        if cond == "none":
            mems[cond] = None
            continue
        scope = f"bench/{cfg.env}/{cond}"
        store.purge(scope, actor="bench", reason="fresh build for skills eval")
        learner = Learner(store, policy, cfg.env, scope,
                          LearnConfig(episodes_per_iter=cfg.build_episodes, use_gate=cond != "nogate",
                                      judge=cfg.judge, gate=cfg.gate),
                          split="train", env_options=cfg.env_options)
        learner.install_seeds()
        if cond in ("ours", "nogate"):
            for it in range(cfg.iterations):
                learner.progress = (lambda i, n, it=it, cond=cond:
                                    progress and progress(f"build {cond} it{it}", i, n))
                learner.iterate()
        reps = store.gate_results(scope=scope)
        gate_rates[cond] = ((sum(r["accepted"] for r in reps) / len(reps)) if reps else None, len(reps))
        logs[cond] = gate_log(store, scope)
        mems[cond] = SkillMemory(store, scope, policy, explore_eps=0.0, judge=cfg.judge,
                                 sources=("seed",) if cond == "seeds" else None).freeze()
    out = []
    for split in cfg.splits:  # one build, evaluated on every split asked for
        out += _evaluate(model, policy, cfg, split, mems, gate_rates, logs, progress, trace_dir)
    return out


def _evaluate(model, policy: ActionPolicy, cfg: EvalConfig, split: str, mems: dict, gate_rates: dict, logs: dict,
              progress, trace_dir) -> list[ConditionResult]:
    import time
    from pathlib import Path

    seeds = [EVAL_SEED_BASE + i for i in range(cfg.eval_episodes)]
    raw: dict[str, list[Trace]] = {}
    out = []
    for cond in cfg.conditions:
        mem = mems[cond]
        t0 = time.perf_counter()
        traces = []
        for i, seed in enumerate(seeds):
            tr = run_episode(make_env(cfg.env, seed, split, **cfg.env_options), policy, mem,
                             random.Random(seed), greedy=True)
            traces.append(tr)
            if trace_dir is not None:
                tr.save(Path(trace_dir) / f"{cond}-{split}-{seed}.json")
            if progress:
                progress(f"eval {split} {cond}", i + 1, len(seeds))
        raw[cond] = traces
        wins = [int(t.outcome["success"]) for t in traces]
        scores = [float(t.outcome.get("score", t.outcome["success"])) for t in traces]  # house: = success
        steps = [s for t in traces for s in t.steps]
        learned = [s for s in steps if s.meta.get("skill_id") and s.meta.get("skill_source") != "seed"]
        n_sk, n_tok = _pool_tokens(model, mem)
        res = ConditionResult(
            condition=cond, split=split, episodes=len(traces), success=statistics.fmean(wins),
            ci95=wilson(sum(wins), len(wins)),
            score=statistics.fmean(scores), score_ci95=bootstrap_ci(scores),
            episode_reuse=statistics.fmean(
                any(inv["source"] != "seed" for inv in t.outcome["invocations"]) for t in traces),
            step_reuse=len(learned) / max(1, len(steps)),
            skill_step_share=sum(bool(s.meta.get("skill_id")) for s in steps) / max(1, len(steps)),
            extra_prompt_tokens_per_step=statistics.fmean(s.meta.get("skill_tokens", 0) for s in steps),
            prefilled_per_step=statistics.fmean(s.usage.prefilled for s in steps),
            pool_skills=n_sk, pool_tokens=n_tok,
            gate_pass_rate=gate_rates.get(cond, (None, 0))[0], gated=gate_rates.get(cond, (None, 0))[1],
            gate_log=logs.get(cond, []),
            pool=[{"id": s.id, "name": s.name, "source": s.source, "status": s.status,
                   "tokens": len(model.encode(s.render()))} for s in (mem.snapshot if mem else [])],
            wall_s=time.perf_counter() - t0)
        out.append(res)

    def outcomes(cond: str) -> tuple[list[int], list[float]]:
        return ([int(t.outcome["success"]) for t in raw[cond]],
                [float(t.outcome.get("score", t.outcome["success"])) for t in raw[cond]])

    for res in out:  # paired with the reference conditions once every condition has run
        wins, scores = outcomes(res.condition)
        if res.condition != "none" and "none" in raw:
            ref_wins, ref_scores = outcomes("none")
            res.paired_diff_vs_none, res.paired_ci95 = _paired(wins, ref_wins)
            res.score_diff_vs_none, res.score_ci95_vs_none = _paired(scores, ref_scores)
        if res.condition not in ("none", "seeds") and "seeds" in raw:
            ref_wins, ref_scores = outcomes("seeds")
            res.paired_diff_vs_seeds, res.paired_ci95_vs_seeds = _paired(wins, ref_wins)
            res.score_diff_vs_seeds, res.score_ci95_vs_seeds = _paired(scores, ref_scores)
    return out


def activation_prefill(model, store: SkillStore, scope: str, env: str = "house", seed: int = EVAL_SEED_BASE,
                       split: str = "train", env_options: dict | None = None) -> dict:
    """Measure what one decision under a skill costs: prefilled tokens with the cached KV prefix vs the text
    block, on the same prompt (the scores are identical; only the work differs)."""
    import time

    skills = store.all(scope, ("active", "probation"))
    if not skills:
        return {}
    sk = skills[0]
    env_ = make_env(env, seed, split, **(env_options or {}))
    try:
        obs = env_.reset()
        inp = StepInputs(task=env_.task, obs=obs, admissible=env_.admissible())
    finally:
        if hasattr(env_, "close"):
            env_.close()
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

"""The gate: a non-parametric PPO acceptance test computed from the acting model's own log-probs.

For replayed transitions (s_t, a_t) recorded under a behaviour skill ω_t (the parent, a seed skill, or none):
ρ_t = π(a_t | s_t, ω′) / π(a_t | s_t, ω_t), where π is the policy's softmax over the admissible actions;
Â_t = the episode's advantage (G − baseline, G = reward − a step cost) spread over its steps, then centred and
scaled within the set;
L(ω′) = mean_t min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t), L(ω) = mean Â = 0.
Accept iff Δ = L(ω′) − L(ω) > margin and the trust-region guard holds: mean|log ρ| × T ≤ max_abs_logratio
(T: the policy's softmax temperature, so the guard is measured at the model's own temperature 1).
(ProcMEM compares the surrogate with 0 before centring, which lets a no-op candidate pass; we centre.)

>>> from kvmas.memory.gate import surrogate
>>> d = surrogate([0.0, 0.0], [1.0, -1.0])  # a no-op candidate: Δ = 0, never above the margin
>>> d["delta"], d["clip_fraction"]
(0.0, 0.0)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from pydantic import BaseModel

from kvmas.memory.episode import STEP_COST, episode_return
from kvmas.memory.policy import PROMPT_VERSION, ActionPolicy, StepInputs
from kvmas.memory.skill import Skill


@dataclass
class Transition:
    """One replayed decision: exact prompt inputs, the action taken, the behaviour log-prob and advantage."""

    inputs: StepInputs
    choice: int
    behavior_logp: float
    advantage: float
    episode_id: str
    behavior_skill_id: str | None
    since: int = 0  # where the behaviour skill was activated (the candidate is replayed as if activated there)
    slots: dict | None = None


def replay_inputs(t: Transition, candidate: Skill) -> StepInputs:
    """The prompt inputs the candidate would have produced at this state (its own step hint)."""
    from kvmas.memory.runtime import step_hint

    actions = [a for a, _ in t.inputs.history][t.since:]
    return t.inputs.model_copy(update={"hint": step_hint(candidate, actions, t.inputs.admissible, t.slots or {})})


class GateConfig(BaseModel):
    eps_clip: float = 0.2
    margin: float = 0.0
    # Trust region on mean |log ρ| at the model's own temperature (log ρ × the policy's softmax temperature, so
    # the guard does not depend on how sharply the policy samples). 1.0 (the reference spec's value) would
    # reject the one house skill that passed on qwen2.5-coder-0.5b (1.62, Δ +0.060): a model that follows a
    # procedure's next step moves that action's probability ~5x, which is what a skill is for (DECISIONS.md).
    max_abs_logratio: float = 2.0
    min_transitions: int = 16
    max_transitions: int = 64
    max_tokens: int = 150


class GateReport(BaseModel):
    candidate_id: str
    parent_id: str | None
    n_transitions: int
    n_episodes: int
    surrogate_new: float = 0.0
    surrogate_old: float = 0.0
    delta: float = 0.0
    mean_abs_logratio: float = 0.0
    clip_fraction: float = 0.0
    adv_pos_share: float = 0.0
    epsilon: float
    margin: float
    logprob: str = "softmax over the admissible actions of their log-likelihood (policy reduction)"
    model_key: str = ""
    decision: str  # accept | reject | defer
    reason: str


def surrogate(logratios: list[float], advantages: list[float], eps: float = 0.2) -> dict[str, float]:
    """Clipped surrogate of centred, scaled advantages; returns delta (vs the behaviour policy) and diagnostics."""
    mu = statistics.fmean(advantages)
    sd = statistics.pstdev(advantages) if len(advantages) > 1 else 0.0
    adv = [(a - mu) / (sd + 1e-8) for a in advantages]
    terms, clipped = [], 0
    for lr, a in zip(logratios, adv):
        rho = math.exp(max(-10.0, min(10.0, lr)))
        rc = min(max(rho, 1 - eps), 1 + eps)
        clipped += rc != rho
        terms.append(min(rho * a, rc * a))
    new = statistics.fmean(terms)
    old = statistics.fmean(adv)  # 0 up to rounding after centring
    return {"new": new, "old": old, "delta": round(new - old, 12), "clip_fraction": clipped / len(terms),
            "mean_abs_logratio": statistics.fmean(abs(x) for x in logratios)}


def gate(policy: ActionPolicy, candidate: Skill, transitions: list[Transition], cfg: GateConfig | None = None,
         *, parent_id: str | None = None) -> GateReport:
    """Score ``candidate`` on the replay set with the acting model; the decision and numbers in a report."""
    cfg = cfg or GateConfig()
    base = dict(candidate_id=candidate.id, parent_id=parent_id, epsilon=cfg.eps_clip, margin=cfg.margin,
                model_key=policy.model.fingerprint.key)
    data = transitions[-cfg.max_transitions:]
    n_eps = len({t.episode_id for t in data})
    if candidate.token_count > cfg.max_tokens:
        return GateReport(**base, n_transitions=len(data), n_episodes=n_eps, decision="reject",
                          reason=f"rendered size {candidate.token_count} > {cfg.max_tokens} tokens")
    pos = sum(t.advantage > 0 for t in data)
    if len(data) < cfg.min_transitions or pos == 0 or pos == len(data):
        return GateReport(**base, n_transitions=len(data), n_episodes=n_eps, decision="defer",
                          adv_pos_share=pos / max(1, len(data)),
                          reason=f"need >= {cfg.min_transitions} transitions with both advantage signs "
                                 f"(have {len(data)}, {pos} positive)")
    text = candidate.render()
    logratios = []
    for t in data:  # the model calls happen here, outside any store transaction
        new = policy.score(replay_inputs(t, candidate), text).logp[t.choice]
        logratios.append(new - t.behavior_logp)
    s = surrogate(logratios, [t.advantage for t in data], cfg.eps_clip)
    report = dict(base, n_transitions=len(data), n_episodes=n_eps, surrogate_new=s["new"], surrogate_old=s["old"],
                  delta=s["delta"], mean_abs_logratio=s["mean_abs_logratio"], clip_fraction=s["clip_fraction"],
                  adv_pos_share=pos / len(data))
    at_t1 = s["mean_abs_logratio"] * policy.temperature
    if at_t1 > cfg.max_abs_logratio:
        return GateReport(**report, decision="reject",
                          reason=f"trust region: mean |log ratio| {at_t1:.3f} at temperature 1 "
                                 f"({s['mean_abs_logratio']:.3f} at {policy.temperature:g}) > {cfg.max_abs_logratio}")
    if s["delta"] <= cfg.margin:
        return GateReport(**report, decision="reject", reason=f"delta {s['delta']:.4f} <= margin {cfg.margin}")
    return GateReport(**report, decision="accept", reason=f"delta {s['delta']:.4f} > margin {cfg.margin}")


def transitions_from(traces, *, baseline: dict[str, float], behavior_skill: str | None | bool = False,
                     families: set[str] | None = None, model_key: str | None = None,
                     step_cost: float = STEP_COST, from_start: bool = False) -> list[Transition]:
    """Replay set from episode traces: steps (optionally only those under ``behavior_skill``; ``False`` = any)
    with the episode advantage G − b(family) spread uniformly over the selected steps, where G is
    :func:`~kvmas.memory.episode.episode_return` (reward minus ``step_cost`` per step).

    Only decisions whose recorded log-prob is comparable with a replay now are used: made with the current
    prompt version and (when ``model_key`` is given) by the same model; otherwise the ratio ρ would measure
    the prompt or model change, not the candidate skill.

    A candidate is replayed as if activated where the behaviour skill was (an edit of it), or with
    ``from_start`` at the episode's start (a new skill: its steps are matched against the whole episode, not
    against the part after some other skill's activation, which would hand it a wrong step)."""
    out = []
    for tr in traces:
        fam = tr.outcome.get("task_family", "")
        if families is not None and fam not in families:
            continue
        if model_key is not None and (tr.model or {}).get("key") != model_key:
            continue
        steps = [s for s in tr.steps if (behavior_skill is False or s.meta.get("skill_id") == behavior_skill)
                 and s.meta["inputs"].get("prompt_version") == PROMPT_VERSION]
        if not steps:
            continue
        adv = (episode_return(tr.outcome, step_cost) - baseline.get(fam, 0.0)) / len(steps)
        for s in steps:
            out.append(Transition(inputs=StepInputs(**s.meta["inputs"]), choice=int(s.meta["choice"]),
                                  behavior_logp=float(s.meta["logp"]), advantage=adv, episode_id=tr.run_id,
                                  behavior_skill_id=s.meta.get("skill_id"),
                                  since=0 if from_start or not s.meta.get("skill_id")
                                  else int(s.meta.get("skill_since", 0)),
                                  slots=s.meta.get("slots") or {}))
    return out

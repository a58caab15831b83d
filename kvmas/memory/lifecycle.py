"""The learning loop: act → credit → extract / critique → gate → probation → promote or reject → maintain.
Every decision is an event in the store with its reason.

>>> import os, tempfile
>>> from kvmas.testing import tiny_model
>>> from kvmas.memory.store import SkillStore
>>> from kvmas.memory.policy import ActionPolicy
>>> from kvmas.memory.lifecycle import Learner, LearnConfig
>>> st = SkillStore(os.path.join(tempfile.mkdtemp(), "s.sqlite"))
>>> lr = Learner(st, ActionPolicy(tiny_model()), "codebreaker", "demo", LearnConfig(episodes_per_iter=2))
>>> rep = lr.iterate()
>>> rep["episodes"], st.iteration("demo")
(2, 1)
"""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from typing import Callable

from pydantic import BaseModel, Field

from kvmas.envs import make_env
from kvmas.memory.critic import ContrastiveRuleCritic, Critic
from kvmas.memory.episode import STEP_COST, episode_return, run_episode
from kvmas.memory.gate import GateConfig, GateReport, gate, transitions_from
from kvmas.memory.maintain import MaintainConfig, jaccard, maintain
from kvmas.memory.policy import ActionPolicy
from kvmas.memory.procedures import extract
from kvmas.memory.runtime import SkillMemory
from kvmas.memory.skill import LIVE, Skill
from kvmas.memory.store import SkillStore
from kvmas.trace import Trace


class LearnConfig(BaseModel):
    episodes_per_iter: int = 8
    explore_eps: float = 0.2
    min_support: int = 2
    max_extracted: int = 4  # new-skill candidates extracted per iteration (each costs a gate run)
    buffer_min: int = 4  # episodes under a skill before the critic may edit it
    probation_min_uses: int = 4
    ema_alpha: float = 0.1
    lcb_beta: float = 0.2
    use_gate: bool = True
    judge: bool = True
    evidence_window: int = 64  # most recent episodes used for extraction and replay
    step_cost: float = STEP_COST  # learning credits reward − step_cost × steps (see episode.episode_return)
    seed_base: int = 0
    gate: GateConfig = Field(default_factory=GateConfig)
    maintain: MaintainConfig = Field(default_factory=MaintainConfig)


def seed_skills(env: str, scope: str) -> list[Skill]:
    """Hand-written starting skills (generic procedures) for an environment."""
    if env == "house":
        specs = [
            ("FetchObject", "you must put an object that is in another place",
             ["go to <place>", "take <object> from <place>"],
             "You pick up the <object>.", []),
            ("CleanAtSink", "holding an object that must be clean",
             ["go to sinkbasin 1", "clean <object> with sinkbasin 1"], "It is clean now.", ["clean", "pick up"]),
            ("HeatInMicrowave", "holding an object that must be hot",
             ["go to microwave 1", "heat <object> with microwave 1"], "It is hot now.", ["hot", "pick up"]),
            ("CoolInFridge", "holding an object that must be cold",
             ["go to fridge 1", "cool <object> with fridge 1"], "It is cold now.", ["cold", "pick up"]),
            ("DeliverObject", "holding the object the task asks to put in a target place",
             ["go to <target>", "put <object> in <target>"], "You put the <object> in <target>.", ["pick up"]),
        ]
    elif env == "codebreaker":
        specs = [("ConsistentGuess", "guessing the secret code",
                  ["keep digits that scored exact in place", "move partial digits to new places",
                   "drop digits that scored nothing"], "all digits exact", ["code"])]
    elif env == "textworld":
        # Few and generic on purpose (what any cooking game starts with): what to cook with, in what order
        # and how to finish is left for the memory to learn.
        specs = [
            ("ExamineRecipe", "the cookbook's recipe has not been read yet", ["examine cookbook"],
             "Ingredients: Directions:", ["cookbook"]),
            ("TakeIngredients", "the recipe is read and its ingredients are not all carried",
             ["take <ingredient1>", "take <ingredient2>", "take <ingredient3>"],
             "every ingredient carried", ["ingredients"]),
            ("Explore", "an ingredient of the recipe is not in sight", ["look", "inventory"],
             "You are carrying", ["ingredients"]),
        ]
    elif env == "scienceworld":
        specs = [
            ("Explore", "you do not yet see what the task needs", ["look around"], "This room is called", []),
            ("GoToTaskRoom", "the task names a room", ["teleport to <room>", "look around"],
             "This room is called the <room>", []),
        ]
    else:
        specs = []
    return [Skill(scope=scope, name=n, activation=a, steps=s, termination=t, activation_terms=terms,
                  status="active", source="seed", pinned=False) for n, a, s, t, terms in specs]


class Learner:
    """Builds a skill pool for one environment and scope. ``progress(i, n)`` is called after each episode."""

    def __init__(self, store: SkillStore, policy: ActionPolicy, env: str, scope: str,
                 cfg: LearnConfig | None = None, *, critic: Critic | None = None, split: str = "train",
                 progress: Callable[[int, int], None] | None = None, env_options: dict | None = None):
        self.store, self.policy, self.env, self.scope = store, policy, env, scope
        self.cfg = cfg or LearnConfig()
        self.critic = critic or ContrastiveRuleCritic()
        self.split, self.progress = split, progress
        self.env_options = dict(env_options or {})  # for make_env (e.g. ScienceWorld's tasks=)

    # -- helpers ------------------------------------------------------------------------------------
    def baselines(self) -> dict[str, float]:
        raw = self.store.get_meta(f"baseline:{self.scope}")
        return json.loads(raw) if raw else {}

    def install_seeds(self) -> int:
        n = 0
        for s in seed_skills(self.env, self.scope):
            n += self.store.add(s, actor="seed", reason="seed skill")[1]
        return n

    def evidence(self) -> list[Trace]:
        raw = self.store.episodes(self.scope)[-self.cfg.evidence_window:]
        return [Trace.model_validate_json(r) for r in raw]

    # -- one iteration ------------------------------------------------------------------------------
    def iterate(self) -> dict:
        cfg, st, scope = self.cfg, self.store, self.scope
        it = st.iteration(scope)
        mem = SkillMemory(st, scope, self.policy, explore_eps=cfg.explore_eps, judge=cfg.judge)
        traces = []
        for j in range(cfg.episodes_per_iter):
            seed = cfg.seed_base + it * cfg.episodes_per_iter + j
            traces.append(run_episode(make_env(self.env, seed, self.split, **self.env_options), self.policy, mem,
                                      random.Random(seed), iteration=it))
            if self.progress:
                self.progress(j + 1, cfg.episodes_per_iter)
        uses, base = self._credit(traces)
        episodes = [dict(ep_id=tr.run_id, env=self.env, task_family=tr.outcome["task_family"], iteration=it,
                         reward=tr.outcome["reward"], success=tr.outcome["success"], n_steps=len(tr.steps),
                         trace_json=tr.model_dump_json()) for tr in traces]
        st.commit_iteration(scope, episodes=episodes, uses=uses,
                            meta={f"baseline:{scope}": json.dumps(base, sort_keys=True)})
        promoted = self._review_probation()
        gated = self._propose_and_gate()
        archived = maintain(st, scope, cfg.maintain)
        return {"iteration": it, "episodes": len(traces),
                "success": statistics.fmean(t.outcome["success"] for t in traces),
                "promoted": promoted, "gated": gated, "archived": archived}

    def _credit(self, traces: list[Trace]) -> tuple[list[dict], dict[str, float]]:
        """Advantage A = G − b(family) (G: reward − step cost); each skill used gets c_k·A/m; then the EMA
        baselines move. Returns the skill uses to credit and the new baselines (written by the caller, with
        the episodes, in one transaction)."""
        base = self.baselines()
        by_fam: dict[str, list[float]] = defaultdict(list)
        for tr in traces:
            by_fam[tr.outcome["task_family"]].append(episode_return(tr.outcome, self.cfg.step_cost))
        first = {f: statistics.fmean(v) for f, v in by_fam.items() if f not in base}
        uses = []
        for tr in traces:
            fam = tr.outcome["task_family"]
            adv = episode_return(tr.outcome, self.cfg.step_cost) - base.get(fam, first.get(fam, 0.0))
            counts: dict[str, int] = defaultdict(int)
            for inv in tr.outcome["invocations"]:
                counts[inv["skill_id"]] += 1
            m = sum(counts.values())
            for sid, c in counts.items():
                status = self.store.get(sid).status
                uses.append(dict(skill_id=sid, credit=c * adv / m, activations=c, success=tr.outcome["success"],
                                 probation=status == "probation"))
        for f, v in by_fam.items():
            b = base.get(f, first.get(f, 0.0))
            base[f] = b + self.cfg.ema_alpha * (statistics.fmean(v) - b)
        return uses, base

    def _review_probation(self) -> list[tuple[str, str]]:
        out, t = [], self.store.iteration(self.scope)
        for s in self.store.all(self.scope, "probation"):
            stt = self.store.stats(s.id)
            if stt.probation_uses < self.cfg.probation_min_uses:
                continue
            lcb = stt.lcb(t, self.cfg.lcb_beta)
            if s.parent_id:
                ref = self.store.stats(s.parent_id).lcb(t, self.cfg.lcb_beta) - 0.01
                why = f"lcb {lcb:.4f} vs parent lcb-0.01 {ref:.4f} after {stt.probation_uses} uses"
            else:
                ref, why = -0.001, f"lcb {lcb:.4f} vs -0.001 after {stt.probation_uses} uses"
            new = "active" if lcb >= ref else "rejected"
            if self.store.set_status(s.id, new, expected="probation", reason=why, actor="probation",
                                     op="promote" if new == "active" else "demote"):
                out.append((s.id, new))
        return out

    def _propose_and_gate(self) -> list[dict]:
        st, cfg = self.store, self.cfg
        ev = self.evidence()
        live = st.all(self.scope, LIVE)
        found = extract(ev, self.scope, min_support=cfg.min_support, live=live, max_candidates=cfg.max_extracted)
        if found.skills or found.rejected:  # what extraction chose and every candidate it did not, with why
            st.log("extract", self.scope, actor="extract", reason=f"{len(found.skills)} proposed, "
                   f"{len(found.rejected)} not", after=found.summary())
        proposals: list[Skill] = list(found.skills)
        for parent in live:
            used = [t for t in ev if any(s.meta.get("skill_id") == parent.id for s in t.steps)]
            if len(used) >= cfg.buffer_min:
                proposals += self.critic.propose(parent, used)
        for cand in proposals:
            twin = next((s for s in live if jaccard(s.activation + " " + " ".join(s.steps),
                                                  cand.activation + " " + " ".join(cand.steps))
                         >= cfg.maintain.dedup_jaccard), None)
            if twin is not None:
                continue  # near-duplicate of a live skill: not worth a gate run
            stored, created = st.add(cand, actor="propose", reason=json.dumps(cand.provenance, sort_keys=True)[:500])
            if not created and stored.status != "candidate":
                continue
        # gate every pending candidate (including ones deferred earlier); best of N per parent
        base = self.baselines()
        key = self.policy.model.fingerprint.key
        results: dict[str | None, list[tuple[Skill, GateReport]]] = defaultdict(list)
        for cand in st.all(self.scope, "candidate"):
            if cand.parent_id:
                tr = transitions_from(ev, baseline=base, behavior_skill=cand.parent_id, model_key=key,
                                      step_cost=cfg.step_cost)
            else:  # a new skill: replayed on the families whose episodes carried it out (all when it spans them)
                fams = set(cand.provenance.get("families") or [cand.provenance.get("family")]) - {None, ""}
                tr = transitions_from(ev, baseline=base, families=fams or None, model_key=key,
                                      step_cost=cfg.step_cost, from_start=True)
            if cfg.use_gate:
                rep = gate(self.policy, cand, tr, cfg.gate, parent_id=cand.parent_id)
            else:
                rep = GateReport(candidate_id=cand.id, parent_id=cand.parent_id, n_transitions=len(tr),
                                 n_episodes=0, epsilon=cfg.gate.eps_clip, margin=cfg.gate.margin,
                                 decision="accept", reason="gate disabled")
            if rep.decision == "defer":
                st.log("defer", self.scope, cand.id, actor="gate", reason=rep.reason)
                continue
            # best of N per parent; new skills compete with those that start on the same new step
            group = cand.provenance.get("group") or cand.provenance.get("family")
            results[cand.parent_id or f"new:{group}"].append((cand, rep))
        out = []
        for group in results.values():
            accepted = [(c, r) for c, r in group if r.decision == "accept"]
            best = max(accepted, key=lambda cr: cr[1].delta) if accepted else None
            for cand, rep in group:
                if rep.decision == "accept" and best is not None and cand.id != best[0].id:
                    why = f"{rep.reason}; not best of {len(group)} (best {best[0].id})"
                    rep = rep.model_copy(update={"decision": "reject", "reason": why})
                ok = rep.decision == "accept"
                with st.transaction():  # the report and the decision it justifies: both or neither
                    st.add_gate_result(cand.id, cand.parent_id, ok, rep.model_dump())
                    st.set_status(cand.id, "probation" if ok else "rejected", expected="candidate",
                                  reason=rep.reason, actor="gate")
                out.append({"id": cand.id, "name": cand.name, "decision": rep.decision, "delta": rep.delta,
                            "reason": rep.reason})
        return out

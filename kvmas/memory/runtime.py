"""Use of skills at run time: retrieve, check applicability, select (ε-greedy in training, greedy in
evaluation), and decide when an active skill ends.

>>> import os, random, tempfile
>>> from kvmas.testing import tiny_model
>>> from kvmas.memory.store import SkillStore
>>> from kvmas.memory.skill import Skill
>>> from kvmas.memory.policy import ActionPolicy
>>> from kvmas.memory.runtime import SkillMemory
>>> st = SkillStore(os.path.join(tempfile.mkdtemp(), "s.sqlite"))
>>> _ = st.add(Skill(scope="house", name="Heat", activation="task says hot", activation_terms=["hot"],
...                  steps=["go to microwave 1"], termination="It is hot now", status="active"))
>>> mem = SkillMemory(st, "house", ActionPolicy(tiny_model()))
>>> skill, info = mem.select("put a hot mug in table 1.", "You are in a room.", random.Random(0))
>>> skill.name, mem.stop_reason(skill, "put a hot mug", "You heat the mug. It is hot now.", 1)
('Heat', 'termination')
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import torch

from kvmas.envs.base import ground, unbound
from kvmas.memory.policy import ActionPolicy
from kvmas.memory.skill import Skill
from kvmas.memory.store import SkillStore

_STOP = {"the", "a", "an", "in", "on", "is", "it", "you", "to", "of", "with", "when", "now", "and"}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP}


def matches(step: str, action: str) -> bool:
    """Whether ``action`` carries out a grounded step: the same command, or the step's words followed by more
    (``take red potato`` is done by ``take red potato from counter``; ``go to table 1`` is not done by
    ``go to table 10``).

    >>> matches("take red potato", "take red potato from counter"), matches("go to table 1", "go to table 10")
    (True, False)
    """
    return action == step or action.startswith(step + " ")


def step_hint(skill: Skill, actions: list[str], admissible: list[str], slots: dict[str, str]) -> str | None:
    """The skill's next step, grounded with the episode's slots; None when the procedure is complete.

    A pure function of the actions taken since activation: the pointer advances past each step matched in
    order (:func:`matches`); a ``go to`` step that is not admissible (already there) is skipped, and so is a
    step naming a slot the episode has no value for (a third ingredient in a two-ingredient recipe). A step
    that is the start of exactly one admissible command is shown as that command. Replays recompute it
    exactly."""
    p = 0
    grounded = [ground(s, slots) for s in skill.steps]
    for a in actions:
        while p < len(grounded) and unbound(grounded[p]):  # skipped here too, or one would stall the pointer
            p += 1
        if p < len(grounded) and matches(grounded[p], a):
            p += 1
    while p < len(grounded) and (unbound(grounded[p])
                                 or grounded[p].startswith("go to ") and grounded[p] not in admissible):
        p += 1
    if p >= len(grounded):
        return None
    step = grounded[p]
    if step not in admissible:
        full = [a for a in admissible if matches(step, a)]
        if len(full) == 1:
            return full[0]
    return step


@dataclass
class SkillMemory:
    """Run-time access to one scope of a store.

    ``explore_eps``: probability of a uniform pick over {candidates, none} (0 in evaluation).
    ``sources``: restrict to skills of these sources (e.g. ``("seed",)``); ``statuses``: live statuses used.
    ``judge``: rank with the model's P(Yes) to "does this skill apply now?" (else retrieval + LCB only)."""

    store: SkillStore
    scope: str
    policy: ActionPolicy
    explore_eps: float = 0.0
    statuses: tuple[str, ...] = ("active", "probation")
    sources: tuple[str, ...] | None = None
    judge: bool = True
    k: int = 5
    lam: float = 0.3
    max_age: int = 8
    embed: bool = False  # also retrieve by cosine over Model.embed_text embeddings (stored per model key)
    snapshot: list[Skill] | None = None  # frozen pool for evaluation
    _lcb: dict[str, float] = field(default_factory=dict)

    def _pool(self) -> list[Skill]:
        return self.snapshot if self.snapshot is not None else self.store.all(self.scope, self.statuses)

    def freeze(self) -> "SkillMemory":
        """Pin the current pool and LCBs (evaluation must not see the store change)."""
        self.snapshot = [s for s in self.store.all(self.scope, self.statuses)
                         if self.sources is None or s.source in self.sources]
        t = self.store.iteration(self.scope)
        self._lcb = {s.id: self.store.stats(s.id).lcb(t) for s in self.snapshot}
        return self

    def candidates(self, task: str, obs: str) -> list[tuple[Skill, float]]:
        """Retrieval (BM25 over the store, or over the frozen snapshot) + the lexical applicability filter."""
        query = f"{task} {obs}"
        if self.snapshot is not None:
            q = _words(query)
            hits = [(s, float(len(q & _words(s.activation + " " + " ".join(s.activation_terms + s.steps)))))
                    for s in self.snapshot]
            hits = sorted([h for h in hits if h[1] > 0], key=lambda h: -h[1])[: self.k]
        elif self.embed:
            key = self.policy.model.fingerprint.key
            for s in self.store.all(self.scope, self.statuses):  # lazily embed; model calls outside any write tx
                if self.store.embedding(s.id, key) is None:
                    self.store.set_embedding(s.id, self.policy.model.embed_text(s.activation).numpy(), key)
            qv = self.policy.model.embed_text(query).numpy()
            hits = self.store.search(self.scope, query, k=self.k, statuses=self.statuses, query_vec=qv,
                                     embedding_model=key)
        else:
            hits = self.store.search(self.scope, query, k=self.k, statuses=self.statuses)
        if self.snapshot is None and self.sources is not None:
            hits = [h for h in hits if h[0].source in self.sources]
        low = query.lower()
        return [(s, sc) for s, sc in hits if all(t in low for t in s.activation_terms)]

    @torch.no_grad()
    def p_apply(self, skill: Skill, task: str, obs: str) -> float:
        """P(Yes) from the acting model's next-token logits, with the skill read from its cached prefix."""
        pol = self.policy
        q = pol.model.encode(f"Task: {task}\n{obs}\nDoes this skill apply now? Answer:")
        lp = pol.prefix(skill.render()).extend(q, agent="memory", role="judge").next_logprobs()[0].float()
        yes, no = pol.model.encode(" Yes")[0], pol.model.encode(" No")[0]
        return float(torch.sigmoid(lp[yes] - lp[no]))

    def select(self, task: str, obs: str, rng: random.Random, exclude: set[str] = frozenset(), *,
               admissible: list[str] | None = None, slots: dict[str, str] | None = None) -> tuple[Skill | None, dict]:
        """Pick a skill (or none), never one in ``exclude`` (completed in this episode), nor, when the
        ``admissible`` commands are given, one with no step to do now (:func:`step_hint` None: every step
        names a slot the episode lacks, or is a move to where it is). Returns (skill, info)."""
        cands = [c for c in self.candidates(task, obs) if c[0].id not in exclude]
        if admissible is not None:
            cands = [c for c in cands if step_hint(c[0], [], admissible, slots or {}) is not None]
        if not cands:
            return None, {"n_candidates": 0}
        if self.explore_eps > 0 and rng.random() < self.explore_eps:
            pick = rng.randrange(len(cands) + 1)
            return (cands[pick][0] if pick < len(cands) else None), {"explore": True, "n_candidates": len(cands)}
        top = max(sc for _, sc in cands) or 1.0
        t = self.store.iteration(self.scope)
        ranked = []
        for s, sc in cands:
            lcb = self._lcb[s.id] if s.id in self._lcb else self.store.stats(s.id).lcb(t)
            p = self.p_apply(s, task, obs) if self.judge else 0.5
            ranked.append((sc / top + p + self.lam * math.tanh(lcb / 0.1), s, p))
        score, best, p = max(ranked, key=lambda r: r[0])
        return best, {"score": round(score, 4), "p_apply": round(p, 4), "n_candidates": len(cands)}

    def stop_reason(self, skill: Skill, task: str, obs: str, age: int, slots: dict[str, str] | None = None,
                    hint: str | None = "") -> str | None:
        """Why the active skill ends now, or None: termination holds (or every step is done: ``hint`` None) /
        activation lost (``task`` + ``obs`` may be the whole transcript) / too old."""
        if hint is None:
            return "termination"
        want = _words(re.sub(r"<\w+>", " ", ground(skill.termination, slots or {})))
        if want and want <= _words(obs):
            return "termination"
        low = f"{task} {obs}".lower()
        if not all(t in low for t in skill.activation_terms):
            return "activation_lost"
        if age >= self.max_age:
            return "max_age"
        return None

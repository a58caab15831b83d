"""Critics: edits of a live skill proposed from contrasts between the successful and failed episodes it was
active in (rule-based by default; an LLM critic behind the same interface). New skills come from
:mod:`kvmas.memory.procedures`.

All inputs are traces of finished episodes (:func:`kvmas.memory.episode.run_episode`).

>>> from kvmas.memory.critic import ContrastiveRuleCritic
>>> ContrastiveRuleCritic().propose(None, [])
[]
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Protocol

from pydantic import ValidationError

from kvmas.memory.procedures import step_template
from kvmas.memory.skill import Skill
from kvmas.trace import Trace

class Critic(Protocol):
    """Proposes edited versions of ``parent`` (or new skills when ``parent`` is None) from episodes."""

    name: str

    def propose(self, parent: Skill | None, traces: list[Trace]) -> list[Skill]: ...


def _under(trace: Trace, skill_id: str) -> list[str]:
    return [step_template(s) for s in trace.steps if s.meta.get("skill_id") == skill_id]


class ContrastiveRuleCritic:
    """Deterministic edits from success/failure statistics of the episodes where ``parent`` was active:
    insert an action common in successes and rare in failures, delete a step tied to failures, add an
    activation term enriched in successes. Emits up to ``n`` variants (each edit alone, then all together)."""

    name = "contrastive-rule"

    def __init__(self, n: int = 3, hi: float = 0.6, lo: float = 0.2):
        self.n, self.hi, self.lo = n, hi, lo

    def propose(self, parent: Skill | None, traces: list[Trace]) -> list[Skill]:
        if parent is None:
            return []
        rel = [t for t in traces if _under(t, parent.id)]
        succ = [t for t in rel if t.outcome.get("success")]
        fail = [t for t in rel if not t.outcome.get("success")]
        if not succ or not fail:
            return []

        def share(group: list[Trace], act: str) -> float:
            return sum(act in _under(t, parent.id) for t in group) / len(group)

        acts = Counter(a for t in succ for a in set(_under(t, parent.id)))
        first = {}
        for t in succ:
            for i, a in enumerate(_under(t, parent.id)):
                first[a] = min(first.get(a, i), i)
        edits = []
        for act in sorted(acts, key=lambda a: (-acts[a], first[a], a)):
            if act not in parent.steps and share(succ, act) >= self.hi and share(fail, act) <= self.lo \
                    and len(parent.steps) < 6:
                pos = sorted(_under(t, parent.id).index(act) for t in succ if act in _under(t, parent.id))
                at = min(pos[len(pos) // 2], len(parent.steps))
                edits.append(("insert", act, at))
                break
        for step in parent.steps:
            if len(parent.steps) > 1 and share(fail, step) >= self.hi and share(succ, step) <= self.lo:
                edits.append(("delete", step, None))
                break
        words_s = Counter(w for t in succ for w in set(re.findall(r"[a-z]+", t.question.lower())))
        for w, c in sorted(words_s.items(), key=lambda wc: (-wc[1], wc[0])):
            in_fail = sum(w in t.question.lower() for t in fail) / len(fail)
            if len(w) > 3 and c / len(succ) >= 0.8 and in_fail <= self.lo and w not in parent.activation_terms:
                edits.append(("term", w, None))
                break
        variants = [[e] for e in edits] + ([edits] if len(edits) > 1 else [])
        out = []
        for combo in variants[: self.n]:
            steps, terms, act_text = list(parent.steps), list(parent.activation_terms), parent.activation
            for kind, val, at in combo:
                if kind == "insert":
                    steps.insert(at, val)
                elif kind == "delete":
                    steps.remove(val)
                else:
                    terms.append(val)
                    act_text = f"{act_text} (task mentions {val})"
            try:
                out.append(parent.derive(steps=steps, activation_terms=terms, activation=act_text,
                                         provenance={"critic": self.name, "edits": [list(map(str, e)) for e in combo],
                                                     "n_success": len(succ), "n_failure": len(fail)}))
            except ValidationError:
                continue
        return out


class LLMCritic:
    """Asks a chat model to rewrite the skill given successful and failed episodes; the reply must be a JSON
    object with ``activation``, ``steps`` (1-6) and ``termination``. Replies are validated, never executed."""

    name = "llm"

    def __init__(self, model, max_new_tokens: int = 200, n_examples: int = 3):
        self.model, self.max_new_tokens, self.n_examples = model, max_new_tokens, n_examples

    def _prompt(self, parent: Skill, succ: list[Trace], fail: list[Trace]) -> str:
        def show(t: Trace) -> str:
            return f"Task: {t.question}\nActions: " + "; ".join(s.text_out or "" for s in t.steps)

        msg = (f"Improve this skill.\n{parent.render()}\n\nSuccessful episodes:\n"
               + "\n".join(show(t) for t in succ[: self.n_examples]) + "\n\nFailed episodes:\n"
               + "\n".join(show(t) for t in fail[: self.n_examples])
               + '\n\nReply with JSON only: {"activation": "...", "steps": ["..."], "termination": "..."}')
        return self.model.chat_text([{"role": "user", "content": msg}])

    def propose(self, parent: Skill | None, traces: list[Trace]) -> list[Skill]:
        import torch

        if parent is None:
            return []
        rel = [t for t in traces if _under(t, parent.id)]
        succ = [t for t in rel if t.outcome.get("success")]
        fail = [t for t in rel if not t.outcome.get("success")]
        if not succ or not fail:
            return []
        ids = self.model.encode(self._prompt(parent, succ, fail))
        self.model.check_fits(len(ids) + self.max_new_tokens)
        with torch.no_grad():
            out = self.model.hf.generate(torch.tensor([ids], device=self.model.device), do_sample=False,
                                         max_new_tokens=self.max_new_tokens, eos_token_id=self.model.eos_ids or None)
        text = self.model.decode(out[0, len(ids):])
        m = re.search(r"\{.*\}", text, re.S)
        if not m:
            return []
        try:
            data = json.loads(m.group(0))
            return [parent.derive(activation=str(data["activation"]), steps=[str(s) for s in data["steps"]],
                                  termination=str(data["termination"]), provenance={"critic": self.name})]
        except (ValueError, KeyError, TypeError, ValidationError):
            return []

"""Procedures that recur in successful episodes, proposed as new skills (the extraction step of learning).

An episode is cut at its sub-goal boundaries: the steps whose result the world marked as an event (a score
increment, a thing taken, cut, cooked, ...), each with the step right before it when that one reached
nothing (what made it possible: a move, putting a tool down). Every run of 2-6 consecutive units, its object
names abstracted to slots, is a candidate procedure, wherever it sits in the episode. Its *support* is the
set of successful episodes that carried it out (:func:`carried_out`): its steps, grounded with that
episode's slots, done in order, with only steps that reached no sub-goal (at most ``max_gap``) in between; a
step naming a slot the episode lacks is skipped, as it is at run time (a second ingredient in a
one-ingredient recipe). So a procedure recurs across episodes whose beginnings and middles differ (another
order of the same sub-goals, another recipe size, another family) and is found where a shared prefix ends.

Candidates with enough support are chosen greedily by the steps they would hint that no live skill has and
no chosen candidate already covers; a candidate that is one live skill's procedure again is refused. Every
candidate not proposed is returned with why (:class:`Extraction`). Nothing here knows a world's commands:
only events, templates and slots.

>>> from kvmas.envs import make_env
>>> from kvmas.memory.episode import play_script
>>> from kvmas.memory.procedures import extract
>>> def fetch(seed, extra):  # a house "place" task: fetch the object, deliver it
...     env = make_env("house", seed)
...     env.reset()
...     o, p, t = (env.slots[k] for k in ("object", "place", "target"))
...     return play_script(env, [f"go to {p}", f"take {o} from {p}", *extra, f"go to {t}", f"put {o} in {t}"])
>>> traces = [fetch(2, []), fetch(3, ["look"]), fetch(4, [])]  # three "place" tasks
>>> ex = extract(traces, "house", min_support=2)
>>> [(s.steps, s.provenance["support"]) for s in ex.skills][0]
(['go to <place>', 'take <object> from <place>', 'go to <target>', 'put <object> in <target>'], 3)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from pydantic import ValidationError

from kvmas.envs.base import abstract, ground, unbound
from kvmas.memory.runtime import matches
from kvmas.memory.skill import Skill
from kvmas.trace import Trace

MAX_STEPS = 6  # a skill's longest procedure (Skill.steps)
KNOWN_WEIGHT = 0.25  # a step some live skill already hints counts this much towards a candidate's gain


def step_template(step) -> str:
    """A recorded step's action as a skill step: the world's template when it recorded one, else the action
    with the step's slots abstracted."""
    tpl = step.meta.get("template")
    return tpl if tpl else abstract(step.text_out or "", step.meta.get("slots") or {})


def episode_slots(trace: Trace) -> dict[str, str]:
    """Every slot the episode bound (later values win): slots are recorded as they were when each action was
    chosen, so one bound by the last step is in its ``obs`` only, never missed by taking the union."""
    out: dict[str, str] = {}
    for s in trace.steps:
        out.update(s.meta.get("slots") or {})
    return out


def units(trace: Trace, enablers: bool = True) -> list[tuple[int, str]]:
    """The episode cut at its sub-goals: (step index, template) of every step that reached one (the world
    gave an event), each preceded, with ``enablers``, by the step right before it when that step reached
    none."""
    out: list[tuple[int, str]] = []
    for i, s in enumerate(trace.steps):
        if not s.meta.get("event"):
            continue
        prev = trace.steps[i - 1] if i else None
        if enablers and prev is not None and not prev.meta.get("event") and (not out or out[-1][0] != i - 1):
            out.append((i - 1, step_template(prev)))
        out.append((i, step_template(s)))
    return out


def carried_out(steps: list[str], trace: Trace, *, max_gap: int = 3,
                slots: dict[str, str] | None = None) -> list[int] | None:
    """Where ``trace`` carried out the procedure ``steps`` (their step indices), or None.

    The steps are grounded with the episode's slots and those naming a slot it lacks dropped (as
    :func:`kvmas.memory.runtime.step_hint` skips them); at least two must remain, matched in order
    (:func:`~kvmas.memory.runtime.matches`), the first match anywhere, each next one within ``max_gap``
    steps that reached no sub-goal: another sub-goal reached in between means the episode did something else
    there, which the procedure would have hinted past."""
    slots = episode_slots(trace) if slots is None else slots
    want = [g for g in (ground(s, slots) for s in steps) if not unbound(g)]
    if len(want) < 2:
        return None
    acts = [s.text_out or "" for s in trace.steps]
    events = [bool(s.meta.get("event")) for s in trace.steps]
    for start, a in enumerate(acts):
        if not matches(want[0], a):
            continue
        got, at = [start], start
        for w in want[1:]:
            nxt = None
            for j in range(at + 1, min(len(acts), at + 2 + max_gap)):
                if matches(w, acts[j]):
                    nxt = j
                    break
                if events[j]:
                    break
            if nxt is None:
                break
            got.append(nxt)
            at = nxt
        if len(got) == len(want):
            return got
    return None


@dataclass
class Proposal:
    """One candidate procedure: its steps, the episodes that carried it out, the steps no live skill has,
    its gain when it was judged, and why it was not proposed ("" when it was)."""

    steps: list[str]
    support: list[str] = field(default_factory=list)  # run ids
    families: list[str] = field(default_factory=list)
    novel: list[str] = field(default_factory=list)
    gain: float = 0.0
    reason: str = ""
    kind: str = ""  # the reason's kind: support, live, gain, budget, invalid

    def as_dict(self) -> dict:
        return {"steps": self.steps, "support": len(self.support), "families": self.families,
                "novel": self.novel, "gain": round(self.gain, 3), "reason": self.reason}


@dataclass
class Extraction:
    """What :func:`extract` found: the skills proposed (for the gate), the proposals behind them, and every
    candidate procedure not proposed, with its reason."""

    skills: list[Skill]
    proposed: list[Proposal]
    rejected: list[Proposal]

    def summary(self, top: int = 12) -> dict:
        """Counts of the rejections by reason and the ``top`` rejected candidates by gain."""
        why = Counter(p.kind for p in self.rejected)
        best = sorted(self.rejected, key=lambda p: (-p.gain, -len(p.support), p.steps))[:top]
        return {"proposed": [p.as_dict() for p in self.proposed], "n_rejected": len(self.rejected),
                "rejected_by_reason": dict(sorted(why.items())), "top_rejected": [p.as_dict() for p in best]}


def _camel(text: str) -> str:
    return "".join(w.capitalize() for w in re.findall(r"[a-z]+", re.sub(r"<\w+>", " ", text).lower())[:3])


def _is_subsequence(steps: list[str], of: list[str]) -> bool:
    it = iter(of)
    return all(any(s == o for o in it) for s in steps)


def _terms(support: list[Trace], others: list[Trace], lo: float = 0.2) -> list[str]:
    """Words of the task (its slots abstracted) that every supporting episode's task has and at most ``lo``
    of the other successes' tasks have: what tells this procedure's tasks apart, if anything does."""
    def words(t: Trace) -> set[str]:
        return {w for w in re.findall(r"[a-z]+", abstract(t.question, episode_slots(t)).lower()) if len(w) >= 3}

    if not others:
        return []
    shared = set.intersection(*(words(t) for t in support))
    rare = [w for w in sorted(shared) if sum(w in words(t) for t in others) / len(others) <= lo]
    return rare[:2]


def extract(traces: list[Trace], scope: str, *, min_support: int = 2, live: list[Skill] = (),
            max_candidates: int = 4, max_gap: int = 3) -> Extraction:
    """New-skill candidates from the successful ``traces``: recurring procedures (see the module docstring),
    at most ``max_candidates``, each carried out by >= ``min_support`` successes; ``live`` are the skills in
    use (a candidate that is one of their procedures again is refused; their steps count little in the
    gain). Every candidate not proposed is in :attr:`Extraction.rejected` with its reason."""
    succ = [t for t in traces if t.outcome.get("success") and t.steps]
    slots = {t.run_id: episode_slots(t) for t in succ}
    known = {s for sk in live for s in sk.steps}
    windows: dict[tuple[str, ...], None] = {}
    for t in succ:
        for enablers in (True, False):
            seq = [tpl for _, tpl in units(t, enablers)]
            for n in range(2, MAX_STEPS + 1):
                for i in range(len(seq) - n + 1):
                    windows.setdefault(tuple(seq[i:i + n]), None)
    rejected: list[Proposal] = []
    pool: list[tuple[Proposal, dict[str, list[int]]]] = []
    for w in windows:
        steps = list(w)
        where = {}
        for t in succ:
            got = carried_out(steps, t, max_gap=max_gap, slots=slots[t.run_id])
            if got is not None:
                where[t.run_id] = got
        fams = sorted({t.outcome.get("task_family", "") for t in succ if t.run_id in where})
        prop = Proposal(steps=steps, support=sorted(where), families=fams, novel=[s for s in steps if s not in known])
        twin = next((sk for sk in live if _is_subsequence(steps, sk.steps)), None)
        if len(where) < min_support:
            prop.reason, prop.kind = f"support {len(where)} < {min_support}", "support"
        elif twin is not None:
            prop.reason, prop.kind = f"what live skill {twin.name} already does", "live"
        if prop.reason:
            rejected.append(prop)
        else:
            pool.append((prop, where))
    covered: set[tuple[str, int]] = set()
    by_id = {t.run_id: t for t in succ}

    def gain(prop: Proposal, where: dict[str, list[int]]) -> float:
        total = 0.0
        for rid, idx in where.items():
            want = [s for s in prop.steps if not unbound(ground(s, slots[rid]))]
            for s, i in zip(want, idx):
                if (rid, i) not in covered:
                    total += 1.0 if s not in known else KNOWN_WEIGHT
        return total

    seen = Counter(tpl for t in succ for tpl in {tpl for _, tpl in units(t)})  # episodes per step: for names
    chosen: list[tuple[Proposal, dict[str, list[int]]]] = []
    while pool:
        for prop, where in pool:
            prop.gain = gain(prop, where)
        pool.sort(key=lambda pw: (-pw[0].gain, -len(pw[0].steps), -len(pw[0].support), pw[0].steps))
        prop, where = pool[0]
        if len(chosen) >= max_candidates or prop.gain < min_support:
            for p, _ in pool:
                low = p.gain < min_support
                p.reason = (f"adds gain {p.gain:.2f} < {min_support} beyond the chosen" if low
                            else f"not among the best {max_candidates}")
                p.kind = "gain" if low else "budget"
            rejected += [p for p, _ in pool]
            break
        pool.pop(0)
        chosen.append((prop, where))
        covered |= {(rid, i) for rid, idx in where.items() for i in idx}
    skills, proposed = [], []
    for prop, where in chosen:
        sup = [by_id[r] for r in prop.support]
        try:
            skills.append(_skill(prop, where, sup, [t for t in succ if t.run_id not in where], scope, seen))
            proposed.append(prop)
        except ValidationError as exc:
            prop.reason, prop.kind = f"not a valid skill ({exc.errors()[0]['msg']})", "invalid"
            rejected.append(prop)
    return Extraction(skills=skills, proposed=proposed, rejected=rejected)


def _skill(prop: Proposal, where: dict[str, list[int]], support: list[Trace], others: list[Trace],
           scope: str, seen: Counter) -> Skill:
    """The skill of a chosen proposal: when (the task, and the sub-goal before the procedure where the
    episodes agree on one), its steps, and when to stop (what the last step's observation said every time)."""
    before, ends, tasks = [], [], []
    longest = max(len(idx) for idx in where.values())
    for t in support:
        idx = where[t.run_id]
        sl = episode_slots(t)
        prior = [tpl for i, tpl in units(t, enablers=False) if i < idx[0]]
        before.append(prior[-1] if prior else "")
        if len(idx) == longest:  # the observation after the procedure's own last step, not a skipped one's
            ends.append(" ".join(re.split(r"(?<=[.!?])\s+", abstract(t.steps[idx[-1]].meta.get("obs_after", ""),
                                                                    sl))[:2]))
        tasks.append(abstract(t.question.split(". ")[0], sl))
    prev, n = Counter(before).most_common(1)[0]
    task = Counter(tasks).most_common(1)[0][0]
    after = "at the start" if prev == "" and n == len(before) else (f"after {prev}" if prev else "")
    activation = f"the task is to {task}" + (f"; {after}" if after and n == len(before) else "")
    novel = prop.novel or prop.steps
    fam = prop.families[0] if len(prop.families) == 1 else ""
    rarest = min(novel, key=lambda s: (seen[s], novel.index(s)))  # its most specific step names it
    name = _camel(rarest) + ("Then" + _camel(prop.steps[-1]) if prop.steps[-1] != rarest else "")
    return Skill(
        scope=scope, name=name[:80] or "Procedure", source="extracted",
        activation=activation[:400], activation_terms=_terms(support, others),
        steps=prop.steps, termination=(Counter(ends).most_common(1)[0][0] or "the task is done")[:300],
        provenance={"episodes": prop.support, "family": fam, "families": prop.families, "support": len(support),
                    "rule": "recurring-procedure", "group": novel[0], "novel": prop.novel,
                    "gain": round(prop.gain, 3)})

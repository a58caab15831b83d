"""Procedurally generated text environments of our own, with admissible-action lists (seeded, no downloads).

- ``house``: ALFWorld-lite. Put an object somewhere, possibly after cleaning / heating / cooling it.
  Recurring sub-procedures: fetch (go to + take), treat (go to appliance + use it), deliver (go to + put).
- ``codebreaker``: Mastermind-lite. Guess a hidden code from exact/partial feedback; the admissible list is a
  sampled set of guesses that always contains one consistent with all feedback so far.

Splits: ``train`` (in-domain) and ``ood`` (unseen objects and furniture; a longer code).

>>> from kvmas.envs import make_env
>>> env = make_env("house", seed=3)
>>> obs = env.reset()
>>> env.task_family in ("place", "clean", "heat", "cool"), "go to sinkbasin 1" in env.admissible()
(True, True)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvmas.envs.base import StepResult
from kvmas.errors import BadInputError

SPLITS = ("train", "ood")


# -- house ----------------------------------------------------------------------------------------------
_HOUSE = {
    "train": dict(objects=["apple", "mug", "potato", "plate", "tomato", "cup"],
                  furniture=["countertop 1", "countertop 2", "cabinet 1", "drawer 1", "table 1", "shelf 1"]),
    "ood": dict(objects=["egg", "bowl", "lettuce", "pan", "bread", "glass"],
                furniture=["countertop 3", "desk 1", "cabinet 2", "drawer 2", "sidetable 1", "stool 1"]),
}
_APPLIANCE = {"clean": ("sinkbasin 1", "clean", "clean"), "heat": ("microwave 1", "heat", "hot"),
              "cool": ("fridge 1", "cool", "cold")}
_FAMILIES = ("place", "clean", "heat", "cool")


@dataclass
class House:
    """A room with six pieces of furniture and three appliances; one object to deliver."""

    seed: int
    split: str = "train"
    max_steps: int = 10
    name: str = "house"
    task_family: str = ""
    task: str = ""
    t: int = 0
    _state: dict = field(default_factory=dict)

    def reset(self) -> str:
        rng = random.Random(f"house:{self.split}:{self.seed}")
        spec = _HOUSE[self.split]
        obj = rng.choice(spec["objects"])
        start, target = rng.sample(spec["furniture"], 2)
        fam = rng.choice(_FAMILIES)
        self.task_family = fam
        adj = "" if fam == "place" else _APPLIANCE[fam][2] + " "
        self.task = f"put a {adj}{obj} in {target}. The {obj} is in {start}."
        self.locations = sorted(spec["furniture"] + [a[0] for a in _APPLIANCE.values()])
        self._state = dict(obj=obj, start=start, target=target, at=None, obj_at=start, holding=False, props=set())
        self.t = 0
        return "You are in the middle of a room."

    @property
    def slots(self) -> dict[str, str]:
        s = self._state
        return {"object": s["obj"], "target": s["target"], "place": s["start"]}

    def admissible(self) -> list[str]:
        s = self._state
        acts = [f"go to {loc}" for loc in self.locations if loc != s["at"]]
        if s["at"] is not None:
            if not s["holding"] and s["obj_at"] == s["at"]:
                acts.append(f"take {s['obj']} from {s['at']}")
            if s["holding"]:
                acts.append(f"put {s['obj']} in {s['at']}")
                for fam, (app, verb, _) in _APPLIANCE.items():
                    if s["at"] == app:
                        acts.append(f"{verb} {s['obj']} with {app}")
        acts.append("look")
        return acts

    def step(self, action: str) -> StepResult:
        if action not in self.admissible():
            raise BadInputError(f"not an admissible action: {action!r}")
        s = self._state
        self.t += 1
        event, reward, done = None, 0.0, False
        if action.startswith("go to "):
            s["at"] = action[6:]
            here = f" You see the {s['obj']}." if s["obj_at"] == s["at"] and not s["holding"] else ""
            obs = f"You arrive at {s['at']}.{here}"
        elif action.startswith("take "):
            s["holding"], s["obj_at"] = True, None
            obs, event = f"You pick up the {s['obj']}.", "take"
        elif action.startswith("put "):
            s["holding"], s["obj_at"] = False, s["at"]
            obs, event = f"You put the {s['obj']} in {s['at']}.", "put"
            want = set() if self.task_family == "place" else {_APPLIANCE[self.task_family][2]}
            if s["at"] == s["target"]:
                done = True
                reward = 1.0 if want <= s["props"] else 0.0
        elif action == "look":
            obs = f"You are at {s['at'] or 'the middle of the room'}."
        else:
            verb = action.split()[0]
            prop = {v: p for _, v, p in _APPLIANCE.values()}[verb]
            s["props"].add(prop)
            obs, event = f"You {verb} the {s['obj']}. It is {prop} now.", verb
        if self.t >= self.max_steps:
            done = True
        return StepResult(obs, reward, done, event)


# -- codebreaker -----------------------------------------------------------------------------------------
def _feedback(secret: tuple[int, ...], guess: tuple[int, ...]) -> tuple[int, int]:
    exact = sum(a == b for a, b in zip(secret, guess))
    common = sum(min(secret.count(d), guess.count(d)) for d in set(guess))
    return exact, common - exact


@dataclass
class CodeBreaker:
    """Guess a hidden code of digits; feedback counts exact and misplaced digits."""

    seed: int
    split: str = "train"
    max_steps: int = 6
    n_choices: int = 5
    name: str = "codebreaker"
    task_family: str = ""
    task: str = ""
    t: int = 0

    def reset(self) -> str:
        self._rng = random.Random(f"code:{self.split}:{self.seed}")
        self.length, self.digits = (3, 4) if self.split == "train" else (4, 5)
        self.secret = tuple(self._rng.randint(1, self.digits) for _ in range(self.length))
        self.task_family = f"code{self.length}x{self.digits}"
        self.task = (f"find the secret code of {self.length} digits from 1 to {self.digits}. "
                     "Feedback: exact = right digit right place, partial = right digit wrong place.")
        self.history: list[tuple[tuple[int, ...], tuple[int, int]]] = []
        self.t = 0
        self._choices = self._sample_choices()
        return "No guesses yet."

    @property
    def slots(self) -> dict[str, str]:
        return {}

    def _consistent(self, g: tuple[int, ...]) -> bool:
        return all(_feedback(g, h) == fb for h, fb in self.history)

    def _sample_choices(self) -> list[str]:
        pool = [tuple(self._rng.randint(1, self.digits) for _ in range(self.length)) for _ in range(400)]
        consistent = [g for g in pool if self._consistent(g)] or [self.secret]
        picks = {self._rng.choice(consistent)}
        while len(picks) < self.n_choices:
            picks.add(self._rng.choice(pool))
        return sorted("guess " + " ".join(map(str, g)) for g in picks)

    def admissible(self) -> list[str]:
        return list(self._choices)

    def step(self, action: str) -> StepResult:
        if action not in self._choices:
            raise BadInputError(f"not an admissible action: {action!r}")
        self.t += 1
        guess = tuple(int(x) for x in action.split()[1:])
        fb = _feedback(self.secret, guess)
        self.history.append((guess, fb))
        solved = fb[0] == self.length
        done = solved or self.t >= self.max_steps
        obs = f"{' '.join(map(str, guess))}: {fb[0]} exact, {fb[1]} partial."
        if not done:
            self._choices = self._sample_choices()
        event = "solve" if solved else ("progress" if fb[0] + fb[1] > 0 else None)
        return StepResult(obs, 1.0 if solved else 0.0, done, event)

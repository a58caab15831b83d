"""ScienceWorld tasks as a :class:`~kvmas.envs.base.TextEnv` (the ``envs`` extra: ``pip install scienceworld``,
plus a Java runtime: ``apt-get install -y default-jre-headless``).

An episode is one (task name, variation) with ScienceWorld's ``easy`` simplifications (teleport, open doors
and containers, self-watering pots). ScienceWorld splits every task's variations into train / dev / test; the
splits here are:

- ``train`` / ``dev`` / ``test``: those variations of the built task types (``tasks``, default
  :data:`DEFAULT_TASKS`), interleaved across the types in a seeded order; episode ``seed`` is item
  ``seed % n`` of that list, so consecutive seeds are distinct variations.
- ``ood``: the test variations of one task type never built on (``unseen``, default :data:`DEFAULT_UNSEEN`).
- ``task=`` and ``variation=`` play one variation directly (it must belong to the split).

Score: ScienceWorld's 0-100 (−100 when the task is failed, e.g. focusing on the wrong thing), normalised to
[0, 1] with failure as 0; won at 100.

The admissible list: ScienceWorld's valid action-object combinations number ~100-1,600 per step, too many
for a policy that scores every one, so :func:`prune_actions` keeps at most ``max_actions`` (default 64) by a
fixed rule that reads only the task text and the actions, never the gold path (see the function).

Slots: ``<box>`` and ``<room>`` from the task text when it names them, ``<thing>`` once a focus earned score.

>>> from kvmas.envs.scienceworld_env import prune_actions, task_slots
>>> task = "Your task is to find a(n) animal. First, focus on the thing. Then, move it to the red box in the kitchen."
>>> acts = ["focus on air", "focus on dove", "look at dove", "move dove to red box", "move dove to fire pit",
...         "teleport to kitchen", "reset task", "look around", "go to door to kitchen", "mix kitchen"]
>>> prune_actions(acts, task, max_actions=4)
['focus on dove', 'look around', 'move dove to red box', 'teleport to kitchen']
>>> "move dove in inventory to red box" in prune_actions(acts + ["move dove in inventory to red box"], task, 3)
True
>>> task_slots(task)
{'box': 'red box', 'room': 'kitchen'}
"""

from __future__ import annotations

import random
import re
import shutil
import threading
from dataclasses import dataclass, field

from kvmas.envs.base import StepResult, abstract, call_with_timeout, require
from kvmas.errors import BadInputError, EnvError

SPLITS = ("train", "dev", "test", "ood")
DEFAULT_TASKS = ("find-living-thing", "find-plant", "find-animal")
DEFAULT_UNSEEN = "find-non-living-thing"
SIMPLIFICATION = "easy"
ROOMS = ("kitchen", "hallway", "bedroom", "living room", "bathroom", "art studio", "workshop", "greenhouse",
         "outside", "foundry")

_INSTALL = "pip install 'kvmas[envs]' (or: pip install scienceworld)"
_JAVA = "apt-get install -y default-jre-headless"


def _package():
    return require("scienceworld", name="ScienceWorld", install=_INSTALL)


def task_names() -> list[str]:
    """Every ScienceWorld task name (from the package; no simulator started)."""
    _package()
    from scienceworld.constants import ID2TASK

    return list(ID2TASK.values())


def check_task(name: str) -> str:
    names = task_names()
    if name not in names:
        raise BadInputError(f"unknown ScienceWorld task {name!r} (expected one of {', '.join(names)})")
    return name


def java_available() -> str | None:
    """Why ScienceWorld cannot start here (no ``java`` on PATH), or None."""
    return None if shutil.which("java") else f"ScienceWorld needs a Java runtime and java is not on PATH ({_JAVA})"


class _Simulator:
    """The one ScienceWorld simulator (a JVM) of this process, started on first use (~7 s) and shared by
    episodes one at a time: the episode that loaded the current task owns it."""

    _lock = threading.Lock()
    _env = None
    owner: object = None
    _variations: dict[tuple[str, str], list[int]] = {}

    @classmethod
    def get(cls, timeout_s: float = 120.0):
        with cls._lock:
            if cls._env is None:
                why = java_available()
                if why:
                    raise EnvError(why)
                sw = _package()
                try:
                    cls._env = call_with_timeout(lambda: sw.ScienceWorldEnv("", envStepLimit=10 ** 6), timeout_s,
                                                 "starting the ScienceWorld simulator")
                except EnvError:
                    raise
                except Exception as exc:
                    raise EnvError(f"the ScienceWorld simulator did not start: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            return cls._env

    @classmethod
    def variations(cls, task: str, which: str, timeout_s: float = 120.0) -> list[int]:
        """ScienceWorld's own ``train`` / ``dev`` / ``test`` variation indices of ``task``."""
        key = (task, which)
        if key not in cls._variations:
            env = cls.get()
            cls.owner = None  # loading a task to read its splits takes the simulator from any episode

            def read() -> list[int]:
                env.load(task, 0, SIMPLIFICATION)
                return list({"train": env.get_variations_train, "dev": env.get_variations_dev,
                             "test": env.get_variations_test}[which]())

            cls._variations[key] = call_with_timeout(read, timeout_s, f"reading the variations of {task}")
        return cls._variations[key]

    @classmethod
    def shutdown(cls) -> None:
        with cls._lock:
            if cls._env is not None:
                try:
                    cls._env.close()
                finally:
                    cls._env, cls.owner = None, None


def shutdown() -> None:
    """Stop this process's ScienceWorld simulator (a later episode starts a new one)."""
    _Simulator.shutdown()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - {"the", "a", "an", "it", "to", "in", "on", "of", "is",
                                                        "first", "then", "your", "task", "thing", "n"}


_NEVER = re.compile(r"^(reset task|task|look at |look in |eat |close |dunk |flush |put down |wait$)")
_USELESS = {"agent", "air", "inventory", "ground"} | set(ROOMS)
_ALWAYS = re.compile(r"^(look around|inventory|wait1|teleport to |go to )")
_SIMPLE_VERBS = ("focus on ", "pick up ", "open ", "activate ", "deactivate ", "read ", "connect ", "use ")


def prune_actions(valid: list[str], task: str, max_actions: int = 64, held: str = "", focused: str = "") -> list[str]:
    """At most ``max_actions`` of ScienceWorld's valid actions, sorted.

    Dropped: actions that cannot serve a task (``reset task``, ``look at``, ``eat``, ``close``, ...), anything
    about a door (the ``easy`` doors are open), ``go to`` where ``teleport to`` reaches every room, and acting
    on the agent, the air, the ground, the inventory or a room. Kept: ``look around``, ``inventory``, ``wait1``
    and the moves between rooms; then, in tiers, each by words shared with the task: moving something held into
    what the task names (its box) what is held (named in ``held``, the
    inventory text, or ``... in inventory``) or was focused on (``focused``);
    focus on / pick up; the other one-object verbs (open, activate, read, ...);
    moving or pouring anything else into what the task names; the rest."""
    want = _words(task)
    goal = _words(" ".join(task_slots(task).values()) or task) - set(" ".join(ROOMS).split())
    teleport = any(a.startswith("teleport to ") for a in valid)
    inventory, focus = _words(held) - {"inventory", "see"}, _words(focused)
    keep, rest = [], []
    for a in sorted(set(valid)):
        if _NEVER.match(a) or re.search(r"\bdoor\b", a) or (teleport and a.startswith("go to ")):
            continue
        if _ALWAYS.match(a):
            keep.append(a)
            continue
        obj = re.sub(r"^(focus on|pick up|open|activate|deactivate|read|use|mix|move|pour|connect) ", "", a)
        if obj.split(" to ")[0].split(" in ")[0].split(" on ")[0] in _USELESS:
            continue
        into_goal = a.startswith(("move ", "pour ")) and bool(goal & _words(a.split(" to ")[-1].split(" into ")[-1]))
        mover = _words(obj.split(" to ")[0].split(" into ")[0])
        if into_goal and (" in inventory " in a or (mover and (mover <= inventory or mover <= focus))):
            tier = 0
        elif a.startswith(("focus on ", "pick up ")):
            tier = 1
        elif a.startswith(_SIMPLE_VERBS):
            tier = 2
        else:
            tier = 3 if into_goal else 4
        rest.append((tier, -len(want & _words(a)), len(a), a))
    room = max(0, max_actions - len(keep))
    return sorted(keep[:max_actions] + [a for *_, a in sorted(rest)[:room]])


def task_slots(task: str) -> dict[str, str]:
    """The slots a task text names: ``box`` (``red box``) and ``room`` (where it says to go or look)."""
    out = {}
    m = re.search(r"\b(\w+ box)\b", task)
    if m:
        out["box"] = m.group(1)
    m = re.search(r"\b(?:in|around|to) the (" + "|".join(ROOMS) + r")\b", task)
    if m:
        out["room"] = m.group(1)
    return out


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def split_items(split: str, tasks: tuple[str, ...], unseen: str) -> list[tuple[str, int]]:
    """The (task, variation) list of a split: ScienceWorld's own variations, each type's shuffled with a fixed
    seed, then interleaved across the types."""
    types, which = ((unseen,), "test") if split == "ood" else (tasks, split)
    lists = []
    for task in types:
        vs = list(_Simulator.variations(task, which))
        random.Random(f"scienceworld:{task}:{which}").shuffle(vs)
        lists.append([(task, v) for v in vs])
    out = []
    for i in range(max(map(len, lists), default=0)):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out


def _task_list(tasks) -> tuple[str, ...]:
    if tasks is None:
        return DEFAULT_TASKS
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise BadInputError("tasks must name at least one ScienceWorld task")
    return tuple(check_task(t) for t in tasks)


@dataclass
class ScienceTask:
    """One ScienceWorld variation (see the module docstring)."""

    seed: int
    split: str = "train"
    task_name: str = ""
    variation: int = 0
    max_steps: int = 30
    max_actions: int = 64
    step_timeout_s: float = 60.0
    name: str = "scienceworld"
    task_family: str = ""
    task: str = ""
    t: int = 0
    _valid: list = field(default_factory=list)
    _score: int = 0
    _slots: dict = field(default_factory=dict)
    _admissible: list | None = None
    _held: str = ""

    @classmethod
    def make(cls, seed: int, split: str = "train", *, tasks=None, unseen: str | None = None,
             task: str | None = None, variation: int | None = None, max_steps: int = 30, max_actions: int = 64,
             step_timeout_s: float = 60.0) -> "ScienceTask":
        if split not in SPLITS:
            raise BadInputError(f"unknown split {split!r} for scienceworld (expected one of {', '.join(SPLITS)})")
        if max_steps < 1 or max_actions < 2:
            raise BadInputError(f"max_steps must be >= 1 and max_actions >= 2 (got {max_steps}, {max_actions})")
        types = _task_list(tasks)
        unseen = check_task(unseen or DEFAULT_UNSEEN)
        if unseen in types:
            raise BadInputError(f"the unseen task {unseen!r} is also a built task type")
        if task is not None:
            check_task(task)
            if variation is None:
                raise BadInputError("task= needs variation= too")
            which = "test" if split == "ood" else split
            known = _Simulator.variations(task, which)
            if variation not in known:
                raise BadInputError(f"variation {variation} of {task} is not in its {which} split "
                                    f"({len(known)} variations: {', '.join(map(str, known[:12]))}"
                                    f"{', ...' if len(known) > 12 else ''})")
            item = (task, variation)
        else:
            if variation is not None:
                raise BadInputError("variation= needs task= too")
            items = split_items(split, types, unseen)
            if not items:
                raise EnvError(f"ScienceWorld has no {split} variations for {', '.join(types)}")
            item = items[seed % len(items)]
        return cls(seed=seed, split=split, task_name=item[0], variation=item[1], max_steps=max_steps,
                   max_actions=max_actions, step_timeout_s=step_timeout_s)

    def _sim(self):
        env = _Simulator.get()
        if _Simulator.owner is not self:
            raise EnvError("another ScienceWorld episode took over the simulator (one episode at a time per process)")
        return env

    def reset(self) -> str:
        env = _Simulator.get()

        def start():
            env.load(self.task_name, self.variation, SIMPLIFICATION)
            return env.reset()

        obs, info = call_with_timeout(start, self.step_timeout_s, f"loading ScienceWorld {self.task_name} "
                                                                  f"variation {self.variation}")
        _Simulator.owner = self
        self.task_family = self.task_name
        self.task = _clean(re.sub(r"^\s*Task Description:\s*", "", info.get("taskDesc", "")))
        self._valid, self._score, self.t = list(info.get("valid") or []), int(info.get("score", 0)), 0
        self._slots, self._admissible, self._held = task_slots(self.task), None, str(info.get("inv", ""))
        return _clean(obs)

    @property
    def slots(self) -> dict[str, str]:
        return dict(self._slots)

    def admissible(self) -> list[str]:
        if self._admissible is None:
            self._admissible = prune_actions(self._valid, self.task, self.max_actions, self._held,
                                             self._slots.get("thing", ""))
        return list(self._admissible)

    def step(self, action: str) -> StepResult:
        if action not in self.admissible():
            raise BadInputError(f"not an admissible action: {action!r}")
        env = self._sim()
        obs, _, done, info = call_with_timeout(lambda: env.step(action), self.step_timeout_s,
                                               f"ScienceWorld step {action!r}")
        self.t += 1
        score = int(info.get("score", 0))
        event = None
        if score > self._score:
            event = action.split()[0]
            if action.startswith("focus on ") and "thing" not in self._slots:
                self._slots["thing"] = action[len("focus on "):]
        self._score, self._valid, self._admissible = score, list(info.get("valid") or []), None
        self._held = str(info.get("inv", ""))
        won = score >= 100
        norm = max(0, min(100, score)) / 100
        done = bool(done or won or score < 0 or self.t >= self.max_steps)
        return StepResult(_clean(obs), norm if done else 0.0, done, event, score=norm, won=won)

    def template(self, action: str) -> str:
        return abstract(action, self._slots)

    def close(self) -> None:
        if _Simulator.owner is self:
            _Simulator.owner = None

"""What every text environment is: the interface the skill memory plays (:class:`TextEnv`), one step's result,
and a step timeout for worlds that run outside Python (an interpreter, a JVM).

>>> from kvmas.envs.base import StepResult, call_with_timeout
>>> StepResult("You take it.", 0.0, False, "take").won is None
True
>>> call_with_timeout(lambda: 41 + 1, 5.0, "adding")
42
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

from kvmas.errors import EnvError

T = TypeVar("T")


@dataclass
class StepResult:
    """One step: the observation, the reward, whether the episode ended, and a sub-goal event or None.

    ``reward`` is what learning credits; the worlds with a score give it once, at the end (the normalised
    final score), as the house env gives its 1 or 0. ``score`` (normalised progress so far, in [0, 1]) and
    ``won`` are set by worlds that keep a score; the house env leaves them None (success is reward > 0)."""

    obs: str
    reward: float
    done: bool
    event: str | None = None  # a sub-goal event ("take", "clean", "score", ...) or None
    score: float | None = None
    won: bool | None = None


class TextEnv(Protocol):
    """What :func:`kvmas.memory.episode.run_episode` plays.

    ``slots`` maps slot names to this episode's values (``<object>`` → ``apple``); it may grow during the
    episode (a recipe read, a thing focused on) and is recorded with every step. ``template(action)`` (optional)
    is the action with the episode's names replaced by slots, as a learned skill would write it; without it
    the memory abstracts by the slots alone. ``close()`` (optional) frees what the episode holds."""

    name: str
    seed: int
    split: str
    task: str
    task_family: str
    max_steps: int
    t: int

    @property
    def slots(self) -> dict[str, str]: ...

    def reset(self) -> str: ...

    def admissible(self) -> list[str]: ...

    def step(self, action: str) -> StepResult: ...


def require(*modules: str, name: str, install: str):
    """Import ``modules`` (an optional package and the parts of it an adapter needs) and return the first, or
    raise :class:`EnvError` naming the world and how to install it.

    >>> require("json", name="JSON", install="it ships with Python").__name__
    'json'
    """
    try:
        found = [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise EnvError(f"{name} is not installed ({exc.name or exc}); {install}") from None
    return found[0]


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()`` in a worker thread; an :class:`EnvError` if it takes longer than ``timeout_s`` seconds.

    The worker is a daemon thread: a world that hangs is abandoned (the caller should drop that world), and
    the run ends with one line instead of waiting forever."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    th = threading.Thread(target=work, name=f"kvmas-env: {what}", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise EnvError(f"{what} did not finish within {timeout_s:g} s (the environment hangs; step timeout)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def abstract(action: str, slots: dict[str, str]) -> str:
    """Replace episode-specific names by slots (``<object>``, ``<target>``, ``<place>``), longest first, whole
    words only (``salt`` is not a slot inside ``basalt``).

    >>> abstract("take apple from table 1", {"object": "apple", "place": "table 1"})
    'take <object> from <place>'
    >>> abstract("take basalt", {"ingredient1": "salt"})
    'take basalt'
    """
    out = action
    for key, val in sorted(slots.items(), key=lambda kv: -len(kv[1])):
        if val:
            out = re.sub(rf"(?<![\w<]){re.escape(val)}(?![\w>])", f"<{key}>", out)
    return out


def ground(template: str, slots: dict[str, str]) -> str:
    """Fill a template's slots with the episode's values (a slot the episode lacks stays ``<name>``)."""
    out = template
    for key, val in slots.items():
        out = out.replace(f"<{key}>", val)
    return out


SLOT = re.compile(r"<\w+>")


def unbound(text: str) -> bool:
    """Whether a grounded step still names a slot this episode has no value for (yet).

    >>> unbound("take <ingredient2>"), unbound("take red potato")
    (True, False)
    """
    return bool(SLOT.search(text))

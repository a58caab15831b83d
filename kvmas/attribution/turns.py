"""What each turn of a log does, inferred from the turn itself, not from who wrote it.

Kinds: ``task`` (the user's / human's statement of the task), ``tool`` (a terminal, code executor or tool
result), ``instruct`` (addresses another agent: an ``(-> X)`` turn, or names a later speaker and tells it what
to do), ``act`` (runs something: code, a tool call, a search), ``plan`` (lays out steps), ``report`` (states a
result or the answer), ``handover`` (ends the turn or the run: ``TERMINATE``, "next speaker"), ``other``.
``task`` and ``tool`` turns are never blamed: they carry the question and the environment's answers.

>>> from kvmas.attribution.log import from_whowhen
>>> log = from_whowhen({"history": [
...     {"role": "human", "content": "How many moons?"},
...     {"role": "Orchestrator (thought)", "content": "Plan: 1. search the web 2. count."},
...     {"role": "Orchestrator (-> WebSurfer)", "content": "Please search for the moons of Mars."},
...     {"role": "WebSurfer", "content": "I typed 'moons of Mars' into the search bar. No results found."},
...     {"role": "Orchestrator (thought)", "content": "The answer is 2."}]})
>>> turn_kinds(log)
['task', 'plan', 'instruct', 'act', 'report']
"""

from __future__ import annotations

import re

from kvmas.attribution.log import AttributionLog, LogStep, normalize_agent

KINDS = ("task", "tool", "instruct", "act", "plan", "report", "handover", "other")
TASK_NAMES = frozenset({"human", "user", "task", "question", "customer"})

_HANDOVER = re.compile(r"^\s*(terminate|exit|done|next speaker\b.*|over to \w+.*)\s*\.?\s*$", re.I | re.S)
_ACT = re.compile(r"```|\b(i (?:typed|clicked|searched|scrolled|visited|opened|ran|executed|navigated)|"
                  r"search(?:ing)? for|web_search|browse|call(?:ing)? the|tool call|function call|api)\b", re.I)
_PLAN = re.compile(r"\b(plan\b|steps?:|step 1|first,|we need to|here is (?:the|my) plan|next steps?)", re.I)
_REPORT = re.compile(r"\b(final answer|the answer is|answer:|result(?:s)? (?:is|are)|in conclusion|"
                     r"therefore|so the|we (?:found|have)|output:)", re.I)
_IMPERATIVE = re.compile(r"\b(please|could you|can you|you should|your task|go to|search|find|look up|open|"
                         r"check|verify|run|write|compute)\b", re.I)


def is_task(step: LogStep, question: str = "") -> bool:
    """The statement of the task: a turn by the human / user, or a first turn that is the question itself."""
    if normalize_agent(step.agent) in TASK_NAMES:
        return True
    q = re.sub(r"\s+", " ", question).strip().lower()
    c = re.sub(r"\s+", " ", step.content).strip().lower()
    return step.index == 0 and bool(q) and bool(c) and c in q


def turn_kind(step: LogStep, log: AttributionLog) -> str:
    """The kind of one turn (see the module docstring); tool and task turns are decided first."""
    if step.is_terminal:
        return "tool"
    if is_task(step, log.question):
        return "task"
    text = step.content
    if not text.strip() or _HANDOVER.match(text[:200]):
        return "handover"
    if step.target:
        return "instruct"
    head = text[:1500]
    if _ACT.search(head):
        return "act"
    later = {normalize_agent(s.agent) for s in log.steps[step.index + 1:]} - {normalize_agent(step.agent)}
    low = head.lower()
    if any(a and a.replace("_", " ") in low.replace("_", " ") for a in later) and _IMPERATIVE.search(head):
        return "instruct"
    if _PLAN.search(head):
        return "plan"
    if _REPORT.search(head):
        return "report"
    return "other"


def turn_kinds(log: AttributionLog) -> list[str]:
    """Every turn's kind, in order."""
    return [turn_kind(s, log) for s in log.steps]


def blameable(kinds: list[str]) -> list[int]:
    """Indices of the turns that can be blamed (not the task, not a tool's output); all of them if none can."""
    idx = [i for i, k in enumerate(kinds) if k not in ("task", "tool")]
    return idx or list(range(len(kinds)))

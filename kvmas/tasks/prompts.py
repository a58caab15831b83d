r"""Prompt text for tasks: the same instruction for every method, so methods differ only in how agents talk.

>>> from kvmas.tasks.task import Choice, Task
>>> from kvmas.tasks.prompts import format_question
>>> print(format_question(Task(id="t", question="What is 2+3?", answer="5")))
What is 2+3?
Reason step by step, then give the final answer as \boxed{N}.
"""

from __future__ import annotations

import re

from kvmas.errors import BadInputError
from kvmas.tasks.answers import is_correct
from kvmas.tasks.task import Task

NUMBER_INSTRUCTION = "Reason step by step, then give the final answer as \\boxed{N}."
CHOICE_INSTRUCTION = "Reason step by step, then give the letter of the correct option as \\boxed{X}."
# "direct": the answer alone, no reasoning (a generated-letter evaluation costs a few tokens, not hundreds)
# (measured on qwen2.5-coder-0.5b: "Give only the letter ... as \\boxed{X}" made it answer a literal "X" or start
# reasoning on 100/200 ARC-Easy items; the plain wording below is what it follows)
DIRECT_NUMBER_INSTRUCTION = "Answer with the final number only."
DIRECT_CHOICE_INSTRUCTION = "Answer with the letter of the correct option only."
STYLES = ("cot", "direct")
_OPTION_RE = re.compile(r"^([A-Za-z0-9]{1,2})\. (.*)$")  # one line of format_choices


def format_choices(task: Task) -> str:
    """``A. text`` lines, one per option (empty for number tasks)."""
    return "\n".join(f"{c.label}. {c.text}" for c in task.choices or ())


def parse_choices(question: str) -> tuple[list[str], list[str]] | None:
    """The options of a question as :func:`format_question` writes them (labels, texts), else None.

    Only a block of ``L. text`` lines directly before a multiple-choice instruction counts, so a numbered
    list inside a word problem is not read as options.

    >>> from kvmas.tasks.task import Choice
    >>> t = Task(id="t", question="Which is a gas?", answer="B", kind="choice",
    ...          choices=[Choice(label="A", text="iron"), Choice(label="B", text="steam")])
    >>> parse_choices(format_question(t, style="direct"))
    (['A', 'B'], ['iron', 'steam'])
    >>> parse_choices(format_question(Task(id="n", question="1. Add 2.\\n2. Add 3.", answer="5"))) is None
    True
    """
    lines = question.splitlines()
    for end, line in enumerate(lines):
        if line.strip() in (CHOICE_INSTRUCTION, DIRECT_CHOICE_INSTRUCTION):
            break
    else:
        return None
    labels: list[str] = []
    texts: list[str] = []
    for line in reversed(lines[:end]):
        m = _OPTION_RE.match(line)
        if not m:
            break
        labels.insert(0, m.group(1))
        texts.insert(0, m.group(2).strip())
    return (labels, texts) if len(labels) >= 2 and len(set(labels)) == len(labels) else None


def check_style(style: str) -> str:
    """``style`` when it is a known prompt style, else a :class:`BadInputError` naming the known ones."""
    if style not in STYLES:
        raise BadInputError(f"unknown prompt style {style!r} (one of {', '.join(STYLES)})")
    return style


def format_question(task: Task, instruction: bool = True, style: str = "cot") -> str:
    """The question as every method sees it: stem, options if any, and the answer-format instruction
    (``style``: ``cot`` reason step by step, or ``direct`` the answer alone)."""
    check_style(style)
    parts = [task.question.strip()]
    if task.kind == "choice":
        parts.append(format_choices(task))
    if instruction:
        choice, number = ((CHOICE_INSTRUCTION, NUMBER_INSTRUCTION) if style == "cot" else
                          (DIRECT_CHOICE_INSTRUCTION, DIRECT_NUMBER_INSTRUCTION))
        parts.append(choice if task.kind == "choice" else number)
    return "\n".join(parts)


def loglik_prefix(task: Task) -> str:
    """Prefix for log-likelihood scoring of options: ``Question: ...\nAnswer:`` (no chat template)."""
    return f"Question: {task.question.strip()}\nAnswer:"


def loglik_continuations(task: Task) -> list[str]:
    """One continuation per option, in label order: a space then the option text."""
    return [" " + c.text.strip() for c in task.choices or ()]


def prompt_echo_floor(tasks, style: str = "cot") -> int:
    """How many ``tasks`` a reply that only echoes its own prompt would be credited (the scorer's floor).

    >>> from kvmas.tasks.task import Task
    >>> prompt_echo_floor([Task(id="t", question="Tom has 3 apples and eats 1. How many are left? 2?", answer="2")])
    0
    """
    return sum(is_correct(format_question(t, style=style), t) for t in tasks)

"""Tasks with verifiable answers: records, loaders, a generator, answer checking and prompts.

>>> from kvmas.tasks import load_tasks, is_correct, format_question
>>> t = load_tasks("gsm8k-sample", n=1)[0]
>>> is_correct(r"... so she makes \\boxed{18} dollars", t)
True
"""

from kvmas.tasks.answers import extract_answer, extract_choice, extract_number, is_correct, parse_number
from kvmas.tasks.generator import generate_tasks
from kvmas.tasks.loaders import TaskAdapter, load_jsonl, load_sample, load_tasks, register_adapter, task_names
from kvmas.tasks.prompts import (
    CHOICE_INSTRUCTION, NUMBER_INSTRUCTION, format_question, loglik_continuations, loglik_prefix,
)
from kvmas.tasks.task import Choice, Task

__all__ = [
    "Task", "Choice", "TaskAdapter", "load_tasks", "load_jsonl", "load_sample", "register_adapter", "task_names",
    "generate_tasks", "extract_answer", "extract_number", "extract_choice", "parse_number", "is_correct",
    "format_question", "loglik_prefix", "loglik_continuations", "NUMBER_INSTRUCTION", "CHOICE_INSTRUCTION",
]

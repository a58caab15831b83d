r"""Answer extraction: what did the model answer (and by which rule), and is it right?

Every reading names the rule that produced it, so a report can say how much of an accuracy rests on explicit
answers (``strict``: ``boxed`` or ``####``, as lm-evaluation-harness's strict-match) and how much on the
flexible fallbacks.

Numbers, first rule that applies:
1. ``boxed``: the last ``\boxed{...}`` holding a number (a box introduced as a format example is skipped);
2. ``####``: the last ``#### N``;
3. ``answer-is``: the last "answer is / answer: / answer =" followed *right away* by a number (an equation
   there is read to its result: "the answer is 9*2 = 18" is 18); a negated one ("is not 18") names nothing;
4. ``last-number``: the last number, only where it concludes the reply: in a final sentence that ends with
   "." or "!" (not "?"), closing an equation at the very end ("9*2 = 18"), or a bare answer of a few words
   ("18 dollars"). A reply cut off mid-sentence ("...now we need to check whether 72") or one that ends on
   an echoed instruction names no number.

Choices (labels are case-sensitive: the article "a" is not option A), first rule that applies:
1. ``boxed``: the last box naming a label or one option's text;
2. ``answer-is``: the last "answer is / answer: ..." statement; after it an option's text wins over a label
   (so "the answer is a compound" is the option "a compound", and "the answer is 3%" is the option "3%", not
   option 3); negations ("is not (B)") and hedges ("A or B") name nothing;
3. ``option-text``: the reply is one option's text, or mentions exactly one option's text;
4. ``label``: the reply opens with a label (``B``, ``B.``, ``B)``, ``(B)``), else the last stand-alone
   label (``(B)`` anywhere, or a label ending the reply) that is neither negated nor part of a hedge.
An echoed option list ("A. goggles\nB. mask ..." or "(A) goggles (B) mask" on one line, or "A\nB\nC\nD")
names no choice of its own; only what the reply says besides it counts.
Letter and numeric labels map onto each other by position (``B`` is option 2 of a 1-4 labelled task).

>>> from kvmas.tasks.answers import extract_number, parse_number, read_number
>>> extract_number(r"So she makes 9 * 2 = $18. \boxed{18}")
'18'
>>> extract_number("He made a profit of $70,000 in total.")
'70000'
>>> extract_number("The answer is -3/4 cups.")
'-0.75'
>>> read_number("The answer is 18. Correction: the answer is 20.")
Reading(answer='20', rule='answer-is')
>>> extract_number("...now we need to check whether 72") is None
True
>>> parse_number("5.0") == parse_number("5")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from kvmas.tasks.numbers import FRACTION_RE, NUMBER_RE, fraction_value, to_fraction, format_number, parse_number

if TYPE_CHECKING:
    from kvmas.tasks.task import Task

__all__ = ["Reading", "RULES", "STRICT_RULES", "parse_number", "format_number", "read_answer", "read_number",
           "read_choice", "is_correct", "matches_gold", "extract_answer", "extract_number", "extract_choice",
           "boxed_contents"]

RULES = ("boxed", "####", "answer-is", "option-text", "label", "last-number")
STRICT_RULES = frozenset({"boxed", "####"})

_HASH_RE = re.compile(r"####\s*([^\n]+)")
# "answer is", "answer:", "answer =", "final answer is:", "**Answer:**", "correct answer is", "answer would be"
_ANSWER_RE = re.compile(r"\banswer\s*(?:\*\*)?\s*(?:is\b|would\s+be\b|:|=)\s*(?:\*\*)?\s*:?", re.IGNORECASE)
_NEGATION_RE = re.compile(r"\s*(?:not\b|n't\b|never\b|neither\b)", re.IGNORECASE)
_NEGATED_RE = re.compile(r"(?:\bnot|n't|\bnever)\s+(?:\w+\s+){0,2}\$?$", re.IGNORECASE)  # "is not (equal to) 18"
# a box written as a format example, not as the answer ("(format example: \boxed{7})", "e.g. \boxed{N}")
_EXAMPLE_RE = re.compile(r"(?:example|e\.g\.|for instance|such as|format|like this)[^.\n]{0,30}$", re.IGNORECASE)
# what may stand between "answer is" and the number itself: spaces, bold, "$", an opening bracket or math
_LEAD_RE = re.compile(r"(?:\s|\*\*|\\\(|\\\[|\(|\$(?=\s*\\))*")
_END_RE = re.compile(r"""[.!]["')\]*`_\s$]*$""")  # a reply that ends a sentence (closing marks allowed)
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s)|\n")
_WORD_RE = re.compile(r"[A-Za-z]+")
BARE_WORDS = 4  # a bare answer: the number with at most this many words ("we need 1/2 of it")


@dataclass(frozen=True)
class Reading:
    """An extracted answer (canonical number text or option label, None if the reply gave none) and the rule
    that produced it (one of :data:`RULES`, None with no answer)."""

    answer: str | None
    rule: str | None = None

    @property
    def strict(self) -> bool:
        """Whether the answer was given in an explicit format (``\\boxed{}`` or ``####``)."""
        return self.rule in STRICT_RULES


NONE = Reading(None, None)


def boxed_contents(text: str, answers_only: bool = False) -> list[str]:
    r"""Contents of every ``\boxed{...}`` / ``\fbox{...}`` in order, with nested braces balanced;
    ``answers_only`` leaves out boxes introduced as format examples ("e.g. \boxed{N}"), as the scorer does.

    >>> boxed_contents(r"\boxed{\frac{1}{2}} and \boxed{7}")
    ['\\frac{1}{2}', '7']
    >>> boxed_contents(r"Put it as e.g. \boxed{N}. So \boxed{7}", answers_only=True)
    ['7']
    """
    return _boxes(text, answers_only)


def _boxes(text: str, answers_only: bool = False) -> list[str]:
    """Contents of every box; ``answers_only`` leaves out boxes introduced as format examples."""
    out: list[str] = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            continue
        if answers_only and _EXAMPLE_RE.search(text[max(0, m.start() - 60): m.start()]):
            continue
        out.append(text[m.end(): i - 1].strip())
    return out


def _numbers(text: str) -> list[tuple[int, int, Fraction]]:
    """(start, end, value) of every number (``\\frac`` included), in order."""
    fracs = [(m.start(), m.end(), fraction_value(m)) for m in FRACTION_RE.finditer(text)]
    spans = [(a, b) for a, b, _ in fracs]
    out = [f for f in fracs if f[2] is not None]
    for m in NUMBER_RE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue  # a digit inside \frac{..}{..}
        val = to_fraction(m.group(0))
        if val is not None:
            out.append((m.start(), m.end(), val))
    return sorted(out, key=lambda x: x[0])


def _number_after_answer(text: str, pos: int) -> Fraction | None:
    """The number that starts right after an "answer is" ending at ``pos`` (None if something else does)."""
    if _NEGATION_RE.match(text, pos):
        return None
    start = _LEAD_RE.match(text, pos).end()
    nums = [n for n in _numbers(text[start:]) if n[0] == 0]
    if not nums:
        return None
    _, end, val = nums[0]
    if re.match(r"[\s*$)]*\?", text[start + end:]):
        return None  # "the answer is 18?" asks, it does not answer
    clause = re.split(r"[.!?](?=\s|$)|\n|[;,]\s", text[start:])[0]
    if re.match(r"\s*[-+*/×x÷]\s*[\d(]", clause[end:]):  # an equation: read it to its result
        results = [n for n in _numbers(clause) if "=" in clause[: n[0]]]
        if results:
            return results[-1][2]
    return val


def _concluding_number(text: str) -> Fraction | None:
    """The last number where it concludes the reply (see rule 4 of the module doc), else None."""
    body = text.rstrip()
    nums = _numbers(body)
    if not nums:
        return None
    start, end, val = nums[-1]
    cut = body.rstrip(""".!"')]*`_ \t$""")
    boundaries = [m.end() for m in _SENTENCE_END_RE.finditer(cut)]
    final_start = boundaries[-1] if boundaries else 0
    if start < final_start:
        return None  # the reply goes on past its last number (an echoed instruction, a question, a ramble)
    if _NEGATED_RE.search(body[final_start:start]) or body.endswith("?"):
        return None  # "the answer is not 18.", "is it 18?"
    if "\n" not in body and len(_WORD_RE.findall(body)) <= BARE_WORDS:
        return val  # a bare answer: "18", "$18.", "18 dollars", "16-3-4=9 eggs"
    if _END_RE.search(body):
        return val
    tail = body[end:]
    if "=" in body[final_start:start] and len(_WORD_RE.findall(tail)) <= 2 and not re.search(r"[,;:]", tail):
        return val  # an equation closing the reply: "... 9 * 2 = 18"
    return None


def read_number(text: str | None) -> Reading:
    """The numeric answer a model gave (canonical text) and the rule that found it."""
    if not text:
        return NONE
    for content in reversed(_boxes(text, answers_only=True)):
        nums = _numbers(content)
        if nums:
            return Reading(format_number(nums[-1][2]), "boxed")
    for tail in reversed(_HASH_RE.findall(text)):
        val = parse_number(tail)
        if val is not None:
            return Reading(format_number(val), "####")
    for m in reversed(list(_ANSWER_RE.finditer(text))):
        val = _number_after_answer(text, m.end())
        if val is not None:
            return Reading(format_number(val), "answer-is")
    val = _concluding_number(text)
    return Reading(format_number(val), "last-number") if val is not None else NONE


def extract_number(text: str | None) -> str | None:
    """The numeric answer a model gave, canonicalised (see the module doc for the rules)."""
    return read_number(text).answer


# ---------------------------------------------------------------------------------------------------- choices
def _label_map(labels: list[str]) -> dict[str, str]:
    """Every spelling of a label that should count as it: itself, and the letter or digit at its position."""
    out: dict[str, str] = {lab: lab for lab in labels}
    for i, lab in enumerate(labels):  # cross-map letters <-> digits by position, never overriding a real label
        out.setdefault("ABCDEFGH"[i], lab)
        out.setdefault(str(i + 1), lab)
    return out


_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+")


def _norm_text(s: str) -> str:
    return re.sub(r"[^a-z0-9+\-]+", " ", s.lower()).strip()


def _bare_text(s: str) -> str:
    """Normalised text without a leading article (an option "a compound" is named by "compound" too)."""
    return _ARTICLE_RE.sub("", _norm_text(s))


class _ChoiceReader:
    """Reads one reply against one task's labels and option texts."""

    def __init__(self, labels: list[str], texts: list[str] | None):
        self.labels, self.texts = labels, list(texts or [])
        self.lmap = _label_map(labels)
        alt = "|".join(re.escape(k) for k in sorted(self.lmap, key=len, reverse=True))
        self.tok = rf"(?<![A-Za-z0-9'])(?:[\(\[]\s*({alt})\s*[\)\]]|({alt}))(?![A-Za-z0-9'])"
        self.tok_re = re.compile(self.tok)
        opt = r"(?:(?i:option|choice)\s*)?"
        self.lead_re = re.compile(rf"\s*{opt}[\(\[]?\s*({alt})\s*(?:[\)\]:.]|$|\s+[-–—])")
        self.start_re = re.compile(rf"\s*{opt}[\(\[]?\s*({alt})(?![A-Za-z0-9'])")
        self.box_re = re.compile(rf"\s*{opt}[\(\[]?\s*({alt})\s*[\)\]]?(?:[\s.:)\]]+.*)?", re.DOTALL)
        self.hedge_re = re.compile(rf"{self.tok}\s*(?:,|/|&|(?i:\bor\b|\band\b))\s*{opt}{self.tok}")
        self.list_line_re = re.compile(rf"\s*[\(\[]?\s*({alt})\s*(?:[\)\].:].*)?$")
        self.inline_re = re.compile(rf"[\(\[]\s*({alt})\s*[\)\]]\s*[^\s(\[]")

    def label(self, m: re.Match) -> str:
        return self.lmap[next(g for g in m.groups() if g)]

    # -- option texts
    def text_exact(self, s: str) -> str | None:
        for same in (lambda t: t.strip() == s.strip(), lambda t: _bare_text(t) and _bare_text(t) == _bare_text(s)):
            hits = {lab for lab, t in zip(self.labels, self.texts) if same(t)}
            if hits:
                return hits.pop() if len(hits) == 1 else None
        return None

    def text_prefix(self, s: str) -> str | None:
        """The option whose text the statement ``s`` opens with (longest wins)."""
        hay = _bare_text(s) + " "
        hits = sorted(((len(_bare_text(t)), lab) for lab, t in zip(self.labels, self.texts)
                       if _bare_text(t) and hay.startswith(_bare_text(t) + " ")), reverse=True)
        if not hits or (len(hits) > 1 and hits[0][0] == hits[1][0]):
            return None
        return hits[0][1]

    def text_mention(self, s: str) -> str | None:
        """The only option whose text occurs in ``s`` (an option nested in a longer one counts as it)."""
        hay = f" {_norm_text(s)} "
        hits = [(lab, _norm_text(t)) for lab, t in zip(self.labels, self.texts)
                if _norm_text(t) and f" {_norm_text(t)} " in hay]
        if not hits:
            return None
        longest = max(hits, key=lambda h: len(h[1]))
        if all(h == longest or (h[1] != longest[1] and f" {h[1]} " in f" {longest[1]} ") for h in hits):
            return longest[0]
        return None

    # -- the rules
    def boxed(self, text: str) -> str | None:
        for content in reversed(_boxes(text, answers_only=True)):
            got = self.text_exact(content)
            if got is None:
                m = self.box_re.fullmatch(content)
                got = self.lmap[m.group(1)] if m else self.text_mention(content)
            if got:
                return got
        return None

    def answer_is(self, text: str) -> str | None:
        """The option the last "answer is ..." statement names (a negated or hedged last one names none)."""
        for m in reversed(list(_ANSWER_RE.finditer(text))):
            tail = re.split(r"(?<=[^A-Z0-9])[.!?](?=\s|$)|\n", text[m.end():])[0]
            if _NEGATION_RE.match(tail) or self.hedge_re.search(tail):
                return None
            got = self.text_prefix(tail)
            if got is None:
                lead = self.start_re.match(tail)
                got = self.lmap[lead.group(1)] if lead else None
            if got:
                return got
        return None

    def without_listing(self, text: str) -> tuple[str, bool]:
        """The reply without an echoed option list, and whether it held one."""
        lines = text.splitlines()
        marked = [i for i, line in enumerate(lines) if self.list_line_re.match(line)]
        leading = {self.lmap[self.list_line_re.match(lines[i]).group(1)] for i in marked}
        keep = lines
        listing = len(leading) > 1
        if listing:
            keep = [line for i, line in enumerate(lines) if i not in set(marked)]
        out = []
        for line in keep:
            inline = {self.lmap[g] for g in self.inline_re.findall(line)}
            if len(inline) > 1:
                listing = True
                continue
            out.append(line)
        return "\n".join(out), listing

    def last_label(self, text: str) -> str | None:
        cands = []
        for m in self.tok_re.finditer(text):
            bracketed = m.group(1) is not None
            if not bracketed and not re.match(r"\s*[.:)]?[\s\"'*`]*$", text[m.end():]):
                continue  # a bare letter counts only where it ends the reply ("... so it is B.")
            before = text[: m.start()]
            if re.search(r"\b(?i:step)\s*[\(\[]?\s*$", before):
                continue  # "Step 1:" opens reasoning, names no option
            if re.search(r"(?i:\bnot|n't|never)\s*(?i:option|choice)?\s*$", before):
                continue
            cands.append(m)
        if not cands:
            return None
        last = cands[-1]
        sentence_start = max([0] + [b.end() for b in _SENTENCE_END_RE.finditer(text, 0, last.start())])
        if self.hedge_re.search(text[sentence_start:]):
            return None  # "It is either A or B."
        return self.label(last)

    def read(self, text: str) -> Reading:
        got = self.boxed(text)
        if got:
            return Reading(got, "boxed")
        for tail in reversed(_HASH_RE.findall(text)):
            m = self.start_re.match(tail)
            got = self.text_exact(tail) or (self.lmap[m.group(1)] if m else None)
            if got:
                return Reading(got, "####")
        got = self.answer_is(text)
        if got:
            return Reading(got, "answer-is")
        got = self.text_exact(text)
        if got:
            return Reading(got, "option-text")
        rest, listing = self.without_listing(text)
        if not listing:
            m = self.lead_re.match(rest)
            if m:
                return Reading(self.lmap[m.group(1)], "label")
            got = self.text_mention(rest)
            if got:
                return Reading(got, "option-text")
        got = self.last_label(rest)
        return Reading(got, "label") if got else NONE


def read_choice(text: str | None, labels: list[str], texts: list[str] | None = None) -> Reading:
    r"""The option a model chose (one of ``labels``) and the rule that found it.

    >>> read_choice("The answer is a compound.", ["A", "B", "C"], ["an element", "a mixture", "a compound"])
    Reading(answer='C', rule='answer-is')
    >>> read_choice("It is either A or B.", ["A", "B", "C", "D"])
    Reading(answer=None, rule=None)
    """
    if not text or not labels:
        return NONE
    return _ChoiceReader(list(labels), texts).read(text)


def extract_choice(text: str | None, labels: list[str], texts: list[str] | None = None) -> str | None:
    r"""The option label a model chose, as one of ``labels`` (None if it named none).

    >>> extract_choice(r"Plants need light. \boxed{C}", ["A", "B", "C", "D"])
    'C'
    >>> extract_choice("The answer is (2).", ["A", "B", "C", "D"])
    'B'
    >>> extract_choice("breathing mask", ["A", "B"], ["safety goggles", "breathing mask"])
    'B'
    >>> extract_choice("A. goggles\nB. mask\nC. gloves\nD", ["A", "B", "C", "D"]) is None
    True
    >>> extract_choice("D. burning trash\n\nStep 1:", ["A", "B", "C", "D"])
    'D'
    """
    return read_choice(text, labels, texts).answer


def read_answer(text: str | None, task: "Task") -> Reading:
    """The canonical answer in ``text`` for ``task`` (a number string or a choice label) and its rule.

    A verbatim echo of the question in the reply is not read: what the question says is no answer.
    """
    stem = task.question.strip()
    if text and len(stem) >= 12 and stem in text:
        text = text.replace(stem, "\n")
    if task.kind == "choice":
        return read_choice(text, task.labels, [c.text for c in task.choices or ()])
    return read_number(text)


def extract_answer(text: str | None, task: "Task") -> str | None:
    """The canonical answer in ``text`` for ``task``: a number string or a choice label (None if absent)."""
    return read_answer(text, task).answer


def matches_gold(answer: str | None, task: "Task") -> bool:
    """Whether an already-extracted answer is the task's gold answer (numbers compared exactly)."""
    if answer is None:
        return False
    if task.kind == "choice":
        return answer == task.answer
    a, b = parse_number(answer), parse_number(task.answer)
    return a is not None and b is not None and a == b


def is_correct(pred: str | None, task: "Task", *, strict: bool = False) -> bool:
    """Whether a model's reply gives the task's gold answer (``strict``: only in ``\\boxed{}`` or ``####``).

    >>> from kvmas.tasks.task import Task
    >>> is_correct("so the total is 1,000 dollars.", Task(id="t", question="?", answer="1000"))
    True
    >>> is_correct("so the total is 1,000 dollars.", Task(id="t", question="?", answer="1000"), strict=True)
    False
    """
    reading = read_answer(pred, task)
    return (reading.strict or not strict) and matches_gold(reading.answer, task)

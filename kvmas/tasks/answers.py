r"""Answer extraction and normalisation: what did the model answer, and is it right?

Numbers: the last ``\boxed{...}``, else ``#### N``, else "the (final) answer is N" / "Answer: N", else the
last number in the text. Thousands separators, ``$``, ``%`` and trailing units are dropped; ``\frac{a}{b}``,
``a/b``, negative signs (ASCII or Unicode minus) and decimals are understood; values are compared exactly as
fractions, so ``5.0 == 5`` and ``0.5 == 1/2``.

Choices: ``\boxed{B}``, "the answer is (B)", "Answer: B", a reply that starts with a label, the text of exactly
one option, and finally the last stand-alone label. Letter and numeric labels map onto each other by
position (``B`` is option 2 of a 1-4 labelled task).

>>> from kvmas.tasks.answers import extract_number, parse_number
>>> extract_number(r"So she makes 9 * 2 = $18. \boxed{18}")
'18'
>>> extract_number("He made a profit of $70,000 in total.")
'70000'
>>> extract_number("The answer is -3/4 cups.")
'-0.75'
>>> parse_number("5.0") == parse_number("5")
True
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmas.tasks.task import Task

_MINUS = "\u2212\u2013"  # Unicode minus and en dash used as minus signs
_NUM = (
    r"(?<![\w.])"  # not glued to a word or another number
    r"[-" + _MINUS + r"]?\$?\s?"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?:\s?/\s?\d+(?:\.\d+)?)?"
    r"|(?<![\w.])[-" + _MINUS + r"]?\.\d+"
)
_NUM_RE = re.compile(_NUM)
_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)?\s*(?:\*\*)?\s*[:=]?\s*([^\n]{0,80})", re.IGNORECASE
)


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` / ``\fbox{...}`` in order, with nested braces balanced.

    >>> boxed_contents(r"\boxed{\frac{1}{2}} and \boxed{7}")
    ['\\frac{1}{2}', '7']
    """
    out: list[str] = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1].strip())
    return out


def parse_number(text: str | None) -> Fraction | None:
    """The first number in ``text`` as an exact :class:`Fraction` (None if there is none).

    >>> parse_number("$1,234.50"), parse_number("\\\\frac{3}{4}"), parse_number("\u22127")
    (Fraction(2469, 2), Fraction(3, 4), Fraction(-7, 1))
    """
    if text is None:
        return None
    text = str(text).strip()
    m = _FRAC_RE.search(text)
    if m:
        try:
            val = Fraction(m.group(2).replace(",", "")) / Fraction(m.group(3).replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
        return -val if m.group(1) else val
    m = _NUM_RE.search(text)
    return _to_fraction(m.group(0)) if m else None


def _to_fraction(token: str) -> Fraction | None:
    tok = token.strip()
    for ch in _MINUS:
        tok = tok.replace(ch, "-")
    tok = tok.replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in tok:
            num, den = tok.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: ``5``, ``-2.5``, ``1/3`` (terminating decimals as decimals).

    >>> format_number(Fraction(5, 1)), format_number(Fraction(-5, 2)), format_number(Fraction(1, 3))
    ('5', '-2.5', '1/3')
    """
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:
        s = f"{float(value):.12f}".rstrip("0").rstrip(".")
        if Fraction(s) == value:
            return s
    return f"{value.numerator}/{value.denominator}"


def _last_number(text: str) -> Fraction | None:
    fracs = list(_FRAC_RE.finditer(text))
    nums = list(_NUM_RE.finditer(text))
    best = None
    if fracs:
        best = fracs[-1]
    if nums and (best is None or nums[-1].start() > best.end()):
        return _to_fraction(nums[-1].group(0))
    return parse_number(best.group(0)) if best else None


def extract_number(text: str | None) -> str | None:
    """The numeric answer a model gave, canonicalised (see module doc for the order of rules)."""
    if not text:
        return None
    for content in reversed(boxed_contents(text)):
        val = _last_number(content)
        if val is not None:
            return format_number(val)
    hashes = _HASH_RE.findall(text)
    if hashes:
        val = parse_number(hashes[-1])
        if val is not None:
            return format_number(val)
    for tail in reversed(_ANSWER_IS_RE.findall(text)):
        val = parse_number(tail)
        if val is not None:
            return format_number(val)
    val = _last_number(text)
    return format_number(val) if val is not None else None


def _label_map(labels: list[str]) -> dict[str, str]:
    """Every spelling of a label that should count as it: itself, and the letter or digit at its position."""
    out: dict[str, str] = {}
    for i, lab in enumerate(labels):
        out[lab.upper()] = lab
    for i, lab in enumerate(labels):  # cross-map letters <-> digits by position, never overriding a real label
        out.setdefault("ABCDEFGH"[i], lab)
        out.setdefault(str(i + 1), lab)
    return out


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
    if not text or not labels:
        return None
    lmap = _label_map(labels)
    keys = sorted(lmap, key=len, reverse=True)
    alt = "|".join(re.escape(k) for k in keys)
    label_tok = rf"[\(\[]?\s*({alt})\s*[\)\]]?"

    def pick(s: str) -> str | None:
        m = re.fullmatch(rf"\s*(?:OPTION|CHOICE)?\s*{label_tok}(?:[\s.:)\]]+.*)?", s.upper(), re.DOTALL)
        return lmap[m.group(1)] if m else None

    def exact(s: str) -> str | None:
        hits = [lab for lab, t in zip(labels, texts or []) if _norm_text(t) and _norm_text(t) == _norm_text(s)]
        return hits[0] if len(hits) == 1 else None

    for content in reversed(boxed_contents(text)):
        got = exact(content) or pick(content)
        if got:
            return got
        if texts:
            got = _match_text(content, labels, texts)
            if got:
                return got
    up = text.upper()
    pat = re.compile(rf"ANSWER\s*(?:IS|:)?\s*(?:OPTION|CHOICE)?\s*:?\s*(?:\*\*)?\s*[\(\[]\s*({alt})\s*[\)\]]"
                     rf"|ANSWER\s*(?:IS|:)\s*(?:OPTION|CHOICE)?\s*:?\s*(?:\*\*)?\s*({alt})(?![A-Z0-9])")
    found = list(pat.finditer(up))
    if found:
        g = found[-1].group(1) or found[-1].group(2)
        return lmap[g]
    got = exact(text)
    if got:
        return got
    starts = {lmap[g] for g in re.findall(rf"(?m)^\s*[\(\[]?\s*({alt})\s*[\)\].:]", up)}
    listing = len(starts) > 1  # the reply echoes the option list: leading labels and texts are no choice
    m = None if listing else re.match(rf"\s*[\(\[]?\s*({alt})\s*(?:[\)\]:.]|$|\s*$|\s+[-–—])", up)
    if m:
        return lmap[m.group(1)]
    if texts and not listing:
        got = _match_text(text, labels, texts)
        if got:
            return got
    if listing:  # the echoed option list (often cut mid-way: "...C. gloves\nD") names no choice of its own
        up = "\n".join(line for line in up.splitlines()
                       if not re.match(rf"\s*[\(\[]?\s*({alt})\s*(?:[\)\].:].*)?$", line))
    found = [m for m in re.finditer(rf"[\(\[]\s*({alt})\s*[\)\]]|(?<![A-Z0-9'])({alt})(?=\s*[.:)]?\s*$)", up)
             if not re.search(r"\bSTEP\s*[\(\[]?\s*$", up[:m.start()])]  # "Step 1:" opens reasoning, names no option
    if found:
        g = found[-1].group(1) or found[-1].group(2)
        return lmap[g]
    return None


def _norm_text(s: str) -> str:
    return re.sub(r"[^a-z0-9+\-]+", " ", s.lower()).strip()


def _match_text(text: str, labels: list[str], texts: list[str]) -> str | None:
    """The label of the only option whose (normalised) text occurs in ``text``; the longest wins nesting."""
    hay = f" {_norm_text(text)} "
    hits = [(len(_norm_text(t)), lab) for lab, t in zip(labels, texts) if _norm_text(t) and f" {_norm_text(t)} " in hay]
    if not hits:
        return None
    hits.sort(reverse=True)
    if len(hits) == 1:
        return hits[0][1]
    longest = hits[0]
    # accept only if every other hit is contained in the longest one ("mask" inside "breathing mask")
    full = [t for lab, t in zip(labels, texts) if lab == longest[1]][0]
    others = [t for lab, t in zip(labels, texts) if lab in {h[1] for h in hits[1:]}]
    if all(_norm_text(o) != _norm_text(full) and f" {_norm_text(o)} " in f" {_norm_text(full)} " for o in others):
        return longest[1]
    return None


def extract_answer(text: str | None, task: "Task") -> str | None:
    """The canonical answer in ``text`` for ``task``: a number string or a choice label (None if absent)."""
    if task.kind == "choice":
        return extract_choice(text, task.labels, [c.text for c in task.choices or ()])
    return extract_number(text)


def is_correct(pred: str | None, task: "Task") -> bool:
    """Whether a model's output (raw text or an already-extracted answer) is the task's gold answer.

    >>> from kvmas.tasks.task import Task
    >>> is_correct("so the total is 1,000 dollars.", Task(id="t", question="?", answer="1000"))
    True
    """
    got = extract_answer(pred, task)
    if got is None:
        return False
    if task.kind == "choice":
        return got == task.answer
    a, b = parse_number(got), parse_number(task.answer)
    return a is not None and b is not None and a == b

"""Numbers as answers are written: ``1,234.50``, ``$5``, ``-3``, ``3/4``, ``\\frac{3}{4}``, read exactly.

>>> from kvmas.tasks.numbers import parse_number, format_number
>>> format_number(parse_number("$1,234.50"))
'1234.5'
"""

from __future__ import annotations

import re
from fractions import Fraction

_MINUS = "\u2212\u2013"  # Unicode minus and en dash used as minus signs
DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # an unsigned decimal, thousands commas allowed
_NUM = (
    r"(?<![\w.])"  # not glued to a word or another number
    r"[-" + _MINUS + r"]?\$?\s?"
    + DIGITS +
    r"(?:\s?/\s?\d+(?:\.\d+)?)?"
    r"|(?<![\w.])[-" + _MINUS + r"]?\.\d+"
)
NUMBER_RE = re.compile(_NUM)
FRACTION_RE = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")


def parse_number(text: str | None) -> Fraction | None:
    """The first number in ``text`` as an exact :class:`Fraction` (None if there is none).

    >>> parse_number("$1,234.50"), parse_number("\\\\frac{3}{4}"), parse_number("\u22127")
    (Fraction(2469, 2), Fraction(3, 4), Fraction(-7, 1))
    """
    if text is None:
        return None
    text = str(text).strip()
    m = FRACTION_RE.search(text)
    n = NUMBER_RE.search(text)
    if m and (n is None or m.start() <= n.start()):
        return fraction_value(m)
    return to_fraction(n.group(0)) if n else None


def fraction_value(m: re.Match) -> Fraction | None:
    try:
        val = Fraction(m.group(2).replace(",", "")) / Fraction(m.group(3).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return -val if m.group(1) else val


def to_fraction(token: str) -> Fraction | None:
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

"""Timestamps, one format everywhere: UTC ISO 8601 with microseconds (sortable as text).

>>> from kvmas.clock import utc_now
>>> utc_now()[4], utc_now().endswith("+00:00"), len(utc_now()) == len("2026-12-02T18:00:00.000000+00:00")
('-', True, True)
"""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """Now, in UTC, as ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")

"""The traces of served runs, kept on disk by run id so that ``GET /v1/traces/{id}`` can return them.

An id from a request is checked against the form run ids have and only then turned into a file name through
``safe_name`` and ``inside``; it never names a path itself.

>>> import tempfile
>>> from kvmas.trace import Trace
>>> store = TraceStore(tempfile.mkdtemp())
>>> t = Trace(question="2+2?")
>>> store.save(t).name.endswith(".json"), store.get(t.run_id).question
(True, '2+2?')
>>> store.get("../../etc/passwd")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
kvmas.errors.BadInputError: invalid trace id
"""

from __future__ import annotations

import re
from pathlib import Path

from kvmas.errors import BadInputError
from kvmas.paths import inside, kvmas_home, safe_name
from kvmas.trace import Trace

RUN_ID = re.compile(r"[0-9a-f]{8,64}")  # Trace.run_id: hex (12 digits from uuid4)


class TraceNotFound(BadInputError):
    """No trace with that id here (an HTTP 404)."""


class TraceStore:
    """Run traces in ``folder`` (default ``kvmas_home()/serve/traces``), one JSON file per run id."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else kvmas_home() / "serve" / "traces"
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise BadInputError("invalid trace id")
        return inside(self.folder, safe_name(run_id) + ".json")

    def save(self, trace: Trace) -> Path:
        return trace.save(self._path(trace.run_id))

    def get(self, run_id: str) -> Trace:
        path = self._path(run_id)
        if not path.is_file():
            raise TraceNotFound(f"no trace {run_id}")
        return Trace.load(path)

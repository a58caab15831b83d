"""Causal failure attribution: which agent, at which step, made a multi-agent run fail.

Modules (one noun each): ``log`` (AttributionLog + adapters: Who&When, generic lists, kvmas traces; streaming
JSONL reader), ``graph`` (data-dependency graph, exact or inferred, and its reversal into the performance-causal
graph), ``shapley`` (exact / sampled Shapley values), ``blame`` (graph-surrogate agent blame for logs),
``features`` + ``scorer`` (learned critical-step scorer), ``attributor`` (LogAttributor: logs that cannot be
re-run), ``replay`` (ReplayAttributor: real counterfactual replays of our primitives), ``planted``
(planted-fault suite), ``evaluate`` (Who&When cross-validated evaluation). Terminal rendering lives in
``kvmas.cli.render``, the CLI's one output boundary.

>>> from kvmas.attribution import LogAttributor, from_generic
>>> res = LogAttributor().attribute(from_generic([{"agent": "a", "content": "Assume 12."},
...                                               {"agent": "b", "content": "So the answer is 12."}]))
>>> res.agent
'a'
"""

from kvmas.attribution.attributor import Attribution, LogAttributor
from kvmas.attribution.log import AttributionLog, from_generic, from_trace, from_whowhen, iter_logs, load_log

__all__ = ["Attribution", "AttributionLog", "LogAttributor", "from_generic", "from_trace", "from_whowhen",
           "iter_logs", "load_log"]

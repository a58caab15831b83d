"""Causal graphs over the steps of a log: data dependencies, and their reversal (performance causality).

``data_graph`` has an edge ``i -> j`` when step ``i`` consumed information produced at step ``j`` (j < i):
exact for kvmas traces (segment ``reads``/``writes``), inferred for external logs (code -> execution output,
``(-> X)`` instructions, mentions of other agents, rare values such as numbers, quoted strings, URLs and file
names reappearing). ``performance_graph`` reverses every edge (the quality of ``j`` affects the quality of
``i``, CDC-MAS's performance causal inversion) and adds an outcome node ``"Y"``.

>>> from kvmas.attribution.log import from_generic
>>> log = from_generic([{"agent": "coder", "content": "```python\\nprint(6*7)\\n```"},
...                     {"agent": "Computer_terminal", "content": "exitcode: 0\\nCode output: 42"},
...                     {"agent": "checker", "content": "The answer is 42."}])
>>> sorted(data_graph(log).edges())
[(1, 0), (2, 1)]
>>> sorted(performance_graph(data_graph(log), log).edges(), key=str)
[(0, 1), (1, 'Y'), (1, 2), (2, 'Y')]
"""

from __future__ import annotations

import re
from collections import defaultdict

import networkx as nx

from kvmas.attribution.log import AttributionLog, normalize_agent

OUTCOME = "Y"
_NUM = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?%?(?![\w])")
# a quoted key ("next_speaker":) is structure, not a value
_QUOTED = re.compile(r"[\"'“‘`]([^\"'”’`\n]{3,60})[\"'”’`](?!\s*:)")
_URL = re.compile(r"https?://[^\s)\]>\"']+")
_FILE = re.compile(r"\b[\w\-/]+\.(?:py|csv|xlsx|xls|json|txt|pdf|png|jpg|mp3|mp4|docx|pptx|html|xml|zip)\b")
_CODE = re.compile(r"```")
_FINAL = re.compile(r"(?:final answer|the answer is|answer:|result is|output:|\*\*answer)", re.I)
_TRIVIAL = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "100", "0.0", "1.0", "2.0"}


def values(text: str) -> set[str]:
    """The rare tokens that mark reuse of information: numbers, quoted strings, URLs and file names.

    >>> sorted(values('The total is 1,234 from "data.csv" at https://x.org/a'))
    ['1234', 'data.csv', 'https://x.org/a']
    """
    out: set[str] = set()
    for m in _NUM.findall(text):
        v = m.replace(",", "").rstrip("%")
        if v not in _TRIVIAL and len(v.lstrip("-")) >= 2:
            out.add(v)
    out.update(u.rstrip(".,") for u in _URL.findall(text))
    out.update(f.lower() for f in _FILE.findall(text))
    for q in _QUOTED.findall(text):
        q = q.strip().lower()
        if len(q) >= 4 and not q.startswith(("http", "```")) and not _FILE.fullmatch(q):
            out.add(q)
    return out


def has_code(text: str) -> bool:
    """True when a step contains a fenced code block."""
    return bool(_CODE.search(text))


def data_graph(log: AttributionLog, max_parents: int = 3) -> nx.DiGraph:
    """Steps as nodes, ``i -> j`` when step ``i`` depends on step ``j``; edge attrs ``kind`` and ``weight``.

    For traces with provenance the edges are exactly ``reads ∩ writes``; otherwise they are inferred.
    """
    g = nx.DiGraph()
    for s in log.steps:
        g.add_node(s.index, agent=s.agent, terminal=s.is_terminal)
    if log.exact_provenance:
        writer: dict[int, int] = {}
        for s in log.steps:
            for seg in s.reads:
                if seg in writer and writer[seg] != s.index:
                    j = writer[seg]
                    if g.has_edge(s.index, j):
                        g[s.index][j]["weight"] += 1.0
                    else:
                        g.add_edge(s.index, j, kind="reads", weight=1.0)
            for seg in s.writes:
                writer[seg] = s.index
        return g
    return _infer_edges(log, g, max_parents)


def _infer_edges(log: AttributionLog, g: nx.DiGraph, max_parents: int) -> nx.DiGraph:
    cand: dict[int, dict[int, tuple[float, str]]] = defaultdict(dict)

    def add(i: int, j: int, w: float, kind: str) -> None:
        old = cand[i].get(j)
        if old is None or old[0] < w:
            cand[i][j] = (w if old is None else w + 0.5 * old[0], kind if old is None or old[0] < w else old[1])

    steps = log.steps
    question_vals = values(log.question)
    first_seen: dict[str, int] = {}
    names = {normalize_agent(a): a for a in log.agents()}
    last_turn: dict[str, int] = {}
    pending_to: dict[str, int] = {}
    last_code = None
    for s in steps:
        i, text = s.index, s.content
        # protocol: execution output consumes the latest code; an agent after a tool output reads it
        if s.is_terminal and last_code is not None:
            add(i, last_code, 3.0, "code->output")
        if i > 0 and steps[i - 1].is_terminal and not s.is_terminal:
            add(i, i - 1, 2.0, "output->reader")
        key = normalize_agent(s.agent)
        if key in pending_to:
            add(i, pending_to.pop(key), 3.0, "instruction")
        if s.target:
            pending_to[normalize_agent(s.target)] = i
        # mentions of another agent's name: that agent's latest turn
        low = text.lower()
        for nk, orig in names.items():
            if nk != key and nk in last_turn and (orig.lower() in low or nk in low):
                add(i, last_turn[nk], 1.0, "mention")
        # information reuse: a rare value first introduced at j reappears at i
        vals = values(text) - question_vals
        for v in vals:
            j = first_seen.get(v)
            if j is not None and j != i:
                add(i, j, 1.0 if len(v) < 6 else 1.5, "value")
        for v in vals:
            first_seen.setdefault(v, i)
        if not s.is_terminal and has_code(text):
            last_code = i
        last_turn[key] = i
        # conversation order: every turn reads the previous one (weak)
        if i > 0:
            add(i, i - 1, 0.25, "adjacent")
    for i, parents in cand.items():
        best = sorted(parents.items(), key=lambda kv: (-kv[1][0], -kv[0]))[:max_parents]
        for j, (w, kind) in best:
            g.add_edge(i, j, kind=kind, weight=w)
    return g


def final_steps(log: AttributionLog) -> list[int]:
    """Steps that produce the run's final answer: the last substantive non-terminal turn, plus any step that
    states the final answer explicitly after it (``TERMINATE``-only turns are skipped)."""
    subst = [s for s in log.steps if s.content.strip() and s.content.strip().upper() != "TERMINATE"]
    if not subst:
        return [log.steps[-1].index]
    speakers = [s for s in subst if not s.is_terminal] or subst
    last = speakers[-1].index
    out = [last]
    for s in reversed(subst):  # an instruction to give the answer ("provide the final answer.") states none
        states = _FINAL.search(s.content) and stated_answer(s.content).strip(" .*:\n\"'}")
        if s.index != last and not s.is_terminal and states:
            out.append(s.index)
            break
    return sorted(set(out))


def stated_answer(text: str) -> str:
    """What a turn states as its answer: the text after its last answer marker ("FINAL ANSWER:", "the answer
    is", ...), else the whole turn. A closing turn's boilerplate (a ledger's keys, "the request is
    satisfied") is then no part of the answer.

    >>> stated_answer('{"next_speaker": "Assistant"}\\nThe request is satisfied. FINAL ANSWER: 4')
    ': 4'
    >>> stated_answer("Done, see above.")
    'Done, see above.'
    """
    last = None
    for last in _FINAL.finditer(text):
        pass
    return text if last is None else text[last.end():]


def final_values(log: AttributionLog) -> set[str]:
    """Rare values stated in the final-answer steps (numbers, names in quotes, URLs...)."""
    out: set[str] = set()
    for i in final_steps(log):
        out |= values(log.steps[i].content)
    if log.answer:
        out |= values(log.answer)
    return out - values(log.question)


def performance_graph(data: nx.DiGraph, log: AttributionLog) -> nx.DiGraph:
    """Reverse every data edge (performance causal inversion) and add the outcome node ``Y``.

    ``Y`` gets edges from the final-answer steps and from every step that first introduced a value the final
    answer repeats.
    """
    g = data.reverse(copy=True)
    g.add_node(OUTCOME)
    for i in final_steps(log):
        g.add_edge(i, OUTCOME, kind="answer", weight=1.0)
    fv = final_values(log)
    if fv:
        seen: set[str] = set()
        for s in log.steps:
            new = (values(s.content) & fv) - seen
            if new:
                g.add_edge(s.index, OUTCOME, kind="introduces-answer", weight=float(len(new)))
                seen |= new
    return g


def reach(perf: nx.DiGraph, node: int) -> int:
    """How many steps a step's quality can influence downstream (descendants, outcome excluded)."""
    return sum(1 for d in nx.descendants(perf, node) if d != OUTCOME)


def reach_all(perf: nx.DiGraph) -> dict[int, int]:
    """:func:`reach` of every step at once (bitset dynamic programme over the DAG; fast for long logs)."""
    steps = [n for n in perf.nodes if n != OUTCOME]
    bits: dict[int, int] = {}
    for n in reversed(list(nx.topological_sort(perf.subgraph(steps)))):
        b = 0
        for c in perf.successors(n):
            if c != OUTCOME:
                b |= (1 << c) | bits[c]
        bits[n] = b
    return {n: bits[n].bit_count() for n in steps}

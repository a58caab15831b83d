"""The one output boundary: everything the CLI shows on a terminal is made and printed here.

Data (questions, answers, model and agent names, dataset fields, store rows, file names, error messages)
is shown literally: :func:`lit` makes it a rich ``Text`` (never parsed as markup), :func:`esc` escapes it
for a markup string of ours, :class:`DataTable` treats every string cell as data. Every console made by
:func:`console` strips control characters (ESC, BEL, CR, C1 codes, bidi overrides) from the text it writes,
never from our own styling (rich adds that afterwards). Traces, usage and attributions render here too.

>>> import io
>>> c = console(file=io.StringIO(), width=60)
>>> c.print(DataTable("t", ["name"]).row("[/]\\x1b]0;x\\x07"))
>>> "[/]]0;x" in c.file.getvalue(), "\\x1b" in c.file.getvalue()
(True, False)
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from kvmas.errors import BadInputError
from kvmas.trace import Trace, Usage

ACTION_STYLE = {"read": "cyan", "think": "magenta", "speak": "green", "score": "yellow", "organize": "blue"}
# C0 controls but newline and tab, DEL, C1 controls, bidi embeddings/overrides/isolates, line/para separators
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(value: Any) -> str:
    """``str(value)`` fit for a terminal: control characters removed, lone surrogates (undecodable input)
    shown as U+FFFD; newlines and tabs kept."""
    text = str(value)
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    return _CONTROL.sub("", text)


def lit(value: Any, style: str = "") -> Text:
    """Data as literal text (never markup), optionally styled by us."""
    return value if isinstance(value, Text) else Text(clean(value), style=style)


def esc(value: Any) -> str:
    """Data to embed in a markup string of ours: cleaned and markup-escaped."""
    return escape(clean(value))


def one_line(value: Any) -> str:
    """Data on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(clean(value).split())


class SafeConsole(Console):
    """A console that strips control characters from every text segment it writes (data can never move the
    cursor, clear the screen or retitle the terminal); rich's own control segments pass."""

    def render(self, renderable, options=None) -> Iterable[Segment]:
        for seg in super().render(renderable, options):
            if seg.control or not (_CONTROL.search(seg.text) or _SURROGATE.search(seg.text)):
                yield seg
            else:
                yield Segment(clean(seg.text), seg.style, seg.control)


def console(*, stderr: bool = False, **kwargs: Any) -> SafeConsole:
    """The console every command prints through (no automatic highlighting of data)."""
    kwargs.setdefault("highlight", False)
    return SafeConsole(stderr=stderr, **kwargs)


def say(*parts: Any, err: bool = False, style: str = "") -> None:
    """Print data (joined by spaces) literally, on stdout or stderr."""
    console(stderr=err).print(lit(" ".join(clean(p) for p in parts), style=style), soft_wrap=True)


def print_error(message: Any, prefix: str = "error") -> None:
    """One line on stderr: ``error: message`` (the message is data: shown literally, on one line)."""
    console(stderr=True).print(Text.assemble((f"{prefix}:", "red"), " ", one_line(message)), soft_wrap=True)


def print_json(obj: Any) -> None:
    """One JSON object on stdout, machine-readable (ASCII: every control character of the data escaped).

    >>> print_json({"answer": "5\\x1b[2J"})
    {"answer": "5\\u001b[2J"}
    """
    import json
    import sys

    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class DataTable(Table):
    """A table whose title, caption and string cells are data (literal text); pass ``Text`` for our styling."""

    def __init__(self, title: Any = None, columns: Iterable[str] = (), **kwargs: Any):
        if kwargs.get("caption") is not None:
            kwargs["caption"] = lit(kwargs["caption"])
        super().__init__(title=None if title is None else lit(title), **kwargs)
        for col in columns:
            self.add_column(col)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(c if c is None or isinstance(c, Text) or not isinstance(c, str) else lit(c)
                          for c in cells), **kwargs)

    def row(self, *cells: Any, **kwargs: Any) -> "DataTable":
        """``add_row`` that returns the table (for one-liners)."""
        self.add_row(*cells, **kwargs)
        return self


# -- traces ---------------------------------------------------------------------------------------------------
def _clip(text: str | None, n: int = 90) -> str:
    if not text:
        return ""
    one = one_line(text)
    return one if len(one) <= n else one[: n - 1] + "…"


def _clip_end(text: str | None, n: int = 300) -> str:
    """One line, its end kept when too long (an answer concludes at its end)."""
    one = one_line(text or "")
    return one if len(one) <= n else "…" + one[-(n - 1):]


def usage_line(u: Usage) -> str:
    """The counters of a usage that are not zero (``no tokens`` when all are).

    >>> usage_line(Usage(prefilled=12, generated=3))
    'prefilled 12 · generated 3'
    """
    parts = [f"{k} {v}" for k, v in (("prefilled", u.prefilled), ("reused", u.reused), ("latent", u.latent),
                                     ("generated", u.generated)) if v]
    return " · ".join(parts) or "no tokens"


# chat-template markup: ChatML (<|im_start|>role ... <|im_end|>), Llama 3 headers, and bare special tokens
_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)|<\|start_header_id\|>(\w+)<\|end_header_id\|>\s*(.*?)"
                   r"(?:<\|eot_id\|>|$)", re.S)
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>|</?s>")


def message_text(text: str | None) -> str:
    """The messages in chat-template text, without the markup: the user and assistant turns' contents (the
    run's system prompt, the same in every turn, left out); text with no markup is returned as it is.

    >>> message_text("<|im_start|>system\\nBe kind.<|im_end|>\\n<|im_start|>user\\nWhat is 2+3?<|im_end|>\\n")
    'What is 2+3?'
    """
    if not text:
        return ""
    turns = [(m.group(1) or m.group(3), (m.group(2) if m.group(1) else m.group(4)) or "")
             for m in _TURN.finditer(text)]
    if not turns:
        return _SPECIAL.sub("", text).strip()
    return "\n\n".join(body.strip() for role, body in turns if role != "system" and body.strip())


SEGMENT_KIND = {"read": "prompt", "think": "thought", "speak": "message", "score": "scored", "merge": "merged",
                "organize": "decision"}
SEGMENT_LEGEND = ("segments are #id agent/kind: prompt = an agent's instruction, question = the problem, "
                  "thought = latent steps, message = decoded text")


def segment_labels(trace: Trace) -> dict[int, str]:
    """``{segment id: "agent/kind"}`` from the step that first wrote each segment."""
    labels: dict[int, str] = {}
    for s in trace.steps:
        kind = "question" if s.role == "question" else SEGMENT_KIND.get(s.action, s.action)
        for sid in s.writes:
            labels.setdefault(sid, f"{s.agent}/{kind}")
    return labels


def _segments(ids: list[int], labels: dict[int, str]) -> str:
    return ", ".join(f"#{i} {labels.get(i, '?')}" for i in ids) or "-"


def _step_label(s) -> Text:
    style = ACTION_STYLE.get(s.action, "white")
    label = Text.assemble((f"{s.index:>2} ", "dim"), (clean(s.agent), "bold"),
                          (f" [{clean(s.role)}]" if s.role != s.agent else ""), " ", (clean(s.action), style),
                          f"  rows {s.rows}" if s.rows > 1 else "", "  ", (usage_line(s.usage), "dim"),
                          f"  {s.wall_s * 1000:.0f} ms")
    if s.usage.generated and s.wall_s > 0:
        label.append(f"  {s.usage.generated / s.wall_s:.1f} tok/s", style="dim")
    if s.meta.get("intervention"):
        label.append(f"  [intervention: {one_line(s.meta['intervention'])}]", style="red")
    if s.meta.get("skill_id"):  # a skills episode: the skill active when this action was chosen
        name = s.meta.get("skill_name") or str(s.meta["skill_id"])[:8]
        label.append(f"  [skill {clean(name)} ({clean(s.meta.get('skill_source') or '?')})]", style="magenta")
    elif "skill_id" in s.meta:
        label.append("  [no skill]", style="dim")
    return label


def step_line(s) -> Text:
    """One line for a step as it finishes (live output): agent, action, nonzero counters, ms, tokens/s."""
    return _step_label(s)


def pick_steps(trace: Trace, steps: str | None = None, agent: str | None = None) -> list:
    """The steps ``steps`` (``3``, ``2-5``, ``0,4-6``) of agent ``agent`` (either may be None: all).

    >>> from kvmas.trace import Step
    >>> t = Trace()
    >>> for a in "abab": _ = t.add(Step(agent=a, role=a, action="read"))
    >>> [s.index for s in pick_steps(t, "1-3", "b")]
    [1, 3]
    >>> pick_steps(t, agent="critic")
    Traceback (most recent call last):
    kvmas.errors.BadInputError: --agent critic: run ... has no such agent (its agents: a, b)
    """
    if agent is not None and agent not in trace.agents():
        raise BadInputError(f"--agent {agent}: run {trace.run_id} has no such agent "
                            f"(its agents: {', '.join(trace.agents())})")
    wanted: set[int] | None = None
    if steps:
        wanted = set()
        for part in steps.split(","):
            lo, _, hi = part.strip().partition("-")
            try:
                a, b = int(lo), int(hi) if hi else int(lo)
            except ValueError:
                raise BadInputError(f"--steps takes numbers and ranges such as 0,3-5, not {steps!r}") from None
            wanted.update(range(a, b + 1))
    return [s for s in trace.steps if (wanted is None or s.index in wanted) and (agent is None or s.agent == agent)]


def trace_tree(trace: Trace, full_text: bool = False, steps: list | None = None) -> Tree:
    """A tree: run -> steps with agent, action, nonzero usage, time, provenance and the texts each step read
    (the role's message, not chat-template markup) and wrote (all data literal)."""
    title = Text.assemble(("run ", "bold"), (clean(trace.run_id), "bold cyan"),
                          f"  {clean(trace.method)}  seed {trace.seed}  ", (f"{trace.wall_s:.2f}s", "dim"))
    root = Tree(title)
    root.add(Text.assemble(("question: ", "bold"), _clip(trace.question, 200)))
    m = trace.model
    root.add(lit(f"model: {m.get('name', '?')} ({m.get('arch', '')}, {m.get('dtype', '')})"))
    labels = segment_labels(trace)
    shown = trace.steps if steps is None else steps
    node_steps = root.add(Text.assemble(("steps", "bold"), (f"  ({SEGMENT_LEGEND})", "dim")))
    for s in shown:
        node = node_steps.add(_step_label(s))
        if s.writes or s.reads:
            others = [i for i in s.reads if not labels.get(i, "").startswith(f"{s.agent}/")]
            own = len(s.reads) - len(others)
            reads = _segments(others, labels) + (f" (+{own} of its own)" if own else "")
            node.add(Text(f"merges {len(s.reads)} segments → writes {len(s.writes)}" if s.action == "merge"
                          else f"reads {reads} → writes {_segments(s.writes, labels)}", style="dim"))
        text_in = s.meta.get("message") or message_text(s.text_in)
        if text_in:
            node.add(Text.assemble(("in: ", "cyan"), clean(text_in) if full_text else _clip(text_in)))
        hint = (s.meta.get("inputs") or {}).get("hint") if isinstance(s.meta.get("inputs"), dict) else None
        if hint:
            node.add(Text.assemble(("skill step: ", "magenta"), clean(hint) if full_text else _clip(hint)))
        if s.text_out is not None:
            node.add(Text.assemble(("out: ", "green"), clean(s.text_out) if full_text else _clip(s.text_out)))
    if steps is not None and len(steps) < len(trace.steps):
        node_steps.add(Text(f"{len(steps)} of {len(trace.steps)} steps shown", style="dim"))
    root.add(Text.assemble(("total: ", "bold"), usage_line(trace.usage)))
    if trace.answer is not None:
        root.add(Text.assemble(("answer: ", "bold green"), _clip_end(trace.answer, 300)))
    if trace.outcome:
        root.add(Text.assemble(("outcome: ", "bold"), one_line(trace.outcome)))
    return root


def agent_table(trace: Trace) -> Table:
    """Usage per agent (zero columns left out)."""
    table = DataTable("usage per agent")
    totals = trace.usage
    counters = [c for c in ("prefilled", "reused", "latent", "generated") if getattr(totals, c)]
    for col in ("agent", "steps", *counters, "time s"):
        table.add_column(col, justify="right" if col != "agent" else "left")
    for agent in trace.agents():
        steps = [s for s in trace.steps if s.agent == agent]
        u = sum((s.usage for s in steps), Usage())
        table.add_row(agent, str(len(steps)), *(str(getattr(u, c)) for c in counters),
                      f"{sum(s.wall_s for s in steps):.2f}")
    return table


def print_trace(trace: Trace, out: Console | None = None, full_text: bool = False, steps: list | None = None) -> None:
    out = out or console()
    out.print(Panel(Group(trace_tree(trace, full_text, steps), agent_table(trace)), title="kvmas trace"))


# -- attribution ----------------------------------------------------------------------------------------------
def _bar(frac: float, width: int = 30) -> str:
    n = max(0, min(width, round(frac * width)))
    return "█" * n + "·" * (width - n)


def render_attribution(res, log, out: Console, context: int = 2) -> None:
    """Blame bar chart, the critical step with its neighbourhood, evidence and a suggested fix.

    >>> import io
    >>> from kvmas.attribution import LogAttributor, from_generic
    >>> log = from_generic([{"agent": "a", "content": "Assume x = 12."}, {"agent": "b", "content": "So 12."}])
    >>> con = console(record=True, width=100, file=io.StringIO())
    >>> render_attribution(LogAttributor().attribute(log), log, con)
    >>> "critical step" in con.export_text()
    True
    """
    t = DataTable(f"agent blame — {res.log_id} ({res.method})", show_lines=False)
    for col, just in (("agent", "left"), ("share", "right"), ("", "left"), ("phi", "right"), ("delta", "right")):
        t.add_column(col, justify=just)
    pos = [max(0.0, b.score) for b in res.blame]
    tot = sum(pos) or 1.0
    for b, p in zip(res.blame, pos):
        t.add_row(b.agent, f"{100 * p / tot:.0f}%", _bar(p / tot), f"{b.phi:+.3f}", f"{b.delta:+.3f}",
                  style="bold red" if b.agent == res.agent else "")
    out.print(t)
    lo, hi = max(0, res.step - context), min(len(log.steps), res.step + context + 1)
    nb = DataTable(f"critical step {res.step} ({res.agent}) and its neighbourhood", show_lines=True)
    nb.add_column("step", justify="right")
    nb.add_column("agent")
    nb.add_column("content")
    for s in log.steps[lo:hi]:
        text = one_line(s.content)
        text = text[:240] + ("…" if len(text) > 240 else "")
        nb.add_row(("▶ " if s.index == res.step else "") + str(s.index), s.agent, text,
                   style="bold" if s.index == res.step else "")
    out.print(nb)
    rk = DataTable("ranked candidate steps")
    for col, just in (("rank", "right"), ("step", "right"), ("agent", "left"), ("score", "right"),
                      ("evidence", "left")):
        rk.add_column(col, justify=just)
    for i, r in enumerate(res.ranking[:5], 1):
        rk.add_row(str(i), str(r.step), r.agent, f"{r.score:.3f}", "; ".join(r.evidence) or "-")
    out.print(rk)
    out.print(Panel(lit("\n".join(f"• {e}" for e in res.evidence) or "-"), title="evidence"))
    out.print(Panel(lit(res.suggested_fix or "-"), title="suggested fix"))
    out.print(lit(f"value function: {res.value_function}", style="dim"))


def render_eval(summary: dict[str, Any], out: Console) -> None:
    """Accuracy table: our held-out numbers, the trivial baselines of this data, and the published anchors
    measured on this data only (``summary["anchors"]``; none for data nothing published was measured on)."""
    if summary.get("mode") == "transfer":
        how = f"fitted on {summary['train']} (n={summary['train_n']})"
    else:
        how = f"{summary['folds']}-fold CV × {len(summary['seeds'])} seeds, held-out only"
    t = DataTable(f"attribution — {summary['data']} (n={summary['n']}, {summary['kind']}, "
                  f"{'with' if summary['with_gt'] else 'without'} gold answer, {how})")
    for c in ("method", "agent %", "step %", "±1 %", "±3 %", "p step vs step1", "p step vs best base"):
        t.add_column(c, justify="left" if c == "method" else "right")
    det = [k for k in summary["baselines"] if k != "uniform_random"]
    for name, m in summary["methods"].items():
        sd = lambda k: f" ± {m[k + '_sd']:.2f}" if k + "_sd" in m else ""  # noqa: E731
        best = max(det, key=lambda k: summary["baselines"][k]["step_acc"])
        t.add_row(f"ours: {name}", f"{m['agent_acc']:.2f}{sd('agent_acc')}", f"{m['step_acc']:.2f}{sd('step_acc')}",
                  f"{m['step_acc_pm1']:.2f}", f"{m['step_acc_pm3']:.2f}",
                  f"{m['mcnemar']['step_vs_always_step1']['p_mcnemar']:.4f}",
                  f"{m['mcnemar'][f'step_vs_{best}']['p_mcnemar']:.4f} ({best})", style="bold")
    for name, b in summary["baselines"].items():
        t.add_row(name.replace("_", " "), f"{b['agent_acc']:.2f}", f"{b['step_acc']:.2f}",
                  *(f"{b[k]:.2f}" if k in b else "" for k in ("step_acc_pm1", "step_acc_pm3")), "", "")
    for a in summary.get("anchors", []):
        t.add_row(*(lit(x, "dim") for x in (f"{a['name']}†", f"{a['agent_acc']:.2f}", f"{a['step_acc']:.2f}")),
                  "", "", "", lit(a["note"], "dim"))
    out.print(t)
    out.print("[dim]p: exact McNemar on step hits (first seed); † published on this data[/dim]")
    if summary.get("skipped"):
        out.print(lit(f"skipped: {', '.join(f'{v} {k}' for k, v in summary['skipped'].items())}", "yellow"))
    if summary.get("warnings"):
        w = summary["warnings"]
        out.print(Text.assemble((f"{len(w)} warning(s)", "yellow"), ": ",
                                one_line("; ".join(w[:5]) + (" …" if len(w) > 5 else ""))))

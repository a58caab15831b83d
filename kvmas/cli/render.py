"""Rich rendering of traces and usage (shared by `kvmas run` and `kvmas trace show`)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from kvmas.trace import Trace, Usage

ACTION_STYLE = {"read": "cyan", "think": "magenta", "speak": "green", "score": "yellow", "organize": "blue"}


def _clip(text: str | None, n: int = 90) -> str:
    if not text:
        return ""
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def usage_line(u: Usage) -> str:
    return f"prefilled {u.prefilled} · reused {u.reused} · latent {u.latent} · generated {u.generated}"


def trace_tree(trace: Trace, full_text: bool = False) -> Tree:
    """A tree: run -> agents -> steps with action, usage, time and text snippets."""
    title = Text.assemble(("run ", "bold"), (trace.run_id, "bold cyan"), f"  {trace.method}  seed {trace.seed}  ",
                          (f"{trace.wall_s:.2f}s", "dim"))
    root = Tree(title)
    root.add(Text.assemble(("question: ", "bold"), _clip(trace.question, 200)))
    model = trace.model.get("name", "?")
    root.add(f"model: {model} ({trace.model.get('arch', '')}, {trace.model.get('dtype', '')})")
    steps = root.add(Text("steps", style="bold"))
    for s in trace.steps:
        style = ACTION_STYLE.get(s.action, "white")
        label = Text.assemble(
            (f"#{s.index} ", "dim"), (s.agent, "bold"), f" [{s.role}] ", (s.action, style),
            f"  rows {s.rows}  " if s.rows > 1 else "  ",
            (usage_line(s.usage), "dim"), f"  {s.wall_s * 1000:.0f} ms",
        )
        if s.meta.get("intervention"):
            label.append(f"  [intervention: {s.meta['intervention']}]", style="red")
        node = steps.add(label)
        if s.writes or s.reads:
            node.add(Text(f"reads {s.reads} → writes {s.writes}", style="dim"))
        if s.text_in:
            node.add(Text.assemble(("in: ", "cyan"), s.text_in if full_text else _clip(s.text_in)))
        if s.text_out is not None:
            node.add(Text.assemble(("out: ", "green"), s.text_out if full_text else _clip(s.text_out)))
    total = trace.usage
    root.add(Text.assemble(("total: ", "bold"), usage_line(total)))
    if trace.answer is not None:
        root.add(Text.assemble(("answer: ", "bold green"), _clip(trace.answer, 300)))
    if trace.outcome:
        root.add(Text.assemble(("outcome: ", "bold"), str(trace.outcome)))
    return root


def agent_table(trace: Trace) -> Table:
    table = Table(title="usage per agent")
    for col in ("agent", "steps", "prefilled", "reused", "latent", "generated", "time s"):
        table.add_column(col, justify="right" if col != "agent" else "left")
    for agent in trace.agents():
        steps = [s for s in trace.steps if s.agent == agent]
        u = sum((s.usage for s in steps), Usage())
        table.add_row(agent, str(len(steps)), str(u.prefilled), str(u.reused), str(u.latent), str(u.generated),
                      f"{sum(s.wall_s for s in steps):.2f}")
    return table


def print_trace(trace: Trace, console: Console | None = None, full_text: bool = False) -> None:
    console = console or Console()
    console.print(Panel(Group(trace_tree(trace, full_text), agent_table(trace)), title="kvmas trace"))

"""Terminal rendering (rich) of an attribution and of an evaluation summary.

>>> import io
>>> from rich.console import Console
>>> from kvmas.attribution.log import from_generic
>>> from kvmas.attribution.attributor import LogAttributor
>>> log = from_generic([{"agent": "a", "content": "Assume x = 12."}, {"agent": "b", "content": "So 12."}])
>>> con = Console(record=True, width=100, file=io.StringIO())
>>> render_attribution(LogAttributor().attribute(log), log, con)
>>> "critical step" in con.export_text()
True
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from kvmas.attribution.attributor import Attribution
from kvmas.attribution.log import AttributionLog

PUBLISHED = [  # (name, agent %, step %) on Who&When Algorithm-Generated, with ground truth, as published
    ("GPT-4o all-at-once†", 54.33, 12.50),
    ("GPT-4o step-by-step†", 35.20, 25.51),
    ("CDC-MAS†", 48.5, 36.2),
]


def _bar(frac: float, width: int = 30) -> str:
    n = max(0, min(width, round(frac * width)))
    return "█" * n + "·" * (width - n)


def render_attribution(res: Attribution, log: AttributionLog, console: Console, context: int = 2) -> None:
    """Blame bar chart, the critical step with its neighbourhood, evidence and a suggested fix."""
    t = Table(title=f"agent blame — {res.log_id} ({res.method})", show_lines=False)
    t.add_column("agent")
    t.add_column("share", justify="right")
    t.add_column("")
    t.add_column("phi", justify="right")
    t.add_column("delta", justify="right")
    pos = [max(0.0, b.score) for b in res.blame]
    tot = sum(pos) or 1.0
    for b, p in zip(res.blame, pos):
        style = "bold red" if b.agent == res.agent else ""
        t.add_row(b.agent, f"{100 * p / tot:.0f}%", _bar(p / tot), f"{b.phi:+.3f}", f"{b.delta:+.3f}",
                  style=style)
    console.print(t)
    lo, hi = max(0, res.step - context), min(len(log.steps), res.step + context + 1)
    nb = Table(title=f"critical step {res.step} ({res.agent}) and its neighbourhood", show_lines=True)
    nb.add_column("step", justify="right")
    nb.add_column("agent")
    nb.add_column("content")
    for s in log.steps[lo:hi]:
        text = s.content.strip().replace("\n", " ")
        text = text[:240] + ("…" if len(text) > 240 else "")
        nb.add_row(("▶ " if s.index == res.step else "") + str(s.index), s.agent, text,
                   style="bold" if s.index == res.step else "")
    console.print(nb)
    rk = Table(title="ranked candidate steps")
    rk.add_column("rank", justify="right")
    rk.add_column("step", justify="right")
    rk.add_column("agent")
    rk.add_column("score", justify="right")
    rk.add_column("evidence")
    for i, r in enumerate(res.ranking[:5], 1):
        rk.add_row(str(i), str(r.step), r.agent, f"{r.score:.3f}", "; ".join(r.evidence) or "-")
    console.print(rk)
    console.print(Panel("\n".join(f"• {e}" for e in res.evidence) or "-", title="evidence"))
    console.print(Panel(res.suggested_fix or "-", title="suggested fix"))
    console.print(f"[dim]value function: {res.value_function}[/dim]")


def render_eval(summary: dict[str, Any], console: Console) -> None:
    """Accuracy table: our held-out numbers, the trivial baselines, and the published reference rows."""
    t = Table(title=f"Who&When attribution — {summary['data']} (n={summary['n']}, "
                    f"{'with' if summary['with_gt'] else 'without'} gold answer, "
                    f"{summary['folds']}-fold CV × {len(summary['seeds'])} seeds, held-out only)")
    for c in ("method", "agent %", "step %", "±1 %", "±3 %", "p vs step1"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for name, m in summary["methods"].items():
        p = m["mcnemar_seed0"]["step_vs_always_step1"]["p_mcnemar"]
        t.add_row(f"ours: {name.removeprefix('cdc_')}", f"{m['agent_acc']:.2f} ± {m['agent_acc_sd']:.2f}",
                  f"{m['step_acc']:.2f} ± {m['step_acc_sd']:.2f}", f"{m['step_acc_pm1']:.2f}",
                  f"{m['step_acc_pm3']:.2f}", f"{p:.4f}", style="bold")
    for name, b in summary["baselines"].items():
        t.add_row(name.replace("_", " "), f"{b['agent_acc']:.2f}", f"{b['step_acc']:.2f}",
                  f"{b['step_acc_pm1']:.2f}", f"{b['step_acc_pm3']:.2f}", "")
    for name, a, s in PUBLISHED:
        t.add_row(f"[dim]{name}[/dim]", f"[dim]{a:.2f}[/dim]", f"[dim]{s:.2f}[/dim]", "", "", "")
    console.print(t)
    console.print("[dim]† published, with gold answer, GPT-4o; p vs step1: exact McNemar on step hits (seed 0)[/dim]")
    if summary.get("warnings"):
        console.print(f"[yellow]{len(summary['warnings'])} warning(s)[/yellow]: "
                      + "; ".join(summary["warnings"][:5]) + (" …" if len(summary["warnings"]) > 5 else ""))

"""`kvmas bench efficiency`: tokens, latent steps, wall time, peak memory and accuracy per method.

Every method runs on the same questions, model, seed and budgets, each method in its own worker process (so
its peak RSS is its own). Speed is reported as ratios measured in this one run, always beside accuracy,
answer lengths and sample answers, so that a speed-up bought with broken answers cannot hide.

    kvmas bench efficiency --n 20                                  # seeded synthetic tasks, embedded model
    kvmas bench efficiency --data ../shared/data/gsm8k/test_dev.jsonl --n 20 --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmas.errors import BadInputError, KvmasError
from kvmas.paths import atomic_write_text

DEFAULT_METHODS = ["single", "latent:review", "text:review", "latent:vote", "text:vote", "latent:plan", "text:plan"]


@dataclass
class ItemResult:
    id: str
    correct: bool
    pred: str | None
    gold: str
    answer_tokens: int  # tokens of the final spoken answer
    prefilled: int
    reused: int
    latent: int
    generated: int
    wall_s: float
    answer: str
    echo: bool = False  # the answer copies a role instruction (collapse), see kvmas.primitives.echo


@dataclass
class MethodResult:
    method: str
    items: list[ItemResult] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    meta: dict = field(default_factory=dict)

    def total(self, key: str) -> float:
        return sum(getattr(i, key) for i in self.items)

    @property
    def accuracy(self) -> float:
        return sum(i.correct for i in self.items) / max(1, len(self.items))


def run_method(method: str, tasks, model, *, seed: int, max_new_tokens: int, latent_steps: int | None,
               trace_dir: Path | None = None, progress=None) -> MethodResult:
    """Run one method over ``tasks`` in this process (the worker calls this)."""
    from kvmas.primitives import parse_method
    from kvmas.primitives.echo import echoes_role_prompt
    from kvmas.tasks import format_question
    from kvmas.tasks.answers import matches_gold, read_answer

    params = {"max_new_tokens": max_new_tokens}
    if latent_steps is not None and method != "single":
        params["latent_steps"] = latent_steps
    prim = parse_method(method, **params)
    out = MethodResult(method=method)
    for task in tasks:
        t0 = time.perf_counter()
        r = prim(format_question(task), model=model, seed=seed)
        wall = time.perf_counter() - t0
        final = [s for s in r.trace.steps if s.action == "speak"]
        answer_tokens = sum(final[-1].meta.get("tokens", [0])) if final else 0
        reading = read_answer(r.answer, task)
        pred = reading.answer
        r.trace.outcome = {"correct": matches_gold(pred, task), "gold": task.answer, "pred": pred,
                           "rule": reading.rule, "task_id": task.id}
        if trace_dir is not None:
            r.trace.save(trace_dir / f"{method.replace(':', '_')}__{task.id}.json")
        u = r.usage
        out.items.append(ItemResult(
            id=task.id, correct=bool(r.trace.outcome["correct"]), pred=pred, gold=task.answer,
            answer_tokens=answer_tokens, prefilled=u.prefilled, reused=u.reused, latent=u.latent,
            generated=u.generated, wall_s=wall, answer=r.answer, echo=echoes_role_prompt(r.answer),
        ))
        for k, v in r.meta.items():
            out.meta.setdefault(k, []).append(v)
        if progress:
            progress()
    out.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def merge_policy_error(model, question: str, n: int = 3, latent_steps: int = 4) -> dict:
    """Error of the Vote selector's merge policies against exact re-prefill of all candidates.

    Builds the latent Vote state up to the selector's prompt with Vote's own code (``Vote.selector_state``,
    hand-offs included) under each policy and compares the selector's next-token distribution with the
    ``reprefill`` (exact joint) one: max |Δ logprob|, KL and top-1 agreement.
    """
    import torch

    from kvmas.primitives import Vote
    from kvmas.primitives.run import Output, open_run

    vote = Vote(n=n, latent_steps=latent_steps)

    def selector_logprobs(policy: str):
        ctx = open_run(model, question, method=vote.method, params=vote.params())
        return vote.selector_state(ctx, Output.start(model), policy).next_logprobs()[0]

    ref = selector_logprobs("reprefill")
    out = {}
    for policy in ("shared", "rerotate"):
        lp = selector_logprobs(policy)
        out[policy] = {
            "max_abs_dlogprob": float((lp - ref).abs().max()),
            "kl_exact_to_policy": float(torch.sum(ref.exp() * (ref - lp))),
            "top1_agrees": bool(int(lp.argmax()) == int(ref.argmax())),
        }
    return out


# ---------------------------------------------------------------------------------------------- driver
def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from kvmas.agents.model import Model
    from kvmas.tasks import load_tasks

    tasks = load_tasks(spec["data"], n=spec["n"], seed=spec["seed"])
    model = Model.load(spec["model"])
    trace_dir = Path(spec["trace_dir"]) if spec.get("trace_dir") else None
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)

    def tick():
        print("ITEM", flush=True)

    res = run_method(spec["method"], tasks, model, seed=spec["seed"], max_new_tokens=spec["max_new_tokens"],
                     latent_steps=spec["latent_steps"], trace_dir=trace_dir, progress=tick)
    if spec.get("merge_error"):
        res.meta["merge_error"] = [merge_policy_error(model, q.question, latent_steps=spec["latent_steps"] or 4)
                                   for q in tasks[: spec["merge_error"]]]
    atomic_write_text(spec["out"], json.dumps(asdict(res)))


def run_efficiency(*, data: str | None, n: int, methods: list[str], model: str | None, seed: int,
                   max_new_tokens: int, latent_steps: int | None, out_dir: Path, merge_error: int = 3,
                   console=None) -> dict:
    """Run every method in a worker process; write results.json, results.md and chart.png to ``out_dir``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvmas.primitives import parse_method
    from kvmas.tasks import load_tasks

    console = console or Console()
    for m in methods:
        parse_method(m)  # reject unknown methods before any work
    tasks = load_tasks(data, n=n, seed=seed)
    if not tasks:
        raise BadInputError("no tasks to run")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[MethodResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for method in methods:
            bar = progress.add_task(f"{method:>14}", total=len(tasks))
            spec = {"method": method, "data": data, "n": n, "seed": seed, "model": model,
                    "max_new_tokens": max_new_tokens, "latent_steps": latent_steps,
                    "trace_dir": str(out_dir / "traces"), "out": str(out_dir / f".{method.replace(':', '_')}.json"),
                    "merge_error": merge_error if method == "latent:vote" else 0}
            spec_path = out_dir / f".{method.replace(':', '_')}.spec.json"
            atomic_write_text(spec_path, json.dumps(spec))
            proc = subprocess.Popen([sys.executable, "-m", "kvmas.bench.efficiency", "--worker", str(spec_path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for line in proc.stdout:
                if line.startswith("ITEM"):
                    progress.advance(bar)
            err = proc.stderr.read()
            if proc.wait() != 0:
                raise KvmasError(f"{method} failed: {err.strip().splitlines()[-1] if err.strip() else 'no output'}")
            raw = json.loads(Path(spec["out"]).read_text())
            items = [ItemResult(**i) for i in raw.pop("items")]
            results.append(MethodResult(items=items, **raw))
            for p in (spec_path, Path(spec["out"])):
                p.unlink(missing_ok=True)
    summary = summarize(results, data=data, n=len(tasks), model=model, seed=seed, max_new_tokens=max_new_tokens,
                        latent_steps=latent_steps)
    atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "results.md", to_markdown(summary))
    chart(summary, out_dir / "chart.png")
    return summary


def summarize(results: list[MethodResult], **info) -> dict:
    from kvmas.stats import wilson

    rows = {}
    for r in results:
        k, n = sum(i.correct for i in r.items), len(r.items)
        lo, hi = wilson(k, n)
        rows[r.method] = {
            "correct": k, "n": n, "accuracy": k / max(1, n), "ci95": [lo, hi],
            "wall_s": r.total("wall_s"), "prefilled": r.total("prefilled"), "reused": r.total("reused"),
            "latent": r.total("latent"), "generated": r.total("generated"),
            "answer_tokens_mean": r.total("answer_tokens") / max(1, n), "peak_rss_mb": r.peak_rss_mb,
            "echoes": sum(i.echo for i in r.items), "no_answer": sum(i.pred is None for i in r.items),
            "samples": [{"id": i.id, "gold": i.gold, "pred": i.pred, "answer": i.answer[:300]} for i in r.items[:3]],
            "items": [asdict(i) for i in r.items], "meta": r.meta,
        }
    ratios = {}
    if "single" in rows:
        for m, row in rows.items():
            ratios[f"{m} / single (wall)"] = row["wall_s"] / max(1e-9, rows["single"]["wall_s"])
    for prim in ("review", "vote", "plan"):
        lat, txt = rows.get(f"latent:{prim}"), rows.get(f"text:{prim}")
        if lat and txt:
            ratios[f"text/latent {prim} (wall)"] = txt["wall_s"] / max(1e-9, lat["wall_s"])
            ratios[f"text/latent {prim} (generated)"] = txt["generated"] / max(1, lat["generated"])
    return {"info": info, "methods": rows, "ratios": ratios}


def to_markdown(summary: dict) -> str:
    info = summary["info"]
    lines = [f"# kvmas bench efficiency — {info.get('model') or 'smollm2-135m'}, data {info.get('data') or 'synthetic'}, "
             f"n={info['n']}, seed {info['seed']}, max_new_tokens {info['max_new_tokens']}, "
             f"latent_steps {info['latent_steps'] if info['latent_steps'] is not None else 'default'}", "",
             "| method | accuracy | 95% CI | wall s | s/question | prefilled | reused | latent | generated | "
             "answer tokens (mean) | no answer | echoed a role prompt | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        lines.append(f"| {m} | {r['correct']}/{r['n']} | {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f} | {r['wall_s']:.1f} | "
                     f"{r['wall_s'] / max(1, r['n']):.2f} | {r['prefilled']} | {r['reused']} | {r['latent']} | "
                     f"{r['generated']} | {r['answer_tokens_mean']:.0f} | {r.get('no_answer', 0)} | "
                     f"{r.get('echoes', 0)} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}× |" for k, v in summary["ratios"].items()]
    merge = summary["methods"].get("latent:vote", {}).get("meta", {}).get("merge_error")
    if merge:
        lines += ["", "Vote selector merge policies vs exact re-prefill (next-token distribution of the selector):", ""]
        for policy in ("shared", "rerotate"):
            vals = [m[policy] for m in merge]
            lines.append(f"- {policy}: max |Δlogprob| mean {sum(v['max_abs_dlogprob'] for v in vals) / len(vals):.3f}, "
                         f"KL mean {sum(v['kl_exact_to_policy'] for v in vals) / len(vals):.4f}, "
                         f"top-1 agrees {sum(v['top1_agrees'] for v in vals)}/{len(vals)}")
    lines += ["", "## Sample answers", ""]
    for m, r in summary["methods"].items():
        for s in r["samples"][:2]:
            ans = " ".join(s["answer"].split())[:200]
            lines.append(f"- **{m}** `{s['id']}` gold {s['gold']} pred {s['pred']}: {ans}")
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summary["methods"])
    rows = [summary["methods"][m] for m in methods]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(methods, [r["wall_s"] / max(1, r["n"]) for r in rows], color="tab:blue")
    axes[0].set_title("wall s / question")
    axes[1].bar(methods, [r["generated"] / max(1, r["n"]) for r in rows], color="tab:orange", label="generated")
    axes[1].bar(methods, [r["latent"] / max(1, r["n"]) for r in rows], color="tab:purple", label="latent",
                bottom=[r["generated"] / max(1, r["n"]) for r in rows])
    axes[1].set_title("tokens / question")
    axes[1].legend()
    acc = [r["accuracy"] for r in rows]
    err = [[a - r["ci95"][0] for a, r in zip(acc, rows)], [r["ci95"][1] - a for a, r in zip(acc, rows)]]
    axes[2].bar(methods, acc, yerr=err, color="tab:green", capsize=3)
    axes[2].set_title("accuracy (95% CI)")
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="kvmas bench efficiency")
    for col in ("method", "acc", "95% CI", "wall s", "prefilled", "latent", "generated", "ans tok", "echo",
                "peak MB"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for m, r in summary["methods"].items():
        table.add_row(m, f"{r['correct']}/{r['n']}", f"{r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}", f"{r['wall_s']:.1f}",
                      str(r["prefilled"]), str(r["latent"]), str(r["generated"]), f"{r['answer_tokens_mean']:.0f}",
                      str(r.get("echoes", 0)), f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    for k, v in summary["ratios"].items():
        console.print(f"  {k}: [bold]{v:.2f}×[/]")


def command(
    data: str = None, n: int = 20, methods: str = ",".join(DEFAULT_METHODS), model: str = None, seed: int = 0,
    max_new_tokens: int = 256, latent_steps: int = None, out: Path = Path("bench_out/efficiency"),
    merge_error: int = 3,
) -> None:
    """Tokens, latent steps, wall time, peak memory and accuracy of each method on the same questions."""
    from rich.console import Console

    console = Console()
    summary = run_efficiency(data=data, n=n, methods=[m.strip() for m in methods.split(",") if m.strip()],
                             model=model, seed=seed, max_new_tokens=max_new_tokens, latent_steps=latent_steps,
                             out_dir=out, merge_error=merge_error, console=console)
    print_summary(summary, console)
    console.print(f"[dim]wrote {out}/results.json, results.md, chart.png, traces/[/]")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        raise SystemExit("usage: kvmas bench efficiency ... (this module's __main__ is the worker entry)")

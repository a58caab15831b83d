"""`kvmas bench`: benchmarks, all run through one harness (:mod:`kvmas.bench.harness`) where they decode.

    kvmas bench accuracy --data ../shared/data/gsm8k/test_dev.jsonl --methods single,latent:vote,auto --n 100
    kvmas bench accuracy                       # no data needed: the seeded synthetic tasks
    kvmas bench efficiency --n 20              # tokens, time, peak memory per method, each in its own process
    kvmas bench accuracy --workers 4 --ray-address auto   # tasks spread over Ray workers, one model each
    kvmas bench merge runs/a runs/b -o runs/ab  # methods run in separate processes, one report
    kvmas bench decode | kvmas bench latent-steps
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.text import Text

from kvmas.cli.backend import BACKEND, BASE_URL, open_backend
from kvmas.cli.boundary import fail as _fail
from kvmas.cli.options import BATCH_SIZE, DEVICE, DTYPE
from kvmas.cli.render import DataTable, console as make_console, esc, lit
from kvmas.errors import BadInputError, InterruptedRunError, KvmasError
from kvmas.progress import progress_bar

app = typer.Typer(help="Benchmarks: accuracy (and efficiency) of single, primitives and auto.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def _bench() -> None:
    """Benchmarks: accuracy (and efficiency) of single, primitives and auto."""


def accuracy_table(summary: dict) -> DataTable:
    """A rich table of a results dict from :func:`kvmas.bench.harness.run_bench`."""
    from kvmas.bench.report import seconds_per_question

    table = DataTable(f"accuracy · {summary['config']['data']} · n={summary['config']['n']} · "
                      f"{summary['config']['model']}")
    peak = any("peak_rss_mb" in s for s in summary["methods"].values())
    for col in ("method", "accuracy", "95% CI", "strict", "tokens/item", "generated", "latent", "s/question",
                "answer tok", "no answer", "echo") + (("peak MB",) if peak else ()):
        table.add_column(col, no_wrap=True)
    for name, s in summary["methods"].items():
        t = s["tokens_per_item"]
        lo, hi = s["ci95_wilson"]
        table.add_row(name, f"{s['correct']}/{s['n']} ({100 * s['accuracy']:.1f}%)",
                      f"{100 * lo:.0f}–{100 * hi:.0f}%", f"{s.get('correct_strict', 0)}/{s['n']}",
                      f"{t['computed']:.0f}", f"{t['generated']:.0f}", f"{t['latent']:.0f}",
                      f"{seconds_per_question(s):.2f}", f"{s['answer_tokens_mean']:.0f}", str(s["no_extractable_answer"]),
                      str(s.get("echoes", 0)), *((f"{s.get('peak_rss_mb', 0):.0f}",) if peak else ()))
    return table


def _progress(console: Console) -> Progress:
    return progress_bar(console)


def _bars(progress: Progress):
    """A ``progress(name, done, total)`` callback drawing one bar per method."""
    bars: dict[str, int] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = progress.add_task(esc(f"{name:<16}"), total=total)
        progress.update(bars[name], completed=done)

    return update


@app.command("accuracy")
def accuracy(
    data: str = typer.Option(None, "--data", "-d",
                             help="GSM8K/ARC JSONL path, or synthetic | synthetic-number | synthetic-choice | "
                                  "gsm8k-sample | arc-easy-sample (default: synthetic)"),
    methods: str = typer.Option(
        "single,latent:review,text:review,latent:vote,text:vote,latent:plan,text:plan,auto", "--methods", "-m",
        help="comma-separated: single, [latent:|text:]review|vote|plan, pipeline:FILE, auto, auto-empty, random, "
             "loglik"),
    n: int = typer.Option(20, "--n", help="number of tasks (first n of the file; --shuffle for a seeded sample)"),
    start: int = typer.Option(0, "--start", help="skip the first START items of the file (--start 100 --n 100: "
                                                 "items 100-199; `kvmas bench merge` joins such ranges)"),
    seed: int = typer.Option(0, "--seed"),
    shuffle: bool = typer.Option(False, "--shuffle", help="a seeded random sample of n tasks instead of the first n"),
    model: str = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    out: Path = typer.Option(None, "--out", "-o", help="output dir (default runs/bench-accuracy-<time>)"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="decode budget per speaking agent"),
    latent_steps: int = typer.Option(None, "--latent-steps", help="latent steps per agent (primitive default)"),
    pool: Path = typer.Option(None, "--pool", help="starting pool for auto/random (copied; default: fresh seeded)"),
    learn: bool = typer.Option(True, "--learn/--no-learn", help="auto learns online from each verified answer"),
    choice_scoring: str = typer.Option("extract", "--choice-scoring",
                                       help="multiple choice: extract the letter from the answer text, or loglik: "
                                            "rank the option labels by likelihood after the method's answer"),
    prompt: str = typer.Option("cot", "--prompt", help="answer instruction: cot (reason step by step, then "
                                                       "\\boxed{}) or direct (the answer alone)"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (of this process; a Ray worker "
                                                        "uses the CPUs the cluster gives it)"),
    workers: int = typer.Option(1, "--workers", "-w", help="Ray workers, one model replica each: each method's "
                                "tasks go out in chunks of --batch-size (default: split evenly), the results the "
                                "same as one process gives. auto learning online (--learn) cannot be split and "
                                "runs in this process (1: no Ray)"),
    ray_address: str = typer.Option(None, "--ray-address", help="a running Ray cluster, e.g. auto or HOST:6379 "
                                    "(default: the one `ray start` started here, else a local one for this run)"),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    backend: str = BACKEND,
    base_url: str = BASE_URL,
) -> None:
    """Accuracy of each method on the same tasks, with 95% intervals, paired tests, tokens and time."""
    from kvmas.bench.harness import BenchConfig, parse_methods, run_bench
    from kvmas.tasks import load_tasks

    console = make_console()
    try:
        meths = parse_methods(methods)
        tasks = load_tasks(data, n=n, seed=seed, shuffle=shuffle, start=start)
        from kvmas.agents.model import Model
        from kvmas.models.registry import default_model

        fanned = workers > 1 or ray_address is not None
        if fanned and (backend != "local" or base_url):
            raise BadInputError("--workers goes with --backend local (an endpoint spreads its own load)")
        with console.status("loading model…"):
            if fanned:  # every worker loads its replica; this process only if auto learns online here
                m = model or default_model()
                if threads:
                    import torch

                    torch.set_num_threads(threads)
            elif backend == "local" and not base_url:
                m = Model.load(model, threads=threads, device=device, dtype=dtype)
            else:  # the endpoint batches: 8 questions in flight unless told otherwise
                m, batch_size = open_backend(backend, model, base_url=base_url), batch_size or 8
        out_dir = out or Path("runs") / f"bench-accuracy-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        cfg = BenchConfig(seed=seed, max_new_tokens=max_new_tokens, latent_steps=latent_steps,
                          pool_path=str(pool) if pool else None, learn=learn, choice_scoring=choice_scoring,
                          prompt=prompt, batch_size=batch_size, device=device, dtype=dtype, workers=workers,
                          ray_address=ray_address)
        with _progress(console) as progress, _sigterm_interrupts():
            summary = run_bench(tasks, meths, m, out_dir, cfg, data_name=str(data or "synthetic"),
                                progress=_bars(progress), start=start, shuffle=shuffle)
    except InterruptedRunError as exc:
        rep = exc.report
        if rep["done"]:
            exc.args = (f"{exc}; to go on: the same command with --start {start + rep['done']} "
                        f"--n {rep['of'] - rep['done']} --methods {','.join([rep['method'], *rep['not_run']])} "
                        "-o ANOTHER_DIR, then kvmas bench merge the two",)
        _fail(exc)
    except KvmasError as exc:
        _fail(exc)
    _print_summary(console, summary, out_dir)


@contextmanager
def _sigterm_interrupts():
    """SIGTERM (``kill``, a job scheduler's stop) ends a run as Ctrl-C does: what finished is reported."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("merge")
def merge(
    runs: list[Path] = typer.Argument(..., help="accuracy run directories (same data and settings; other methods "
                                                "or other task ranges of a method)"),
    out: Path = typer.Option(..., "--out", "-o", help="output dir of the merged report"),
) -> None:
    """Merge accuracy runs into one report: methods run apart, and task ranges of a method run at different times
    (paired tests on the tasks each pair shares)."""
    from kvmas.bench.harness import merge_runs

    try:
        summary = merge_runs(runs, out)
    except KvmasError as exc:
        _fail(exc)
    _print_summary(make_console(), summary, out)


@app.command("rescore")
def rescore(
    run: Path = typer.Argument(..., help="a finished accuracy run directory"),
    data: str = typer.Option(None, "--data", "-d", help="the data the run used (default: as recorded in the run)"),
    out: Path = typer.Option(..., "--out", "-o", help="output dir of the rescored report"),
) -> None:
    """Read every stored answer of a run again with the current scorer (old vs new figures; no model needed)."""
    from kvmas.bench.harness import rescore_run
    from kvmas.tasks import load_tasks

    try:
        if data is None:
            try:
                data = json.loads((run / "results.json").read_text(encoding="utf-8"))["config"]["data"]
            except (OSError, ValueError, KeyError) as exc:
                raise KvmasError(f"{run}: not a finished accuracy run ({exc})") from exc
        summary = rescore_run(run, load_tasks(data, n=None), out)
    except KvmasError as exc:
        _fail(exc)
    console = make_console()
    _print_summary(console, summary, out)
    before = summary["config"]["rescored_from"]["correct"]
    for name, s in summary["methods"].items():
        console.print(lit(f"  {name}: {before.get(name, '?')} correct before, {s['correct']} now (strict "
                          f"{s['correct_strict']})"))


def _print_summary(console: Console, summary: dict, out_dir: Path) -> None:
    console.print(accuracy_table(summary))
    for p in summary["paired"]:
        if p["a"] == summary["config"]["methods"][0] or "auto" in (p["a"], p["b"]):
            console.print(lit(f"  {p['a']} vs {p['b']}: {100 * p['diff']:+.1f} pts "
                              f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}], "
                              f"McNemar p={p['mcnemar_p']:.3g}"))
    from kvmas.bench.report import rule_counts

    for name, s in summary["methods"].items():
        console.print(lit(f"  {name} answers by rule (correct/read): {rule_counts(s)}"))
    if summary["config"].get("fanout"):
        from kvmas.bench.report import fanout_line

        fanout = summary["config"]["fanout"]
        console.print(lit("  " + fanout_line(fanout), "yellow" if fanout.get("workers_died") else "dim"))
    if "prompt_echo_floor" in summary["config"]:
        console.print(f"  prompt-echo floor: {summary['config']['prompt_echo_floor']} of {summary['config']['n']} "
                      "items credited to a reply that only repeats its prompt", highlight=False)
    for k, v in summary.get("efficiency", {}).get("ratios", {}).items():
        console.print(Text.assemble(lit(f"  {k}: "), (f"{v:.2f}×", "bold")))
    console.print(lit(f"wrote {out_dir}/results.json, results.md, chart.png, pareto.png, items.jsonl", "dim"))


@app.command("efficiency")
def efficiency(
    data: str = typer.Option(None, "--data", "-d", help="task data as for accuracy (default: synthetic)"),
    n: int = typer.Option(20, "--n", help="number of tasks (the first n)"),
    methods: str = typer.Option("single,latent:review,text:review,latent:vote,text:vote,latent:plan,text:plan",
                                "--methods", "-m", help="comma-separated methods, as for accuracy"),
    model: str = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    seed: int = typer.Option(0, "--seed"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="decode budget per speaking agent"),
    latent_steps: int = typer.Option(None, "--latent-steps", help="latent steps per agent (primitive default)"),
    out: Path = typer.Option(Path("bench_out/efficiency"), "--out", "-o", help="output dir"),
    merge_error: int = typer.Option(3, "--merge-error", help="questions on which Vote's merge error is measured"),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Tokens, latent steps, wall time, peak memory and accuracy of each method on the same questions."""
    from kvmas.bench.efficiency import run_efficiency
    from kvmas.tasks import load_tasks

    console = make_console()
    try:
        tasks = load_tasks(data, n=n, seed=seed)
        with _progress(console) as progress:
            summary = run_efficiency(tasks=tasks, methods=[m.strip() for m in methods.split(",") if m.strip()],
                                     model=model, seed=seed, max_new_tokens=max_new_tokens, latent_steps=latent_steps,
                                     out_dir=out, data_name=str(data or "synthetic"), merge_error=merge_error,
                                     progress=_bars(progress), batch_size=batch_size, device=device, dtype=dtype)
    except KvmasError as exc:
        _fail(exc)
    _print_summary(console, summary, out)
    console.print(lit(f"traces in {out}/traces/", "dim"))


@app.command("decode")
def decode(
    model: str = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    new_tokens: int = typer.Option(128, "--new-tokens", help="tokens to decode (EOS suppressed)"),
    repeats: int = typer.Option(2, "--repeats", help="alternating runs of each; the fastest counts"),
) -> None:
    """Decode tokens/s of kvmas vs bare transformers generate on the same prompt (ratio from one run)."""
    import time

    from kvmas.agents.model import Model
    from kvmas.bench.decode import measure

    t0 = time.perf_counter()
    try:
        m = Model.load(model)
    except KvmasError as exc:
        _fail(exc)
    load_s = time.perf_counter() - t0
    r = measure(m, new_tokens=new_tokens, repeats=repeats)
    c = make_console()
    c.print(f"model {m.name} (load {load_s:.2f}s), prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens",
            highlight=False, markup=False)
    c.print(f"kvmas speak: {r['kvmas_tok_s']:.1f} tok/s   transformers generate: {r['generate_tok_s']:.1f} tok/s   "
            f"ratio {r['ratio_kvmas_over_generate']:.2f}×   same tokens: {r['same_tokens']}", highlight=False)


@app.command("latent-steps")
def latent_steps_cmd(
    data: str = typer.Option("gsm8k-sample", "--data", "-d",
                             help="GSM8K JSONL with worked solutions (default: the sample shipped in kvmas/data)"),
    n: int = typer.Option(20, "--n", help="number of tasks"),
    model: str = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    methods: str = typer.Option("latent:review,latent:vote,latent:plan", "--methods", "-m",
                                help="comma-separated latent methods"),
    steps: str = typer.Option("0,2,4,8,16", "--steps", help="comma-separated latent_steps values"),
    out: Path = typer.Option(Path("bench_out/latent_steps.json"), "--out", "-o", help="output JSON"),
    handoff: str = typer.Option("thoughts", "--handoff", help="comma-separated hand-offs: thoughts, full"),
) -> None:
    """Mean log-prob per token of the gold solution under each latent primitive, per latent_steps value."""
    from kvmas.agents.model import Model
    from kvmas.bench.latent_steps import run
    from kvmas.paths import atomic_write_text
    from kvmas.tasks import load_tasks

    try:
        tasks = load_tasks(data, n=n)
        m = Model.load(model)
        with progress_bar(make_console()) as p:
            bar = p.add_task("latent-steps", total=len(tasks))
            res = run(m, tasks, [x for x in methods.split(",") if x], [int(x) for x in steps.split(",")],
                      progress=lambda: p.advance(bar), handoffs=[h for h in handoff.split(",") if h])
    except (KvmasError, ValueError) as exc:
        _fail(exc if isinstance(exc, KvmasError) else KvmasError(f"bad --steps: {exc}"))
    atomic_write_text(out, json.dumps({"model": m.name, "n": len(tasks), "results": res}, indent=2))
    table = DataTable(f"gold-solution log-prob per token ({m.name}, n={len(tasks)})")
    for col in ("method@steps", "mean logprob/token", "Δ vs single", "s"):
        table.add_column(col)
    base = res["single"]["mean"]
    for k, r in res.items():
        table.add_row(k, f"{r['mean']:.4f}", f"{r['mean'] - base:+.4f}", f"{r['s']:.1f}")
    make_console().print(table)


@app.command("throughput")
def throughput(
    model: str = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    data: str = typer.Option("gsm8k-sample", "--data", "-d", help="questions (as for accuracy)"),
    methods: str = typer.Option("single,latent:review,latent:vote,latent:plan", "--methods", "-m",
                                help="comma-separated methods"),
    batch: str = typer.Option("1,8,32", "--batch", help="comma-separated batch sizes"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="the answer budget"),
    min_questions: int = typer.Option(8, "--min-questions", help="questions per batch size at the least"),
    compare_tokens: int = typer.Option(32, "--compare-tokens", help="tokens per row in the generate comparison"),
    out: Path = typer.Option(Path("bench_out/throughput"), "--out", "-o", help="output dir"),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Aggregate tokens/s and questions/hour per method and batch size, against the compute-bound limit."""
    from kvmas.agents.model import Model
    from kvmas.bench.throughput import run_throughput, to_markdown
    from kvmas.paths import atomic_write_text
    from kvmas.tasks import load_tasks

    console = make_console()
    try:
        sizes = sorted({int(b) for b in batch.split(",") if b.strip()})
        if not sizes or sizes[0] < 1:
            raise KvmasError(f"--batch needs positive sizes, got {batch!r}")
        tasks = load_tasks(data, n=max(max(sizes), min_questions))
        m = Model.load(model, device=device, dtype=dtype)
        with console.status("measuring…") as status:
            res = run_throughput(m, tasks, [x.strip() for x in methods.split(",") if x.strip()], sizes,
                                 max_new_tokens, min_questions=min_questions, compare_tokens=compare_tokens,
                                 progress=lambda what: status.update(f"measuring {what}…"))
    except (KvmasError, ValueError) as exc:
        _fail(exc if isinstance(exc, KvmasError) else KvmasError(f"bad --batch: {exc}"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "results.md", to_markdown(res))
    console.print(lit(to_markdown(res)))
    console.print(lit(f"wrote {out}/results.json, results.md", "dim"))

"""`kvmas attribute`: who and when a failed multi-agent run went wrong.

    kvmas attribute RUN.json [--json]             # a kvmas trace, a Who&When record, or [{agent, content}]
    kvmas attribute RUN.json --replay --gold 12    # a kvmas trace: real counterfactual replays
    kvmas attribute eval --data PATH [--with-gt/--no-gt] [--json OUT]   # k-fold on one system
    kvmas attribute eval --train A --test B        # fit on one system, score another
    kvmas attribute plant --out ours.jsonl         # planted-fault failure logs of our primitives (Who&When format)
    kvmas attribute export TRACE... --out X.jsonl  # labelled kvmas traces as Who&When records
    kvmas attribute judge --data PATH --model qwen2.5-coder-0.5b --limit 30   # a local model as judge
    kvmas attribute planted [--n 4]               # planted-fault suite on real primitives
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from kvmas.cli.boundary import fail as _fail
from kvmas.cli.options import BATCH_SIZE
from kvmas.cli.render import console, lit
from kvmas.errors import KvmasError
from kvmas.paths import atomic_write_text


class _DefaultToReport(TyperGroup):
    """Routes ``kvmas attribute FILE`` to the ``report`` command; ``eval`` stays a sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["report", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_DefaultToReport, help="Failure attribution: which agent, which step, and why.",
                  no_args_is_help=True, add_completion=False)


@app.command("report")
def report(
    path: Path = typer.Argument(..., help="kvmas trace, Who&When record (.json) or generic [{agent, content}] list"),
    as_json: bool = typer.Option(False, "--json", help="print the attribution as JSON"),
    with_gt: bool = typer.Option(False, "--with-gt/--no-gt", help="let the scorer see the gold answer"),
    weights: Optional[Path] = typer.Option(None, help="step-scorer weights JSON (default: shipped weights)"),
    agent_rule: str = typer.Option("auto", help="shapley (bottleneck agent), speaker (of the top step) or auto "
                                   "(speaker for the portable features, shapley for the development set's)"),
    replay: bool = typer.Option(False, "--replay", help="kvmas traces: counterfactual replays of the primitive"),
    gold: Optional[str] = typer.Option(None, help="gold answer (number): judges the trace's answer and its replays "
                                       "(default: the trace's outcome.gold)"),
    max_replays: int = typer.Option(32, help="replay budget"),
    judge: Optional[str] = typer.Option(None, "--judge", help="re-rank the scorer's top steps by this model's "
                                        "mistake verdicts (registry name or local HF dir; cached per log)"),
    judge_k: int = typer.Option(3, "--judge-k", help="how many of the scorer's top steps the judge re-ranks"),
) -> None:
    """Attribute one failed run: agent blame, critical step with neighbourhood, evidence, suggested fix."""
    from kvmas.attribution.attributor import LogAttributor
    from kvmas.attribution.log import load_log, recorded_failure
    from kvmas.cli.render import render_attribution
    from kvmas.attribution.scorer import StepScorer
    from kvmas.errors import BadInputError

    try:
        if agent_rule not in ("shapley", "speaker", "auto"):
            raise BadInputError(f"--agent-rule must be shapley, speaker or auto, not {agent_rule!r}")
        log = load_log(path)
        if recorded_failure(log, gold) is None:  # a run nothing marks as failed: blaming an agent would be noise
            oc = log.meta.get("outcome") or {}
            judged = gold is not None or log.ground_truth is not None or "success" in oc or "correct" in oc
            outcome = "it succeeded" if judged else "its trace records no outcome and no gold answer"
            raise BadInputError(f"nothing to attribute: run {log.log_id} has no recorded failure ({outcome}); "
                                "pass --gold ANSWER to judge its answer")
        if replay and judge is not None:
            raise BadInputError("--judge re-ranks the log scorer's steps; --replay attributes by re-running instead")
        if replay:
            res = _replay(path, gold, max_replays)
        else:
            scorer = StepScorer.load(weights) if weights else None
            rule = None if agent_rule == "auto" else agent_rule
            log_judge = None
            if judge is not None:
                from kvmas.agents.model import Model
                from kvmas.attribution.judge import LogJudge
                from kvmas.paths import kvmas_home

                if judge_k < 1:
                    raise BadInputError("--judge-k must be >= 1")
                log_judge = LogJudge(Model.load(judge), cache_dir=kvmas_home() / "attribution" / "judge")
            res = LogAttributor(scorer=scorer, with_gt=with_gt, agent_rule=rule,  # type: ignore[arg-type]
                                judge=log_judge, judge_k=judge_k).attribute(log)
    except KvmasError as exc:
        _fail(exc)
    if as_json:
        typer.echo(res.model_dump_json(indent=2))
    else:
        render_attribution(res, log, console())


def _replay(path: Path, gold: Optional[str], max_replays: int, model=None):
    """Re-run the trace's primitive (same question, seed, parameters, model) under counterfactuals."""
    from kvmas.agents.model import Model
    from kvmas.attribution.planted import number_judge
    from kvmas.attribution.replay import ReplayAttributor
    from kvmas.errors import BadInputError
    from kvmas.primitives import build
    from kvmas.trace import Trace

    trace = Trace.load(path)
    gold = gold if gold is not None else (trace.outcome or {}).get("gold")
    if gold is None:
        raise BadInputError("--replay needs --gold (the trace has no outcome.gold)")
    if "steps" in trace.params:
        raise BadInputError(f"--replay supports single primitives, not the composite {trace.method!r}")
    prim = build(trace.method.rpartition(":")[2], **trace.params)
    model = model or Model.load(trace.model.get("name"))
    run = lambda iv: prim(trace.question, model=model, seed=trace.seed, interventions=iv)  # noqa: E731
    return ReplayAttributor(run, number_judge(str(gold)), max_replays=max_replays).attribute(trace)


@app.command("planted")
def planted_cmd(
    n: int = typer.Option(4, help="how many arithmetic tasks"),
    plant: str = typer.Option("first", help="plant the fault on each agent's first or last content step"),
    model: Optional[str] = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    methods: str = typer.Option("latent:review,latent:plan", help="comma-separated primitives to plant faults in"),
    max_new_tokens: int = typer.Option(16, help="decode budget per speaking agent"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every case here"),
) -> None:
    """Planted-fault suite on real primitives: how often replays name the planted agent/step."""
    from kvmas.agents.model import Model
    from kvmas.attribution.planted import TASKS, run_suite
    from kvmas.errors import BadInputError
    from kvmas.primitives import parse_method

    out = console()
    small = {"review": {"rounds": 1}, "plan": {"k": 2}, "vote": {"n": 2}}  # few agents: exact Shapley stays cheap
    try:
        if not 1 <= n <= len(TASKS):
            raise BadInputError(f"--n must be in 1..{len(TASKS)}")
        prims = {m: parse_method(m, max_new_tokens=max_new_tokens, **small.get(m.rpartition(":")[2], {}))
                 for m in [x.strip() for x in methods.split(",") if x.strip()]}
        res = run_suite(prims, TASKS[:n], Model.load(model), plant=plant, progress=lambda c: out.print(lit(
            f"{c.primitive} planted {c.agent}@{c.step} effective={c.effective} -> {c.pred_agent}@{c.pred_step} "
            f"({c.decided_by or 'not attributed'}, {c.replays} replays, {c.wall_s:.0f} s)")))
        out.print({k: v for k, v in res.items() if k != "cases"})
        if json_out:
            atomic_write_text(json_out, json.dumps(res, indent=1))
    except KvmasError as exc:
        _fail(exc)


@app.command("plant")
def plant_cmd(
    out_path: Path = typer.Option(..., "--out", help="Who&When-format JSONL of the planted-fault failures"),
    n: int = typer.Option(8, help="how many tasks"),
    data: Optional[Path] = typer.Option(None, "--data", help="number-answer tasks, a .jsonl (GSM8K train) or a "
                                        "generated set (synthetic-number), asked as the bench asks them (default: "
                                        "generated sums)"),
    start: int = typer.Option(0, help="skip this many tasks of --data first"),
    fault: str = typer.Option("claim", help="claim: a wrong claim in one of a few voices; slip: the agent's own "
                              "message with one value wrong"),
    methods: str = typer.Option("text:review,text:vote,text:plan", help="comma-separated primitives"),
    model: Optional[str] = typer.Option(None, "--model", help="registry name or local HF dir (default: embedded)"),
    max_new_tokens: int = typer.Option(32, help="decode budget per speaking agent"),
    plant: str = typer.Option("first", help="plant on each agent's first or last content step, or on each "
                              "content step (one fault per run)"),
    traces: Optional[Path] = typer.Option(None, help="also save every faulted trace in this folder"),
    batch_size: Optional[int] = BATCH_SIZE,
) -> None:
    """Failure logs of our own system with known decisive errors: planted faults in real runs, exported in the
    Who&When format (a second system to test whether attribution transfers)."""
    from kvmas.agents.model import Model
    from kvmas.attribution.export import to_whowhen
    from kvmas.attribution.planted import FAULT_KINDS, PLANT_SITES, arithmetic_tasks, planted_traces
    from kvmas.errors import BadInputError
    from kvmas.paths import inside, safe_name
    from kvmas.primitives import parse_method
    from kvmas.tasks.loaders import load_tasks
    from kvmas.tasks.prompts import format_question

    out = console()
    try:
        if n < 1:
            raise BadInputError("--n must be >= 1")
        if batch_size is not None and batch_size < 1:
            raise BadInputError("--batch-size must be >= 1")
        if fault not in FAULT_KINDS:
            raise BadInputError(f"--fault must be one of {', '.join(FAULT_KINDS)}, not {fault!r}")
        if plant not in PLANT_SITES:
            raise BadInputError(f"--plant must be one of {', '.join(PLANT_SITES)}, not {plant!r}")
        prims = {m: parse_method(m, max_new_tokens=max_new_tokens)
                 for m in [x.strip() for x in methods.split(",") if x.strip()]}
        if data is None:
            tasks = arithmetic_tasks(n)
        else:
            loaded = load_tasks(data, n=n, start=start)
            wrong_kind = [t for t in loaded if t.kind != "number"]
            if wrong_kind:
                raise BadInputError(f"{data}: planting needs number answers; {wrong_kind[0].id} is a "
                                    f"{wrong_kind[0].kind} task")
            tasks = [(format_question(t), t.answer) for t in loaded]
        records = []
        for label, trace in planted_traces(prims, tasks, Model.load(model), plant=plant, fault=fault,
                                           progress=lambda msg: out.print(lit(msg)), batch_size=batch_size):
            p = trace.outcome["planted"]
            rid = f"planted-{fault}-{plant}-{start}-{len(records)}"  # unique across files of one system
            records.append(to_whowhen(trace, (p["agent"], p["step"]), system=f"kvmas-planted/{label}",
                                      record_id=rid))
            if traces:
                trace.save(inside(traces, safe_name(rid) + ".json"))
            atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in records))  # a cut run keeps its cases
        if not records:
            raise BadInputError("no planted fault was effective; nothing written")
        out.print(lit(f"wrote {len(records)} record(s) to {out_path}"))
    except KvmasError as exc:
        _fail(exc)


@app.command("export")
def export_cmd(
    paths: list[Path] = typer.Argument(..., help="kvmas traces whose outcome.planted names the decisive step"),
    out_path: Path = typer.Option(..., "--out", help="Who&When-format JSONL"),
) -> None:
    """Export labelled kvmas traces as Who&When records (the task as a human turn, then every spoken step)."""
    from kvmas.attribution.export import label_of, to_whowhen
    from kvmas.errors import BadInputError
    from kvmas.trace import Trace

    try:
        recs = []
        for p in paths:
            trace = Trace.load(p)
            lab = label_of(trace)
            if lab is None:
                raise BadInputError(f"{p}: no outcome.planted label (agent, step) to export")
            recs.append(to_whowhen(trace, lab, record_id=p.stem))
        atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in recs))
        console().print(lit(f"wrote {len(recs)} record(s) to {out_path}"))
    except KvmasError as exc:
        _fail(exc)


@app.command("eval")
def eval_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="k-fold CV on this Who&When-format .jsonl, "
                                        "directory of .json, or one file"),
    train: Optional[Path] = typer.Option(None, "--train", help="fit on every record of this system's logs..."),
    test: Optional[Path] = typer.Option(None, "--test", help="...and score every record of another's"),
    with_gt: Optional[bool] = typer.Option(None, "--with-gt/--no-gt", help="one setting (default: both)"),
    features: str = typer.Option("portable,cdc", help="feature sets: portable (any system), cdc (development set)"),
    folds: int = typer.Option(5, help="cross-validation folds (only held-out predictions are scored)"),
    seeds: int = typer.Option(3, help="how many fold shuffles to average"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full summary JSON here"),
) -> None:
    """Agent / step accuracy (exact, ±1, ±3) beside this data's trivial baselines, with exact McNemar tests:
    k-fold on --data, or fitted on --train and scored on --test."""
    from kvmas.attribution.evaluate import evaluate, transfer
    from kvmas.attribution.portable import FEATURE_SETS
    from kvmas.cli.render import render_eval
    from kvmas.errors import BadInputError

    out = console()
    settings = [with_gt] if with_gt is not None else [False, True]
    results = {}
    try:
        if (data is None) == (train is None and test is None) or (train is None) != (test is None):
            raise BadInputError("give either --data (k-fold) or both --train and --test")
        if seeds < 1:
            raise BadInputError("--seeds must be >= 1")
        fsets = tuple(x.strip() for x in features.split(",") if x.strip())
        bad = [f for f in fsets if f not in FEATURE_SETS] or ([] if fsets else ["(none)"])
        if bad:
            raise BadInputError(f"--features: unknown {', '.join(bad)} (choose from {', '.join(FEATURE_SETS)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for gt in settings:
                if data is not None:
                    res = evaluate(data, with_gt=gt, folds=folds, seeds=tuple(range(seeds)), feature_sets=fsets)
                else:
                    res = transfer(train, test, with_gt=gt, feature_sets=fsets)
                results["with_gt" if gt else "without_gt"] = res
                render_eval(res, out)
        if json_out:
            atomic_write_text(json_out, json.dumps(results, indent=1))
            out.print(lit(f"wrote {json_out}"))
    except KvmasError as exc:
        _fail(exc)


@app.command("judge")
def judge_cmd(
    data: Path = typer.Option(..., "--data", help="Who&When-format logs to score"),
    train: Optional[Path] = typer.Option(None, "--train", help="fit the scorer on these logs (default: k-fold "
                                         "on --data)"),
    model: Optional[str] = typer.Option(None, "--model", help="judge model: registry name or local HF dir"),
    k: int = typer.Option(3, help="re-rank the scorer's top k steps"),
    limit: int = typer.Option(30, help="judge the first N records (file order)"),
    cache: Optional[Path] = typer.Option(None, help="verdict cache folder (default: KVMAS_HOME/attribution/judge)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the summary JSON here"),
) -> None:
    """The local model as judge: the scorer's top-k re-ranked by the likelihood of a mistake verdict, and the
    same model all-at-once, beside the scorer alone and this data's baselines (verdicts cached per log)."""
    from kvmas.agents.model import Model
    from kvmas.attribution.judge import judge_eval
    from kvmas.cli.render import render_eval
    from kvmas.paths import kvmas_home

    out = console()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = judge_eval(data, Model.load(model), train_path=train, k=k, limit=limit,
                             cache_dir=cache or kvmas_home() / "attribution" / "judge",
                             progress=lambda m: out.print(lit(m), style="dim"))
        render_eval(res, out)
        if json_out:
            atomic_write_text(json_out, json.dumps(res, indent=1))
            out.print(lit(f"wrote {json_out}"))
    except KvmasError as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

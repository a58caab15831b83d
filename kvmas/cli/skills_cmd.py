"""`kvmas skills`: inspect, curate, learn and evaluate procedural skill memory.

    kvmas skills list [--scope S] [--status active] [--page-size 20] [--after CURSOR]
    kvmas skills show ID | history ID | rollback ID --to VERSION
    kvmas skills export FILE [--scope S] | import FILE [--dry-run]
    kvmas skills prune --scope S [--dry-run] | purge --scope S --yes | stats [--scope S]
    kvmas skills learn house|codebreaker|textworld|scienceworld [--iterations 3] [--episodes 8] [--model NAME]
    kvmas skills eval ENV [--split S] [--iterations 2] [--build-episodes 6] [--eval-episodes 8] [--model NAME]
                          [--json OUT] [--trace-dir DIR]
    kvmas skills eval textworld --split test         # TextWorld cooking: train | test (unseen foods) | ood (3)
    kvmas skills prepare textworld --split train,test,ood --eval-episodes 30 --workers 8   # the games, up front
    kvmas skills eval scienceworld --split test --tasks find-living-thing,find-plant --unseen-task find-animal
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from kvmas.cli.boundary import fail as _fail
from kvmas.cli.render import DataTable, console as make_console, lit
from kvmas.errors import BadInputError, KvmasError
from kvmas.paths import atomic_write_text

app = typer.Typer(help="Procedural skill memory: learn, verify, score, prune and reuse skills.",
                  no_args_is_help=True, add_completion=False)
console = make_console()

StoreOpt = typer.Option(None, "--store", help="skill store file (default: KVMAS_HOME/skills.sqlite)")


def _store(path: Optional[Path]):
    from kvmas.memory.store import SkillStore

    return SkillStore(path)


def _load_model(name: Optional[str], threads: Optional[int]):
    from kvmas.agents.model import Model

    return Model.load(name, threads=threads)


@app.command("list")
def list_(scope: Optional[str] = typer.Option(None, help="only this scope"),
          status: Optional[str] = typer.Option(None, help="candidate|probation|active|archived|rejected"),
          page_size: int = typer.Option(20, min=1, max=500),
          after: int = typer.Option(0, help="cursor of the next page"),
          store: Optional[Path] = StoreOpt) -> None:
    """List skills, one page at a time (the next cursor is printed when there is more)."""
    try:
        st = _store(store)
        t = {sc: st.iteration(sc) for sc in st.scopes()}
        skills, nxt = st.list(scope, status, limit=page_size, after=after)
        table = DataTable(f"skills in {st.path}")
        for col in ("id", "scope", "name", "v", "status", "source", "tokens", "episodes", "mean credit", "lcb"):
            table.add_column(col)
        for s in skills:
            sts = st.stats(s.id)
            table.add_row(s.id, s.scope, s.name, str(s.version), s.status, s.source, str(s.token_count),
                          str(sts.n_episodes), f"{sts.mean_credit:+.3f}", f"{sts.lcb(t.get(s.scope, 0)):+.3f}")
        console.print(table)
        if nxt is not None:
            console.print(lit(f"more: --after {nxt}"))
    except KvmasError as exc:
        _fail(exc)


@app.command()
def show(skill_id: str, store: Optional[Path] = StoreOpt) -> None:
    """Rendered skill, stats, lineage and gate reports."""
    try:
        st = _store(store)
        s = st.get(skill_id)
        console.print(Text.assemble(lit(s.name, "bold"), lit(f" v{s.version}  id={s.id}  scope={s.scope}  "
                                    f"status={s.status}  source={s.source}  lineage={s.lineage_id}  "
                                    f"parent={s.parent_id}")))
        console.print(lit(s.render()))
        console.print(lit(f"stats: {st.stats(s.id).model_dump()}"))
        if s.provenance:
            console.print(lit(f"provenance: {json.dumps(s.provenance)[:400]}"))
        for g in st.gate_results(s.id):
            console.print(lit(f"gate: {g['decision']} delta={g['delta']:+.4f} "
                              f"|logr|={g['mean_abs_logratio']:.3f} n={g['n_transitions']} — {g['reason']}"))
    except KvmasError as exc:
        _fail(exc)


@app.command()
def history(skill_id: str, store: Optional[Path] = StoreOpt) -> None:
    """Every event of the skill's lineage (append-only), oldest first."""
    try:
        st = _store(store)
        table = DataTable("history")
        for col in ("seq", "ts", "op", "skill", "actor", "change", "reason"):
            table.add_column(col)
        for e in st.history(skill_id):
            change = f"{(e.before or {}).get('status', '')}→{(e.after or {}).get('status', '')}" if e.before else ""
            table.add_row(str(e.seq), e.ts[:19], e.op, e.skill_id or "", e.actor, change, e.reason[:60])
        console.print(table)
    except KvmasError as exc:
        _fail(exc)


@app.command()
def rollback(skill_id: str, to: int = typer.Option(..., "--to", help="version to make live again"),
             store: Optional[Path] = StoreOpt) -> None:
    """Re-activate a version of the lineage (archiving the other live versions) as new events."""
    try:
        s = _store(store).rollback(skill_id, to, actor="cli")
        console.print(lit(f"active: {s.name} v{s.version} ({s.id})"))
    except KvmasError as exc:
        _fail(exc)


@app.command("export")
def export_(path: Path, scope: Optional[str] = typer.Option(None), store: Optional[Path] = StoreOpt) -> None:
    """Write skills (with stats, without embeddings) as a deterministic JSON file."""
    try:
        out = _store(store).export_file(path, scope)
        console.print(lit(f"wrote {out}"))
    except KvmasError as exc:
        _fail(exc)


@app.command("import")
def import_(path: Path, dry_run: bool = typer.Option(False, "--dry-run"), store: Optional[Path] = StoreOpt) -> None:
    """Validate a skill file (schema version, field limits) and add its skills; existing content is skipped."""
    try:
        counts = _store(store).import_file(path, dry_run=dry_run)
        console.print(lit(f"{'would create' if dry_run else 'created'} {counts['created']}, "
                          f"skipped {counts['skipped']}"))
    except KvmasError as exc:
        _fail(exc)


@app.command()
def prune(scope: str = typer.Option(..., help="scope to maintain"), dry_run: bool = typer.Option(False, "--dry-run"),
          capacity: int = typer.Option(8, min=1), store: Optional[Path] = StoreOpt) -> None:
    """Maintenance: archive duplicates, superseded versions, harmful skills and anything over capacity."""
    from kvmas.memory.maintain import MaintainConfig, maintain

    try:
        gone = maintain(_store(store), scope, MaintainConfig(capacity=capacity), dry_run=dry_run, actor="cli")
        for sid, why in gone:
            console.print(lit(f"{'would archive' if dry_run else 'archived'} {sid}: {why}"))
        if not gone:
            console.print("nothing to prune")
    except KvmasError as exc:
        _fail(exc)


@app.command()
def purge(scope: str = typer.Option(..., help="the scope to delete (required; there is no global purge)"),
          yes: bool = typer.Option(False, "--yes", help="confirm"), store: Optional[Path] = StoreOpt) -> None:
    """Hard-delete one scope: skills, stats, search rows, evidence. Logged as a purge event."""
    try:
        if not yes:
            raise BadInputError(f"purge deletes every skill of scope {scope!r}; add --yes to confirm")
        n = _store(store).purge(scope, actor="cli")
        console.print(lit(f"purged {n} skills from {scope}"))
    except KvmasError as exc:
        _fail(exc)


@app.command()
def stats(scope: Optional[str] = typer.Option(None), store: Optional[Path] = StoreOpt) -> None:
    """Per-scope pool size, tokens, usage and gate pass rate."""
    try:
        st = _store(store)
        table = DataTable("skill memory")
        for col in ("scope", "iter", "live", "live tokens", "archived", "rejected", "episodes credited",
                    "gated", "gate pass"):
            table.add_column(col)
        for sc in [scope] if scope else st.scopes():
            sk = st.all(sc)
            live = [s for s in sk if s.status in ("active", "probation")]
            gates = st.gate_results(scope=sc)
            table.add_row(sc, str(st.iteration(sc)), str(len(live)), str(sum(s.token_count for s in live)),
                          str(sum(s.status == "archived" for s in sk)), str(sum(s.status == "rejected" for s in sk)),
                          str(sum(st.stats(s.id).n_episodes for s in sk)), str(len(gates)),
                          f"{sum(g['accepted'] for g in gates) / len(gates):.2f}" if gates else "-")
        console.print(table)
    except KvmasError as exc:
        _fail(exc)


def _env_options(env: str, tasks: Optional[str], unseen_task: Optional[str], max_steps: Optional[int]) -> dict:
    """make_env options from the command line (a one-line error for an option the environment does not take)."""
    from kvmas.envs import ENVS, check

    if env not in ENVS:
        raise BadInputError(f"unknown environment {env!r} (expected one of {', '.join(ENVS)})")
    opts: dict = {}
    if tasks is not None or unseen_task is not None:
        if env != "scienceworld":
            raise BadInputError("--tasks and --unseen-task are ScienceWorld options")
        if tasks is not None:
            opts["tasks"] = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if unseen_task is not None:
            opts["unseen"] = unseen_task
    if max_steps is not None:
        if env not in ("textworld", "scienceworld"):
            raise BadInputError("--max-steps is a TextWorld / ScienceWorld option")
        opts["max_steps"] = max_steps
    check(env, "train")
    return opts


EnvArg = typer.Argument(..., help="house | codebreaker | textworld | scienceworld")
TasksOpt = typer.Option(None, "--tasks", help="ScienceWorld: the task types built on (comma-separated; default "
                        "find-living-thing,find-plant,find-animal)")
UnseenOpt = typer.Option(None, "--unseen-task", help="ScienceWorld: the task type of split ood, never built on "
                         "(default find-non-living-thing)")
MaxStepsOpt = typer.Option(None, "--max-steps", min=1, help="TextWorld / ScienceWorld: steps per episode "
                           "(default: the split's)")


def _progress():
    from kvmas.progress import progress_bar

    return progress_bar(console)


@app.command()
def learn(env: str = EnvArg,
          scope: Optional[str] = typer.Option(None, help="default: ENV"),
          iterations: int = typer.Option(3, min=1), episodes: int = typer.Option(8, min=1),
          split: str = typer.Option("train"), no_gate: bool = typer.Option(False, "--no-gate"),
          tasks: Optional[str] = TasksOpt, unseen_task: Optional[str] = UnseenOpt,
          max_steps: Optional[int] = MaxStepsOpt,
          temperature: float = typer.Option(0.3, min=0.01, help="policy softmax temperature (sampling)"),
          model: Optional[str] = typer.Option(None, "--model", help="model name or path for Model.load"),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
          store: Optional[Path] = StoreOpt) -> None:
    """Run the learning loop in an environment: act, credit, extract/critique, gate, probation, maintain."""
    from kvmas.envs import check
    from kvmas.memory.lifecycle import LearnConfig, Learner
    from kvmas.memory.policy import ActionPolicy

    try:
        opts = _env_options(env, tasks, unseen_task, max_steps)
        check(env, split)
        st = _store(store)
        m = _load_model(model, threads)
        cfg = LearnConfig(episodes_per_iter=episodes, use_gate=not no_gate)
        lr = Learner(st, ActionPolicy(m, temperature=temperature), env, scope or env, cfg, split=split,
                     env_options=opts)
        lr.install_seeds()
        with _progress() as prog:
            task = prog.add_task("episodes", total=iterations * episodes)
            lr.progress = lambda i, n: prog.advance(task)
            for _ in range(iterations):
                rep = lr.iterate()
                prog.console.print(lit(f"iteration {rep['iteration']}: success {rep['success']:.2f}, "
                                       f"gated {[(g['name'], g['decision']) for g in rep['gated']]}, "
                                       f"promoted {rep['promoted']}, archived {len(rep['archived'])}"))
    except KvmasError as exc:
        _fail(exc)


def _ci(d: float | None, ci) -> str:
    return "-" if d is None else f"{d:+.2f} [{ci[0]:+.2f},{ci[1]:+.2f}]"


def render_eval(results, title: str, gates: bool = True) -> None:
    """The eval table (success and score, each paired vs none and vs seeds), then (``gates``) every gate
    decision of the build and the pools evaluated."""
    table = DataTable(title)
    for col in ("condition", "success [95% CI]", "Δ vs none", "Δ vs seeds", "score [95% CI]", "Δ score vs none",
                "Δ score vs seeds", "learned reuse", "step reuse", "skill steps", "extra prompt tok/step",
                "prefilled/step", "pool (skills/tokens)", "gate pass"):
        table.add_column(col)
    for r in results:
        table.add_row(r.condition, f"{r.success:.2f} [{r.ci95[0]:.2f},{r.ci95[1]:.2f}]",
                      _ci(r.paired_diff_vs_none, r.paired_ci95), _ci(r.paired_diff_vs_seeds, r.paired_ci95_vs_seeds),
                      f"{r.score:.2f} [{r.score_ci95[0]:.2f},{r.score_ci95[1]:.2f}]",
                      _ci(r.score_diff_vs_none, r.score_ci95_vs_none),
                      _ci(r.score_diff_vs_seeds, r.score_ci95_vs_seeds),
                      f"{r.episode_reuse:.2f}", f"{r.step_reuse:.2f}", f"{r.skill_step_share:.2f}",
                      f"{r.extra_prompt_tokens_per_step:.1f}", f"{r.prefilled_per_step:.1f}",
                      f"{r.pool_skills}/{r.pool_tokens}",
                      "-" if r.gate_pass_rate is None else f"{r.gate_pass_rate:.2f} ({r.gated})")
    console.print(table)
    for r in results if gates else []:
        if not r.gate_log:
            continue
        log = DataTable(f"gate decisions of {r.condition} (every candidate, rejected ones too)")
        for col in ("skill", "name", "source", "decision", "Δ", "transitions", "reason"):
            log.add_column(col)
        for g in r.gate_log:
            log.add_row(str(g["skill_id"])[:8], g["name"], g["source"], g["decision"],
                        "-" if g["delta"] is None else f"{g['delta']:+.4f}", str(g["n_transitions"] or "-"),
                        g["reason"][:90])
        console.print(log)
        if r.pool:
            console.print(lit(f"{r.condition} pool: " + ", ".join(f"{p['name']} ({p['source']}, {p['tokens']} tok)"
                                                                  for p in r.pool)))


@app.command()
def prepare(env: str = typer.Argument(..., help="textworld (ScienceWorld ships its worlds in its jar)"),
            split: str = typer.Option("train", help="the evaluation split(s), comma-separated"),
            iterations: int = typer.Option(2, min=1), build_episodes: int = typer.Option(6, min=1),
            eval_episodes: int = typer.Option(8, min=1),
            workers: int = typer.Option(1, min=1, help="generator processes")) -> None:
    """Generate every TextWorld game a `skills eval` with the same numbers plays (build seeds on train, the
    held-out seeds on each split) into the kvmas cache, in parallel; an eval then only loads them."""
    from kvmas.bench.skills import EVAL_SEED_BASE
    from kvmas.envs import check

    try:
        if env != "textworld":
            raise BadInputError(f"nothing to prepare for {env!r}: only TextWorld games are generated")
        wanted = [x.strip() for x in split.split(",") if x.strip()]
        for sp in wanted or ["?"]:
            check(env, sp)
        from kvmas.envs.textworld_env import ensure_games, game_dir

        items = [(s, "train") for s in range(iterations * build_episodes)]
        items += [(EVAL_SEED_BASE + i, sp) for sp in wanted for i in range(eval_episodes)]
        with _progress() as prog:
            task = prog.add_task("games", total=len(items))
            paths = ensure_games(items, workers, progress=lambda i, n: prog.update(task, completed=len(items) - n + i))
        console.print(lit(f"{len(paths)} games ready in {game_dir()}"))
    except KvmasError as exc:
        _fail(exc)


@app.command("eval")
def eval_(env: str = EnvArg,
          split: str = typer.Option("train", help="evaluation split(s), comma-separated: the pools are built "
                                    "once on train and evaluated on each; house / "
                                    "codebreaker train | ood; textworld train (unseen seeds) | test (unseen "
                                    "foods) | ood (harder recipe); scienceworld train | dev | test | ood "
                                    "(a task type never built on)"),
          tasks: Optional[str] = TasksOpt, unseen_task: Optional[str] = UnseenOpt,
          max_steps: Optional[int] = MaxStepsOpt,
          iterations: int = typer.Option(2, min=1), build_episodes: int = typer.Option(6, min=1),
          eval_episodes: int = typer.Option(8, min=2),
          conditions: str = typer.Option("none,ours,nogate,seeds"),
          judge: bool = typer.Option(True, "--judge/--no-judge", help="applicability P(Yes) from the model"),
          temperature: float = typer.Option(0.3, min=0.01, help="policy softmax temperature (build sampling)"),
          model: Optional[str] = typer.Option(None, "--model", help="model name or path for Model.load"),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results here"),
          trace_dir: Optional[Path] = typer.Option(None, "--trace-dir", help="save every evaluation episode's "
                                                   "trace here (kvmas trace show: the skill at each step)"),
          store: Optional[Path] = StoreOpt) -> None:
    """Build phase, then a frozen evaluation on held-out seeds paired across conditions."""
    from kvmas.bench.skills import CONDITIONS, EvalConfig, activation_prefill, run_eval
    from kvmas.envs import check

    try:
        conds = tuple(c.strip() for c in conditions.split(",") if c.strip())
        bad = [c for c in conds if c not in CONDITIONS]
        if bad or not conds:
            raise BadInputError(f"unknown condition(s) {bad} (choose from {', '.join(CONDITIONS)})")
        opts = _env_options(env, tasks, unseen_task, max_steps)
        wanted = [x.strip() for x in split.split(",") if x.strip()]
        if not wanted:
            raise BadInputError("--split names no split")
        for sp in wanted:
            check(env, sp)
        st = _store(store)
        m = _load_model(model, threads)
        cfg = EvalConfig(env=env, split=",".join(wanted), iterations=iterations, build_episodes=build_episodes,
                         eval_episodes=eval_episodes, conditions=conds, judge=judge,
                         temperature=temperature, env_options=opts)
        with _progress() as prog:
            tasks: dict[str, int] = {}

            def progress(label: str, i: int, n: int) -> None:
                if label not in tasks:
                    tasks[label] = prog.add_task(label, total=n)
                prog.update(tasks[label], completed=i)

            results = run_eval(m, st, cfg, progress=progress,
                               trace_dir=str(trace_dir) if trace_dir is not None else None)
        for sp in cfg.splits:
            render_eval([r for r in results if r.split == sp],
                        f"skills eval: {env}/{sp}, {eval_episodes} paired held-out seeds, model {m.name}",
                        gates=sp == cfg.splits[-1])
        act = activation_prefill(m, st, f"bench/{env}/{'ours' if 'ours' in conds else conds[-1]}", env,
                                 split=cfg.splits[0], env_options=opts)
        if act:
            console.print(lit(f"one decision under a skill: KV prefix prefills {act['kv']['prefilled']} tokens "
                              f"(= {act['no_skill_prefilled']} without a skill), text block prefills "
                              f"{act['text']['prefilled']}; "
                              f"max |Δ log p| between the two = {act['max_abs_logp_diff']:.2e}"))
        console.print("anchor: ProcMEM reports reuse 0.925 with an 816-token memory (Mastermind/ALFWorld).")
        if json_out:
            atomic_write_text(json_out, json.dumps({"config": cfg.model_dump(mode="json"), "model": m.name,
                                                    "results": [r.model_dump(mode="json") for r in results],
                                                    "activation": act}, indent=2))
    except KvmasError as exc:
        _fail(exc)

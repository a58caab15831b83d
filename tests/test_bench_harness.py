import json

import pytest
from typer.testing import CliRunner

from kvmas.agents.state import LatentState
from kvmas.bench.harness import BenchConfig, merge_runs, parse_methods, run_bench
from kvmas.bench.items import ItemResult
from kvmas.cli.bench_cmd import app
from kvmas.errors import BadInputError
from kvmas.organizer import PipelineSpec
from kvmas.tasks import load_tasks, loglik_continuations, loglik_prefix
from kvmas.testing import tiny_model
from kvmas.trace import Usage

CFG = BenchConfig(max_new_tokens=4, latent_steps=1)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_parse_methods():
    ms = parse_methods("single, latent:vote ,text:review,auto,auto-empty,random,loglik")
    assert [m.kind for m in ms] == ["primitive", "primitive", "primitive", "auto", "auto-empty", "random", "loglik"]
    for bad, msg in [("single,telepathy", "unknown method"), ("single,single", "duplicate"),
                     ("fast:vote", "unknown method"), ("", "no methods"), ("pipeline:/nope.json", "no spec file")]:
        with pytest.raises(BadInputError, match=msg):
            parse_methods(bad)


def test_run_bench_writes_everything(model, tmp_path, small_pool):
    tasks = load_tasks("synthetic-choice", n=2, seed=2)
    spec = tmp_path / "spec.json"
    PipelineSpec.chain(("vote", {"n": 2})).save(spec)
    methods = f"single,loglik,auto,auto-empty,random,pipeline:{spec}"
    cfg = BenchConfig(max_new_tokens=4, latent_steps=1, pool_path=small_pool(tmp_path / "start.sqlite"))
    s = run_bench(tasks, methods, model, tmp_path / "out", cfg, data_name="synth")
    out = tmp_path / "out"
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 6 * 2 and {i["method"] for i in items} == set(s["methods"])
    assert json.loads((out / "results.json").read_text()) == s
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # seconds per question: each method's whole loop over its questions, recorded per method
    walls = s["config"]["method_wall_s"]
    assert set(walls) == set(s["methods"]) and all(w > 0 for w in walls.values())
    for name, m in s["methods"].items():
        assert m["seconds_per_question"] == pytest.approx(walls[name] / m["n"], abs=1e-3)
    # the Pareto fronts: no method off a front is beaten by none, none on it is beaten by one
    fronts = s["pareto"]
    cost = {"seconds": lambda m: m["seconds_per_question"], "tokens": lambda m: m["tokens_per_item"]["computed"]}
    for key, front in fronts.items():
        pts = {n: (m["accuracy"], cost[key](m)) for n, m in s["methods"].items()}
        beaten = {n for n, (a, c) in pts.items() if any(a2 >= a and c2 <= c and (a2 > a or c2 < c)
                                                         for n2, (a2, c2) in pts.items() if n2 != n)}
        assert set(front) == set(pts) - beaten and front
    md = (out / "results.md").read_text()
    assert "Pareto front" in md and "s/question" in md
    assert "| loglik |" in md and "Paired comparisons" in md and "Sample answers" in md
    assert len(s["paired"]) == 15
    for name, m in s["methods"].items():
        assert m["n"] == 2 and 0 <= m["ci95_wilson"][0] <= m["accuracy"] <= m["ci95_wilson"][1] <= 1
        assert m["correct"] == sum(i["correct"] for i in items if i["method"] == name)
    # auto-empty is the fallback single agent; auto pays for its organizer on top of what it runs
    assert s["methods"]["auto-empty"]["chosen_pipelines"] == {"single": 2}
    assert s["methods"]["auto-empty"]["chosen_correct"] == {"single": sum(
        i["correct"] for i in items if i["method"] == "auto-empty")}
    assert "- auto-empty: single ×2 (" in md
    by = {(i["method"], i["task_id"]): i for i in items}
    assert all(by[("auto-empty", t.id)]["answer"] == by[("single", t.id)]["answer"] for t in tasks)
    assert s["methods"]["auto"]["tokens_per_item"]["prefilled"] > s["methods"]["single"]["tokens_per_item"]["prefilled"]
    # auto learned online from verified answers: its pool file holds the counts
    from kvmas.organizer import KnowledgePool

    auto_pool = KnowledgePool(out / "pool-auto.sqlite").entries()
    assert sum(e.trials for e in auto_pool if e.origin != "learned") == 2 - s["methods"]["auto"]["errors"]
    assert len([e for e in auto_pool if e.origin == "learned"]) == s["methods"]["auto"]["correct"]
    assert KnowledgePool(out / "pool-random.sqlite").stats()["trials"] == 0
    assert len(KnowledgePool(tmp_path / "start.sqlite")) == 3  # the starting pool was copied, not changed
    # loglik picks the option with the best mean per-token log-likelihood
    t = tasks[0]
    scores = LatentState.empty(model).extend(loglik_prefix(t)).score(loglik_continuations(t), mean=True)
    assert by[("loglik", t.id)]["pred"] == t.labels[max(range(len(scores)), key=scores.__getitem__)]
    assert by[("loglik", t.id)]["meta"]["scores"] == [round(x, 4) for x in scores]


def _planted_runner(model, tmp_path, replies):
    """The bench's runner for ``single`` whose solver's spoken text is planted (one reply per call, in order)."""
    from kvmas.agents.agent import Intervention
    from kvmas.bench.harness import Method, _Runner

    runner = _Runner(Method("single", "primitive", "single"), model, CFG, tmp_path)
    single, queue = runner.prim, list(replies)
    runner.prim = lambda q, **kw: single(q, interventions={"solver": Intervention("replace", queue.pop(0))}, **kw)
    return runner


def test_correctness_is_judged_on_the_answer(model, tmp_path):
    """Right, wrong, flexible-only and no-answer replies, each judged on what the answer says."""
    from kvmas.tasks import Task

    task = Task(id="t", question="Tom has 10 apples and eats 4. How many are left?", answer="6")
    replies = [r"10 - 4 = 6, so \boxed{6}.", "The answer is 6.", r"\boxed{4}", "…now we need to check whether 6",
               "Tom has 10 apples and eats 4. How many are left?"]
    runner = _planted_runner(model, tmp_path, replies)
    got = [runner.run(task) for _ in replies]
    assert [r.answer for r in got] == replies  # the planted reply is what the bench read
    assert [(r.pred, r.rule, r.correct, r.correct_strict) for r in got] == [
        ("6", "boxed", True, True), ("6", "answer-is", True, False), ("4", "boxed", False, False),
        (None, None, False, False), (None, None, False, False)]
    # and through the whole harness, on the tiny model: correct exactly where the extracted answer is gold
    tasks = load_tasks("synthetic-number", n=2)
    s = run_bench(tasks, "single", model, tmp_path / "run", CFG)
    items = [json.loads(line) for line in (tmp_path / "run" / "items.jsonl").read_text().splitlines()]
    assert all(i["correct"] == (i["pred"] is not None and float(i["pred"]) == float(i["gold"])) for i in items)
    assert s["methods"]["single"]["tokens_per_item"]["generated"] <= 4


def test_report_has_strict_and_flexible_figures_with_rule_counts(model, tmp_path):
    from kvmas.bench.report import summarise

    from kvmas.tasks import Task

    task = Task(id="t", question="Tom has 10 apples and eats 4. How many are left?", answer="6")
    replies = [r"\boxed{6}", "#### 6", "The answer is 6.", "So 6 are left.", "no idea", r"\boxed{5}"]
    runner = _planted_runner(model, tmp_path, replies)
    s = summarise([runner.run(task) for _ in replies])
    assert (s["correct"], s["correct_strict"], s["accuracy_strict"]) == (4, 2, round(2 / 6, 4))
    assert s["rules"] == {"boxed": {"n": 2, "correct": 1}, "####": {"n": 1, "correct": 1},
                          "answer-is": {"n": 1, "correct": 1}, "last-number": {"n": 1, "correct": 1},
                          "none": {"n": 1, "correct": 0}}
    lo, hi = s["ci95_wilson_strict"]
    assert 0 < lo < 2 / 6 < hi < 1
    run = run_bench(load_tasks("gsm8k-sample", n=2), "single", model, tmp_path / "r", CFG)
    assert run["config"]["prompt_echo_floor"] == 0
    md = (tmp_path / "r" / "results.md").read_text()
    assert "strict (boxed/####)" in md and "Prompt-echo floor" in md and "none 0/2" in md


def test_rescore_reads_stored_answers_again(model, tmp_path):
    from kvmas.bench.harness import rescore_run

    tasks = load_tasks("synthetic-number", n=3)
    run_bench(tasks, "single", model, tmp_path / "run", CFG)
    lines = (tmp_path / "run" / "items.jsonl").read_text().splitlines()
    # as if an older scorer had credited a rambling number, and had stored no rule
    item = json.loads(lines[0])
    item.update(answer=f"…so now we need to check whether {item['gold']}", pred=item["gold"], correct=True)
    item.pop("rule")
    lines[0] = json.dumps(item)
    item = json.loads(lines[1])
    item.update(answer=f"\\boxed{{{item['gold']}}}", pred=None, correct=False)
    lines[1] = json.dumps(item)
    (tmp_path / "run" / "items.jsonl").write_text("\n".join(lines) + "\n")
    s = rescore_run(tmp_path / "run", tasks, tmp_path / "new")
    items = [json.loads(line) for line in (tmp_path / "new" / "items.jsonl").read_text().splitlines()]
    assert [i["correct"] for i in items] == [False, True, False] and items[1]["rule"] == "boxed"
    assert s["methods"]["single"]["correct"] == 1 and s["methods"]["single"]["correct_strict"] == 1
    assert s["config"]["rescored_from"]["run"] == str(tmp_path / "run")
    with pytest.raises(BadInputError, match="overwrite its input"):
        rescore_run(tmp_path / "run", tasks, tmp_path / "run")
    with pytest.raises(BadInputError, match="not in the data"):
        rescore_run(tmp_path / "run", tasks[:1], tmp_path / "x")
    res = CliRunner().invoke(app, ["rescore", str(tmp_path / "run"), "--data", "synthetic-number",
                                   "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "correct before" in res.output and "answers by rule" in res.output
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["methods"] == s["methods"]


def test_choice_scoring_by_likelihood_after_the_answer(model, tmp_path):
    tasks = load_tasks("synthetic-choice", n=2, seed=4)
    cfg = BenchConfig(max_new_tokens=3, latent_steps=1, choice_scoring="loglik")
    s = run_bench(tasks, "single,latent:vote", model, tmp_path, cfg)
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    for i in items:
        sc = i["meta"]["label_scores"]
        assert len(sc) == 4 and i["pred"] == "ABCD"[max(range(4), key=sc.__getitem__)]
        assert i["correct"] == (i["pred"] == i["gold"]) and "extracted" in i["meta"]
    assert s["config"]["choice_scoring"] == "loglik"
    for m in ("single", "latent:vote"):  # the report keeps both readings of the same answers
        mine = [i for i in items if i["method"] == m]
        assert s["methods"][m]["extracted"]["correct"] == sum(i["meta"]["extracted"] == i["gold"] for i in mine)
        assert s["methods"][m]["extracted"]["n"] == len(mine)
    assert "read from the text" in (tmp_path / "results.md").read_text()
    with pytest.raises(BadInputError, match="choice scoring"):
        run_bench(tasks, "single", model, tmp_path, BenchConfig(choice_scoring="vibes"))


def test_task_ranges_run_apart_merge_into_one_run(model, tmp_path):
    """A method run on items 0-1 and 2-3 at different times, merged, is the report of one run on items 0-3; a
    costlier method run on fewer items is paired on the items it shares (its n said)."""
    whole = run_bench(load_tasks("gsm8k-sample", n=4), "single,latent:vote", model, tmp_path / "whole", CFG)
    first, rest = load_tasks("gsm8k-sample", n=2), load_tasks("gsm8k-sample", n=2, start=2)
    assert [t.id for t in first + rest] == [r["task_id"] for r in map(json.loads, (
        tmp_path / "whole" / "items.jsonl").read_text().splitlines()) if r["method"] == "single"]
    run_bench(rest, "single,latent:vote", model, tmp_path / "rest", CFG)
    run_bench(first, "single,latent:vote", model, tmp_path / "first", CFG)
    run_bench(first, "text:review", model, tmp_path / "twin", CFG)
    merged = merge_runs([tmp_path / "first", tmp_path / "rest", tmp_path / "twin"], tmp_path / "m")
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("wall_s") and k != "seconds_per_question"}  # noqa: E731
    for name in whole["methods"]:
        assert strip(merged["methods"][name]) == strip(whole["methods"][name])
    assert merged["config"]["n"] == 4 and merged["config"]["n_per_method"] == {
        "single": 4, "latent:vote": 4, "text:review": 2}
    pairs = {(p["a"], p["b"]): p for p in merged["paired"]}
    assert pairs["single", "latent:vote"] == next(p for p in whole["paired"] if p["b"] == "latent:vote")
    assert pairs["single", "text:review"]["n"] == 2
    walls = [json.loads((tmp_path / d / "results.json").read_text())["config"]["method_wall_s"]["single"]
             for d in ("first", "rest")]
    assert merged["config"]["method_wall_s"]["single"] == pytest.approx(sum(walls), abs=1e-3)
    # the same data file named by another path is the same data
    moved = json.loads((tmp_path / "twin" / "results.json").read_text())
    moved["config"]["data"] = str(tmp_path / "sub" / ".." / "data.jsonl")
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    for d in ("first", "rest"):
        c = json.loads((tmp_path / d / "results.json").read_text())
        c["config"]["data"] = str(tmp_path / "data.jsonl")
        (tmp_path / d / "results.json").write_text(json.dumps(c))
    (tmp_path / "twin" / "results.json").write_text(json.dumps(moved))
    assert merge_runs([tmp_path / "first", tmp_path / "rest", tmp_path / "twin"], tmp_path / "m2")["config"]["n"] == 4
    moved["config"]["data"] = "other"
    (tmp_path / "twin" / "results.json").write_text(json.dumps(moved))
    with pytest.raises(BadInputError, match="config.data"):
        merge_runs([tmp_path / "first", tmp_path / "twin"], tmp_path / "m3")
    with pytest.raises(BadInputError, match="cannot be combined with shuffle"):
        load_tasks("gsm8k-sample", n=2, start=1, shuffle=True)
    with pytest.raises(BadInputError, match="past the last item"):
        load_tasks("gsm8k-sample", n=2, start=10_000)


def test_merged_runs_equal_one_run(model, tmp_path):
    """Methods split across processes and merged give the report of one run with all of them (bar wall time)."""
    tasks = load_tasks("synthetic-choice", n=3, seed=5)
    whole = run_bench(tasks, "single,latent:vote,text:review", model, tmp_path / "whole", CFG)
    run_bench(tasks, "single,latent:vote", model, tmp_path / "a", CFG)
    run_bench(tasks, "text:review", model, tmp_path / "b", CFG)
    merged = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert list(merged["methods"]) == list(whole["methods"])
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("wall_s") and k != "seconds_per_question"}  # noqa: E731
    for name in whole["methods"]:
        assert strip(merged["methods"][name]) == strip(whole["methods"][name])
    # each method keeps the wall clock of the run it came from
    assert set(merged["config"]["method_wall_s"]) == set(whole["methods"])
    assert merged["methods"]["text:review"]["seconds_per_question"] == pytest.approx(
        json.loads((tmp_path / "b" / "results.json").read_text())["methods"]["text:review"]["seconds_per_question"])
    assert merged["paired"] == whole["paired"]
    assert merged["config"]["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert len((tmp_path / "ab" / "items.jsonl").read_text().splitlines()) == 9
    # runs that cannot be paired are refused, naming the reason
    run_bench(tasks, "single", model, tmp_path / "c", CFG)
    with pytest.raises(BadInputError, match="method single also ran task"):
        merge_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    run_bench(tasks, "text:vote", model, tmp_path / "d", BenchConfig(max_new_tokens=5, latent_steps=1))
    with pytest.raises(BadInputError, match="max_new_tokens"):
        merge_runs([tmp_path / "a", tmp_path / "d"], tmp_path / "x")
    with pytest.raises(BadInputError, match="not a finished accuracy run"):
        merge_runs([tmp_path / "a", tmp_path / "nope"], tmp_path / "x")
    with pytest.raises(BadInputError, match="overwrite one of its inputs"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "a")
    with open(tmp_path / "b" / "items.jsonl", "a") as f:
        f.write('{"method": "text:review"}\n')
    with pytest.raises(BadInputError, match="line 4: not an item record"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "x")


def test_merge_joins_what_runs_over_workers_report(model, tmp_path):
    """A merged report keeps every worker death and re-run of the runs it joins (the record written by
    ``run_bench`` over Ray workers, set here by hand: the Ray tests are in test_fanout)."""
    tasks = load_tasks("synthetic", n=2)
    run_bench(tasks, "single", model, tmp_path / "a", CFG)
    run_bench(tasks, "text:review", model, tmp_path / "b", CFG)
    for d, fanout in (("a", {"workers": 2, "workers_died": 1, "reruns": {"single": [tasks[1].id]}, "in_process": []}),
                      ("b", {"workers": 4, "workers_died": 0, "reruns": {}, "in_process": []})):
        summary = json.loads((tmp_path / d / "results.json").read_text())
        summary["config"]["fanout"] = fanout
        (tmp_path / d / "results.json").write_text(json.dumps(summary))
    merged = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert merged["config"]["fanout"] == {"workers": 4, "workers_died": 1, "reruns": {"single": [tasks[1].id]},
                                          "in_process": []}
    assert f"1 worker(s) died; re-run elsewhere: single: {tasks[1].id}." in (tmp_path / "ab" / "results.md").read_text()


def test_loglik_refuses_number_tasks(model, tmp_path):
    with pytest.raises(BadInputError, match="multiple-choice"):
        run_bench(load_tasks("synthetic-number", n=2), "loglik", model, tmp_path, CFG)


def test_cli_accuracy(model, tmp_path, monkeypatch):
    from kvmas.agents import model as model_mod

    monkeypatch.setattr(model_mod.Model, "load", classmethod(lambda cls, *a, **k: model))
    runner = CliRunner()
    res = runner.invoke(app, ["accuracy", "--data", "arc-easy-sample", "--n", "2", "--methods", "loglik,single",
                              "--max-new-tokens", "3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "loglik" in res.output and (tmp_path / "o" / "results.json").is_file()
    bad = runner.invoke(app, ["accuracy", "--methods", "single,warp", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown method" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["accuracy", "--data", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_batched_bench_items_equal_the_one_at_a_time_items(model, tmp_path):
    from kvmas.tasks import load_tasks

    tasks = load_tasks("synthetic", n=5, seed=0)
    methods = "single,latent:vote,text:review,auto"
    one = run_bench(tasks, methods, model, tmp_path / "one", BenchConfig(max_new_tokens=4, latent_steps=1))
    many = run_bench(tasks, methods, model, tmp_path / "many",
                     BenchConfig(max_new_tokens=4, latent_steps=1, batch_size=4))
    items = lambda d: [{k: v for k, v in json.loads(line).items() if k != "wall_s"}  # noqa: E731
                       for line in (d / "items.jsonl").read_text().splitlines()]
    assert items(tmp_path / "many") == items(tmp_path / "one")
    for m in one["methods"]:
        assert many["methods"][m]["correct"] == one["methods"][m]["correct"]
        assert many["methods"][m]["tokens_total"] == one["methods"][m]["tokens_total"]


def test_vote_candidates_are_scored_and_summarised(model, tmp_path):
    """Each candidate answer a Vote recorded is scored against the gold answer; the report counts what the
    candidates held (a right candidate anywhere, a strict majority, that majority right)."""
    from kvmas.tasks.answers import matches_gold

    tasks = load_tasks("synthetic", n=3, seed=2)
    s = run_bench(tasks, "text:vote", model, tmp_path, BenchConfig(max_new_tokens=6, seed=0))
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    for task, item in zip(tasks, items):
        keys = item["meta"]["facts"]["vote_candidates"]
        assert item["meta"]["candidates_correct"] == [bool(k) and matches_gold(k, task) for k in keys]
    c = s["methods"]["text:vote"]["candidates"]
    assert c["n"] == 3 and c["any_correct"] == sum(any(i["meta"]["candidates_correct"]) for i in items)
    assert c["majority_correct"] <= c["majority"] <= 3 and "What the candidates held" in (tmp_path / "results.md").read_text()
    from kvmas.bench.harness import _score_candidates

    meta = {"facts": {"vote_candidates": [tasks[0].answer, "no", None]}}
    _score_candidates(meta, tasks[0])
    assert meta["candidates_correct"] == [True, False, False]


def test_review_drafts_are_scored_and_what_refinement_did_is_counted(model, tmp_path):
    """Each draft a Review's critic read is scored against the gold answer; the report counts first drafts
    right, and refinements that fixed or broke them."""
    from kvmas.bench.harness import _score_candidates
    from kvmas.bench.report import draft_summary

    tasks = load_tasks("synthetic-number", n=2, seed=2)
    s = run_bench(tasks, "kv:review", model, tmp_path, BenchConfig(max_new_tokens=4, seed=0))
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert all(len(i["meta"]["drafts_correct"]) == 2 for i in items)  # two rounds: two drafts read
    assert s["methods"]["kv:review"]["drafts"]["n"] == 2
    assert "What refinement did" in (tmp_path / "results.md").read_text()
    task = tasks[0]
    meta = {"facts": {"review_drafts": [task.answer, "no"]}}
    _score_candidates(meta, task)
    assert meta["drafts_correct"] == [True, False]
    rows = [ItemResult("kv:review", t, "number", task.answer, p, ok, "", Usage(), 0.0,
                       meta={"drafts_correct": d})
            for t, p, ok, d in (("a", "1", False, [True, False]), ("b", task.answer, True, [False, True]),
                                ("c", task.answer, True, [True]), ("d", "1", False, [False, False]))]
    assert draft_summary(rows) == {"n": 4, "first_right": 2, "final_right": 2, "fixed": 1, "broke": 1}

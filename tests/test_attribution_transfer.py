"""Attribution that transfers: inferred turn kinds, features free of names and absolute positions, fit on one
system and score another, the baselines and anchors of the data being scored, Who&When export of our traces."""

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmas.attribution.anchors import data_kind
from kvmas.attribution.evaluate import evaluate, transfer
from kvmas.attribution.export import to_whowhen
from kvmas.attribution.log import from_generic, from_whowhen, iter_logs
from kvmas.attribution.portable import PORTABLE, portable_features
from kvmas.attribution.turns import turn_kinds
from kvmas.cli.attribute_cmd import app
from kvmas.errors import BadInputError

DEV = Path("/work/shared/data/whowhen/algorithm_generated.jsonl")
runner = CliRunner()


def system(path: Path, names: tuple[str, str, str], n: int = 40, seed: int = 0, task_turn: bool = False,
           tool: str | None = None, hc: bool = False) -> Path:
    """Runs of one made-up system: the decisive step claims an unverified value; a tool may answer acts."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        hist = [{"name": "human", "content": "How many items are there?"}] if task_turn else []
        k = rng.randint(4, 9)
        bad = rng.randrange(0, k - 1)
        gold = None
        for j in range(k):
            a = names[j % 3]
            if j == bad:
                gold = len(hist)
                hist.append({"name": a, "content": f"Let's assume the count is {100 + i}. The answer is {100 + i}."})
            else:
                hist.append({"name": a, "content": f"Working on part {j} of the task, nothing new yet."})
            if tool and j % 3 == 1:
                hist.append({"name": tool, "content": "exitcode: 0\nCode output: done"})
        rec = {"source_file": f"{i}.json", "question": "How many items are there?", "ground_truth": "3",
               "mistake_agent": hist[gold]["name"], "mistake_step": str(gold), "history": hist}
        if hc:  # Who&When Hand-Crafted layout: the agent is the role, orchestrator sub-turns in parentheses
            rec["history"] = [{"role": h["name"] if h["name"] != names[0] else f"{names[0]} (-> {names[1]})",
                               "content": h["content"]} for h in hist]
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_turn_kinds_keep_task_and_tools_out_of_the_candidates():
    log = from_whowhen({"question": "How many moons has Mars?", "history": [
        {"role": "human", "content": "How many moons has Mars?"},
        {"role": "Orchestrator (thought)", "content": "Plan: 1. search 2. count."},
        {"role": "Orchestrator (-> WebSurfer)", "content": "Please search for the moons of Mars."},
        {"role": "WebSurfer", "content": "I typed 'moons of Mars' into the search bar. No results found."},
        {"role": "ComputerTerminal", "content": "Traceback: error"},
        {"role": "Orchestrator (thought)", "content": "The answer is 3."}]})
    assert turn_kinds(log) == ["task", "plan", "instruct", "act", "tool", "report"]
    fx, cand = portable_features(log)
    assert cand == [1, 2, 3, 5]
    row = dict(zip(PORTABLE, fx.rows[2]))
    assert row["next_result_bad"] == 1.0 and row["rel_pos"] == pytest.approx(1 / 3)


def test_portable_rows_do_not_depend_on_agent_names():
    items = [{"agent": "Planner", "content": "Plan: first, read the file data.csv."},
             {"agent": "Coder", "content": "```python\nprint(sum([41, 1]))\n```"},
             {"agent": "Computer_terminal", "content": "exitcode: 1\nTraceback: boom"},
             {"agent": "Coder", "content": "```python\nprint(sum([41, 1]))\n```"},
             {"agent": "Planner", "content": "Let's assume it is 1234. The answer is 1234."}]
    renamed = [{**it, "agent": {"Planner": "Alice", "Coder": "Bob"}.get(it["agent"], it["agent"])} for it in items]
    a, ca = portable_features(from_generic(items))
    b, cb = portable_features(from_generic(renamed))
    assert a.rows == b.rows and ca == cb == [0, 1, 3, 4]
    row = dict(zip(PORTABLE, a.rows[3]))
    assert row["repeats"] == 1.0 and row["reads_bad"] == 1.0
    assert dict(zip(PORTABLE, a.rows[1]))["repeated_later"] == 1.0
    assert dict(zip(PORTABLE, a.rows[4]))["assume_cue"] == 1.0


@pytest.mark.parametrize("items", [
    [{"agent": "solo", "content": ""}],
    [{"agent": "solo", "content": "x"}, {"agent": "solo", "content": ""}],
    [{"agent": "Computer_terminal", "content": "exitcode: 0"}],
])
def test_degenerate_logs_still_have_candidates(items):
    fx, cand = portable_features(from_generic(items))
    assert cand and len(fx.rows) == len(items) and all(len(r) == len(PORTABLE) for r in fx.rows)


def test_fit_on_one_system_score_another(tmp_path):
    a = system(tmp_path / "a.jsonl", ("Planner", "Solver", "Checker"))
    b = system(tmp_path / "b.jsonl", ("Orchestrator", "WebSurfer", "Coder"), seed=1, task_turn=True,
               tool="ComputerTerminal", hc=True)
    res = transfer(a, b)
    assert res["mode"] == "transfer" and res["n"] == 40 and res["train_n"] == 40
    assert res["methods"]["portable_shapley"]["step_acc"] >= 90
    assert set(res["baselines"]) >= {"always_step1", "first_agent", "majority_speaker", "last_step",
                                     "train_gold_agent", "uniform_random"}
    # the training side's most frequent gold agent never speaks in b: its baseline falls back to the first turn
    assert res["baselines"]["train_gold_agent"] == {k: v for k, v in res["baselines"]["first_agent"].items()}
    assert res["methods"]["portable_shapley"]["mcnemar"]["step_vs_always_step1"]["p_mcnemar"] < 0.05
    assert res["kind"] == "whowhen-hc" and {x["name"] for x in res["anchors"]} == {"GPT-4o all-at-once",
                                                                                "AgenTracer-8B"}
    same = transfer(a, system(tmp_path / "a2.jsonl", ("Planner", "Solver", "Checker"), seed=3))
    golds = [json.loads(x)["mistake_agent"] for x in a.read_text().splitlines()]
    top = max(set(golds), key=golds.count)
    test_golds = [it["gold_agent"] for it in same["items"]]
    assert same["baselines"]["train_gold_agent"]["agent_acc"] == round(100 * test_golds.count(top) / 40, 2)
    back = transfer(b, a)
    assert back["kind"] == "unknown" and back["anchors"] == []
    assert back["methods"]["portable_shapley"]["step_acc"] >= 90


def test_the_task_turn_is_never_blamed(tmp_path):
    """Logs whose gold is the first agent turn after the task: the task turn must not take its place."""
    b = system(tmp_path / "b.jsonl", ("Orchestrator", "WebSurfer", "Coder"), task_turn=True)
    res = evaluate(b, folds=4, seeds=(0,), feature_sets=("portable",))
    preds = [it["pred"]["portable_shapley"] for it in res["items"]]
    assert all(p[0] != "human" and p[1] != 0 for p in preds)


def test_anchors_follow_the_data():
    planted = from_whowhen({"system": "kvmas-planted/text:review", "history": [{"name": "a", "content": "x"}]})
    assert data_kind([planted]) == "kvmas-planted"
    assert data_kind([from_generic([{"agent": "a", "content": "x"}])]) == "unknown"


@pytest.mark.skipif(not DEV.exists(), reason="Who&When dev data not present")
def test_dev_set_is_recognised_and_portable_features_hold_up():
    assert data_kind(list(iter_logs(DEV))) == "whowhen-ag"
    res = evaluate(DEV, folds=5, seeds=(0,), feature_sets=("portable",))
    m = res["methods"]["portable_shapley"]
    assert m["agent_acc"] > 58 and m["step_acc"] > 33  # held-out folds; baselines 53.97 / 26.98


def test_eval_cli_train_test_and_no_foreign_anchors(tmp_path):
    a = system(tmp_path / "a.jsonl", ("Planner", "Solver", "Checker"), n=20)
    b = system(tmp_path / "b.jsonl", ("X", "Y", "Z"), n=20, seed=2)
    out = tmp_path / "t.json"
    r = runner.invoke(app, ["eval", "--train", str(a), "--test", str(b), "--no-gt", "--json", str(out)],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "GPT-4o" not in r.output and "CDC-MAS" not in r.output and "first agent" in r.output
    assert json.loads(out.read_text())["without_gt"]["train_n"] == 20
    r = runner.invoke(app, ["eval", "--data", str(a), "--train", str(a), "--test", str(b)])
    assert r.exit_code == 2 and "either --data" in r.output
    r = runner.invoke(app, ["eval", "--data", str(a), "--features", "names"])
    assert r.exit_code == 2 and "unknown names" in r.output


def _faulted_trace():
    from kvmas.agents.agent import Intervention
    from kvmas.primitives import parse_method
    from kvmas.testing import tiny_model

    prim = parse_method("text:review", max_new_tokens=3, rounds=1)
    r = prim("What is 2+3?", model=tiny_model("llama"), seed=0,
             interventions={"critic": Intervention("replace", "The answer is 9.", {3})})
    r.trace.outcome = {"gold": "5", "correct": False, "planted": {"agent": "critic", "step": 3, "reason": "x"}}
    return r.trace


def test_export_maps_the_planted_step_into_the_history(tmp_path):
    trace = _faulted_trace()
    rec = to_whowhen(trace, ("critic", 3), system="kvmas-planted/text:review")
    log = from_whowhen(rec)
    assert log.steps[0].agent == "human" and log.steps[0].content == "What is 2+3?"
    assert log.gold_agent == "critic" and log.steps[log.gold_step].content == "The answer is 9."
    with pytest.raises(BadInputError, match="produced no text"):
        to_whowhen(trace, ("critic", 2))
    with pytest.raises(BadInputError, match="spoken by"):
        to_whowhen(trace, ("solver", 3))
    p = trace.save(tmp_path / "t.json")
    out = tmp_path / "x.jsonl"
    r = runner.invoke(app, ["export", str(p), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert from_whowhen(json.loads(out.read_text())).gold_step == log.gold_step
    trace.outcome = {}
    trace.save(p)
    r = runner.invoke(app, ["export", str(p), "--out", str(out)])
    assert r.exit_code == 2 and "no outcome.planted" in r.output


def _orchestrator_log(n: int = 40, bad: int = 31):
    """A long Magentic-One-style log: routine hand-offs, then one search that comes back empty and is built on."""
    hist = [{"role": "human", "content": "What was the 2019 population of the town?"}]
    for i in range(1, n):
        if i == bad:
            hist.append({"role": "Orchestrator (-> WebSurfer)", "content": "Please search for the 2019 census page."})
        elif i == bad + 1:
            hist.append({"role": "WebSurfer", "content": "I typed 'census 2019' into the search bar. No results found."})
        elif i == n - 1:
            hist.append({"role": "Orchestrator (thought)", "content": "The answer is 48213."})
        elif i % 2:
            hist.append({"role": "Orchestrator (thought)", "content": f"Progress ledger update {i}: keep going."})
        else:
            hist.append({"role": "WebSurfer", "content": f"I scrolled down one page; the page shows section {i}."})
    return from_whowhen({"question": hist[0]["content"], "history": hist, "mistake_agent": "Orchestrator",
                         "mistake_step": str(bad)})


def test_shipped_weights_are_portable_and_look_past_the_start():
    from kvmas.attribution.attributor import LogAttributor
    from kvmas.attribution.weights import PORTABLE_WEIGHTS

    assert list(PORTABLE_WEIGHTS) == PORTABLE  # refit benchmarks/attribution_fit.py when the features change
    res = LogAttributor().attribute(_orchestrator_log())
    assert res.agent != "human" and all(r.step != 0 for r in res.ranking)
    assert res.step >= 20, (res.step, res.evidence)


def test_judge_reranks_from_its_cache(tmp_path):
    """The judge runs on a real (tiny) model; its verdicts are cached per log and a cached verdict decides."""
    from kvmas.attribution.judge import judge_eval
    from kvmas.testing import tiny_model

    data = system(tmp_path / "a.jsonl", ("Planner", "Solver", "Checker"), n=12)
    cache = tmp_path / "cache"
    res = judge_eval(data, tiny_model("llama"), k=3, limit=4, cache_dir=cache, folds=3)
    assert res["n"] == 4 and set(res["methods"]) == {"portable_speaker", "judge_rerank_top3", "judge_all_at_once"}
    assert res["judge"]["n_total"] == 12 and "first_agent" in res["baselines"]
    files = sorted(cache.glob("*.json"))
    assert len(files) == 4
    first = json.loads(files[0].read_text())
    assert len(first["verdicts"]) == 3 and first["all_at_once"]["candidates"]
    # verdicts planted in the cache (the last of each log's top 3 wins) must now decide the re-rank
    winners = []
    for f in files:
        e = json.loads(f.read_text())
        last = max(e["verdicts"], key=int)
        e["verdicts"] = {s: (50.0 if s == last else -50.0) for s in e["verdicts"]}
        f.write_text(json.dumps(e))
        winners.append(int(last))
    again = judge_eval(data, tiny_model("llama"), k=3, limit=4, cache_dir=cache, folds=3)
    assert sorted(p["pred"]["judge_rerank_top3"][1] for p in again["items"]) == sorted(winners)


def test_judge_cli_refuses_bad_limits(tmp_path):
    data = system(tmp_path / "a.jsonl", ("Planner", "Solver", "Checker"), n=6)
    r = runner.invoke(app, ["judge", "--data", str(data), "--limit", "0", "--model", "nope-model"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_bad_records_are_counted_and_named(tmp_path):
    good = [json.loads(x) for x in system(tmp_path / "a.jsonl", ("P", "S", "C"), n=6).read_text().splitlines()]
    d = tmp_path / "logs"
    d.mkdir()
    for i, rec in enumerate(good):
        (d / f"{i}.json").write_text(json.dumps(rec))
    (d / "20.json").write_bytes(b'{"history": [{"name": "a", "content": "caf\xe9"}]}')  # not UTF-8
    (d / "21.json").write_text(json.dumps({**good[0], "mistake_step": "99"}))
    (d / "22.json").write_text(json.dumps({**good[0], "history": []}))
    (d / "23.json").write_text(json.dumps({k: v for k, v in good[0].items() if k != "mistake_step"}))
    (d / "24.json").write_text(json.dumps({**good[1], "mistake_agent": "Ghost"}))  # kept, with a warning
    res = evaluate(d, folds=2, seeds=(0,), feature_sets=("portable",))
    assert res["n"] == 7 and res["skipped"] == {"unreadable record": 3, "no gold label": 1}
    text = " | ".join(res["warnings"])
    for name in ("20.json", "21.json", "22.json", "23.json", "24.json"):
        assert name in text, name
    assert "outside" in text and "never speaks" in text
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b"\n".join(lines[:4] + [b'{"history": "\xff"}', b"[1, 2]"]) + b"\n")
    res = evaluate(bad, folds=2, seeds=(0,), feature_sets=("portable",))
    assert res["n"] == 4 and res["skipped"] == {"unreadable record": 2}
    assert any("b.jsonl line 5" in w for w in res["warnings"])


def test_claims_against_the_evidence():
    log = from_generic([{"agent": "coder", "content": "```python\nprint(6*7)\n```"},
                        {"agent": "Computer_terminal", "content": "exitcode: 0\nCode output: 42"},
                        {"agent": "checker", "content": "The answer is 42."},
                        {"agent": "writer", "content": "So the final answer is 48."},
                        {"agent": "coder", "content": "The total is 1234."}], question="What is 6*7?")
    fx, _ = portable_features(log)
    col = lambda name: [r[PORTABLE.index(name)] for r in fx.rows]  # noqa: E731
    assert col("contradicts") == [0, 0, 0, 1, 1]
    assert col("claim_unsupported") == [0, 0, 0, 1, 1]


def test_plant_on_a_model_that_never_gets_it_right_writes_nothing(tmp_path):
    from kvmas.attribution.planted import planted_traces
    from kvmas.primitives import parse_method
    from kvmas.testing import tiny_model

    prims = {"text:review": parse_method("text:review", max_new_tokens=3, rounds=1)}
    msgs = []
    got = list(planted_traces(prims, [("What is 2 + 3?", "5")], tiny_model("llama"), progress=msgs.append))
    assert got == [] and "clean run wrong" in msgs[0]
    out = tmp_path / "p.jsonl"
    r = runner.invoke(app, ["plant", "--out", str(out), "--n", "0"])
    assert r.exit_code == 2 and "--n must be" in r.output and not out.exists()


def test_plant_refuses_an_unknown_fault_and_choice_tasks_before_loading_a_model(tmp_path):
    out = tmp_path / "p.jsonl"
    r = runner.invoke(app, ["plant", "--out", str(out), "--fault", "typo"])
    assert r.exit_code == 2 and "--fault must be one of claim, slip" in r.output and not out.exists()
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "c1", "question": "Which is a gas?", "choices": {"label": ["A", "B"], "text": [
        "iron", "steam"]}, "answerKey": "B"}) + "\n")
    r = runner.invoke(app, ["plant", "--out", str(out), "--data", str(arc), "--n", "1"])
    assert r.exit_code == 2 and "planting needs number answers; c1 is a choice task" in r.output
    assert not out.exists()


def test_a_slip_keeps_the_agents_words_and_changes_one_value():
    from kvmas.attribution.planted import slip

    text = "She had 1,200 apples and sold 300, so 1,200 - 300 = 900 remain. Answer: 900."
    assert slip(text, "900") == "She had 1,200 apples and sold 300, so 1,200 - 300 = 901 remain. Answer: 901."
    assert slip("Take 1,200 and subtract 300.", "900") == "Take 1,200 and subtract 301."  # last number + 1
    assert slip("Step 2.5 is 7.5", "7.5") == "Step 2.5 is 8.5" and slip("", "3") is None


def test_answer_origin_is_the_earliest_step_the_final_answer_comes_from():
    """The final answer repeats 1234 (first printed by the coder's code) and 'Springfield' (said later by the
    writer): only the coder's turn is the origin, and a tool output credits the turn that ran it."""
    log = from_generic([{"agent": "human", "content": "Which town, and how many people?"},
                        {"agent": "planner", "content": "Plan: look the town up, then count."},
                        {"agent": "coder", "content": "```python\nprint(1234)\n```"},
                        {"agent": "Computer_terminal", "content": "exitcode: 0\nCode output: 1234"},
                        {"agent": "writer", "content": "The town is 'Springfield'."},
                        {"agent": "checker", "content": "The answer is 1234 people in 'Springfield'."}],
                       question="Which town, and how many people?")
    fx, cand = portable_features(log)
    origin = [r[PORTABLE.index("answer_origin")] for r in fx.rows]
    assert origin == [0, 0, 1, 0, 0, 0] and 2 in cand
    assert [r[PORTABLE.index("introduces_answer")] for r in fx.rows] == [0, 0, 1, 0, 1, 0]
    assert "the earliest step that introduces a value of the final answer" in fx.evidence[2]


def test_the_report_attributor_takes_a_judge_whose_verdicts_decide_among_the_top_steps(tmp_path):
    """kvmas attribute --judge: the scorer's top k blameable steps re-ranked by a real (tiny) model's cached
    verdicts; a verdict planted in the cache for the third-ranked step makes it the answer, with its speaker."""
    from kvmas.attribution.attributor import LogAttributor
    from kvmas.attribution.judge import LogJudge
    from kvmas.testing import tiny_model

    log = _orchestrator_log()
    cache = tmp_path / "cache"
    plain = LogAttributor().attribute(log)
    judged = LogAttributor(judge=LogJudge(tiny_model("llama"), cache_dir=cache), judge_k=3).attribute(log)
    assert "judge" in judged.method and any("judge verdicts" in e for e in judged.evidence)
    top3 = [r.step for r in plain.ranking if r.agent != "human"][:3]
    assert judged.step in top3
    (entry,) = cache.glob("*.json")
    e = json.loads(entry.read_text())
    assert sorted(map(int, e["verdicts"])) == sorted(top3)
    e["verdicts"] = {str(s): (50.0 if s == top3[2] else -50.0) for s in top3}
    entry.write_text(json.dumps(e))
    again = LogAttributor(judge=LogJudge(tiny_model("llama"), cache_dir=cache), judge_k=3).attribute(log)
    assert (again.step, again.agent) == (top3[2], log.steps[top3[2]].agent)


def test_report_refuses_a_bad_judge_k_and_judge_with_replay(tmp_path):
    p = tmp_path / "log.json"
    p.write_text(json.dumps({"question": "q", "history": [{"name": "a", "content": "It is 5."},
                                                          {"name": "b", "content": "So 5."}],
                             "mistake_agent": "a", "mistake_step": "0"}))
    r = runner.invoke(app, [str(p), "--judge", "no-such-model", "--judge-k", "0"])
    assert r.exit_code == 2 and "--judge-k must be >= 1" in r.output
    r = runner.invoke(app, [str(p), "--judge", "no-such-model", "--replay"])
    assert r.exit_code == 2 and "--replay attributes by re-running" in r.output


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_judge_verdicts_on_a_shared_prefix_equal_each_prompt_scored_alone(family):
    """Golden: verdicts for several steps of one log come from one prefill of the prompts' common tokens and
    a fork per step; each equals its own prompt scored from scratch."""
    from kvmas.attribution.judge import LogJudge
    from kvmas.testing import tiny_model

    model = tiny_model(family)
    log = _orchestrator_log()
    steps = [len(log.steps) - 1, 1, 3]
    judge = LogJudge(model)
    shared = judge.verdicts(log, steps)
    for step, got in zip(steps, shared):
        yes, no = model.score_continuations(judge._prompt(log, step, judge._ask(log, step)), ["Yes", "No"])
        assert got == pytest.approx(yes - no, abs=1e-4)
    assert judge.verdict(log, 1) == shared[1]  # cached
    with pytest.raises(BadInputError, match="outside"):
        judge.verdicts(log, [1, len(log.steps)])

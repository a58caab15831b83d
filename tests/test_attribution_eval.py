"""Evaluation: baselines reproduce the published trivial numbers, CV scores only held-out folds, McNemar."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from kvmas.attribution.evaluate import evaluate
from kvmas.attribution.attributor import LogAttributor
from kvmas.attribution.log import iter_logs

DEV = Path("/work/shared/data/whowhen/algorithm_generated.jsonl")


def synthetic(path: Path, n: int = 40, seed: int = 0, bad: bool = True) -> Path:
    """Who&When-format runs where the decisive step is the one that assumes a value; others are neutral."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        k = rng.randint(3, 7)
        agents = ["Planner", "Solver", "Checker"]
        bad_step = rng.randrange(0, k - 1)
        hist = []
        for j in range(k):
            a = agents[j % 3]
            text = f"Working on part {j} of the task." if j != bad_step else \
                f"Let's assume the count is {100 + i}. The answer is {100 + i}."
            hist.append({"name": a, "role": "user", "content": text})
        hist.append({"name": "Checker", "role": "user", "content": "TERMINATE"})
        lines.append(json.dumps({"source_file": f"{i}.json", "question": "How many?", "ground_truth": "3",
                                 "mistake_agent": hist[bad_step]["name"], "mistake_step": str(bad_step),
                                 "history": hist}))
    if bad:
        lines += ["{broken", json.dumps({"source_file": "empty.json", "history": []})]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_synthetic_cv_learns_and_survives_bad_records(tmp_path):
    res = evaluate(synthetic(tmp_path / "s.jsonl"), folds=4, seeds=(0,))
    assert res["n"] == 40
    assert any("empty.json" in w for w in res["warnings"]) and any("line 41" in w for w in res["warnings"])
    assert res["skipped"] == {"unreadable record": 2}  # counted, never dropped silently
    for name in ("cdc_shapley", "portable_shapley"):
        m = res["methods"][name]
        assert m["step_acc"] >= 90 and m["agent_acc"] >= 90 and m["n"] == 40
    assert len(res["items"]) == 40 and {"portable_speaker", "cdc_shapley"} <= set(res["items"][0]["pred"])


def test_cv_is_held_out_only(tmp_path):
    """With labels unrelated to the features, held-out accuracy stays near chance (no leakage)."""
    p = synthetic(tmp_path / "s.jsonl", n=60, bad=False)
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    rng = random.Random(3)
    for r in rows:  # shuffle the labels: the cue no longer marks the decisive step
        r["mistake_step"] = str(rng.randrange(len(r["history"])))
        r["mistake_agent"] = r["history"][int(r["mistake_step"])]["name"]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = evaluate(p, folds=5, seeds=(0,))
    assert res["methods"]["cdc_speaker"]["step_acc"] < 45
    assert res["methods"]["portable_speaker"]["step_acc"] < 45


@pytest.mark.skipif(not DEV.exists(), reason="Who&When dev data not present")
def test_dev_set_baselines_and_heldout_accuracy():
    res = evaluate(DEV, with_gt=False, folds=5, seeds=(0,))
    assert res["n"] == 126
    assert res["baselines"]["majority_speaker"]["agent_acc"] == 53.97
    assert res["baselines"]["always_step1"]["step_acc"] == 26.98
    m = res["methods"]["cdc_shapley"]
    assert m["step_acc"] > 30 and m["agent_acc"] > 55  # held-out folds only
    assert res["kind"] == "whowhen-ag" and {a["name"] for a in res["anchors"]} >= {"CDC-MAS"}


def test_shipped_weights_attribute_a_log(tmp_path):
    log = next(iter_logs(synthetic(tmp_path / "s.jsonl", n=1, bad=False)))
    res = LogAttributor().attribute(log)
    assert res.step == log.gold_step and res.ranking[0].evidence
    assert abs(sum(r.score for r in res.ranking) - 1) < 1e-6
    assert res.suggested_fix


def test_too_few_usable_records_for_the_folds_is_an_error_naming_the_file_and_the_skips(tmp_path):
    from kvmas.errors import BadInputError

    bad = tmp_path / "few.jsonl"
    bad.write_text('{"question": "q", "history": [{"name": "a", "content": "x"}, {"name": "b", "content": "y"}], '
                   '"mistake_agent": "a", "mistake_step": "0"}\n'
                   '{"question": "q", "history": [], "mistake_agent": "a", "mistake_step": "0"}\n')
    with pytest.raises(BadInputError, match=r"few.jsonl: 1 usable labelled record\(s\) \(1 unreadable record\); "
                                            r"5-fold cross-validation needs at least 5"):
        evaluate(bad, feature_sets=("portable",))

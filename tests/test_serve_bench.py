"""kvmas bench serve on a tiny model: every request answered once by a run of its own question, answers equal
the in-process ones, the report written whole; bad level settings refused before anything loads."""

import json

import pytest

from kvmas.bench.serve import LoadConfig, run_load_bench
from kvmas.errors import BadInputError
from kvmas.tasks import load_tasks
from kvmas.testing import tiny_model


def test_levels_match_every_request(tmp_path):
    cfg = LoadConfig(concurrency=(1, 3), requests=(3, 7), baseline=3, baseline_thread=1, max_new_tokens=4)
    tasks = load_tasks("gsm8k-sample", n=3)
    summary = run_load_bench(tiny_model("qwen", seed=1), tasks, tmp_path, cfg)
    for lv, n in zip(summary["levels"], (3, 7)):
        assert (lv["ok"], lv["failed"], lv["lost"], lv["duplicated"], lv["mismatched"]) == (n, 0, 0, 0, 0)
        assert lv["answers_compared"] == n and lv["answers_same_as_in_process"] == n
        assert lv["latency_p50_s"] <= lv["latency_p95_s"] <= lv["latency_max_s"]
    assert summary["lost_or_duplicated"] == 0 and summary["total_requests"] == 10
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    assert "| 3 | 7 | 7 | 0 | 0 | 0 | 7/7 |" in (tmp_path / "results.md").read_text()
    assert len(list((tmp_path / "traces").iterdir())) == 1 + 10  # the warm-up and every request


@pytest.mark.parametrize("kw", [dict(concurrency=(1, 8), requests=(4,)), dict(concurrency=(8,), requests=(4,)),
                                dict(concurrency=(0,), requests=(4,)), dict(baseline=0),
                                dict(method="text:nothing")])
def test_bad_settings(kw):
    with pytest.raises(BadInputError):
        LoadConfig(**kw).check()

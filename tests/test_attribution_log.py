"""Log model and adapters: Who&When (both formats), generic lists, kvmas traces, streaming with bad records."""

import json
import warnings

import pytest

from kvmas.attribution.log import (
    AttributionWarning,
    from_generic,
    from_trace,
    from_whowhen,
    iter_jsonl,
    iter_logs,
    load_log,
    normalize_agent,
)
from kvmas.errors import BadInputError
from kvmas.trace import Step, Trace


def _rec(i=0, step="1", agent="B"):
    return {"source_file": f"{i}.json", "question": "q", "ground_truth": "7", "mistake_agent": agent,
            "mistake_step": step,
            "history": [{"name": "A", "role": "assistant", "content": "plan"},
                        {"name": "B", "role": "user", "content": "answer 8"}]}


def test_name_format_steps_are_zero_based_ints():
    log = from_whowhen(_rec())
    assert [(s.index, s.agent) for s in log.steps] == [(0, "A"), (1, "B")]
    assert log.gold_step == 1 and isinstance(log.gold_step, int) and log.log_id == "0.json"


def test_role_format_strips_suffix_and_keeps_target():
    rec = {"question": "q", "mistake_agent": "WebSurfer", "mistake_step": "2",
           "history": [{"role": "human", "content": "q"},
                       {"role": "Orchestrator (-> WebSurfer)", "content": "search x"},
                       {"role": "WebSurfer", "content": "found y"},
                       {"role": "Orchestrator (thought)", "content": "ok"}]}
    log = from_whowhen(rec, "hc1")
    assert [s.agent for s in log.steps] == ["human", "Orchestrator", "WebSurfer", "Orchestrator"]
    assert log.steps[1].target == "WebSurfer" and log.steps[3].target is None


def test_normalize_agent():
    assert normalize_agent("Orchestrator (-> WebSurfer)") == "orchestrator"
    assert normalize_agent("Data Verification-Expert") == normalize_agent("data_verification_expert")


@pytest.mark.parametrize("bad, msg", [
    ({"history": []}, "empty"),
    ({"history": [{"content": "x"}]}, "neither"),
    ({"history": [{"name": "A", "content": "x"}], "mistake_step": "5"}, "outside"),
    ({"history": [{"name": "A", "content": "x"}], "mistake_step": "one"}, "not an integer"),
])
def test_bad_records_raise_with_id(bad, msg):
    with pytest.raises(BadInputError, match=msg) as e:
        from_whowhen(bad, "rec-9")
    assert str(e.value).startswith("rec-9")


def test_unknown_gold_agent_warns():
    with pytest.warns(AttributionWarning, match="never speaks"):
        from_whowhen(_rec(agent="Ghost"), "r")


def test_generic_and_terminal_detection():
    log = from_generic([{"agent": "coder", "content": "x"}, {"agent": "Computer_terminal", "content": "exitcode: 0"},
                        {"agent": "WomenInComputerScienceHistory_Expert", "content": "y"}])
    assert [s.is_terminal for s in log.steps] == [False, True, False]
    with pytest.raises(BadInputError):
        from_generic([])
    with pytest.raises(BadInputError, match="no 'agent'"):
        from_generic([{"content": "x"}])


def test_trace_keeps_exact_provenance(tmp_path):
    t = Trace(question="q", answer="4")
    t.add(Step(agent="a", role="solver", action="speak", writes=[3], text_out="4"))
    t.add(Step(agent="b", role="critic", action="speak", reads=[3], writes=[4], text_out="ok"))
    log = from_trace(t)
    assert log.exact_provenance and log.steps[1].reads == [3] and log.steps[0].writes == [3]
    p = t.save(tmp_path / "t.json")
    assert load_log(p).source == "trace"
    with pytest.raises(BadInputError):
        from_trace(Trace(question="q"))


def test_stream_skips_bad_lines_with_ids(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [json.dumps(_rec(1)), "[1, 2]", json.dumps({"source_file": "x.json", "history": []}), "",
             json.dumps(_rec(2)), "A" * 800 + "\n"]
    p.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = list(iter_jsonl(p, max_line_bytes=500))
    assert [lg.log_id for lg in logs] == ["1.json", "2.json"]
    text = " | ".join(str(w.message) for w in caught)
    assert "line 2: record is not a JSON object" in text and "x.json" in text and "line 6" in text


def test_invalid_json_line_warns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("{not json\n" + json.dumps(_rec(3)) + "\n")
    with pytest.warns(AttributionWarning, match="line 1: invalid JSON"):
        assert [lg.log_id for lg in iter_jsonl(p)] == ["3.json"]


def test_a_line_that_is_not_utf8_says_so_and_a_record_without_id_is_named_once(tmp_path):
    """Bytes FF FE made json.loads guess UTF-16 ('utf-16-le codec can't decode'); a record with no id of its
    own was named twice ('d.jsonl line 2: line 2: ...')."""
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xff\xfe bad\n" + json.dumps({"history": []}).encode() + b"\n" + json.dumps(_rec(4)).encode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [lg.log_id for lg in iter_jsonl(p)] == ["4.json"]
    msgs = [str(w.message) for w in caught]
    assert msgs[0] == "d.jsonl line 1: not UTF-8 text (byte 0xff at position 0)"
    assert msgs[1].startswith("d.jsonl line 2: ") and msgs[1].count("line 2") == 1, msgs[1]


def test_iter_logs_directory_and_missing(tmp_path):
    for i in (2, 10, 1):
        (tmp_path / f"{i}.json").write_text(json.dumps(_rec(i)))
    assert [lg.log_id for lg in iter_logs(tmp_path)] == ["1.json", "2.json", "10.json"]
    with pytest.raises(BadInputError):
        list(iter_logs(tmp_path / "missing.jsonl"))

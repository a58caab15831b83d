import json

import pytest

from kvmas.errors import BadInputError
from kvmas.tasks import Task, generate_tasks, is_correct, load_jsonl, load_tasks, task_names
from kvmas.tasks.loaders import TaskAdapter, register_adapter, _ADAPTERS


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in records) + "\n")
    return path


def test_gsm8k_formats(tmp_path):
    p = _write(tmp_path / "g.jsonl", [
        {"id": "a", "question": "2+2?", "answer": "2+2=4\n#### 4"},
        {"id": "b", "question": "big?", "answer": "x\n#### 1,200", "final": "1,200"},
    ])
    ts = load_jsonl(p)
    assert [t.answer for t in ts] == ["4", "1200"] and ts[0].kind == "number"
    assert is_correct(ts[0].meta["solution"], ts[0])


def test_arc_layouts(tmp_path):
    flat = {"id": "f", "question": "Q?", "choices": [{"label": "A", "text": "x"}, {"label": "B", "text": "y"}],
            "answer": "B"}
    ai2 = {"id": "g", "question": {"stem": "Q2?", "choices": [{"label": "1", "text": "x"}, {"label": "2", "text": "y"}]},
           "answerKey": "1"}
    hf = {"id": "h", "question": "Q3?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
          "answerKey": "C"}
    ts = load_jsonl(_write(tmp_path / "a.jsonl", [flat, ai2, hf]))
    assert [(t.id, t.answer, t.labels) for t in ts] == [
        ("f", "B", ["A", "B"]), ("g", "1", ["1", "2"]), ("h", "C", ["A", "B", "C"])]
    assert all(t.kind == "choice" for t in ts)


def test_kvmas_format_and_blank_lines(tmp_path):
    p = _write(tmp_path / "k.jsonl", [{"question": "3*3?", "answer": 9}, "", {"question": "1?", "answer": "1"}])
    ts = load_jsonl(p)
    assert [t.id for t in ts] == ["task-0", "task-1"] and ts[0].answer == "9"


@pytest.mark.parametrize("lines,msg", [
    (["{not json"], ":1: not valid JSON"),
    (["[1, 2]"], ":1: expected a JSON object"),
    ([{"foo": 1}], ":1: unrecognised task record"),
    ([{"question": "q", "answer": "x\n#### 3"}, {"question": "q", "answer": "no marker"}], ":2: bad gsm8k record"),
    ([{"question": "q", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}], "answer": "Z"}],
     ":1:"),
    ([""], "no tasks"),
])
def test_bad_files_name_the_line(tmp_path, lines, msg):
    p = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(BadInputError, match=msg):
        load_jsonl(p)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_tasks(tmp_path / "nope.jsonl")
    with pytest.raises(BadInputError, match="known name"):
        load_tasks("gsm9k")
    with pytest.raises(BadInputError):
        load_tasks(None, n=0)


def test_samples_and_n_and_shuffle():
    g = load_tasks("gsm8k-sample")
    a = load_tasks("arc-easy-sample")
    assert len(g) == 20 and len(a) == 20
    assert g[0].id == "gsm8k-test-0" and g[2].answer == "70000"
    assert a[0].kind == "choice" and a[0].answer == "A"
    assert [t.id for t in load_tasks("gsm8k-sample", n=3)] == [t.id for t in g[:3]]
    s1 = load_tasks("arc-easy-sample", n=5, seed=1, shuffle=True)
    assert s1 == load_tasks("arc-easy-sample", n=5, seed=1, shuffle=True)
    assert [t.id for t in s1] != [t.id for t in a[:5]]
    assert "synthetic" in task_names()


def test_generator_is_seeded_and_verifiable():
    a, b, c = generate_tasks(30, seed=7), generate_tasks(30, seed=7), generate_tasks(30, seed=8)
    assert a == b and a != c
    assert len({t.id for t in a}) == 30
    for t in a:
        if t.kind == "number":
            assert is_correct(rf"\boxed{{{t.answer}}}", t)
        else:
            assert len(t.choices) == 4 and len({ch.text for ch in t.choices}) == 4
            expr = t.question.removeprefix("What is ").rstrip("?")
            x, op, y = expr.split()
            val = {"+": int(x) + int(y), "*": int(x) * int(y), "-": int(x) - int(y)}[op]
            assert t.choice_text(t.answer) == str(val)
    assert {t.kind for t in load_tasks("synthetic-choice", n=4)} == {"choice"}
    with pytest.raises(BadInputError):
        generate_tasks(5, kind="essay")


def test_custom_adapter(tmp_path):
    class Pairs(TaskAdapter):
        name = "pairs"

        def matches(self, record):
            return "q" in record and "a" in record

        def to_task(self, record, index):
            return Task(id=f"p{index}", question=record["q"], answer=str(record["a"]))

    register_adapter(Pairs())
    try:
        ts = load_jsonl(_write(tmp_path / "p.jsonl", [{"q": "1+1?", "a": 2}]))
        assert ts[0].id == "p0" and ts[0].answer == "2"
        assert load_jsonl(tmp_path / "p.jsonl", adapter="pairs")[0].id == "p0"
    finally:
        _ADAPTERS.pop(0)

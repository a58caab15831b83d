"""Causal graphs: exact from reads/writes, inferred for external logs, reversed with an outcome node."""

import networkx as nx

from kvmas.attribution.graph import OUTCOME, data_graph, final_steps, performance_graph, values
from kvmas.attribution.log import from_generic, from_trace, from_whowhen
from kvmas.trace import Step, Trace


def test_exact_graph_from_segments():
    t = Trace(question="q")
    t.add(Step(agent="a", role="r", action="speak", writes=[1]))
    t.add(Step(agent="b", role="r", action="speak", writes=[2]))
    t.add(Step(agent="c", role="r", action="speak", reads=[1, 2], writes=[3]))
    t.add(Step(agent="d", role="r", action="speak", reads=[3]))
    g = data_graph(from_trace(t))
    assert set(g.edges()) == {(2, 0), (2, 1), (3, 2)}
    perf = performance_graph(g, from_trace(t))
    assert perf.has_edge(0, 2) and nx.has_path(perf, 0, OUTCOME)


def test_inferred_edges_kinds():
    log = from_generic([
        {"agent": "Orchestrator (-> coder)", "content": "compute the area of file plot.csv"},
        {"agent": "coder", "content": "```python\nprint(3141)\n```"},
        {"agent": "Computer_terminal", "content": "exitcode: 0\nCode output: 3141"},
        {"agent": "checker", "content": "coder got 3141 from plot.csv, confirmed."},
    ])
    g = data_graph(log)
    kinds = {(u, v): d["kind"] for u, v, d in g.edges(data=True)}
    assert kinds[(1, 0)] == "instruction"
    assert kinds[(2, 1)] == "code->output"
    assert (3, 2) in kinds and (3, 0) in kinds  # reads the output; reuses the file name from step 0
    assert all(u > v for u, v in g.edges())


def test_outcome_edges_and_final_steps():
    log = from_whowhen({"question": "q", "history": [
        {"name": "A", "content": "I estimate 1234 people."},
        {"name": "B", "content": "The answer is 1234."},
        {"name": "B", "content": "TERMINATE"}]})
    assert final_steps(log) == [1]
    perf = performance_graph(data_graph(log), log)
    assert perf.has_edge(0, OUTCOME) and perf.has_edge(1, OUTCOME) and not perf.has_edge(2, OUTCOME)
    assert perf.has_edge(0, 1)  # reversed value-reuse edge: step 0's quality affects step 1


def test_values_ignore_trivial_numbers():
    assert values("1 2 10 and 42 and 3.75%") == {"42", "3.75"}


def test_reach_all_matches_descendants():
    import random

    from kvmas.attribution.graph import reach, reach_all

    rng = random.Random(0)
    log = from_generic([{"agent": f"a{rng.randrange(3)}", "content": f"x {rng.randrange(50) + 10} y"}
                        for _ in range(40)])
    perf = performance_graph(data_graph(log), log)
    assert reach_all(perf) == {i: reach(perf, i) for i in range(40)}


def test_an_orchestrator_ledger_is_structure_not_an_answer():
    """A Magentic-One-style ledger (JSON keys, "provide the final answer") neither states the final answer nor
    carries values: before, its quoted keys were 'values', the ledger that asked for the answer was a final
    step, and every earlier ledger 'introduced' the answer's values."""
    ledger = ('Updated Ledger:\n{"is_request_satisfied": {"reason": "not yet", "answer": false},\n'
              ' "next_speaker": {"reason": "needed", "answer": "Assistant"},\n'
              ' "instruction_or_question": {"reason": "done", "answer": "Provide the final answer."}}')
    log = from_whowhen({"question": "How many albums?", "history": [
        {"role": "human", "content": "How many albums?"},
        {"role": "Orchestrator (thought)", "content": ledger},
        {"role": "WebSurfer", "content": "The page lists 'Silver Roads' (2002) and 'Northbound' (2005)."},
        {"role": "Assistant", "content": "Silver Roads (2002) and Northbound (2005): the answer is 2 albums."},
        {"role": "Orchestrator (thought)", "content": ledger},
        {"role": "Orchestrator (termination condition)", "content": "The request is satisfied. FINAL ANSWER: 2"}]})
    assert "next_speaker" not in values(ledger) and "not yet" in values(ledger)
    assert final_steps(log) == [3, 5]  # the Assistant states the answer; the ledger only asks for it
    perf = performance_graph(data_graph(log), log)
    assert perf.has_edge(2, OUTCOME) and not perf.has_edge(1, OUTCOME)  # the values come from the WebSurfer

import json

import pytest

from kvmas.errors import BadInputError
from kvmas.organizer.spec import PRIMITIVE_PARAMS, PipelineSpec


def _spec(nodes, edges=()):
    return {"nodes": nodes, "edges": [list(e) for e in edges]}


DAG = _spec([{"id": "p", "type": "plan", "params": {"k": 2}},
             {"id": "r", "type": "review", "params": {"rounds": 1, "comm": "text"}},
             {"id": "v", "type": "vote", "params": {"n": 3}},
             {"id": "f", "type": "single", "merge": "rerotate"}],
            [("p", "r"), ("p", "v"), ("r", "f"), ("v", "f")])


def test_round_trip_and_views():
    spec = PipelineSpec.from_dict(DAG)
    again = PipelineSpec.from_json(spec.to_json(indent=2))
    assert again == spec
    assert json.loads(spec.to_json())["edges"] == [["p", "r"], ["p", "v"], ["r", "f"], ["v", "f"]]
    assert spec.sink == "f" and spec.order() == ["p", "r", "v", "f"]
    assert "f: [r, v] => single()" in spec.describe()
    assert PipelineSpec.chain("single").describe() == "single()"
    text = spec.with_params(comm="text", rounds=5)
    assert all(n.params["comm"] == "text" for n in text.nodes)
    assert text.nodes[1].params["rounds"] == 5 and "rounds" not in text.nodes[2].params
    # defaults fill only what a node leaves unset: the review keeps its own comm and rounds
    kv = spec.with_defaults(comm="kv", rounds=5)
    assert [n.params.get("comm") for n in kv.nodes] == ["kv", "text", "kv", "kv"]
    assert kv.nodes[1].params["rounds"] == 1 and kv.edges == spec.edges


@pytest.mark.parametrize("data,path", [
    (_spec([{"id": "a", "type": "debate"}]), r"nodes\[0\]\.type: unknown primitive 'debate'"),
    (_spec([{"id": "a", "type": "review", "params": {"rounds": "2"}}]), r"nodes\[0\]\.params\.rounds: expected an integer"),
    (_spec([{"id": "a", "type": "review", "params": {"rounds": True}}]), r"nodes\[0\]\.params\.rounds: expected an integer"),
    (_spec([{"id": "a", "type": "single"}, {"id": "b", "type": "vote", "params": {"n": 1000}}], [("a", "b")]),
     r"nodes\[1\]\.params\.n: must be <= 16"),
    (_spec([{"id": "a", "type": "vote", "params": {"n": 0}}]), r"nodes\[0\]\.params\.n: must be >= 1"),
    (_spec([{"id": "a", "type": "vote", "params": {"comm": "telepathy"}}]), r"params\.comm: must be one of latent, text"),
    (_spec([{"id": "a", "type": "vote", "params": {"rounds": 2}}]), r"nodes\[0\]\.params\.rounds: unknown parameter of vote"),
    (_spec([{"id": "a", "type": "single"}, {"id": "a", "type": "single"}]), r"nodes\[1\]\.id: duplicate"),
    (_spec([{"id": "a", "type": "single"}], [("a", "zz")]), r"edges\[0\]\[1\]: no node with id 'zz'"),
    (_spec([{"id": "a", "type": "single"}, {"id": "b", "type": "single"}], [("a", "b"), ("b", "a")]),
     r"edges: cycle a -> b -> a"),
    (_spec([{"id": "a", "type": "single"}], [("a", "a")]), r"edges\[0\]: self-loop"),
    (_spec([{"id": "a", "type": "single"}, {"id": "b", "type": "single"}]), r"exactly one sink.*found 2"),
    (_spec([{"id": "a", "type": "single"}, {"id": "b", "type": "single"}], [("a", "b"), ("a", "b")]),
     r"edges\[1\]: duplicate edge"),
    (_spec([{"id": "a b", "type": "single"}]), r"nodes\[0\]\.id: String should match"),
    (_spec([{"id": "a", "type": "single", "merge": "blend"}]), r"nodes\[0\]\.merge"),
    (_spec([{"id": "a", "type": "single", "code": "import os"}]), r"nodes\[0\]\.code: Extra inputs"),
    (_spec([]), r"nodes: Tuple should have at least 1 item"),
    ({"version": 9, "nodes": [{"id": "a", "type": "single"}]}, r"newer than this kvmas"),
])
def test_invalid_specs_name_the_field(data, path):
    with pytest.raises(BadInputError, match=path):
        PipelineSpec.from_dict(data)


def test_not_json_and_too_many_nodes():
    with pytest.raises(BadInputError, match="not valid JSON"):
        PipelineSpec.from_json("{nodes: ")
    nodes = [{"id": f"n{i}", "type": "single"} for i in range(40)]
    with pytest.raises(BadInputError, match="at most 32"):
        PipelineSpec.from_dict(_spec(nodes, [(f"n{i}", f"n{i+1}") for i in range(39)]))


def test_every_primitive_has_comm():
    assert set(PRIMITIVE_PARAMS) == {"single", "review", "vote", "plan", "consistency"}
    assert all("comm" in p for p in PRIMITIVE_PARAMS.values())

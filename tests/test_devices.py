"""Every tensor reaching the model follows its device and dtype; devices and dtypes are chosen with clear errors.

On a CUDA machine the same checks run on the GPU (``KVMAS_TEST_DEVICE=cuda`` or automatically when present).
"""


import pytest
import torch

from kvmas.agents.model import Model, resolve_device
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.primitives import PlanExecute, Review, Vote
from kvmas.testing import tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def placements(device):
    dtypes = [torch.float32, torch.bfloat16]
    return [(device, d) for d in dtypes]


@pytest.mark.parametrize("device,dtype", [p for d in DEVICES for p in placements(d)])
def test_every_input_reaching_the_model_is_on_its_device_and_dtype(device, dtype):
    model = tiny_model("qwen", dtype=dtype, device=device)
    assert model.device.type == device and model.dtype == dtype
    seen = []

    def check(_module, _args, kwargs):
        for key in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
            t = kwargs.get(key)
            if t is not None:
                seen.append(key)
                assert t.device.type == device, (key, t.device)
                if key == "inputs_embeds":
                    assert t.dtype == dtype, (key, t.dtype)
        cache = kwargs.get("cache")
        for layer in getattr(cache, "layers", []):
            if getattr(layer, "keys", None) is not None:
                assert layer.keys.device.type == device and layer.keys.dtype == dtype

    decoder = getattr(model.hf, model.hf.base_model_prefix)
    handle = decoder.register_forward_pre_hook(check, with_kwargs=True)
    try:
        s = LatentState.empty(model).extend("2+3?").think(2)
        s.speak(3)
        s.score(["yes", "no"])
        rows = s.fork(2).extend(["a", "bbb"]).think(1)
        for policy in ("shared", "rerotate", "reprefill"):
            rows.merge_rows(policy).extend("ok").speak(2, temperature=0.8, seed=1)
        for prim in (Review(max_new_tokens=3, latent_steps=1, early_stop=True), Vote(n=2, max_new_tokens=3),
                     PlanExecute(comm="text", k=2, max_new_tokens=3), Review(comm="kv", max_new_tokens=3)):
            prim.batch(["2+3?", "What is 4 times 5?"], model=model)
        model.embed_text("hello")
    finally:
        handle.remove()
    assert {"inputs_embeds", "input_ids", "attention_mask", "position_ids"} <= set(seen)


def test_a_saved_state_loads_onto_the_models_device(tmp_path):
    model = tiny_model("qwen")
    s = LatentState.empty(model).extend("2+3?").think(1)
    s.save(tmp_path / "s.safetensors")
    back = LatentState.load(tmp_path / "s.safetensors", model)
    assert all(t.device == model.device for t in back.keys) and back.speak(3).texts == s.speak(3).texts


def test_device_and_dtype_choices_fail_clearly(monkeypatch):
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("KVMAS_DEVICE", "cpu")
    assert resolve_device(None)[0] == torch.device("cpu")
    for bad, match in (("tpu", "unknown device"), ("cuda:x", "unknown device")):
        with pytest.raises(BadInputError, match=match):
            resolve_device(bad)
    with pytest.raises(BadInputError, match="unknown dtype"):
        resolve_device("cpu", "int8")
    with pytest.raises(BadInputError, match="float16 is not a CPU dtype"):
        resolve_device("cpu", "float16")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="cuda requested, none found"):
            resolve_device("cuda")
        with pytest.raises(BadInputError, match="cuda:1 requested, none found"):
            Model.load(None, device="cuda:1")

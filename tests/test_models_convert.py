"""GGUF -> safetensors conversion cache: faithful weights, re-tying, atomicity, checksums, schema refusal.

Every test builds its own tiny Qwen2-style GGUF with the ``gguf`` package (no download, < 1 s).
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

from kvmas.models.convert import (
    MANIFEST,
    SCHEMA_VERSION,
    convert_gguf,
    read_manifest,
    gguf_tensor_table,
    read_gguf_tensor,
    retie_embeddings,
    tie_source,
    verify_cache,
)
from kvmas.errors import CacheCorruptError, KvmasError, SchemaVersionError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path, *, tie: bool = False, seed: int = 0, rope_theta: float = 1e6, emb_f16: bool = False):
    """Write a tiny random Qwen2 model (fp32 tensors, byte-level BPE tokenizer) as GGUF; return the HF model.

    With ``tie=False`` the file stores a separate ``output.weight``, as the Qwen GGUFs do; ``emb_f16`` stores
    the embedding at lower precision than the output matrix (as Q5_0 vs Q8_0 there).
    """
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["h e", "l l", "Ġ t"]
    tokens = list(bytes_to_unicode().values()) + ["he", "ll", "Ġt"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    vocab = len(tokens)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, rope_theta=rope_theta, initializer_range=0.5, rms_norm_eps=1e-6)
    hf = Qwen2ForCausalLM(cfg).float().eval()
    if not tie:  # a distinct output matrix, like a re-quantised copy of the embedding
        with torch.no_grad():
            hf.lm_head.weight.copy_(hf.model.embed_tokens.weight + 0.01 * torch.randn_like(hf.lm_head.weight))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 3)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    for key, value in hf.state_dict().items():
        if tie and key == "lm_head.weight":
            continue
        dtype = np.float16 if emb_f16 and key == "model.embed_tokens.weight" else np.float32
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), value.numpy().astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def load_dir(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    hf = write_tiny_gguf(path)
    return path, hf


def test_conversion_is_faithful_and_writes_a_manifest(tiny_gguf, tmp_path):
    path, ref = tiny_gguf
    out = tmp_path / "models" / "tiny"
    manifest = convert_gguf(path, out, name="tiny")
    tok, hf = load_dir(out)
    got = hf.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(got[key], value), key
    assert not manifest.retied and not manifest.tied and manifest.dtype == "float32"
    assert manifest.schema_version == SCHEMA_VERSION and "model.safetensors" in manifest.files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and "quantization_config" not in cfg  # explicit for transformers 4.x readers
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False).startswith("<|im_start|>")
    assert tok.decode(tok.encode("hello the")) == "hello the"
    verify_cache(out, full=True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_retie_uses_the_embedding_and_drops_the_output_matrix(tiny_gguf, tmp_path):
    from safetensors import safe_open

    path, ref = tiny_gguf
    out = tmp_path / "tied"
    assert tie_source(path) == "embedding"  # equal precision: keep the embedding
    manifest = convert_gguf(path, out, name="tiny", retie=True)
    assert manifest.retied and manifest.tied and manifest.tied_to == "embedding"
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert "lm_head.weight" not in fh.keys()
    _, hf = load_dir(out)
    assert hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, ref.model.embed_tokens.weight)
    assert manifest.params == sum(p.numel() for p in ref.parameters()) - ref.lm_head.weight.numel()
    ids = torch.tensor([[5, 70, 80, 90, 100]])
    with torch.no_grad():
        hidden = ref.model(ids).last_hidden_state
        expect = hidden @ ref.model.embed_tokens.weight.T
        assert torch.allclose(hf(ids).logits, expect, atol=1e-5)
        assert not torch.allclose(ref(ids).logits, expect, atol=1e-3)  # the untied GGUF head really differed


def test_retie_keeps_the_higher_precision_copy(tmp_path):
    path = tmp_path / "mixed.gguf"
    ref = write_tiny_gguf(path, emb_f16=True)
    table = gguf_tensor_table(path)
    assert table["token_embd.weight"] == (1, (64, len(SPECIALS) + 259))  # F16, GGUF dim order
    assert table["output.weight"][0] == 0  # F32
    assert torch.equal(read_gguf_tensor(path, "output.weight"), ref.lm_head.weight)
    assert torch.equal(read_gguf_tensor(path, "token_embd.weight"), ref.model.embed_tokens.weight.half().float())
    assert tie_source(path) == "output"
    out = tmp_path / "tied"
    manifest = convert_gguf(path, out, name="tiny", retie=True)
    assert manifest.retied and manifest.tied_to == "output"
    _, hf = load_dir(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.model.embed_tokens.weight, ref.lm_head.weight)  # the fp32 copy won over the fp16 one


def test_tie_source_without_an_output_matrix(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tie=True)
    assert tie_source(path) is None and "output.weight" not in gguf_tensor_table(path)
    with pytest.raises(CacheCorruptError, match="not a GGUF"):
        gguf_tensor_table(_write(tmp_path / "x.bin", b"nope" * 10))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_retie_on_an_already_tied_model_is_a_no_op():
    from kvmas.testing import tiny_hf_model

    hf = tiny_hf_model("qwen", tie=True)
    assert retie_embeddings(hf) is False
    untied = tiny_hf_model("qwen", tie=False)
    head = untied.lm_head.weight.detach().clone()
    assert retie_embeddings(untied, keep="output") is True
    assert untied.lm_head.weight is untied.model.embed_tokens.weight
    assert torch.equal(untied.model.embed_tokens.weight, head)


def test_bf16_storage_loads_as_fp32(tiny_gguf, tmp_path):
    from safetensors import safe_open

    path, ref = tiny_gguf
    out = tmp_path / "bf16"
    manifest = convert_gguf(path, out, name="tiny", bf16=True)
    assert manifest.dtype == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    _, hf = load_dir(out)
    assert hf.model.embed_tokens.weight.dtype == torch.float32
    assert torch.allclose(hf.model.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=1e-2, atol=1e-2)


def test_crash_mid_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    path, _ = tiny_gguf
    out = tmp_path / "models" / "tiny"

    def crash(self, *a, **k):  # weights are already written when the tokenizer is saved
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf(path, out, name="tiny")
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_crash_while_replacing_keeps_the_old_cache(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    path, _ = tiny_gguf
    out = tmp_path / "tiny"
    convert_gguf(path, out, name="tiny")
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        convert_gguf(path, out, name="tiny", bf16=True)
    assert verify_cache(out, full=True).dtype == "float32"
    assert (out / "model.safetensors").read_bytes() == before


def test_disk_full_is_a_clear_error_and_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    path, _ = tiny_gguf
    out = tmp_path / "models" / "tiny"

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(KvmasError, match="disk full"):
        convert_gguf(path, out, name="tiny")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_leftovers_of_a_killed_run_are_ignored_then_cleaned(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "tiny"
    stale = tmp_path / ".tmp-tiny-99999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    with pytest.raises(CacheCorruptError):
        verify_cache(stale)  # no manifest: never a usable cache
    convert_gguf(path, out, name="tiny")
    assert not stale.exists()


def test_corruption_is_detected_by_checksum(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "tiny"
    convert_gguf(path, out, name="tiny")
    weights = out / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as fh:  # flip one byte deep inside the tensors, same size
        fh.seek(st.st_size - 100)
        byte = fh.read(1)
        fh.seek(st.st_size - 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CacheCorruptError, match="sha256"):
        verify_cache(out)  # mtime changed: re-hashed
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime back...
    with pytest.raises(CacheCorruptError, match="sha256"):
        verify_cache(out, full=True)  # ...a full check catches it
    with open(weights, "r+b") as fh:
        fh.truncate(st.st_size - 1)
    with pytest.raises(CacheCorruptError, match="failed verification"):
        verify_cache(out)  # marked damaged by the failures above
    with pytest.raises(CacheCorruptError, match="bytes"):
        verify_cache(out, full=True)


def test_touched_but_intact_file_is_rehashed_once(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "tiny"
    convert_gguf(path, out, name="tiny")
    os.utime(out / "config.json", ns=(1, 1))
    manifest = verify_cache(out)
    assert manifest.stamps["config.json"] == 1
    assert read_manifest(out).stamps["config.json"] == 1


def test_newer_schema_is_refused_and_not_overwritten(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "tiny"
    out.mkdir()
    newer = {"kind": "kvmas-model-cache", "schema_version": SCHEMA_VERSION + 1, "whatever": True}
    (out / MANIFEST).write_text(json.dumps(newer))
    with pytest.raises(SchemaVersionError, match="newer kvmas"):
        read_manifest(out)
    with pytest.raises(SchemaVersionError):
        convert_gguf(path, out, name="tiny")
    assert json.loads((out / MANIFEST).read_text()) == newer
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


def test_foreign_manifest_is_not_ours(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheCorruptError):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "something-else", "schema_version": 1}))
    with pytest.raises(CacheCorruptError, match="not a kvmas"):
        read_manifest(tmp_path)


def test_a_failed_verification_sticks_until_a_full_one_passes(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "tiny"
    convert_gguf(path, out, name="tiny")
    weights = out / "model.safetensors"
    st = weights.stat()
    good = weights.read_bytes()
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    weights.write_bytes(bytes(bad))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the flip hides behind the old mtime
    verify_cache(out)  # the quick check trusts the mtime...
    with pytest.raises(CacheCorruptError, match="sha256"):
        verify_cache(out, full=True)  # ...the full one does not
    for _ in range(2):  # and from now on neither does the quick one
        with pytest.raises(CacheCorruptError, match="failed verification"):
            verify_cache(out)
    assert "sha256" in read_manifest(out).damaged
    weights.write_bytes(good)  # repaired: a full verification clears the mark
    assert verify_cache(out, full=True).damaged == ""
    assert verify_cache(out).damaged == "" and read_manifest(out).damaged == ""


def test_cache_lock_excludes_other_processes_and_threads_and_nests_in_one(tmp_path):
    import subprocess
    import sys
    import threading
    import time

    from kvmas.models.convert import cache_lock

    target = tmp_path / "m"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom kvmas.models.convert import cache_lock\n"
                              f"with cache_lock({str(target)!r}):\n    print('held', flush=True); time.sleep(1.5)"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with cache_lock(target), cache_lock(target):  # re-entrant in this thread
        waited = time.monotonic() - t0
    child.wait(timeout=30)
    assert waited > 0.5  # it waited for the other process
    order = []

    def worker(i):
        with cache_lock(target):
            order.append(("in", i))
            time.sleep(0.05)  # another thread inside now would interleave its entry here
            order.append(("out", i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o[0] for o in order] == ["in", "out"] * 4
    assert [order[k][1] for k in range(0, 8, 2)] == [order[k][1] for k in range(1, 8, 2)]

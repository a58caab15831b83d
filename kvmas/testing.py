"""Tiny random models for tests and examples: no download, built from a config in a second.

>>> from kvmas.testing import tiny_model
>>> m = tiny_model("llama")
>>> m.decode(m.encode("hi there"))
'hi there'
"""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII + chat specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_hf_model(arch: str = "llama", *, seed: int = 0, tie: bool = False, vocab_size: int = 128,
                  layers: int = 2, init: float = 0.5):
    """A randomly initialised Llama- or Qwen2-style causal LM (fp32, eval mode).

    ``init=0.5`` makes position mistakes visible in the logits (small inits hide them).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=init, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(head_dim=16, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen":
        cfg = Qwen2Config(**common)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny arch {arch!r} (llama|qwen)")
    return model.float().eval()


def save_tiny_model(directory, arch: str = "llama", *, seed: int = 0):
    """Save a tiny random model and the char tokenizer as a local HF directory (what ``--model DIR`` loads).

    >>> import tempfile
    >>> from kvmas.agents.model import Model
    >>> Model.load(str(save_tiny_model(tempfile.mkdtemp()))).fingerprint.num_layers
    2
    """
    from pathlib import Path

    d = Path(directory)
    tok = tiny_tokenizer()
    tiny_hf_model(arch, seed=seed, vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_model(arch: str = "llama", *, seed: int = 0, tie: bool = False, layers: int = 2, init: float = 0.5,
               dtype=None, device=None):
    """A :class:`kvmas.agents.model.Model` around a tiny random HF model and the char tokenizer
    (``dtype``/``device``: a torch dtype and device to move it to; default float32 on the CPU)."""
    from kvmas.agents.model import Model

    tok = tiny_tokenizer()
    hf = tiny_hf_model(arch, seed=seed, tie=tie, vocab_size=len(tok), layers=layers, init=init)
    if dtype is not None or device is not None:
        hf = hf.to(device=device, dtype=dtype)
    return Model.from_hf(hf, tok, name=f"tiny-{arch}-s{seed}{'-tied' if tie else ''}")

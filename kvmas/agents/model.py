"""The shared model: one instance per process, used by every agent.

>>> from kvmas.testing import tiny_model
>>> m = tiny_model("qwen")
>>> len(m.encode("abc")), m.fingerprint.num_layers
(3, 2)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from kvmas.agents.engine import Engine
from kvmas.agents.fingerprint import ModelFingerprint
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError, ContextOverflowError
from kvmas.models.convert import quiet_transformers
from kvmas.models.install import model_dir
from kvmas.models.registry import default_model
from kvmas.paths import kvmas_home

T = TypeVar("T")
log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_LOADED: dict[str, "Model"] = {}
_DERIVED_LOCK = threading.RLock()  # re-entrant: one derived object may be made from another


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None = None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and dtype a model loads with; ``device`` None reads ``$KVMAS_DEVICE`` (default ``auto``).

    >>> resolve_device("cpu")
    (device(type='cpu'), torch.float32)
    >>> resolve_device("tpu")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    kvmas.errors.BadInputError: unknown device 'tpu' (auto, cpu, cuda, cuda:N)
    """
    name = (device or os.environ.get("KVMAS_DEVICE") or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise BadInputError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"{name} requested, none found (torch {torch.__version__} sees no CUDA device)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise BadInputError(f"{name} requested, this machine has {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else \
            torch.float16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise BadInputError(f"unknown dtype {dtype!r} ({', '.join(['auto', *DTYPES])})")
    if dev.type == "cpu" and dt == torch.float16:
        raise BadInputError("float16 is not a CPU dtype here (use float32 or bfloat16)")
    if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise BadInputError(f"{torch.cuda.get_device_name(dev)} cannot run bfloat16 (use float16 or float32)")
    return dev, dt


def _weights_digest(hf) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(hf.config.to_dict(), sort_keys=True, default=str).encode())
    # A strided sample of every tensor: cheap, and any re-quantisation or retie changes it.
    for name, p in sorted(hf.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _rope_info(cfg) -> dict[str, Any]:
    rope = getattr(cfg, "rope_parameters", None) or {}
    out = {k: v for k, v in dict(rope).items() if isinstance(v, (int, float, str, bool))}
    theta = getattr(cfg, "rope_theta", None)
    if theta is not None:
        out.setdefault("rope_theta", theta)
    return out


class Model:
    """A causal LM plus its tokenizer, fingerprint and small forward helpers.

    ``hf`` is the transformers model (fp32, eval); ``tokenizer`` a fast tokenizer with a chat template.
    """

    def __init__(self, hf, tokenizer, name: str, source: str | None = None):
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        cfg = hf.config
        heads = cfg.num_attention_heads
        self.fingerprint = ModelFingerprint(
            name=name,
            revision=_weights_digest(hf),
            dtype=str(next(hf.parameters()).dtype).replace("torch.", ""),
            arch=type(hf).__name__,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            rope=_rope_info(cfg),
        )
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self._derived: dict[str, Any] = {}
        self.engine = Engine(self)  # every forward of this model goes through it (batches concurrent runs)
        self._tok_lock = threading.RLock()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf, tokenizer, name: str = "custom") -> "Model":
        """Wrap an already-built transformers model and tokenizer (tests, notebooks)."""
        return cls(hf, tokenizer, name=name)

    @classmethod
    def load(cls, name_or_path: str | None = None, *, threads: int | None = None, device: str | None = None,
             dtype: str = "auto") -> "Model":
        """Load a model once per process: a registry name, a local HF dir, or a hub id; ``None`` is the default
        (``$KVMAS_MODEL`` or ``qwen2.5-coder-0.5b``, installed and verified on first use).

        ``device``: ``auto`` (CUDA when present, else CPU; the default, or ``$KVMAS_DEVICE``), ``cpu``, ``cuda``,
        ``cuda:N``. ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``,
        ``float16``. A registry model is installed and verified on first use.
        """
        dev, dt = resolve_device(device, dtype)
        if threads:
            torch.set_num_threads(threads)
        with _LOCK:
            wanted = (name_or_path or default_model(), str(dev), str(dt))
            if wanted in _LOADED:
                return _LOADED[wanted]
            directory, name = model_dir(name_or_path)
            key = (str(Path(directory).resolve()), str(dev), str(dt))
            if key in _LOADED:  # the same model under another name (default vs its registry name)
                _LOADED[wanted] = _LOADED[key]
                return _LOADED[key]
            from transformers import AutoModelForCausalLM, AutoTokenizer

            t0 = time.perf_counter()
            extra = {"attn_implementation": "sdpa"} if dev.type == "cuda" else {}
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(directory)
                hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dt, **extra).to(dev)
            model = cls(hf, tok, name=name, source=str(directory))
            log.debug("loaded %s from %s on %s (%s) in %.1f s", name, directory, dev, dt, time.perf_counter() - t0)
            _LOADED[key] = _LOADED[wanted] = model
            return model

    @property
    def device(self) -> torch.device:
        """Where the weights live; every tensor a state, agent or scorer makes follows it."""
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    # -- text helpers ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise BadInputError(f"text to encode must be a string, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (argv, a file read leniently)
            raise BadInputError("text is not valid UTF-8 (it holds undecodable bytes)") from None
        with self._tok_lock:  # a fast tokenizer used from several threads at once can raise "Already borrowed"
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's chat template (a plain fallback when it has none)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    @property
    def turn_end(self) -> str:
        """What the chat template writes right after an assistant message (Qwen: ``"<|im_end|>\\n"``).

        A speaker whose message stays in the KV cache closes its turn with it, so the next agent reads the
        same tokens a chat transcript of the conversation would hold.
        """
        return self.derived("turn_end", self._turn_end)

    def _turn_end(self) -> str:
        mark = "kvmas-reply-mark"
        text = self.chat_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": mark}], add_generation_prompt=False)
        at = text.rfind(mark)
        return text[at + len(mark):] if at >= 0 else ""

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end a reply (computed once: reading a large vocabulary costs ~0.3 s)."""
        return list(self.derived("eos_ids", self._eos_ids))

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.hf.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(i) for i in src)
        for tok in ("<|im_end|>", "<|endoftext|>", "<|end|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok) if tok in self.tokenizer.get_vocab() else None
            if isinstance(tid, int):
                ids.add(tid)
        return tuple(sorted(ids))

    def check_fits(self, n_tokens: int, what: str = "prompt") -> None:
        if n_tokens > self.max_context:
            raise ContextOverflowError(
                f"{what} needs {n_tokens} positions but {self.name} has a context of {self.max_context}"
            )

    # -- model helpers --------------------------------------------------------------------
    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.hf.get_input_embeddings()

    @property
    def ties_embeddings(self) -> bool:
        out = self.hf.get_output_embeddings()
        return out is not None and out.weight.data_ptr() == self.embedding.weight.data_ptr()

    @torch.no_grad()
    def embed_text(self, text: str) -> torch.Tensor:
        """Mean-pooled last-layer hidden state of ``text`` (fp32, shape [hidden]); used for retrieval."""
        ids = self.encode(text)[: self.max_context] or [self.tokenizer.eos_token_id or 0]
        out = self.hf.model(torch.tensor([ids], device=self.device))
        return out.last_hidden_state[0].mean(0).float()

    @torch.no_grad()
    def score_continuations(self, prefix: str | list[int], continuations: list[str | list[int]]) -> list[float]:
        """Total log-prob of each continuation after ``prefix``; the prefix is prefilled once and its KV reused."""
        state = LatentState.empty(self).extend(prefix, agent="scorer", role="scorer")
        return state.score(continuations)

    def require_same(self, fp: ModelFingerprint, what: str = "state") -> None:
        self.fingerprint.check(fp, what)

    def derived(self, key: str, make: Callable[[], T]) -> T:
        """A per-model derived object (realignment matrix, skill prefix states), made once by ``make()``."""
        with _DERIVED_LOCK:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]

    def derived_dir(self) -> Path:
        """Per-model folder in the data dir for derived artefacts saved to disk (e.g. the realignment matrix)."""
        d = kvmas_home() / "derived" / self.fingerprint.key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def __repr__(self) -> str:
        return f"Model({self.name!r}, layers={self.fingerprint.num_layers}, key={self.fingerprint.key})"

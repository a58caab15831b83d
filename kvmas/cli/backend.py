"""Where a command's LLM runs: in this process (``--backend local``, the default) or behind an
OpenAI-compatible endpoint (``--backend openai --base-url URL``: text-mode primitives only).

>>> open_backend("openai", "single", base_url="http://127.0.0.1:8000/v1").name
'openai:single'
"""

from __future__ import annotations

import os

import typer

from kvmas.errors import BadInputError

BACKEND = typer.Option("local", "--backend", help="local | openai (text-mode primitives on an OpenAI-compatible "
                       "endpoint; --model names the endpoint's model)")
BASE_URL = typer.Option(None, "--base-url", help="the endpoint of --backend openai, e.g. http://127.0.0.1:8000/v1 "
                        "(key: $OPENAI_API_KEY or $KVMAS_API_KEY)")


def open_backend(backend: str, model: str | None, *, base_url: str | None = None, device: str | None = None,
                 dtype: str = "auto"):
    """A loaded local :class:`~kvmas.agents.model.Model`, or a :class:`~kvmas.agents.remote.RemoteModel`."""
    if backend == "local":
        if base_url:
            raise BadInputError("--base-url goes with --backend openai")
        from kvmas.agents.model import Model

        return Model.load(model, device=device, dtype=dtype)
    if backend != "openai":
        raise BadInputError(f"unknown backend {backend!r} (local | openai)")
    if not base_url:
        raise BadInputError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    from kvmas.agents.remote import RemoteModel

    key = os.environ.get("OPENAI_API_KEY") or os.environ.get("KVMAS_API_KEY")
    return RemoteModel(base_url, model or "", api_key=key)

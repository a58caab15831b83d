"""Text mode on any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp server, ``kvmas serve``).

:class:`RemoteModel` stands where a :class:`~kvmas.agents.model.Model` would: the text-mode primitives run
unchanged on it. Its states are :class:`Conversation` values (chat messages per row, no KV): an agent's fresh
turn becomes ``[system, user]`` messages and its speech one chat-completions request per row (rows in
parallel, so a batching server runs them as rows too). Latent and kv hand-offs need the model's KV in this
process, so every state operation they use (think, a continuation turn, merge, score, drop) refuses with a
:class:`RemoteTextOnly` error saying so.

The trace counts what the endpoint reports: each request's ``usage.prompt_tokens`` as ``prefilled`` and its
``usage.completion_tokens`` as ``generated``, both on the speak step that sent the request (the read step
before it computes nothing here: the endpoint prefills the prompt when it is asked to answer it). What the
endpoint reused from its own prefix cache is not reported by the OpenAI usage fields and is not counted.

>>> RemoteModel("http://127.0.0.1:9/v1", "single").name
'openai:single'
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Sequence

from kvmas.agents.state import Segment, Speech
from kvmas.errors import BadInputError, KvmasError

TEXT_ONLY = ("latent and kv hand-offs need the model's KV cache in this process: the openai backend runs the "
             "text-mode primitives only (single, text:review, text:vote, text:plan)")


class RemoteTextOnly(BadInputError):
    """A latent or kv operation asked of a remote (text-only) model."""


class RemoteError(KvmasError):
    """The endpoint could not be reached or answered with an error."""


class ChatText(str):
    """A rendered chat turn that keeps its messages (what the endpoint is sent). A slice of it is a plain
    ``str``: a continuation turn, which a remote conversation cannot take."""

    messages: tuple[dict, ...]
    generation_prompt: bool

    def __new__(cls, messages: Sequence[dict], generation_prompt: bool):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if generation_prompt
                                                                               else "")
        obj = super().__new__(cls, text)
        obj.messages, obj.generation_prompt = tuple(dict(m) for m in messages), generation_prompt
        return obj


class _NoBatch:
    """A remote model's forwards run on the endpoint: nothing to batch here (the runs' threads still
    overlap their requests, and a batching endpoint batches them)."""

    forwards = 0

    def is_member(self) -> bool:
        return False

    def member(self):
        return nullcontext()


@dataclass(frozen=True)
class _Fingerprint:
    backend: str
    base_url: str
    model: str

    @property
    def key(self) -> str:
        return f"{self.backend}:{self.base_url}:{self.model}"

    def model_dump(self) -> dict:
        return {"backend": self.backend, "base_url": self.base_url, "model": self.model}


class RemoteModel:
    """A model behind ``base_url`` (``.../v1``) named ``model`` there; ``api_key`` sent as a bearer token."""

    remote = True  # LatentState.empty gives this model's own (Conversation) states

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 600.0):
        if not base_url.startswith(("http://", "https://")):
            raise BadInputError(f"--base-url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise BadInputError("the openai backend needs the endpoint's model name (--model)")
        self.base_url, self.model, self.api_key, self.timeout = base_url.rstrip("/"), model, api_key, timeout
        self.name = f"openai:{model}"
        self.fingerprint = _Fingerprint("openai", self.base_url, model)
        self.engine = _NoBatch()

    def __repr__(self) -> str:
        return f"RemoteModel({self.base_url!r}, {self.model!r})"

    # -- what the run lifecycle asks of a model ------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes: an upper bound of the tokens, for sizing only (the endpoint's tokenizer is its own)."""
        return list(text.encode("utf-8"))

    def check_fits(self, n_tokens: int, what: str = "prompt") -> None:
        """The endpoint enforces its own context length (its error is reported as it comes)."""

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatText:
        return ChatText(messages, add_generation_prompt)

    def score_continuations(self, *_args, **_kw):
        raise RemoteTextOnly("scoring continuations needs the model's logits in this process (the organizer's "
                             "choice, early stops, loglik): " + TEXT_ONLY)

    def empty_state(self, rows: int = 1) -> "Conversation":
        return Conversation(self, tuple(() for _ in range(rows)))

    # -- the endpoint --------------------------------------------------------------------------------
    def complete(self, messages: Sequence[dict], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: Sequence[str] = ()) -> tuple[str, int, int]:
        """One chat completion: (text, prompt_tokens, completion_tokens)."""
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed}
        if stop:
            body["stop"] = list(stop)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise RemoteError(f"{self.base_url} answered {exc.code}: {_error_message(exc)}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RemoteError(f"cannot reach {self.base_url}: {getattr(exc, 'reason', exc)}") from exc
        except ValueError as exc:
            raise RemoteError(f"{self.base_url} sent a reply that is not JSON") from exc
        try:
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RemoteError(f"{self.base_url} sent a reply without choices[0].message.content") from exc


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        err = json.loads(exc.read().decode("utf-8")).get("error", {})
        return str(err.get("message") or err)[:300]
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


@dataclass(frozen=True)
class Conversation:
    """A remote model's state: per row, the chat messages so far (no KV). Only what text mode does to a state
    is defined: a fresh turn per row (``extend``), ``speak``, ``fork`` of an empty state, ``select``."""

    model: RemoteModel
    messages: tuple[tuple[dict, ...], ...]
    segments: tuple[Segment, ...] = ()

    shared_cols = 0

    @property
    def rows(self) -> int:
        return len(self.messages)

    @property
    def length(self) -> int:
        """Messages in the longest row (0: nothing said yet)."""
        return max((len(m) for m in self.messages), default=0)

    def segment_ids(self) -> list[int]:
        return [s.id for s in self.segments]

    def _next_id(self) -> int:
        return max(self.segment_ids(), default=-1) + 1

    def extend(self, content, *, agent: str = "user", role: str = "user", kind: str = "prompt") -> "Conversation":
        """A fresh turn per row (a :class:`ChatText` with the generation prompt, one for all rows or one each)."""
        turns = list(content) if isinstance(content, list) else [content] * self.rows
        if self.length or len(turns) != self.rows or kind != "prompt" or not all(
                isinstance(t, ChatText) and t.generation_prompt for t in turns):
            raise RemoteTextOnly(TEXT_ONLY)
        seg = Segment(id=self._next_id(), agent=agent, role=role, kind="prompt", start=0, length=0, rows=self.rows,
                      token_ids=[[] for _ in turns], text=[str(t) for t in turns])
        return replace(self, messages=tuple(t.messages for t in turns), segments=self.segments + (seg,))

    def speak(self, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
              stop: Sequence[str] = (), agent: str = "agent", role: str = "agent", min_new_tokens: int = 0,
              on_token=None) -> Speech:
        """One request per row, in parallel; the replies become assistant messages. Token ids are unknown here:
        each row's ``token_ids`` holds ``-1`` once per token the endpoint says it decoded; the speech's
        ``prefilled`` is the prompt tokens the endpoint says it read, over the rows."""
        if not self.length:
            raise BadInputError("speak needs a turn to answer (extend it first)")
        if min_new_tokens:
            raise RemoteTextOnly("min_new_tokens needs the model's logits in this process")

        def one(msgs):
            return self.model.complete(msgs, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       seed=seed, stop=stop)

        if self.rows == 1:
            replies = [one(self.messages[0])]
        else:
            with ThreadPoolExecutor(max_workers=self.rows, thread_name_prefix="kvmas-remote") as pool:
                replies = list(pool.map(one, self.messages))
        texts = [t for t, _, _ in replies]
        ids = [[-1] * n for _, _, n in replies]
        seg = Segment(id=self._next_id(), agent=agent, role=role, kind="generated", start=0, length=0,
                      rows=self.rows, token_ids=ids, text=texts)
        after = replace(self, messages=tuple(m + ({"role": "assistant", "content": t},)
                                             for m, t in zip(self.messages, texts)),
                        segments=self.segments + (seg,))
        return Speech(texts=texts, token_ids=ids, state=after, prefilled=sum(p for _, p, _ in replies))

    def fork(self, k: int) -> "Conversation":
        if k < 1:
            raise BadInputError(f"fork needs k >= 1, got {k}")
        return replace(self, messages=tuple(m for m in self.messages for _ in range(k)))

    def select(self, rows: Sequence[int]) -> "Conversation":
        return replace(self, messages=tuple(self.messages[i] for i in rows))

    # -- what only a local KV cache can do ----------------------------------------------------------
    def _refuse(self, *_args, **_kw):
        raise RemoteTextOnly(TEXT_ONLY)

    think = score = drop = crop = merge_rows = next_logprobs = save = _refuse

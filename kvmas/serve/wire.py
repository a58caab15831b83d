"""The OpenAI chat-completions wire format: the request kvmas reads, the responses and stream chunks it writes.

A request is one question: its last message is the user's, optionally after one system message (the run's
system prompt). ``usage`` follows OpenAI (``prompt_tokens`` = positions prefilled, ``completion_tokens`` =
tokens decoded by every agent of the run, ``total_tokens`` their sum) with the kvmas counts under
``usage.kvmas``; the response's ``kvmas`` key names the run's trace id and method.

>>> req = ChatRequest.model_validate({"model": "single", "messages": [{"role": "user", "content": "2+2?"}]})
>>> req.question(), req.system()
('2+2?', None)
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmas.errors import BadInputError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadInputError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(BaseModel):
    """The fields kvmas reads; others an OpenAI client may send (``user``, ``logprobs`` false, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    stop: str | list[str] | None = None

    def check(self) -> "ChatRequest":
        """What the primitives cannot do is refused here, before anything runs."""
        if self.n not in (None, 1):
            raise BadInputError("n must be 1 (a run gives one answer)")
        if self.stop:
            raise BadInputError("stop strings are not supported")
        roles = [m.role for m in self.messages]
        if roles[-1] != "user" or roles.count("user") != 1 or any(r not in ("system", "user") for r in roles) \
                or roles.count("system") > 1:
            raise BadInputError("kvmas runs one question per request: send one user message, optionally after "
                                "one system message")
        if not self.question().strip():
            raise BadInputError("empty question")
        return self

    def question(self) -> str:
        return self.messages[-1].text()

    def system(self) -> str | None:
        return next((m.text() for m in self.messages if m.role == "system"), None)

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def usage_json(result) -> dict[str, Any]:
    u = result.trace.usage
    return {"prompt_tokens": u.prefilled, "completion_tokens": u.generated,
            "total_tokens": u.prefilled + u.generated,
            "kvmas": {"prefilled": u.prefilled, "reused": u.reused, "latent": u.latent, "generated": u.generated,
                      "computed": u.computed}}


def kvmas_json(result) -> dict[str, Any]:
    return {"trace_id": result.trace.run_id, "method": result.trace.method, "wall_s": round(result.trace.wall_s, 4)}


def finish_reason(result, budget: int) -> Literal["stop", "length"]:
    """``length`` when the answering speech used the whole budget (it may have been cut off)."""
    speaks = [s for s in result.trace.steps if s.action == "speak"]
    tokens = (speaks[-1].meta.get("tokens") or [0]) if speaks else [0]
    return "length" if max(tokens) >= budget else "stop"


def completion(cid: str, model: str, result, budget: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "finish_reason": finish_reason(result, budget), "logprobs": None}],
            "usage": usage_json(result), "kvmas": kvmas_json(result)}


def chunk(cid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
          **extra: Any) -> str:
    """One server-sent event of a streamed completion (``delta`` None: a usage-only chunk, no choices)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}

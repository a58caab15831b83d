"""``kvmas serve``: an OpenAI-compatible HTTP API over the primitives (FastAPI; the ``serve`` extra).

``POST /v1/chat/completions`` runs the method the ``model`` field names on the server's LLM (plain or
streamed as server-sent events: the answering agent's tokens as they are decoded), ``GET /v1/models`` lists
the methods, ``GET /v1/traces/{id}`` returns a run's trace, ``GET /health`` says the server is up (no key
needed). Concurrent requests run as rows of one batch (:mod:`kvmas.serve.scheduler`). Every error is an
OpenAI-style JSON body ``{"error": {"message", "type", "code"}}``.

>>> from kvmas.testing import tiny_model
>>> app = create_app(tiny_model(), ServeConfig())
>>> sorted(r.path for r in app.routes if r.path.startswith("/v1"))
['/v1/chat/completions', '/v1/models', '/v1/traces/{trace_id}']
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmas.errors import BadInputError, ContextOverflowError, KvmasError, OutputError
from kvmas.paths import loads_json
from kvmas.serve import wire
from kvmas.serve.methods import Methods, UnknownMethod
from kvmas.serve.scheduler import Cancelled, QueueFull, Scheduler
from kvmas.serve.traces import TraceNotFound, TraceStore

log = logging.getLogger("kvmas.serve")
POLL_S = 0.1  # how often a waiting request looks for its client having gone


@dataclass
class ServeConfig:
    """Limits and options of a server. ``max_tokens``: the decode budget per speaking agent when a request
    sends none; ``max_tokens_limit``: the most a request may ask for (more is a 400)."""

    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 64
    collect_ms: float = 5.0
    max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_request_bytes: int = 1 << 20
    trace_dir: str | Path | None = None
    pipelines: dict[str, Any] = field(default_factory=dict)  # name -> PipelineSpec
    pool: Any = None  # the KnowledgePool ``auto`` chooses from (None: auto not served)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(wire.error_body(exc.message, exc.type, exc.code), status_code=exc.status, headers=headers)


def _api_error(exc: BaseException) -> ApiError:
    """A kvmas error as the HTTP error a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownMethod):
        return ApiError(404, str(exc), code="model_not_found")
    if isinstance(exc, TraceNotFound):
        return ApiError(404, str(exc), code="trace_not_found")
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", "queue_full")
    if isinstance(exc, OutputError):  # the server could not write (a trace): not the client's fault
        return ApiError(500, str(exc), "server_error", "output_error")
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (BadInputError, KvmasError)):
        return ApiError(400, str(exc), code="invalid_request")
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")


def _watched(future) -> asyncio.Future:
    """The job's future on this loop; its error counts as seen even when the client left before it came."""
    done = asyncio.wrap_future(future)
    done.add_done_callback(lambda f: f.cancelled() or f.exception())
    return done


def create_app(model, config: ServeConfig | None = None) -> FastAPI:
    """The API over ``model`` (a loaded :class:`~kvmas.agents.model.Model`) with ``config``'s limits."""
    config = config or ServeConfig()
    methods = Methods(pipelines=dict(config.pipelines), pool=config.pool)
    store = TraceStore(config.trace_dir)
    key = config.api_key.encode("utf-8") if config.api_key else None
    sched: dict[str, Scheduler] = {}

    @asynccontextmanager
    async def lifespan(_app):
        sched["s"] = app.state.scheduler = Scheduler(model.engine, max_batch=config.max_batch,
                                                     max_queue=config.max_queue, collect_s=config.collect_ms / 1000)
        yield
        sched.pop("s").close()

    app = FastAPI(title="kvmas", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model, app.state.config, app.state.methods = model, config, methods

    @app.exception_handler(ApiError)
    async def _on_api_error(_request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_request, exc: StarletteHTTPException):
        return _error_response(ApiError(exc.status_code, str(exc.detail), code="not_found"
                                        if exc.status_code == 404 else None))

    @app.exception_handler(KvmasError)
    async def _on_kvmas_error(_request, exc: KvmasError):
        return _error_response(_api_error(exc))


    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           "authentication_error", "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        return bytes(body)

    def parse(body: bytes) -> wire.ChatRequest:
        try:
            data = loads_json(body, "request body")
        except BadInputError as exc:
            raise ApiError(400, str(exc), code="invalid_json") from exc
        try:
            req = wire.ChatRequest.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise ApiError(400, f"{where}: {err['msg']}", code="invalid_request") from exc
        try:
            return req.check()
        except BadInputError as exc:
            raise ApiError(400, str(exc), code="invalid_request") from exc

    @app.get("/health")
    async def health():
        s = sched.get("s")
        return {"status": "ok", "model": model.name, "running": s.running if s else 0,
                "queued": s.waiting if s else 0}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "kvmas",
                                            "kvmas": {"llm": model.name}} for n in methods.names()]}

    @app.get("/v1/traces/{trace_id}")
    async def get_trace(trace_id: str, request: Request):
        authorize(request)
        try:
            trace = await asyncio.to_thread(store.get, trace_id)
        except TraceNotFound:
            raise
        except BadInputError as exc:
            raise ApiError(400, str(exc), code="invalid_trace_id") from exc
        return JSONResponse(trace.model_dump(mode="json"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            return await _chat(request)
        except ApiError:
            raise
        except Exception as exc:  # raised past the route, an unplanned error would end the connection unanswered
            raise _api_error(exc) from exc

    async def _chat(request: Request):
        authorize(request)
        req = parse(await read_body(request))
        budget = req.budget() if req.budget() is not None else config.max_tokens
        if not 1 <= budget <= config.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be in 1..{config.max_tokens_limit}, got {budget}",
                           code="budget_exceeded")
        runner = methods.resolve(req.model, max_new_tokens=budget, temperature=req.temperature or 0.0,
                                 top_p=req.top_p if req.top_p is not None else 1.0)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        question, system, seed = req.question(), req.system(), req.seed or 0
        holder: dict[str, Any] = {}

        def listener(agent: str, text: str, final: bool) -> None:
            holder["job"].check()  # raising stops the run: the client has gone
            if req.stream and final and text:
                loop.call_soon_threadsafe(deltas.put_nowait, text)

        def run():
            return runner.run(model, question, seed=seed, listener=listener, system=system)

        job = sched["s"].submit(run, then=lambda result: store.save(result.trace))
        holder["job"] = job
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(request, job, deltas, cid, req, budget),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        done = _watched(job.future)
        try:
            while True:
                finished, _ = await asyncio.wait({done}, timeout=POLL_S)
                if finished:
                    break
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "client closed the request", code="cancelled")
            result = done.result()
        except (asyncio.CancelledError, ApiError):
            job.cancel()
            raise
        except Exception as exc:  # the run's error, as the client should see it (handled here, not re-raised)
            raise _api_error(exc) from exc
        return wire.completion(cid, req.model, result, budget)

    async def _stream(request, job, deltas: asyncio.Queue, cid: str, req: wire.ChatRequest, budget: int):
        created = int(time.time())
        done = _watched(job.future)
        sent = False
        try:
            yield wire.chunk(cid, req.model, created, {"role": "assistant", "content": ""})
            getter = None
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(deltas.get())
                await asyncio.wait({getter, done}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():  # no await between this check and the cancel below: no delta is lost
                    sent = True
                    yield wire.chunk(cid, req.model, created, {"content": getter.result()})
                    getter = None
                    continue
                if done.done():
                    getter.cancel()
                    break
                if await request.is_disconnected():
                    getter.cancel()
                    job.cancel()
                    return
            while not deltas.empty():  # deltas queued before the run ended
                sent = True
                yield wire.chunk(cid, req.model, created, {"content": deltas.get_nowait()})
            try:
                result = done.result()
            except Cancelled:
                return
            except Exception as exc:  # the stream has begun: the error is its last event
                err = _api_error(exc)
                yield f"data: {json.dumps(wire.error_body(err.message, err.type, err.code))}\n\n"
                yield "data: [DONE]\n\n"
                return
            if not sent and result.answer:  # nothing final was spoken as a stream (e.g. a majority vote)
                yield wire.chunk(cid, req.model, created, {"content": result.answer})
            yield wire.chunk(cid, req.model, created, {}, wire.finish_reason(result, budget),
                             kvmas=wire.kvmas_json(result))
            if req.include_usage:
                yield wire.chunk(cid, req.model, created, None, usage=wire.usage_json(result))
            yield "data: [DONE]\n\n"
        finally:
            if not job.future.done():
                job.cancel()

    return app

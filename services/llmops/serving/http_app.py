"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``, ``/health``.

Chat takes ``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs``, enforced by
the engine's guided decoding, and ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, answered with
``tool_calls`` (streamed as deltas); see :mod:`llmops.serving.structured`.

It calls the same :class:`ServingService` as gRPC, so validation, queueing and metrics are shared.
Streaming uses server-sent events (``data: {...}`` chunks, then ``data: [DONE]``), with a usage chunk
when ``stream_options.include_usage`` is set. Errors have OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) and HTTP statuses from the domain error
(400, 404, 413, 429 with ``Retry-After``, 503, 504). A client that disconnects aborts its generation.
Input is checked before use (:mod:`llmops.serving.http_guard`): the body's size before it is read,
then strict UTF-8, JSON and field types; a ``stream: true`` request is fully validated before its
stream starts. An unexpected error is a JSON 500 whose error id is logged with the trace.
``auth`` authenticates each ``/v1/`` request (``Authorization: Bearer <key>``, :mod:`llmops.common.auth`)
and the handlers run as the identity it returns (its tenant keys the cache and pays the rate
limits); ``None`` leaves the API open.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llmops.common.auth import acting_as
from llmops.common.errors import InvalidArgument, LLMOpsError, NotFound
from llmops.common.http_server import AuthHook
from llmops.serving.domain import (
    Completion,
    CompletionDelta,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ModelSelector,
    ModelState,
    Prompt,
    StreamEnd,
    StreamEvent,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from llmops.serving.http_guard import MAX_BODY_BYTES, Guard, error_body, error_headers, parse_body
from llmops.serving.openai_schema import ChatBody, CompletionBody, EmbeddingBody
from llmops.serving.service import ServingService

__all__ = ["AuthHook", "create_http_app", "error_body"]


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status, headers=error_headers(exc))


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _usage(u: Usage) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
    if u.cached_prompt_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    return usage


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, position = [], offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t.token, t.logprob) for t in e.top]}
            for e in entries
        ]
    }


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.openai


async def _until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; cancel it (aborting the generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def create_http_app(
    service: ServingService, *, auth: AuthHook | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app over ``service``; bodies over ``max_body_bytes`` get 413 unread."""
    app = FastAPI(
        title="llmops serving (OpenAI-compatible)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # a 404 in OpenAI's shape, not a 307 a client may not follow
    )

    @app.exception_handler(LLMOpsError)
    async def _domain_error(request: Request, exc: LLMOpsError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own refusals (no such path 404, wrong method 405) in OpenAI's shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if auth is None or not request.url.path.startswith("/v1/"):
            return await call_next(request)
        try:
            identity = await auth(request)
        except LLMOpsError as exc:
            return _error_response(exc)
        with acting_as(identity):
            return await call_next(request)

    def select(model: str) -> tuple[ModelSelector, str, str]:
        """(selector, adapter, name to report) for a served name or an adapter name (served on its
        base model); empty means the only model."""
        loaded = service.list_models()
        if not model and len(loaded) == 1:
            model = loaded[0].served_name
        if model in {m.served_name for m in loaded}:
            return ModelSelector(served_name=model), "", model
        for info in loaded:
            if any(a.name == model for a in info.adapters):
                return ModelSelector(served_name=info.served_name), model, model
        if not model:
            raise InvalidArgument("name the model", field="model")
        raise NotFound(f"the model {model!r} does not exist")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if await service.ready() else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = []
        for info in service.list_models():
            if info.state is not ModelState.READY:
                continue
            created = int(info.loaded_at.timestamp()) if info.loaded_at else 0
            data.append({"id": info.served_name, "object": "model", "created": created, "owned_by": "llmops",
                         "root": info.local_path or str(info.model or ""), "parent": None,
                         "max_model_len": info.max_model_len})  # fmt: skip
            for adapter in info.adapters:
                data.append({"id": adapter.name, "object": "model", "created": int(adapter.loaded_at.timestamp()),
                             "owned_by": "llmops", "root": adapter.local_path, "parent": info.served_name})  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionBody)
        body.check()
        selector, adapter, name = select(body.model)
        sampling = body.sampling(body.max_tokens, body.logprobs)
        request_id = body.request_id or request.headers.get("x-request-id", "")
        requests = [
            GenerationRequest(
                model=selector,
                prompt=Prompt(text=p) if isinstance(p, str) else Prompt(token_ids=p),
                sampling=sampling,
                adapter=adapter,
                request_id=request_id,
            )
            for p in body.prompts()
        ]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            rid, events = await service.generate_stream(requests[0])
            return StreamingResponse(
                _completion_chunks(events, cid, created, name, body),
                media_type="text/event-stream",
                headers={"x-request-id": rid},
            )
        results: list[GenerationResult] = await _until_disconnected(
            request, asyncio.gather(*(service.generate(r) for r in requests))
        )
        choices = []
        for i, result in enumerate(results):
            for c in result.completions:
                choice: dict[str, Any] = {"index": i * body.n + c.index, "text": c.text, "finish_reason": _finish(c.finish_reason),
                                          "logprobs": _completion_logprobs(c.logprobs, 0) if body.logprobs is not None else None}  # fmt: skip
                if c.stop_sequence:
                    choice["stop_reason"] = c.stop_sequence
                choices.append(choice)
        usage = Usage(
            sum(r.usage.prompt_tokens for r in results), sum(r.usage.completion_tokens for r in results)
        )
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": choices,
                "usage": _usage(usage),
            },
            headers={"x-request-id": results[0].request_id},
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatBody)
        body.check()
        selector, adapter, name = select(body.model)
        generation = GenerationRequest(
            model=selector,
            prompt=body.prompt(),
            sampling=body.sampling(body.max_output(), body.logprob_count()),
            adapter=adapter,
            request_id=body.request_id or request.headers.get("x-request-id", ""),
        )
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            rid, events = await service.generate_stream(generation)
            return StreamingResponse(
                _chat_chunks(events, cid, created, name, body),
                media_type="text/event-stream",
                headers={"x-request-id": rid},
            )
        result: GenerationResult = await _until_disconnected(request, service.generate(generation))
        choices = [_chat_choice(c, body.logprobs) for c in result.completions]
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": choices,
                "usage": _usage(result.usage),
            },
            headers={"x-request-id": result.request_id},
        )

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(request: Request) -> Response:
        body = parse_body(await request.body(), EmbeddingBody)
        selector, adapter, name = select(body.model)
        if adapter:
            raise InvalidArgument("embeddings take a model, not an adapter", field="model")
        embed = EmbedRequest(
            selector, body.inputs(), body.request_id or request.headers.get("x-request-id", "")
        )
        result: EmbedResult = await _until_disconnected(request, service.embed(embed))
        if body.dimensions is not None and result.embeddings and body.dimensions != len(result.embeddings[0]):
            raise InvalidArgument(
                f"{name} makes {len(result.embeddings[0])}-dimensional embeddings; it cannot shorten them",
                field="dimensions",
            )
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
            for i, v in enumerate(result.embeddings)
        ]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return JSONResponse(
            {"object": "list", "data": data, "model": name, "usage": usage},
            headers={"x-request-id": result.request_id},
        )

    app.add_middleware(Guard, max_body_bytes=max_body_bytes)  # outermost: sees every request first
    return app


def _vector(values: tuple[float, ...], encoding: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list, or base64 of little-endian float32s."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


def _tool_finish(reason: FinishReason | None, has_calls: bool) -> str | None:
    """OpenAI's finish reason: ``tool_calls`` when a completion ended normally with calls."""
    if has_calls and reason in (FinishReason.STOP, FinishReason.STOP_SEQUENCE):
        return "tool_calls"
    return _finish(reason)


def _chat_choice(c: Completion, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.tool_calls:
        message["content"] = c.text or None
        message["tool_calls"] = [
            {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
            for t in c.tool_calls
        ]
    return {
        "index": c.index,
        "message": message,
        "logprobs": _chat_logprobs(c.logprobs) if logprobs else None,
        "finish_reason": _tool_finish(c.finish_reason, bool(c.tool_calls)),
    }


async def _guarded(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent | bytes]:
    """The events, then an SSE error chunk if generation fails after the response started (an
    unexpected error's chunk is the generic one, its error id logged with the trace)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # the status is sent: the error can only be the stream's last chunk
        yield _sse(error_body(exc)[1])
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _completion_chunks(
    events: AsyncIterator[StreamEvent], cid: str, created: int, model: str, body: CompletionBody
) -> AsyncIterator[bytes]:
    offsets: dict[int, int] = {}
    async for event in _guarded(events):
        if isinstance(event, bytes):
            yield event
            return
        if isinstance(event, StreamEnd):
            if body.include_usage:
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": [], "usage": _usage(event.usage)})  # fmt: skip
            break
        assert isinstance(event, CompletionDelta)
        if not event.text and event.finish_reason is None:
            continue
        offset = offsets.get(event.index, 0)
        offsets[event.index] = offset + len(event.text)
        choice = {"index": event.index, "text": event.text, "finish_reason": _finish(event.finish_reason),
                  "logprobs": _completion_logprobs(event.logprobs, offset) if body.logprobs is not None else None}  # fmt: skip
        yield _sse(
            {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        )
    yield _sse("[DONE]")


async def _chat_chunks(
    events: AsyncIterator[StreamEvent], cid: str, created: int, model: str, body: ChatBody
) -> AsyncIterator[bytes]:
    started: set[int] = set()
    called: set[int] = set()

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices, **extra})  # fmt: skip

    async for event in _guarded(events):
        if isinstance(event, bytes):
            yield event
            return
        if isinstance(event, StreamEnd):
            if body.include_usage:
                yield chunk([], usage=_usage(event.usage))
            break
        assert isinstance(event, CompletionDelta)
        delta: dict[str, Any] = {}
        if event.index not in started:
            started.add(event.index)
            delta["role"] = "assistant"
        if event.text or "role" in delta:
            delta["content"] = event.text
        if event.tool_calls:
            called.add(event.index)
            delta["tool_calls"] = [_tool_call_part(t) for t in event.tool_calls]
        if not delta and event.finish_reason is None:
            continue
        finish = _tool_finish(event.finish_reason, event.index in called)
        choice = {"index": event.index, "delta": delta, "finish_reason": finish,
                  "logprobs": _chat_logprobs(event.logprobs) if body.logprobs and event.logprobs else None}  # fmt: skip
        yield chunk([choice])
    yield _sse("[DONE]")


def _tool_call_part(t: ToolCallDelta) -> dict[str, Any]:
    part: dict[str, Any] = {"index": t.index, "function": {"arguments": t.arguments}}
    if t.id:
        part.update(id=t.id, type="function")
        part["function"]["name"] = t.name
    return part

"""The router's OpenAI-compatible HTTP API: a routing reverse proxy to the replicas' own HTTP APIs.

Each replica already speaks the OpenAI API (serving's HTTP layer); the router reads only what it
routes on from the JSON body (``model``, and the prompt or messages for prefix affinity), picks a
replica exactly as for gRPC (same policies, headers, holding, alias split), and forwards the body
and the caller's ``Authorization`` to the replica's HTTP port (which the replica announces in its
load reports), streaming the answer back byte for byte. So the router re-implements no OpenAI
schema and clients see one API whichever address they use. A replica that cannot be reached, or
answers 503 before any byte, is left for another. The response cache in front applies to gRPC
Generate; HTTP requests meet the replica's own cache.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmops.common.errors import InvalidArgument, LLMOpsError, Unavailable
from llmops.common.http_server import AuthHook
from llmops.proto.common.v1 import generation_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.router.service import Router

_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504,
    "UNAVAILABLE": 503,
}


_CODE_OF_STATUS = {status: code for code, status in _HTTP_STATUS.items()}


def _error(exc: LLMOpsError) -> JSONResponse:
    code = exc.code.name
    status = _HTTP_STATUS.get(code, 500)
    body = {"error": {"message": exc.message, "type": code.lower(), "code": code.lower()}}
    return JSONResponse(body, status_code=status)


def _routing_request(document: dict[str, Any]) -> pb.GenerateRequest:
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model is required", field="model")
    request = pb.GenerateRequest(model=pb.ModelSelector(served_name=model))
    messages = document.get("messages")
    prompt = document.get("prompt")
    if isinstance(messages, list):
        chat = generation_pb2.ChatPrompt()
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                chat.messages.add(
                    role=str(m.get("role", "")), content=content if isinstance(content, str) else ""
                )
        request.prompt.chat.CopyFrom(chat)
    elif isinstance(prompt, str):
        request.prompt.text = prompt
    return request


def create_http_app(router: Router, *, auth: AuthHook | None = None, timeout: float = 600.0) -> FastAPI:
    """The proxy; ``auth`` checks the caller (the router's own keys) before anything is routed."""
    app = FastAPI(title="llmops router", docs_url=None, redoc_url=None, openapi_url=None)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=2.0), limits=httpx.Limits(max_keepalive_connections=256)
    )
    app.state.http_client = client

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if router.pool.ready else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            if auth is not None:
                await auth(request)
            listed = await router.list_models(tuple(request.headers.items()))
        except LLMOpsError as exc:
            return _error(exc)
        data = [
            {"id": m.served_name, "object": "model", "owned_by": "llmops"}
            for m in listed.models
            if m.state == pb.LOADED_MODEL_STATE_READY
        ]
        return JSONResponse({"object": "list", "data": data})

    async def proxy(request: Request) -> Response:
        try:
            if auth is not None:
                await auth(request)
            body = await request.body()
            try:
                document = json.loads(body)
            except ValueError:
                raise InvalidArgument("the body is not JSON") from None
            if not isinstance(document, dict):
                raise InvalidArgument("the body must be a JSON object")
            route = router.route(_routing_request(document), tuple(request.headers.items()), None)
            return await _forward(request, body, route)
        except LLMOpsError as exc:
            return _error(exc)

    async def _forward(request: Request, body: bytes, route: Any) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        tried: set[str] = set()
        for attempt in range(1, router.settings.max_attempts + 1):
            decision = await router.pick(route, tried)
            endpoint = decision.endpoint
            host = endpoint.address.rsplit(":", 1)[0]
            url = f"http://{host}:{endpoint.http_port}{request.url.path}"
            upstream = client.build_request("POST", url, content=body, headers=headers)
            router.begin(endpoint)
            try:
                if not endpoint.http_port:
                    raise httpx.ConnectError("the replica announced no HTTP port")
                answer = await client.send(upstream, stream=True)
            except httpx.TransportError:
                router.end(endpoint)
                tried.add(endpoint.address)
                router.pool.mark_failed(endpoint)
                if attempt == router.settings.max_attempts:
                    raise Unavailable(f"no replica of {route.model} answered") from None
                continue
            if answer.status_code == 503 and attempt < router.settings.max_attempts:
                await answer.aclose()
                router.end(endpoint)
                tried.add(endpoint.address)
                continue
            ok = answer.status_code < 400
            code = "OK" if ok else _CODE_OF_STATUS.get(answer.status_code, "UNKNOWN")
            router.answered(route, decision.slot.model if ok else None, code)
            return StreamingResponse(
                _relay(answer, lambda e=endpoint: router.end(e)),  # type: ignore[misc]
                status_code=answer.status_code,
                headers={k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS},
            )
        raise Unavailable(f"no replica of {route.model} answered")  # pragma: no cover

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.add_api_route(path, proxy, methods=["POST"], response_model=None)
    return app


async def _relay(answer: httpx.Response, done: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    finally:
        await answer.aclose()
        done()

"""The chart's RayService entry (``llmops.serving.serve_app:build_app``): it takes exactly the args
the chart renders, refuses others by name, and passes HTTP from Serve's proxy to the OpenAI app
with the response streamed chunk by chunk (no port of its own)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from llmops.serving.serve_app import forward_asgi, parse_args

ARGS = {"model": "llm@champion", "engine": "vllm", "num_gpus": 2, "min_replicas": 1, "max_replicas": 3,
        "target_ongoing_requests": 8, "engine_options": {"tensor_parallel_size": 2}}  # fmt: skip


def test_the_charts_args_parse() -> None:
    parsed = parse_args(ARGS)
    assert parsed.num_gpus == 2 and parsed.engine_options == {"tensor_parallel_size": 2}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"http_port": 8000}, "http_port"),
        ({"engine": "llama"}, "engine"),
        ({"min_replicas": 9}, "min_replicas"),
    ],
)
def test_wrong_args_are_refused_by_name(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_args(ARGS | change)
    with pytest.raises(ValueError, match="model"):
        parse_args({k: v for k, v in ARGS.items() if k != "model"})


async def test_http_is_forwarded_and_streamed() -> None:
    async def chunks(request: Request) -> StreamingResponse:
        body = await request.body()

        async def gen() -> Any:
            for part in (b"data: 1\n\n", b"data: " + body + b"\n\n"):
                yield part

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-test": "yes"})

    app = Starlette(routes=[Route("/v1/completions", chunks, methods=["POST"])])
    sent = [{"type": "http.request", "body": b"hello", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
             "server": ("x", 80), "client": ("y", 1), "root_path": ""}  # fmt: skip
    response = await forward_asgi(app, scope, receive, StreamingResponse)
    assert response.status_code == 200
    assert response.headers["x-test"] == "yes"
    parts = [part async for part in response.body_iterator]
    assert parts == [b"data: 1\n\n", b"data: hello\n\n"]

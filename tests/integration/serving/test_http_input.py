"""Hostile input to the OpenAI HTTP API gets a 4xx with OpenAI's error body, on a connection that stays open.

Invariants (regressions of issue 21): a prompt or chat message holding invalid Unicode (a lone
surrogate as a ``\\ud800`` escape, raw bytes that are not UTF-8 inside a JSON string) is a 400
naming the field, not a 500 and a dropped keep-alive connection, also with ``stream: true`` (refused
before any stream starts); wrong JSON types and out-of-range integers are 400s, not coerced; an
oversized body is a 413 before it is read; an unexpected error is a JSON 500 whose error id is in
the server's log with the trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmops.serving.domain import EngineKind, LoadRequest, ModelSource
from llmops.serving.engines.base import Engine
from llmops.serving.http_guard import MAX_BODY_BYTES
from tests.fuzz.http_wire import Connection, Reply, json_request, request
from tests.integration.serving.conftest import Stack, borrowing_factory, start_stack, stop_stack

MODEL = "tiny-hf"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(transformers_engine: Engine, tiny_model_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(borrowing_factory({EngineKind.TRANSFORMERS: transformers_engine}))
    source = ModelSource(local_path=str(tiny_model_path))
    await s.app.service.load_model(
        LoadRequest(source=source, served_name=MODEL, engine=EngineKind.TRANSFORMERS)
    )
    yield s
    await stop_stack(s)


@pytest_asyncio.fixture(loop_scope="session")
async def connection(stack: Stack) -> AsyncIterator[Connection]:
    assert stack.app.http_port is not None
    c = await Connection.open(stack.app.http_port)
    yield c
    await c.close()


async def _post(connection: Connection, path: str, body: bytes) -> Reply:
    await connection.send(request("POST", path, body, headers={"Content-Type": "application/json"}))
    return await connection.reply()


async def _still_serves(connection: Connection) -> None:
    """The same keep-alive connection answers a valid completion."""
    await connection.send(json_request(COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 2}))
    reply = await connection.reply()
    assert reply.status == 200, reply
    assert reply.json()["usage"]["completion_tokens"] <= 2


def _error(reply: Reply, status: int = 400) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    assert not reply.closes
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


COMPLETION_SURROGATES = [
    (b'{"model": "tiny-hf", "prompt": "abc\\ud800def"}', "prompt"),
    (b'{"model": "tiny-hf", "prompt": "\\udfff"}', "prompt"),
    (b'{"model": "tiny-hf", "prompt": ["ok", "\\ud83d"]}', "prompt[1]"),
    (b'{"model": "tiny-hf", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
    (b'{"model": "tiny-hf", "prompt": "x", "stream": true, "user": "\\udc00"}', "user"),
]
CHAT_SURROGATES = [
    (b'{"model": "tiny-hf", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    (b'{"model": "tiny-hf", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model": "tiny-hf", "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    (b'{"model": "tiny-hf", "messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}', "messages[0].name"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [(COMPLETIONS, *c) for c in COMPLETION_SURROGATES] + [(CHAT, *c) for c in CHAT_SURROGATES],
)
async def test_a_lone_surrogate_escape_is_a_400_naming_the_field(
    connection: Connection, path: str, body: bytes, param: str
) -> None:
    error = _error(await _post(connection, path, body))
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_argument"
    assert "surrogate" in error["message"]
    await _still_serves(connection)


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"ok\xfe\xffok"],
    ids=["ff", "truncated-2-byte", "surrogate-bytes", "overlong-nul", "bom-bytes"],
)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_raw_bytes_that_are_not_utf8_in_a_string_are_a_400(
    connection: Connection, raw: bytes, path: str
) -> None:
    text = b'"abc' + raw + b'"'
    if path == COMPLETIONS:
        body = b'{"model": "tiny-hf", "stream": true, "prompt": ' + text + b"}"
    else:
        body = (
            b'{"model": "tiny-hf", "stream": true, "messages": [{"role": "user", "content": ' + text + b"}]}"
        )
    error = _error(await _post(connection, path, body))
    assert "not UTF-8" in error["message"]
    await _still_serves(connection)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": [2**70]}, "prompt"),
        ({"prompt": "x", "logit_bias": {"5": 1e400}}, "logit_bias.5"),
        ({"prompt": "x", "request_id": "\u00e9t\u00e9"}, "request_id"),
        ({"prompt": "x", "not_a_field": 1}, "not_a_field"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({}, "prompt"),
    ],
)
async def test_wrong_types_and_ranges_are_400s_not_coerced(
    connection: Connection, body: dict[str, Any], param: str
) -> None:
    payload = json.dumps({"model": MODEL, **body}).encode()  # 1e400 is written as Infinity: refused too
    error = _error(await _post(connection, COMPLETIONS, payload.replace(b"Infinity", b"1e400")))
    assert error["param"] == param, error
    await _still_serves(connection)


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b"null", b"{", b"[" * 100_000, b'{"model": "tiny-hf", "prompt": NaN}'],
    ids=["empty", "array", "null", "cut", "deep", "nan"],
)
async def test_bodies_that_are_no_json_object_are_400s(connection: Connection, body: bytes) -> None:
    _error(await _post(connection, COMPLETIONS, body))
    await _still_serves(connection)


async def test_unknown_paths_and_methods_answer_in_openai_shape(connection: Connection) -> None:
    await connection.send(request("POST", "/v1/images/generations", b"{}"))
    assert _error(await connection.reply(), 404)["code"] == "not_found"
    await connection.send(request("GET", COMPLETIONS))
    assert _error(await connection.reply(), 405)["code"] == "method_not_allowed"
    await _still_serves(connection)


async def test_an_oversized_body_is_a_413_before_it_is_read(connection: Connection) -> None:
    head = f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    await connection.send(head.encode())  # no body follows: the answer cannot wait for it
    reply = await connection.reply(10)
    assert reply.status == 413 and reply.json()["error"]["code"] == "payload_too_large"
    assert reply.closes


@pytest.mark.parametrize("stream", [False, True])
async def test_an_unexpected_error_is_a_json_500_with_a_logged_error_id(
    stack: Stack,
    connection: Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(stack.app.service, "generate_stream" if stream else "generate", broken)
    with caplog.at_level(logging.ERROR, logger="llmops.serving.http_guard"):
        await connection.send(json_request(COMPLETIONS, {"model": MODEL, "prompt": "x", "stream": stream}))
        reply = await connection.reply()
    assert reply.status == 500, reply
    error = reply.json()["error"]
    assert error["type"] == "server_error" and "a bug" not in error["message"]
    error_id = error["message"].split("error id ")[1].rstrip(")")
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "a bug" in str(logged[0].exc_info[1])

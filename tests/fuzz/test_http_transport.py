"""Transport-level hostility against serving's OpenAI HTTP API, on a raw socket, on a real server.

Invariant: a wrong ``Content-Length`` (short, long, not a number, twice), a bad ``Transfer-Encoding``
(unknown coding, broken chunks, both framings at once), a body cut short by a client that hangs
up, a compressed body, an oversized one, and a client that disconnects mid-stream never get a 5xx
and never put anything in the server's error log; a refusal the app makes has an OpenAI error body
(a refusal of the framing itself comes from the HTTP server before any app code runs, and closes
the connection); afterwards the server is healthy and answers a known-good completion.
``make fuzz`` sends a tenth of ``LLMOPS_FUZZ_EXAMPLES`` here: every input opens a connection, and
the oversized ones send 16 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.http_target import HttpTarget, http_budget, http_target
from tests.fuzz.http_wire import Connection, Dropped, HttpTally, Reply, problem_with, request
from tests.fuzz.openai_bodies import MODEL, completion, encode

pytestmark = pytest.mark.fuzz
__all__ = ["http_target"]

PATH = "/v1/completions"
CASES = [
    "short_length", "long_length_then_hang_up", "bad_length", "two_lengths", "unknown_coding",
    "chunked", "broken_chunk", "chunked_and_length", "unterminated_chunks_then_hang_up",
    "cut_then_hang_up", "gzip", "deflate", "oversized_length", "oversized_chunked",
]  # fmt: skip


def _judge(reply: Reply) -> str | None:
    if reply.status >= 500 or reply.status < 200:
        return f"status {reply.status}: {reply.body[:300]!r}"
    if (
        reply.status >= 400
        and reply.closes
        and not reply.headers.get("content-type", "").startswith("application/json")
    ):
        return None  # the HTTP server refused the framing before the app saw a request
    return problem_with(reply, stream=True) if reply.status != 413 else None


def _chunks(body: bytes, size: int = 7) -> bytes:
    out = b"".join(
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


def _wire(case: str, body: bytes, limit: int) -> tuple[bytes, bool]:
    """The request bytes for ``case`` and whether the client hangs up after sending them."""
    json_type = {"Content-Type": "application/json"}
    if case == "short_length":
        return request(
            "POST", PATH, body, headers={**json_type, "Content-Length": str(len(body) // 2)}
        ), False
    if case == "long_length_then_hang_up":
        return request("POST", PATH, body, headers={"Content-Length": str(len(body) + 100)}), True
    if case == "bad_length":
        return request("POST", PATH, body, headers={"Content-Length": "-1"}), False
    if case == "two_lengths":
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nContent-Length: {len(body) + 1}\r\n\r\n"
        return head.encode() + body, False
    if case == "unknown_coding":
        return request("POST", PATH, body, headers={"Transfer-Encoding": "gzip"}), False
    if case == "chunked":
        return request("POST", PATH, _chunks(body), headers={"Transfer-Encoding": "chunked"}), False
    if case == "broken_chunk":
        return request(
            "POST", PATH, b"zz\r\n" + body + b"\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}
        ), False
    if case == "chunked_and_length":
        headers = {"Transfer-Encoding": "chunked", "Content-Length": str(len(body))}
        return request("POST", PATH, _chunks(body), headers=headers), False
    if case == "unterminated_chunks_then_hang_up":
        return request("POST", PATH, _chunks(body)[:-5], headers={"Transfer-Encoding": "chunked"}), True
    if case == "cut_then_hang_up":
        return request("POST", PATH, body, headers={"Content-Length": str(len(body))})[
            : -max(1, len(body) // 2)
        ], True
    if case == "gzip":
        return request(
            "POST", PATH, gzip.compress(body), headers={**json_type, "Content-Encoding": "gzip"}
        ), False
    if case == "deflate":
        return request(
            "POST", PATH, zlib.compress(body), headers={**json_type, "Content-Encoding": "deflate"}
        ), False
    if case == "oversized_length":
        return request("POST", PATH, b"", headers={"Content-Length": str(limit + 1)}), True
    assert case == "oversized_chunked"
    padded = json.dumps({"model": MODEL, "prompt": "a" * (limit + 1)}).encode()
    return request("POST", PATH, _chunks(padded, 1 << 20), headers={"Transfer-Encoding": "chunked"}), False


async def _one(target: HttpTarget, case: str, body: bytes) -> str | None:
    from llmops.serving.http_guard import MAX_BODY_BYTES

    data, hang_up = _wire(case, body, MAX_BODY_BYTES)
    connection = await Connection.open(target.port)
    try:
        with contextlib.suppress(ConnectionError):  # an oversized body: answered and closed mid-send
            await connection.send(data)
        if hang_up:
            connection.writer.transport.write_eof()  # type: ignore[attr-defined]
        try:
            reply = await connection.reply(60)
        except (Dropped, ConnectionError):
            # A client that hangs up mid-request gets no answer; one that sent a whole request must.
            # (The server closes an oversized one once its 413 is out: a client still sending may
            # get a reset that discards the answer.)
            return None if hang_up or case.startswith("oversized") else "the connection was dropped"
        problem = _judge(reply)
        if case == "short_length" and problem is None and not reply.closes:
            # The rest of the body reads as a next request: refused, or the connection ends.
            with contextlib.suppress(Dropped, ConnectionError):
                problem = _judge(await connection.reply(30))
        return problem
    finally:
        await connection.close()


@http_budget(len(CASES) * 3, share=0.1)  # each input is a fresh connection; some send 16 MiB
@given(case=st.sampled_from(CASES), body=st.builds(encode, completion(), st.booleans()))
async def test_transport(http_target: HttpTarget, case: str, body: bytes) -> None:
    problem = await _one(http_target, case, body) or http_target.logged()
    HttpTally.record("transport", case, problem)
    assert problem is None, f"{case}: {problem} (body {body[:300]!r})"


async def test_every_case_once(http_target: HttpTarget) -> None:
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2}).encode()
    for case in CASES:
        problem = await _one(http_target, case, body) or http_target.logged()
        HttpTally.record("transport", case, problem)
        assert problem is None, f"{case}: {problem}"


@pytest.mark.parametrize("after", ["headers", "first_chunk"])
async def test_a_client_that_disconnects_mid_stream(http_target: HttpTarget, after: str) -> None:
    engine = http_target.engine
    body = {"model": MODEL, "prompt": "a", "max_tokens": 16, "stream": True, "ignore_eos": True}
    sock = socket.create_connection(("127.0.0.1", http_target.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    sock.sendall(request("POST", PATH, json.dumps(body).encode()))
    received = b""
    while b"\r\n\r\n" not in received or (after == "first_chunk" and b"data: " not in received):
        received += await asyncio.to_thread(sock.recv, 4096)
    assert received.startswith(b"HTTP/1.1 200"), received
    sock.close()
    HttpTally.record("transport", f"disconnect_after_{after}", None)
    for _ in range(600):  # the generation ends (aborted or done); nothing is logged as an error
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0
    assert http_target.logged() is None
    await http_target.healthy()


async def test_server_is_healthy_after_the_transport_fuzzing(http_target: HttpTarget) -> None:
    await http_target.healthy()

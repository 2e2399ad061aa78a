"""Fuzzing every endpoint of serving's OpenAI-compatible HTTP API on a real server.

Invariant: whatever body, query, method or path a client sends (valid requests, mutated ones with
wrong JSON types, out-of-range numbers, unknown fields and invalid Unicode, damaged and random
bytes, deep nesting), the answer is a 2xx (a stream ends with ``[DONE]``) or a 4xx with an OpenAI
error body ``{"error": {"message", "type", "param", "code"}}`` on a connection that stays open
(only a 413 may close it); never a 5xx, never a dropped connection, nothing in the server's error
log; afterwards the server is healthy and answers a known-good completion.

Inputs are counted per endpoint in the session summary; ``make fuzz`` runs ``LLMOPS_FUZZ_EXAMPLES``
per test from a random seed it prints.
"""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.http_target import HttpTarget, http_budget, http_target
from tests.fuzz.http_wire import request
from tests.fuzz.openai_bodies import JSON, TEXT, bodies, chat, completion

pytestmark = pytest.mark.fuzz
__all__ = ["http_target"]

HEADERS = st.sampled_from(
    [{}, {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}, {"Accept": "text/event-stream"},
     {"Content-Type": "application/json; charset=latin-1"}, {"Authorization": "Bearer nothing"}]
)  # fmt: skip
QUERY = st.one_of(
    st.just(""),
    st.dictionaries(TEXT, TEXT, max_size=3).map(lambda q: "?" + urllib.parse.urlencode(q)),
    st.binary(max_size=20).map(lambda b: "?" + urllib.parse.quote_from_bytes(b)),
)


async def _post(target: HttpTarget, endpoint: str, body: bytes, headers: dict[str, str]) -> None:
    problem = await target.judged(endpoint, request("POST", endpoint, body, headers=headers))
    assert problem is None, f"{problem} (body {body[:500]!r})"


@http_budget(60)
@given(body=bodies(completion()), headers=HEADERS)
async def test_completions(http_target: HttpTarget, body: bytes, headers: dict[str, str]) -> None:
    await _post(http_target, "/v1/completions", body, headers)


@http_budget(60)
@given(body=bodies(chat()), headers=HEADERS)
async def test_chat_completions(http_target: HttpTarget, body: bytes, headers: dict[str, str]) -> None:
    await _post(http_target, "/v1/chat/completions", body, headers)


@http_budget(20)
@given(
    path=st.sampled_from(["/v1/models", "/health", "/v1/models/", "/health/"]),
    query=QUERY,
    body=st.binary(max_size=64) | JSON.map(lambda v: repr(v).encode("utf-8", "surrogatepass")),
    headers=HEADERS,
)
async def test_models_and_health(
    http_target: HttpTarget, path: str, query: str, body: bytes, headers: dict[str, str]
) -> None:
    problem = await http_target.judged(path.rstrip("/"), request("GET", path + query, body, headers=headers))
    assert problem is None, f"{problem} (GET {path}{query} {body!r})"


@http_budget(20)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.sampled_from(["/", "/v1", "/v1/", "/v1/embeddings", "/v1/completions", "/v1/chat/completions",
                          "/v1/models", "/metrics", "/docs", "/openapi.json", "/v1/../etc/passwd"])
    | st.text(max_size=20).map(lambda t: "/" + urllib.parse.quote(t.encode("utf-8", "surrogatepass"))),
    body=st.binary(max_size=32),
)  # fmt: skip
async def test_other_methods_and_paths(http_target: HttpTarget, method: str, path: str, body: bytes) -> None:
    problem = await http_target.judged("other", request(method, path, body))
    assert problem is None, f"{problem} ({method} {path} {body!r})"


async def test_server_is_healthy_after_the_fuzzing(http_target: HttpTarget) -> None:
    await http_target.healthy()

"""Serving with API keys: tenants, token budgets and the OpenAI API's bearer tokens.

A real serving app (the transformers engine on the tiny model, loaded as registry version
``tiny:1``) with the response cache and the rate limiter on a real Redis, behind a keys file.

Invariants: tenants never see each other's cache entries (a deterministic request answered for
tenant A is a miss for tenant B, then a hit for each); a tenant over its tokens-per-minute budget
gets RESOURCE_EXHAUSTED with a retry delay before any engine work, other tenants are unaffected;
a ``user`` key may generate but not load models; the OpenAI HTTP API answers 401 without a
bearer token, 403 for a role that may not, 429 with ``Retry-After`` over budget; prompts and keys
never reach the logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from llmops.cache.redis_server import RedisServer
from llmops.common.auth import Role, key_entry, new_key
from llmops.common.clients import ServingClient
from llmops.common.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import EngineKind, EngineOptions
from llmops.serving.engines.base import Engine
from tests.integration.serving.conftest import Stack, serving_settings, start_registry_stack, stop_stack
from tests.integration.serving.test_cache_wiring import MODEL, CountingEngine, VersionResolver
from tests.redis_fixture import make_redis_server

__all__ = ["make_redis_server"]

ADMIN, TEAM_A, TEAM_B, SPENDER = new_key(), new_key(), new_key(), new_key()
PROMPT = "zebra-canary-prompt 7f3c"


@pytest_asyncio.fixture(loop_scope="session")
async def secured(
    transformers_engine: Engine,
    tiny_model_path: Path,
    make_redis_server: Callable[..., RedisServer],
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    redis = make_redis_server()
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump({
            "tenants": {"spenders": {"tokens_per_minute": 30}},
            "keys": [
                key_entry(ADMIN, "ops", "platform", Role.ADMIN),
                key_entry(TEAM_A, "a-app", "team-a", Role.USER),
                key_entry(TEAM_B, "b-app", "team-b", Role.USER),
                key_entry(SPENDER, "spender", "spenders", Role.USER),
            ],
        })
    )  # fmt: skip
    settings = serving_settings(
        LLMOPS_REDIS_URL=redis.url,
        LLMOPS_API_KEYS_FILE=str(keys),
        LLMOPS_CACHE_REDIS_TIMEOUT_MS="2000",
    )

    def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> Engine:
        return CountingEngine(transformers_engine)

    resolver = VersionResolver(tiny_model_path)
    stack = await start_registry_stack(
        settings, factory, resolver, served_name=MODEL, ref="tiny:1", api_key=ADMIN
    )
    yield stack
    await stop_stack(stack)


def _request(text: str = PROMPT, max_tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=pb.ModelSelector(served_name=MODEL),
        prompt=generation_pb2.Prompt(text=text),
        sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=max_tokens, ignore_eos=True),
    )


async def _generate(stack: Stack, key: str, request: pb.GenerateRequest) -> pb.GenerateResponse:
    async with ServingClient.connect(f"127.0.0.1:{stack.port}", timeout=120, api_key=key) as client:
        response: pb.GenerateResponse = await client.unary(client.stub.Generate, request)
        return response


async def test_tenants_never_share_cache_entries(secured: Stack) -> None:
    CountingEngine.calls = 0
    first_a = await _generate(secured, TEAM_A, _request())
    first_b = await _generate(secured, TEAM_B, _request())
    assert not first_a.cached and not first_b.cached  # B's identical request is not A's entry
    assert CountingEngine.calls == 2
    again_a = await _generate(secured, TEAM_A, _request())
    again_b = await _generate(secured, TEAM_B, _request())
    assert again_a.cached and again_b.cached and CountingEngine.calls == 2
    assert again_a.output.completions[0].text == first_a.output.completions[0].text


async def test_roles_on_serving(secured: Stack) -> None:
    async with ServingClient.connect(f"127.0.0.1:{secured.port}", timeout=30, api_key=TEAM_A) as client:
        listed = await client.unary(client.stub.ListModels, pb.ListModelsRequest())
        assert [m.served_name for m in listed.models] == [MODEL]
        with pytest.raises(PermissionDenied, match="LoadModel needs role 'admin'"):
            await client.unary(
                client.stub.LoadModel, pb.LoadModelRequest(local_path="/nowhere", served_name="x")
            )


async def test_token_budget_per_tenant(secured: Stack) -> None:
    # 30 tokens a minute: the first request (prompt + 16) fits, the second spends the rest, the third waits.
    await _generate(secured, SPENDER, _request("budget one", max_tokens=16))
    await asyncio.sleep(0.2)  # the charge is written after the answer
    await _generate(secured, SPENDER, _request("budget two", max_tokens=16))
    await asyncio.sleep(0.2)
    CountingEngine.calls = 0
    with pytest.raises(ResourceExhausted) as over:
        await _generate(secured, SPENDER, _request("budget three", max_tokens=16))
    assert "spenders" in over.value.message and "30 tokens per minute" in over.value.message
    assert over.value.retry_after_seconds is not None and over.value.retry_after_seconds > 1
    assert CountingEngine.calls == 0  # refused before any engine work
    await _generate(secured, TEAM_A, _request("another tenant", max_tokens=16))  # unaffected


def _http(
    stack: Stack, path: str, body: dict[str, Any] | None, key: str | None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        stack.http_url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                json.loads(response.read()),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


async def test_openai_api_takes_bearer_tokens(secured: Stack) -> None:
    body = {"model": MODEL, "prompt": "http canary", "max_tokens": 4, "temperature": 0}
    status, _, answer = await asyncio.to_thread(_http, secured, "/v1/completions", body, None)
    assert status == 401 and "API key is required" in answer["error"]["message"]
    status, _, answer = await asyncio.to_thread(_http, secured, "/v1/completions", body, new_key())
    assert status == 401
    status, _, answer = await asyncio.to_thread(_http, secured, "/v1/completions", body, TEAM_A)
    assert status == 200 and answer["choices"][0]["text"] is not None
    status, _, answer = await asyncio.to_thread(_http, secured, "/v1/models", None, TEAM_B)
    assert status == 200 and [m["id"] for m in answer["data"]] == [MODEL]
    # the spender's budget is gone (test_token_budget_per_tenant) or goes now
    for attempt in range(3):  # distinct prompts: cache hits cost no engine tokens
        spend = {**body, "prompt": f"http spend {attempt}", "max_tokens": 16}
        status, headers, answer = await asyncio.to_thread(_http, secured, "/v1/completions", spend, SPENDER)
        if status == 429:
            break
    assert status == 429 and float(headers["retry-after"]) > 0


async def test_prompts_and_keys_never_reach_the_logs(
    secured: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _generate(secured, TEAM_A, _request(PROMPT + " logs"))
    bad = _request(PROMPT + " bad")
    bad.sampling.temperature = -3  # refused: INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        await _generate(secured, TEAM_A, bad)
    with pytest.raises(Unauthenticated):
        await _generate(secured, new_key(), _request(PROMPT))
    await asyncio.to_thread(
        _http, secured, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, TEAM_B
    )
    text = caplog.text
    assert PROMPT not in text and "zebra-canary" not in text
    for key in (ADMIN, TEAM_A, TEAM_B, SPENDER):
        assert key not in text

"""The OpenAI-compatible HTTP API through the official ``openai`` client, unmodified, on both engines.

Invariants: /v1/models lists the loaded models; completions and chat completions answer whole and as
SSE streams that add up to the same text, with usage when asked; vLLM-style extensions pass through
``extra_body``; bad input is a 400 naming the OpenAI field, an unknown model a 404, unknown fields are
refused, not ignored; a client that disconnects mid-stream aborts its generation.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.integration.serving.conftest import Stack

MODELS = ["tiny-hf", "tiny-vllm"]


@pytest.fixture
async def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def test_health_and_models(stack: Stack, client: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(stack.http_url + "/health")).status_code == 200
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == MODELS
    assert all(m.owned_by == "llmops" for m in models.data)


@pytest.mark.parametrize("model", MODELS)
async def test_completion_whole_and_streamed(client: openai.AsyncOpenAI, model: str) -> None:
    args = {
        "model": model,
        "prompt": "def main():",
        "max_tokens": 12,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    whole = await client.completions.create(**args)  # type: ignore[call-overload]
    assert whole.object == "text_completion" and whole.model == model
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    stream = await client.completions.create(**args, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("model", MODELS)
async def test_chat_whole_and_streamed(client: openai.AsyncOpenAI, model: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]
    args = {
        "model": model,
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = await client.chat.completions.create(**args)  # type: ignore[call-overload]
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 10
    stream = await client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


async def test_n_seed_logprobs_and_extensions(client: openai.AsyncOpenAI) -> None:
    several = await client.completions.create(
        model="tiny-vllm",
        prompt="x = ",
        max_tokens=6,
        n=3,
        seed=4,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    for choice in several.choices:
        assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 6
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs or [])
    again = await client.completions.create(
        model="tiny-vllm",
        prompt="x = ",
        max_tokens=6,
        n=3,
        seed=4,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in several.choices]
    greedy = await client.completions.create(model="tiny-hf", prompt="x = ", max_tokens=6, temperature=0)
    top1 = await client.completions.create(
        model="tiny-hf", prompt="x = ", max_tokens=6, seed=9, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy.choices[0].text
    chat = await client.chat.completions.create(
        model="tiny-hf",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(entry.top_logprobs) == 2 for entry in content)


async def test_errors_have_openai_shape_and_status(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="tiny-hf", prompt="x", temperature=-1)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    assert "temperature" in bad.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as unknown:
        await client.completions.create(model="tiny-hf", prompt="x", extra_body={"not_a_field": 1})
    assert "not_a_field" in str(unknown.value.body)
    with pytest.raises(openai.BadRequestError) as tools:
        await client.chat.completions.create(
            model="tiny-hf",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="tiny-hf", prompt="x", max_tokens=5000)


async def test_disconnect_mid_stream_aborts_the_generation(stack: Stack, vllm_engine) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "tiny-vllm", "prompt": "a", "max_tokens": 900, "stream": True, "ignore_eos": True}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", stack.http_url + "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
        assert vllm_engine.num_unfinished_requests() == 1
    for _ in range(500):  # the connection is closed: the server notices and aborts
        if vllm_engine.num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)
    assert vllm_engine.num_unfinished_requests() == 0

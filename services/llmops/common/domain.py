"""Types the services share: which model version a request names, and what it asks the model for.

Plain frozen dataclasses mirroring ``llmops.common.v1`` (``ModelRef``, ``ResolvedModel``, ``Prompt``, ``SamplingParams``):
the registry, serving and the response cache read a model reference the same way, and the cache key
and the engine see the same request; no proto types here (:mod:`llmops.common.convert` converts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from llmops.common.errors import InvalidArgument


@dataclass(frozen=True)
class ModelRef:
    """A version of a model: exact (``version``), through an alias, or the latest READY one."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        if self.version is not None and self.alias is not None:
            raise InvalidArgument("a model reference names a version or an alias, not both")

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``name``, ``name:3`` or ``name@champion``."""
        if "@" in text:
            name, _, alias = text.partition("@")
            return cls(name, alias=alias)
        if ":" in text:
            name, _, version = text.rpartition(":")
            if not version.isdigit():
                raise InvalidArgument(f"bad model reference {text!r}: expected name, name:N or name@alias")
            return cls(name, version=int(version))
        return cls(text)


@dataclass(frozen=True)
class ResolvedModel:
    """A registry version after resolution (never an alias alone), with the alias it was reached
    through ("" if none): what serving loaded and what a cache entry is keyed by."""

    name: str
    version: int
    alias: str = ""

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool by the model: its id, the tool's name, the arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is its arguments' JSON Schema as JSON text."""

    name: str
    description: str = ""
    parameters: str = ""


@dataclass(frozen=True)
class ToolChoice:
    """Whether and how tools are called: ``mode`` is auto | none | required | function (then
    ``function`` names the tool)."""

    mode: str = "auto"
    function: str = ""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, handed to the chat template as is."""

    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class Prompt:
    """The input: exactly one of raw text, token ids or chat messages."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = True
    #: Functions offered to a chat (rendered by its template); empty means none.
    tools: tuple[Tool, ...] = ()
    #: ``None`` means auto with tools, none without.
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's form (``llmops.common.v1.StructuredOutput``); exactly one set."""

    json_schema: str | None = None  # JSON text of a JSON Schema
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """json_schema | json_object | regex | choice ("" when none is set)."""
        if self.json_schema is not None:
            return "json_schema"
        if self.json_object:
            return "json_object"
        if self.regex is not None:
            return "regex"
        return "choice" if self.choice else ""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding controls as the client sent them; ``None`` means unset (see sampling.proto)."""

    greedy: bool = False
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    seed: int | None = None
    n: int = 0
    use_beam_search: bool = False
    beam_width: int = 0
    length_penalty: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool | None = None
    structured_output: StructuredOutput | None = None

    def set_fields(self) -> list[str]:
        """Names of the controls set to something other than their default."""
        defaults = SamplingParams()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)]

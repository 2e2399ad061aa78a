"""Domain objects of the serving service: what the service, the engines and both APIs speak.

No proto or HTTP types live here. A request arrives as a :class:`GenerationRequest` whose
:class:`SamplingParams` mirror ``llmops.common.v1.SamplingParams`` field for field (``None`` where the
proto field is ``optional`` and unset); validation turns them into a :class:`Decoding`, where every
default is filled in and every value is in range, which is all an engine ever sees.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

from llmops.common.domain import ChatMessage as ChatMessage  # re-exported: shared request types
from llmops.common.domain import ModelRef as ModelRef
from llmops.common.domain import Prompt as Prompt
from llmops.common.domain import ResolvedModel as ResolvedModel
from llmops.common.domain import SamplingParams as SamplingParams
from llmops.common.domain import StructuredOutput as StructuredOutput
from llmops.common.domain import Tool as Tool
from llmops.common.domain import ToolCall as ToolCall
from llmops.common.domain import ToolChoice as ToolChoice


class EngineKind(enum.Enum):
    """Inference engine a model runs in (``llmops.serving.v1.Engine``)."""

    VLLM = "vllm"
    TRANSFORMERS = "transformers"
    TENSORRT_LLM = "tensorrt_llm"
    #: The deterministic test engine; never chosen by a client.
    FAKE = "fake"


class FinishReason(enum.Enum):
    """Why a completion ended (``llmops.common.v1.FinishReason``)."""

    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"

    @property
    def metric_label(self) -> str:
        """The bounded ``finish_reason`` label: stop | length | abort."""
        return "stop" if self is FinishReason.STOP_SEQUENCE else self.value

    @property
    def openai(self) -> str:
        """OpenAI's ``finish_reason`` string."""
        if self is FinishReason.LENGTH:
            return "length"
        return "abort" if self is FinishReason.ABORT else "stop"


class ModelState(enum.Enum):
    """Where a served model is in its life (``llmops.serving.v1.LoadedModelState``)."""

    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelSelector:
    """Picks a loaded model: by served name, or by registry reference; exactly one is set."""

    served_name: str | None = None
    model_ref: ModelRef | None = None


@dataclass(frozen=True)
class Decoding:
    """Validated decoding controls with every default filled in; what engines receive.

    ``greedy`` is true whenever the temperature is 0. ``set_controls`` names the controls the client
    set, so an engine can refuse those it cannot honour (never silently ignore them).
    """

    max_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None
    n: int = 1
    use_beam_search: bool = False
    beam_width: int = 0
    length_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    set_controls: frozenset[str] = frozenset()
    #: The checked constraint the engine enforces by guided decoding; ``None`` means free text.
    structured_output: StructuredOutput | None = None

    @property
    def deterministic(self) -> bool:
        """Same inputs give the same output on the same engine (greedy, beam search or seeded)."""
        return self.greedy or self.use_beam_search or self.seed is not None


@dataclass(frozen=True)
class TopLogprob:
    """One likely alternative at a position."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token, its 1-based rank, and the top alternatives when asked for."""

    token_id: int
    token: str
    logprob: float
    rank: int
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of one tool call of a streamed completion: id and name on its first part."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class CompletionDelta:
    """New tokens of one completion since its previous delta; the last one has ``finish_reason``."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    cumulative_logprob: float | None = None
    #: True when replayed from the response cache rather than generated.
    cached: bool = False
    #: Tool-call parts parsed from the output (the prompt offered tools).
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class EngineOutput:
    """What an engine yields: deltas of one or more completions.

    The first output of a request carries ``prompt_token_ids`` as the engine saw them (and prompt
    log-probabilities when asked for); every completion's last delta has its finish reason.
    """

    deltas: list[CompletionDelta]
    prompt_logprobs: list[TokenLogprob] | None = None
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class EngineRequest:
    """A validated request handed to an engine."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    decoding: Decoding
    adapter: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """A generation request as both APIs hand it to the service."""

    model: ModelSelector
    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str = ""
    request_id: str = ""
    #: Seconds the caller still waits (its gRPC deadline or HTTP timeout); ``None`` means no limit.
    timeout: float | None = None
    #: Response cache opt-outs (``CacheControl``): skip the lookup, skip the store.
    cache_bypass: bool = False
    cache_no_store: bool = False


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, summed over its completions."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """One whole generated answer."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_sequence: str = ""
    cumulative_logprob: float | None = None
    #: Tool calls parsed from the output; ``text`` then holds only the content around them.
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEnd:
    """Closes a generation stream once every completion finished."""

    served_name: str
    model: ResolvedModel | None
    usage: Usage
    prompt_token_ids: tuple[int, ...]
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    #: True when replayed from the response cache rather than generated.
    cached: bool = False


#: One message of a generation stream.
StreamEvent = CompletionDelta | StreamEnd


@dataclass(frozen=True)
class GenerationResult:
    """The whole answer to a request."""

    request_id: str
    served_name: str
    model: ResolvedModel | None
    completions: tuple[Completion, ...]
    prompt_token_ids: tuple[int, ...]
    usage: Usage
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    #: True when the answer came from the response cache rather than the engine.
    cached: bool = False


@dataclass(frozen=True)
class EngineOptions:
    """Engine tuning at load time (``llmops.serving.v1.EngineOptions``); 0 / None mean defaults."""

    dtype: str = ""  # "", "float32", "bfloat16", "float16"
    device: str = ""  # "", "cpu", "cuda"
    max_model_len: int = 0
    gpu_memory_utilization: float | None = None
    kv_cache_bytes: int = 0
    tensor_parallel_size: int = 0
    pipeline_parallel_size: int = 0
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = False
    quantization: str = ""
    enable_lora: bool = False
    max_loras: int = 0
    max_lora_rank: int = 0
    extra_args: Mapping[str, str] = field(default_factory=dict)

    def set_fields(self) -> list[str]:
        """Names of the options set to something other than their default."""
        defaults = EngineOptions()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)]


@dataclass(frozen=True)
class ModelSource:
    """What to load: a registry reference or a folder on this server; exactly one is set."""

    model_ref: ModelRef | None = None
    local_path: str | None = None


@dataclass(frozen=True)
class ResolvedSource:
    """A model source made into a folder this server can load."""

    path: Path
    model: ResolvedModel | None = None
    format: str = ""  # "fp32", "bf16", ... as the registry says; "" when unknown
    #: For an adapter from the registry: the base version it was trained on.
    adapter_base: ModelRef | None = None


@dataclass(frozen=True)
class LoadRequest:
    """Load a model under a served name."""

    source: ModelSource
    served_name: str = ""
    engine: EngineKind | None = None
    options: EngineOptions = field(default_factory=EngineOptions)
    replace: bool = False
    no_wait: bool = False
    follow_alias: bool = False


@dataclass(frozen=True)
class LoadedAdapter:
    """A LoRA adapter active on a loaded model."""

    name: str
    local_path: str
    rank: int
    loaded_at: datetime
    adapter: ResolvedModel | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A model this server serves or is loading, as ListModels reports it."""

    served_name: str
    engine: EngineKind
    state: ModelState
    options: EngineOptions
    local_path: str = ""
    model: ResolvedModel | None = None
    format: str = ""
    error_message: str = ""
    max_model_len: int = 0
    adapters: tuple[LoadedAdapter, ...] = ()
    loaded_at: datetime | None = None
    follow_alias: bool = False


@dataclass(frozen=True)
class TokenizeRequest:
    """Tokenize text or a chat with a loaded model's tokenizer."""

    model: ModelSelector
    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strings: bool = False


@dataclass(frozen=True)
class TokenizeResult:
    """Token ids (and strings when asked for) and the model's context length."""

    token_ids: tuple[int, ...]
    token_strings: tuple[str, ...]
    max_model_len: int


@dataclass(frozen=True)
class UnloadResult:
    """What an unload did."""

    served_name: str
    aborted_requests: int


@dataclass(frozen=True)
class EmbedRequest:
    """Embed a batch of inputs (texts or token ids) with an embedding model."""

    model: ModelSelector
    inputs: tuple[str | tuple[int, ...], ...]
    request_id: str = ""


@dataclass(frozen=True)
class EmbedResult:
    """One vector per input, in order, and the tokens read."""

    request_id: str
    served_name: str
    model: ResolvedModel | None
    embeddings: tuple[tuple[float, ...], ...]
    prompt_tokens: int

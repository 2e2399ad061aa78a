"""The engine interface: one model in one inference engine.

Required: :meth:`Engine.start` (load), :meth:`Engine.generate` (an async iterator of token deltas),
tokenization, :meth:`Engine.health` and :meth:`Engine.shutdown`. Optional hooks have safe defaults:
LoRA adapters (refused with FAILED_PRECONDITION), engine stats (none), sleep/wake (refused).

Every engine declares the decoding controls it honours (``supported_controls``) and the load options
it understands (``supported_options``); :meth:`Engine.check_decoding` and :meth:`Engine.check_options`
refuse anything else with INVALID_ARGUMENT naming it, so nothing is ever silently ignored.

Cancelling: closing the iterator returned by :meth:`Engine.generate` (``aclose()``, or the consuming
task being cancelled) must abort the request inside the engine and free its slot.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from llmops.common.errors import FailedPrecondition, InvalidArgument, Unimplemented
from llmops.serving.domain import (
    ChatMessage,
    Decoding,
    EngineKind,
    EngineOptions,
    EngineOutput,
    EngineRequest,
    SamplingParams,
    Tool,
)

#: Every decoding control of the API (``SamplingParams`` field names).
ALL_CONTROLS: frozenset[str] = frozenset(f.name for f in fields(SamplingParams))
#: Every load option of the API (``EngineOptions`` field names).
ALL_OPTIONS: frozenset[str] = frozenset(f.name for f in fields(EngineOptions))


@dataclass(frozen=True)
class EngineStats:
    """Load of an engine now, for the ``vllm:*`` metrics of engines that do not export their own."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0  # fraction in [0, 1]


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter as the engine loaded it."""

    name: str
    path: str
    rank: int


class Engine(abc.ABC):
    """One model loaded in one inference engine.

    Args:
        model_path: folder holding the model (Hugging Face layout).
        served_name: the name requests use; engines that label their own metrics use it too.
        options: load options; :meth:`check_options` has already accepted them.
    """

    kind: ClassVar[EngineKind]
    #: Decoding controls this engine honours; a request that sets another gets INVALID_ARGUMENT.
    supported_controls: ClassVar[frozenset[str]] = ALL_CONTROLS
    #: Load options this engine understands; setting another gets INVALID_ARGUMENT.
    supported_options: ClassVar[frozenset[str]] = frozenset()
    #: True when the engine publishes the ``vllm:*`` metrics itself (vLLM does).
    exports_engine_metrics: ClassVar[bool] = False

    def __init__(self, model_path: Path, served_name: str, options: EngineOptions) -> None:
        self.model_path = Path(model_path)
        self.served_name = served_name
        self.options = options
        #: Seconds of the last :meth:`start` by phase, where the engine can tell: ``weights`` (reading
        #: the weights) and ``engine_start`` (the rest). Empty: the whole start counts as engine start.
        self.load_phases: dict[str, float] = {}

    # --- required ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the weights and tokenizer; return when the engine can generate."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Generate for one request, yielding deltas as tokens come; closing the iterator aborts it."""

    @abc.abstractmethod
    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of raw text."""

    @abc.abstractmethod
    async def tokenize_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool, tools: Sequence[Tool] = ()
    ) -> list[int]:
        """Token ids of a chat rendered with the model's chat template (offering ``tools``)."""

    @abc.abstractmethod
    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids."""

    @abc.abstractmethod
    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True while the engine can serve requests."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Abort what is running and free the engine's memory and processes."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Context length in tokens (prompt plus output)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model knows."""

    # --- optional hooks ---------------------------------------------------------------------------

    @property
    def max_concurrency(self) -> int:
        """Requests the engine works on at once; the service queues the rest (bounded)."""
        return 1

    def check_decoding(self, decoding: Decoding) -> None:
        """Refuse controls this engine cannot honour (INVALID_ARGUMENT naming the first one)."""
        unsupported = sorted(decoding.set_controls - self.supported_controls)
        if unsupported:
            raise InvalidArgument(
                f"the {self.kind.value} engine does not support {', '.join(unsupported)}",
                field=f"sampling.{unsupported[0]}",
            )

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        """Refuse load options this engine does not understand (INVALID_ARGUMENT naming them)."""
        unsupported = sorted(set(options.set_fields()) - cls.supported_options)
        if unsupported:
            raise InvalidArgument(
                f"the {cls.kind.value} engine does not support {', '.join(unsupported)}",
                field=f"options.{unsupported[0]}",
            )
        for name, value in options.extra_args.items():
            try:
                json.loads(value)
            except ValueError:
                raise InvalidArgument(f"{name}: value must be JSON", field="options.extra_args") from None

    @property
    def chat_template(self) -> str:
        """The model's chat template source ("" when it has none): tells whether it renders tools."""
        return ""

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer, for vLLM's tool-call parsers; ``None`` when there is none."""
        return None

    @property
    def is_embedding_model(self) -> bool:
        """True for a model loaded to embed (pooling) rather than to generate."""
        return False

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One vector per tokenized input, in order (embedding models only)."""
        raise FailedPrecondition(f"{self.served_name} is not an embedding model")

    def stats(self) -> EngineStats | None:
        """Current load, when the engine can tell (engines exporting their own metrics need not)."""
        return None

    async def load_adapter(self, name: str, path: Path) -> AdapterInfo:
        """Add a LoRA adapter that requests can then pick by ``name``."""
        raise FailedPrecondition(f"the {self.kind.value} engine does not serve LoRA adapters")

    async def unload_adapter(self, name: str) -> None:
        """Remove a LoRA adapter."""
        raise FailedPrecondition(f"the {self.kind.value} engine does not serve LoRA adapters")

    async def sleep(self, level: int = 1) -> None:
        """Free accelerator memory while idle (weights offloaded at level 1, dropped at level 2)."""
        raise Unimplemented(f"the {self.kind.value} engine cannot sleep")

    async def wake_up(self) -> None:
        """Undo :meth:`sleep`."""
        raise Unimplemented(f"the {self.kind.value} engine cannot sleep")


def decode_extra_args(options: EngineOptions) -> dict[str, object]:
    """``EngineOptions.extra_args`` with each value JSON-decoded."""
    return {name: json.loads(value) for name, value in options.extra_args.items()}

"""The serving service: the model table, request validation, queueing, generation and metrics.

Both APIs (gRPC in :mod:`grpc_app`, OpenAI HTTP in :mod:`http_app`) call :class:`ServingService` with
domain objects. Invariants it keeps:

* every request is validated before it reaches an engine (INVALID_ARGUMENT names the field), and an
  engine refuses controls it cannot honour instead of ignoring them;
* each model's queue is bounded (RESOURCE_EXHAUSTED beyond ``max_waiting``);
* a cancelled or failed request always aborts its engine work and frees its slot;
* a deadline that passes while queued or generating ends the request with DEADLINE_EXCEEDED;
* unloading drains in-flight requests for ``drain_timeout`` and then aborts them (finish reason ABORT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmops.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LLMOpsError,
    NotFound,
    Unavailable,
)
from llmops.serving.domain import (
    Completion,
    CompletionDelta,
    EngineKind,
    EngineOptions,
    EngineRequest,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    LoadedAdapter,
    LoadRequest,
    ModelInfo,
    ModelRef,
    ModelSelector,
    ModelSource,
    ModelState,
    StreamEnd,
    StreamEvent,
    TokenizeRequest,
    TokenizeResult,
    TokenLogprob,
    UnloadResult,
    Usage,
)
from llmops.serving.engines.base import Engine
from llmops.serving.lifecycle import ModelLifecycle
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.models import InFlight, ServedModel
from llmops.serving.resolver import ModelResolver
from llmops.serving.validation import Limits, check_prompt, check_request_id, check_token_ids, to_decoding

log = logging.getLogger(__name__)

#: Builds an engine for a model folder: (kind, folder, served name, options) -> engine (not started).
EngineFactory = Callable[[EngineKind, Path, str, EngineOptions], Engine]


@dataclass(frozen=True)
class ServingConfig:
    """How the service treats requests and models."""

    default_engine: EngineKind = EngineKind.VLLM
    max_waiting: int = 256
    limits: Limits = field(default_factory=Limits)
    drain_timeout: float = 30.0
    alias_poll_seconds: float = 30.0


@dataclass
class _Prepared:
    request_id: str
    entry: ServedModel
    engine: Engine
    engine_request: EngineRequest
    arrival: float
    deadline: float | None


class ServingService(ModelLifecycle):
    """Generation on the loaded models; loading and unloading come from :class:`ModelLifecycle`."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        resolver: ModelResolver,
        metrics: ServingMetrics,
        shim: EngineShimMetrics,
        config: ServingConfig | None = None,
    ) -> None:
        super().__init__(engine_factory, resolver, metrics, shim, config or ServingConfig())

    # --- generation -------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate every completion and return them whole."""
        prepared = await self._prepare(request)
        completions: dict[int, Completion] = {}
        end: StreamEnd | None = None
        async for event in self._run(prepared):
            if isinstance(event, StreamEnd):
                end = event
                continue
            done = completions.setdefault(event.index, Completion(event.index, "", [], FinishReason.ABORT))
            done.text += event.text
            done.token_ids.extend(event.token_ids)
            done.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                done.finish_reason = event.finish_reason
                done.stop_sequence = event.stop_sequence
                done.cumulative_logprob = event.cumulative_logprob
        assert end is not None
        return GenerationResult(
            request_id=prepared.request_id,
            served_name=end.served_name,
            model=end.model,
            completions=tuple(completions[i] for i in sorted(completions)),
            prompt_token_ids=end.prompt_token_ids,
            usage=end.usage,
            prompt_logprobs=end.prompt_logprobs,
        )

    async def generate_stream(self, request: GenerationRequest) -> tuple[str, AsyncIterator[StreamEvent]]:
        """Validate now (errors raise here), then stream deltas and a final :class:`StreamEnd`.

        Returns:
            The request id and the event stream; closing the stream aborts the generation.
        """
        prepared = await self._prepare(request)
        return prepared.request_id, self._run(prepared)

    async def _prepare(self, request: GenerationRequest) -> _Prepared:
        arrival = time.perf_counter()
        request_id = check_request_id(request.request_id) or uuid.uuid4().hex
        check_prompt(request.prompt)
        entry = await self._select(request.model)
        engine = entry.engine
        assert engine is not None
        if request.adapter and request.adapter not in entry.adapters:
            raise NotFound(f"adapter {request.adapter!r} is not loaded on {entry.served_name}")
        prompt = request.prompt
        if prompt.text is not None:
            token_ids = await engine.tokenize(prompt.text, add_special_tokens=True)
        elif prompt.token_ids is not None:
            check_token_ids(prompt.token_ids, engine.vocab_size, "prompt.tokens.token_ids")
            token_ids = list(prompt.token_ids)
        else:
            assert prompt.messages is not None
            token_ids = await engine.tokenize_chat(
                prompt.messages, add_generation_prompt=prompt.add_generation_prompt
            )
        if not token_ids:
            raise InvalidArgument("the prompt tokenizes to nothing", field="prompt")
        decoding = to_decoding(
            request.sampling,
            prompt_len=len(token_ids),
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            limits=self.config.limits,
        )
        engine.check_decoding(decoding)
        deadline = None if request.timeout is None else arrival + request.timeout
        engine_request = EngineRequest(request_id, tuple(token_ids), decoding, request.adapter)
        return _Prepared(request_id, entry, engine, engine_request, arrival, deadline)

    async def _select(self, selector: ModelSelector) -> ServedModel:
        if selector.served_name is not None:
            entry = self._models.get(selector.served_name)
            if entry is None:
                raise NotFound(f"no model {selector.served_name!r} is loaded on this server")
        elif selector.model_ref is not None:
            entry = await self._entry_for_ref(selector.model_ref)
        elif len(self._models) == 1:
            entry = next(iter(self._models.values()))  # one model: naming it is optional
        else:
            raise InvalidArgument("name the model: served_name or model_ref", field="model")
        if entry.state is not ModelState.READY:
            state = entry.state.value
            detail = f": {entry.info.error_message}" if entry.info.error_message else ""
            raise Unavailable(f"model {entry.served_name!r} is {state}{detail}")
        return entry

    async def _entry_for_ref(self, ref: ModelRef) -> ServedModel:
        resolved = await self._resolver.resolve_ref(ref)
        for entry in self._models.values():
            model = entry.info.model
            if model is not None and (model.name, model.version) == (resolved.name, resolved.version):
                return entry
        raise FailedPrecondition(
            f"{resolved.name}:{resolved.version} (from {ref}) is not loaded on this server"
        )

    async def _run(self, p: _Prepared) -> AsyncGenerator[StreamEvent, None]:
        entry, name = p.entry, p.entry.served_name
        in_flight = entry.enter(asyncio.current_task())
        admission = entry.admission
        assert admission is not None
        outcome, admitted = "error", False
        self.metrics.waiting.labels(name).inc()
        try:
            remaining = None if p.deadline is None else max(0.0, p.deadline - time.perf_counter())
            try:
                await admission.acquire(remaining)
            finally:
                self.metrics.waiting.labels(name).dec()
            admitted = True
            self.metrics.running.labels(name).inc()
            started = time.perf_counter()
            events = self._stream(p, started, in_flight)
            try:
                outcome = "abort"
                async for event in events:
                    if isinstance(event, CompletionDelta) and event.finish_reason is not None:
                        outcome = event.finish_reason.metric_label
                    yield event
            except Exception:
                outcome = "error"
                raise
            finally:
                await events.aclose()  # closes the engine's stream: aborts it when unfinished
                admission.release()
                self.metrics.running.labels(name).dec()
        finally:
            entry.leave(in_flight)
            if admitted:  # refused requests (full queue, deadline while queued) never started
                self.metrics.requests.labels(name, outcome).inc()

    async def _stream(
        self, p: _Prepared, started: float, in_flight: InFlight
    ) -> AsyncGenerator[StreamEvent, None]:
        """The engine's deltas, timed; an abort by unload turns into ABORT finishes."""
        name, shim_labels = p.entry.served_name, self.shim.labels(p.entry.served_name)
        shim = None if p.engine.exports_engine_metrics else self.shim
        if shim is not None:
            shim.queue_time.labels(*shim_labels).observe(started - p.arrival)
        d = p.engine_request.decoding
        prompt_len = len(p.engine_request.prompt_token_ids)
        unfinished = set(range(d.n))
        generated = cached = 0
        prompt_logprobs: list[TokenLogprob] = []
        first_at: float | None = None
        last_at = started
        stream = p.engine.generate(p.engine_request)
        try:
            async for output in stream:
                now = time.perf_counter()
                if p.deadline is not None and now > p.deadline:
                    raise DeadlineExceeded("the deadline passed during generation")
                if output.prompt_logprobs:
                    prompt_logprobs.extend(output.prompt_logprobs)
                cached = max(cached, output.cached_prompt_tokens)
                new_tokens = sum(len(delta.token_ids) for delta in output.deltas)
                if new_tokens:
                    if first_at is None:
                        first_at = now
                        self.metrics.ttft.labels(name).observe(now - p.arrival)
                        if shim is not None:
                            shim.ttft.labels(*shim_labels).observe(now - p.arrival)
                    else:
                        self.metrics.itl.labels(name).observe(now - last_at)
                        if shim is not None:
                            shim.itl.labels(*shim_labels).observe(now - last_at)
                    last_at = now
                    generated += new_tokens
                for delta in output.deltas:
                    if delta.finish_reason is not None:
                        unfinished.discard(delta.index)
                    yield delta
                    in_flight.task = asyncio.current_task()  # whoever drives the stream now
        except asyncio.CancelledError:
            if not in_flight.aborted:
                raise  # the client went away: nothing more to send
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            await stream.aclose()
        for index in sorted(unfinished):  # aborted by an unload
            yield CompletionDelta(index=index, finish_reason=FinishReason.ABORT)
        done = time.perf_counter()
        self.metrics.duration.labels(name).observe(done - p.arrival)
        self.metrics.generated_tokens.labels(name).inc(generated)
        self.metrics.prompt_tokens.labels(name).inc(prompt_len)
        if shim is not None:
            shim.e2e.labels(*shim_labels).observe(done - p.arrival)
            shim.generation_tokens.labels(*shim_labels).inc(generated)
            shim.prompt_tokens.labels(*shim_labels).inc(prompt_len)
        yield StreamEnd(
            served_name=name,
            model=p.entry.info.model,
            usage=Usage(prompt_len, generated, cached),
            prompt_token_ids=p.engine_request.prompt_token_ids,
            prompt_logprobs=tuple(prompt_logprobs),
        )

    # --- tokenizer --------------------------------------------------------------------------------

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResult:
        entry = await self._select(request.model)
        engine = entry.engine
        assert engine is not None
        if (request.text is None) == (request.messages is None):
            raise InvalidArgument("exactly one of text or chat must be set", field="input")
        if request.text is not None:
            ids = await engine.tokenize(request.text, add_special_tokens=request.add_special_tokens)
        else:
            assert request.messages is not None
            if not request.messages:
                raise InvalidArgument("must hold at least one message", field="chat.messages")
            ids = await engine.tokenize_chat(
                request.messages, add_generation_prompt=request.add_generation_prompt
            )
        strings = tuple(engine.token_strings(ids)) if request.return_token_strings else ()
        return TokenizeResult(tuple(ids), strings, engine.max_model_len)

    async def detokenize(
        self, selector: ModelSelector, token_ids: tuple[int, ...], skip_special_tokens: bool
    ) -> str:
        entry = await self._select(selector)
        engine = entry.engine
        assert engine is not None
        check_token_ids(token_ids, engine.vocab_size, "token_ids")
        return await engine.detokenize(token_ids, skip_special_tokens=skip_special_tokens)

    # --- re-exported for the APIs -----------------------------------------------------------------

    async def load_model(self, request: LoadRequest) -> ModelInfo:
        return await self.load(request)

    async def unload_model(self, selector: ModelSelector, drain_timeout: float | None) -> UnloadResult:
        return await self.unload(selector, drain_timeout)

    async def load_adapter(
        self, base: ModelSelector, source: ModelSource, name: str, replace: bool
    ) -> LoadedAdapter:
        entry = await self._select(base)
        return await self.add_adapter(entry, source, name, replace)

    async def unload_adapter(self, base: ModelSelector, name: str) -> ModelInfo:
        entry = await self._select(base)
        return await self.remove_adapter(entry, name)

    async def ready(self) -> bool:
        """Readiness: at least one model is READY and its engine healthy."""
        for entry in list(self._models.values()):
            if entry.state is ModelState.READY and entry.engine is not None:
                with contextlib.suppress(LLMOpsError):
                    if await entry.engine.health():
                        return True
        return False


__all__ = ["AlreadyExists", "EngineFactory", "ServingConfig", "ServingService"]

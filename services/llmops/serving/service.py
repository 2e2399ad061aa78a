"""The serving service: the model table, request validation, queueing, generation and metrics.

Both APIs (gRPC in :mod:`grpc_app`, OpenAI HTTP in :mod:`http_app`) call :class:`ServingService` with
domain objects. Invariants it keeps:

* every request is validated before it reaches an engine (INVALID_ARGUMENT names the field), and an
  engine refuses controls it cannot honour instead of ignoring them;
* each model's queue is bounded (RESOURCE_EXHAUSTED beyond ``max_waiting``);
* a cancelled or failed request always aborts its engine work and frees its slot;
* a deadline that passes while queued or generating ends the request with DEADLINE_EXCEEDED;
* unloading drains in-flight requests for ``drain_timeout`` and then aborts them (finish reason ABORT).

With a response cache (in process, straight to Redis): a deterministic request for a registry
version (and registry adapter, if any) is answered from the cache when an identical one was answered
before, with the same completions, prompt details and usage (``cached`` set, the request id its
own); identical misses at the same time generate once (single flight; one with a deadline waits
for the first at most ``single_flight_wait_share`` of its remaining time, then generates its own,
so a slow first request never makes it miss its deadline). Only complete answers are
stored (never ABORT, never a cancelled stream). Sampling without a seed, models or adapters loaded
from a local path and ``CacheControl`` opt-outs skip the lookup and/or the store. A cache that is
down never fails a request: it is answered from the engine. What is keyed, stored and replayed is
:mod:`llmops.serving.cached`; the model table (load, unload, adapters) is :mod:`llmops.serving.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

from llmops.common.auth import Identity, current_identity
from llmops.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LLMOpsError,
    NotFound,
    Unavailable,
)
from llmops.common.ratelimit import RateLimiter
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.domain import CacheKey, LookupOutcome
from llmops.serving.cached import Assembler, ResultCodec, cache_key, replay
from llmops.serving.config import EngineFactory, ServingConfig
from llmops.serving.domain import (
    CompletionDelta,
    EmbedRequest,
    EmbedResult,
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
from llmops.serving.embeddings import embed
from llmops.serving.engines.base import Engine
from llmops.serving.faults import FaultInjector
from llmops.serving.lifecycle import ModelLifecycle
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.models import Aborted, InFlight, ServedModel
from llmops.serving.resolver import ModelResolver
from llmops.serving.structured import ToolPlan, check_tools, plan_tools, with_tool_calls
from llmops.serving.validation import (
    check_prompt,
    check_prompt_size,
    check_request_id,
    check_token_ids,
    to_decoding,
)

log = logging.getLogger(__name__)


@dataclass
class _Admitted:
    """A request checked as far as it can be without tokenizing its prompt (a cache hit needs no more)."""

    request_id: str
    entry: ServedModel
    engine: Engine
    arrival: float
    deadline: float | None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (``None``: none): what the cache's single flight may
        spend a share of waiting for an identical request's answer."""
        return None if self.deadline is None else self.deadline - time.perf_counter()


@dataclass
class _Prepared(_Admitted):
    engine_request: EngineRequest
    #: How tool calls are enforced and parsed; ``None`` when the chat offers no tools.
    tools: ToolPlan | None = None


class ServingService(ModelLifecycle):
    """Generation on the loaded models; loading and unloading come from :class:`ModelLifecycle`."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        resolver: ModelResolver,
        metrics: ServingMetrics,
        shim: EngineShimMetrics,
        config: ServingConfig | None = None,
        cache: ResponseCache | None = None,
        limiter: RateLimiter | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        super().__init__(engine_factory, resolver, metrics, shim, config or ServingConfig())
        self.cache = cache
        self.limiter = limiter
        #: ``serving.faults`` (tests only): added latency and errors on every generation's stream
        self.faults = faults
        self._charges: set[asyncio.Task[None]] = set()

    # --- generation -------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate every completion and return them whole (from the response cache when it can).

        A cache hit is checked against the stored prompt's token count instead of tokenizing the
        prompt again (the same registry version tokenized the same text when it was stored).
        """
        admitted = await self._admit(request)
        key = self._cache_key(request, admitted)
        if self.cache is None or key is None:
            return await self._generate(await self._tokenized(request, admitted))
        codec = ResultCodec(admitted.request_id, admitted.entry)
        if request.cache_bypass or not key.cacheable:
            prepared = await self._tokenized(request, admitted)
            self.cache.metrics.count(LookupOutcome.BYPASS)
            result = await self._generate(prepared)
            if key.cacheable and not request.cache_no_store:
                await self._store(key, codec, result)
            return result
        if request.cache_no_store:
            cached = await self._lookup(key, codec)
            if cached is not None and await self._check_hit(request, admitted, cached):
                return cached
            return await self._generate(await self._tokenized(request, admitted))
        async with self.cache.flight(key, codec, timeout=admitted.remaining()) as flight:
            if (
                flight.hit
                and flight.value is not None
                and await self._check_hit(request, admitted, flight.value)
            ):
                return flight.value
            result = await self._generate(await self._tokenized(request, admitted))
            await flight.store(result)
            return result

    async def _generate(self, prepared: _Prepared) -> GenerationResult:
        assembler = Assembler()
        async for event in self._run(prepared):
            assembler.add(event)
        return assembler.result(prepared.request_id)

    async def generate_stream(self, request: GenerationRequest) -> tuple[str, AsyncIterator[StreamEvent]]:
        """Validate now (errors raise here), then stream deltas and a final :class:`StreamEnd`.

        A cache hit replays the stored answer as one delta per completion and the end, each with
        ``cached`` set; a miss is streamed from the engine and stored once complete.

        Returns:
            The request id and the event stream; closing the stream aborts the generation.
        """
        admitted = await self._admit(request)
        key = self._cache_key(request, admitted)
        if self.cache is None or key is None or request.cache_bypass or not key.cacheable:
            prepared = await self._tokenized(request, admitted)
            if self.cache is None or key is None:
                return prepared.request_id, self._run(prepared)
            return prepared.request_id, self._cached_stream(request, prepared, self.cache, key)
        return admitted.request_id, self._cached_stream(request, admitted, self.cache, key)

    async def _cached_stream(
        self, request: GenerationRequest, admitted: _Admitted, cache: ResponseCache, key: CacheKey
    ) -> AsyncGenerator[StreamEvent, None]:
        codec = ResultCodec(admitted.request_id, admitted.entry)
        store = key.cacheable and not request.cache_no_store
        if request.cache_bypass or not key.cacheable:
            assert isinstance(admitted, _Prepared)  # tokenized before the stream started
            prepared = admitted
            cache.metrics.count(LookupOutcome.BYPASS)
            bypassed = Assembler()
            async with contextlib.aclosing(self._run(prepared)) as events:
                async for event in events:
                    bypassed.add(event)
                    yield event
            if store:
                await self._store(key, codec, bypassed.result(prepared.request_id))
            return
        if request.cache_no_store:
            cached = await self._lookup(key, codec)
            if cached is not None and await self._check_hit(request, admitted, cached):
                for event in replay(cached):
                    yield event
                return
            prepared = await self._tokenized(request, admitted)
            async with contextlib.aclosing(self._run(prepared)) as events:
                async for event in events:
                    yield event
            return
        async with cache.flight(key, codec, timeout=admitted.remaining()) as flight:
            if (
                flight.hit
                and flight.value is not None
                and await self._check_hit(request, admitted, flight.value)
            ):
                for event in replay(flight.value):
                    yield event
                return
            prepared = await self._tokenized(request, admitted)
            assembler = Assembler()
            async with contextlib.aclosing(self._run(prepared)) as events:
                async for event in events:
                    assembler.add(event)
                    yield event
            await flight.store(assembler.result(prepared.request_id))

    def _cache_key(self, request: GenerationRequest, admitted: _Admitted) -> CacheKey | None:
        """The request's cache key (see :func:`~llmops.serving.cached.cache_key`); ``None`` without a cache."""
        if self.cache is None:
            return None
        return cache_key(request, admitted.entry, admitted.request_id)

    async def _check_hit(
        self, request: GenerationRequest, admitted: _Admitted, hit: GenerationResult
    ) -> bool:
        """Check a cached answer's request as a miss would be checked, with the stored prompt's token
        count (the same model version tokenized the same prompt); raises what a miss would raise.
        False when the entry has no prompt tokens to check with: the caller then generates."""
        if not hit.prompt_token_ids:
            return False
        engine = admitted.engine
        decoding = to_decoding(
            request.sampling,
            prompt_len=len(hit.prompt_token_ids),
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            limits=self.config.limits,
        )
        engine.check_decoding(decoding)
        return True

    async def _lookup(self, key: CacheKey, codec: ResultCodec) -> GenerationResult | None:
        assert self.cache is not None
        found = await self.cache.lookup(key)
        if found.entry is None:
            return None
        try:
            return codec.decode(found.entry.payload)
        except Exception:
            log.warning("undecodable cache entry %s; generating", key.digest, exc_info=True)
            return None

    async def _store(self, key: CacheKey, codec: ResultCodec, result: GenerationResult) -> None:
        assert self.cache is not None
        await self.cache.store(key, codec.encode(result), complete=codec.complete(result))

    async def _admit(self, request: GenerationRequest) -> _Admitted:
        """Everything checked before the prompt is tokenized: the id, the model, the prompt's size."""
        arrival = time.perf_counter()
        request_id = check_request_id(request.request_id) or uuid.uuid4().hex
        check_prompt(request.prompt)
        entry = await self._select(request.model)
        engine = entry.engine
        assert engine is not None
        if engine.is_embedding_model:
            raise FailedPrecondition(f"{entry.served_name} is an embedding model: use Embed (/v1/embeddings)")
        if request.adapter and request.adapter not in entry.adapters:
            raise NotFound(f"adapter {request.adapter!r} is not loaded on {entry.served_name}")
        prompt = request.prompt
        size = None if prompt.token_ids is None else len(prompt.token_ids)
        check_prompt_size(prompt.text, prompt.messages, engine.max_model_len, "prompt", tokens=size)
        deadline = None if request.timeout is None else arrival + request.timeout
        return _Admitted(request_id, entry, engine, arrival, deadline)

    async def _tokenized(self, request: GenerationRequest, admitted: _Admitted) -> _Prepared:
        """Tokenize the prompt and check the sampling controls against its length."""
        if isinstance(admitted, _Prepared):
            return admitted
        engine, prompt = admitted.engine, request.prompt
        sampling, plan = request.sampling, None
        if prompt.messages is None:
            check_tools(prompt)
        else:
            plan = plan_tools(prompt, sampling.structured_output, engine.chat_template)
            if plan is not None and plan.constraint is not None:
                sampling = replace(sampling, structured_output=plan.constraint)
        if prompt.text is not None:
            token_ids = await engine.tokenize(prompt.text, add_special_tokens=True)
        elif prompt.token_ids is not None:
            check_token_ids(prompt.token_ids, engine.vocab_size, "prompt.tokens.token_ids")
            token_ids = list(prompt.token_ids)
        else:
            assert prompt.messages is not None
            extra = {"tools": prompt.tools} if prompt.tools else {}
            token_ids = await engine.tokenize_chat(
                prompt.messages, add_generation_prompt=prompt.add_generation_prompt, **extra
            )
        if not token_ids:
            raise InvalidArgument("the prompt tokenizes to nothing", field="prompt")
        decoding = to_decoding(
            sampling,
            prompt_len=len(token_ids),
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            limits=self.config.limits,
        )
        engine.check_decoding(decoding)
        a = admitted
        engine_request = EngineRequest(a.request_id, tuple(token_ids), decoding, request.adapter)
        return _Prepared(a.request_id, a.entry, engine, a.arrival, a.deadline, engine_request, plan)

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
        if self.config.pool and ref.alias:
            # in a pool the pool decides which version its alias means here: while the pool rolls,
            # a replica not yet reloaded keeps answering for the alias instead of failing
            for entry in self._models.values():
                model = entry.info.model
                if model is not None and (model.name, model.alias) == (ref.name, ref.alias):
                    return entry
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
        identity = current_identity()
        if self.limiter is not None:
            await self.limiter.admit_generation(identity)  # the tenant's token budget is not spent
        in_flight = entry.enter()
        admission = entry.admission
        assert admission is not None
        outcome, admitted = "error", False
        self.metrics.waiting.labels(name).inc()
        try:
            remaining = None if p.deadline is None else max(0.0, p.deadline - time.perf_counter())
            try:
                with in_flight.interruptible():
                    await admission.acquire(remaining)
            except Aborted:
                raise Unavailable(f"model {name!r} was unloaded while the request waited") from None
            finally:
                self.metrics.waiting.labels(name).dec()
            admitted = True
            self.metrics.running.labels(name).inc()
            started = time.perf_counter()
            events = self._stream(p, started, in_flight)
            if p.tools is not None:
                events = with_tool_calls(events, p.tools, p.engine.hf_tokenizer)
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
                self._charge(identity, in_flight.tokens)

    def _charge(self, identity: Identity | None, tokens: int) -> None:
        """Charge a generation's tokens to its tenant, off the request's path (it may be cancelled)."""
        if self.limiter is None or identity is None or not tokens:
            return
        task = asyncio.ensure_future(self.limiter.charge_tokens(identity, tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

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
        in_flight.tokens = prompt_len
        stream = p.engine.generate(p.engine_request)
        if self.faults is not None:
            stream = self.faults.wrap(stream)
        try:
            while True:
                try:
                    with in_flight.interruptible():
                        output = await anext(stream, None)
                except Aborted:
                    break
                if output is None:
                    break
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
                        if p.entry.cold_start is not None:  # the load's first token: its last phase
                            p.entry.cold_start.first_token(now - p.arrival)
                            p.entry.cold_start = None
                        if shim is not None:
                            shim.ttft.labels(*shim_labels).observe(now - p.arrival)
                    else:
                        self.metrics.itl.labels(name).observe(now - last_at)
                        if shim is not None:
                            shim.itl.labels(*shim_labels).observe(now - last_at)
                    last_at = now
                    generated += new_tokens
                    in_flight.tokens += new_tokens
                for delta in output.deltas:
                    if delta.finish_reason is not None:
                        unfinished.discard(delta.index)
                    yield delta
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
        check_prompt_size(request.text, request.messages, engine.max_model_len, "input")
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
        check_prompt_size(None, None, engine.max_model_len, "token_ids", tokens=len(token_ids))
        check_token_ids(token_ids, engine.vocab_size, "token_ids")
        return await engine.detokenize(token_ids, skip_special_tokens=skip_special_tokens)

    # --- embeddings -------------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """One vector per input from an embedding model (FAILED_PRECONDITION for a generator)."""
        request_id = check_request_id(request.request_id) or uuid.uuid4().hex
        entry = await self._select(request.model)
        result = await embed(entry, request, request_id)
        self.metrics.prompt_tokens.labels(entry.served_name).inc(result.prompt_tokens)
        return result

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


__all__ = ["AlreadyExists", "ServingService"]

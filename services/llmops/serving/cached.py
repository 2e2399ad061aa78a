"""How a generation meets the response cache: its key, its stored form, and its replay.

The service (:mod:`llmops.serving.service`) decides when to look up, store or run single flight;
this module says what is looked up and stored. A request is keyed by the registry version (and
registry adapter) that serves it, the prompt, the sampling controls and the caller's tenant; a
non-deterministic request gets a bypass key. An answer is stored as a serialized
``GeneratedOutput`` (:class:`ResultCodec`), only when complete, and a hit is streamed back as one
delta per completion and the end (:func:`replay`), every event marked ``cached``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from llmops.common.auth import current_tenant
from llmops.common.errors import LLMOpsError
from llmops.common.response_cache.domain import CacheKey
from llmops.common.response_cache.keys import make_key
from llmops.proto.common.v1 import generation_pb2
from llmops.serving import convert
from llmops.serving.domain import (
    Completion,
    CompletionDelta,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamEnd,
    StreamEvent,
    ToolCall,
)
from llmops.serving.models import ServedModel
from llmops.serving.structured import tool_call_parts

log = logging.getLogger(__name__)


def cache_key(request: GenerationRequest, entry: ServedModel, request_id: str) -> CacheKey | None:
    """The request's cache key; ``None`` when the cache does not apply at all (a model or adapter
    loaded from a local path, or both opt-outs set). Non-deterministic requests get a bypass key
    (counted as bypass)."""
    if request.cache_bypass and request.cache_no_store:
        return None
    model = entry.info.model
    if model is None:
        return None
    adapter = None
    if request.adapter:
        loaded = entry.adapters.get(request.adapter)
        adapter = None if loaded is None else loaded.adapter
        if adapter is None:
            return None
    try:
        # The caller's tenant is part of the key: tenants never see each other's answers.
        key = make_key(model, request.prompt, request.sampling, tenant=current_tenant(), adapter=adapter)
    except LLMOpsError as exc:
        log.warning("no cache key for request %s: %s", request_id, exc)
        return None
    if key.cacheable and not deterministic(request.sampling):
        key = CacheKey(key.model, "", key.tenant, key.adapter)
    return key


class Assembler:
    """Builds the whole answer from a stream of events."""

    def __init__(self) -> None:
        self.completions: dict[int, Completion] = {}
        self.end: StreamEnd | None = None

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, StreamEnd):
            self.end = event
            return
        done = self.completions.setdefault(event.index, Completion(event.index, "", [], FinishReason.ABORT))
        done.text += event.text
        done.token_ids.extend(event.token_ids)
        done.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            done.finish_reason = event.finish_reason
            done.stop_sequence = event.stop_sequence
            done.cumulative_logprob = event.cumulative_logprob
        for part in event.tool_calls:
            if part.index < len(done.tool_calls):
                call = done.tool_calls[part.index]
                done.tool_calls[part.index] = replace(call, arguments=call.arguments + part.arguments)
            else:
                done.tool_calls.append(ToolCall(part.id, part.name, part.arguments))

    def result(self, request_id: str) -> GenerationResult:
        end = self.end
        assert end is not None
        return GenerationResult(
            request_id=request_id,
            served_name=end.served_name,
            model=end.model,
            completions=tuple(self.completions[i] for i in sorted(self.completions)),
            prompt_token_ids=end.prompt_token_ids,
            usage=end.usage,
            prompt_logprobs=end.prompt_logprobs,
        )


class ResultCodec:
    """A :class:`GenerationResult` as the cache stores it: a serialized ``GeneratedOutput``.

    Decoding answers for this request: its id, the model that serves it, ``cached`` set.
    """

    def __init__(self, request_id: str, entry: ServedModel) -> None:
        self._request_id = request_id
        self._served_name = entry.served_name
        self._model = entry.info.model

    def encode(self, value: GenerationResult) -> bytes:
        return convert.generated_output(value).SerializeToString()

    def decode(self, data: bytes) -> GenerationResult:
        output = generation_pb2.GeneratedOutput.FromString(data)
        return GenerationResult(
            request_id=self._request_id,
            served_name=self._served_name,
            model=self._model,
            completions=tuple(convert.completion_from_pb(c) for c in output.completions),
            prompt_token_ids=tuple(output.prompt_token_ids),
            usage=convert.usage_from_pb(output.usage),
            prompt_logprobs=tuple(convert.logprobs_from_pb(output.prompt_logprobs)),
            cached=True,
        )

    def complete(self, value: GenerationResult) -> bool:
        return bool(value.completions) and all(
            c.finish_reason is not FinishReason.ABORT for c in value.completions
        )


def deterministic(s: SamplingParams) -> bool:
    """What :attr:`Decoding.deterministic` says once ``s`` is checked: greedy (or temperature 0),
    beam search, or seeded. Read from the request, so a cache lookup needs no tokenized prompt."""
    return s.greedy or s.temperature == 0 or s.use_beam_search or s.seed is not None


def replay(result: GenerationResult) -> list[StreamEvent]:
    """A cached answer as a stream: one delta per completion, then the end; all marked cached."""
    events: list[StreamEvent] = [
        CompletionDelta(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            finish_reason=c.finish_reason,
            stop_sequence=c.stop_sequence,
            cumulative_logprob=c.cumulative_logprob,
            cached=True,
            tool_calls=tool_call_parts(c.tool_calls),
        )
        for c in result.completions
    ]
    events.append(
        StreamEnd(
            served_name=result.served_name,
            model=result.model,
            usage=result.usage,
            prompt_token_ids=result.prompt_token_ids,
            prompt_logprobs=result.prompt_logprobs,
            cached=True,
        )
    )
    return events

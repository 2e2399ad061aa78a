"""The response cache in front of the replicas: a deterministic request already answered is served
from Redis without touching a replica, and identical requests in flight at once (on this router or
another) compute once (single flight through the cache's Redis lock).

The key is the one serving computes (:func:`llmops.common.response_cache.keys.make_key`): the
version that will answer (the chosen replica's, never the alias), the adapter name is not resolved
here so requests naming an adapter bypass the router's cache (serving's own cache still applies),
the caller's tenant, the prompt and every sampling control. Generate runs single flight; a stream
is looked up (a hit is replayed as one delta per completion and the end) but not stored, so a
stream's first token never waits on another request.

Single flight here takes its lock under the ``router`` scope (:data:`LOCK_SCOPE`): serving, behind,
shares the entries (same key, same Redis) but takes its own lock, so the request the router's leader
forwards never waits on the router's lock (it would wait for itself until the flight gave up). An
identical request waits for the leader at most ``single_flight_wait_share`` of its remaining
deadline, then is forwarded on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from llmops.common.auth import current_tenant
from llmops.common.domain import ResolvedModel
from llmops.common.errors import LLMOpsError
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.codec import GeneratedOutputCodec
from llmops.common.response_cache.domain import CacheKey, LookupOutcome
from llmops.common.response_cache.keys import make_key
from llmops.common.response_cache.proto import deterministic, prompt_from_proto, sampling_from_proto
from llmops.proto.common.v1 import generation_pb2, model_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb

log = logging.getLogger(__name__)
CODEC = GeneratedOutputCodec()
#: The router's single-flight lock scope (serving's is the unscoped one).
LOCK_SCOPE = "router"


def request_key(
    request: pb.GenerateRequest | pb.GenerateStreamRequest, model: ResolvedModel | None
) -> CacheKey | None:
    """The request's cache key on ``model``; ``None`` when the router's cache does not apply."""
    if model is None or request.adapter or not request.HasField("prompt"):
        return None
    if request.cache.bypass or not deterministic(request.sampling):
        return None
    try:
        return make_key(
            model,
            prompt_from_proto(request.prompt),
            sampling_from_proto(request.sampling),
            tenant=current_tenant(),
        )
    except LLMOpsError as exc:  # a request the replica will refuse with its own message
        log.debug("no cache key: %s", exc)
        return None


def _resolved(model: ResolvedModel) -> model_pb2.ResolvedModel:
    return model_pb2.ResolvedModel(name=model.name, version=model.version, alias=model.alias)


class FrontCache:
    """The router's use of a :class:`ResponseCache`."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache
        self.hits = 0

    async def generate(
        self,
        request: pb.GenerateRequest,
        key: CacheKey,
        served_name: str,
        model: ResolvedModel,
        compute: Callable[[], Awaitable[pb.GenerateResponse]],
        timeout: float | None = None,
    ) -> pb.GenerateResponse:
        """The cached answer, or ``compute()``'s, stored for the next identical request.

        ``timeout``: seconds the caller has left; an identical request in flight is waited for at most
        a share of it (see :meth:`ResponseCache.wait_limit`).
        """
        computed: list[pb.GenerateResponse] = []

        async def output() -> generation_pb2.GeneratedOutput:
            response = await compute()
            computed.append(response)
            return response.output

        if request.cache.no_store:
            found = await self.cache.lookup(key)
            if found.entry is not None:
                return self._hit(request, served_name, model, CODEC.decode(found.entry.payload))
            return await compute()
        cached = await self.cache.get_or_compute(key, output, CODEC, timeout=timeout, lock_scope=LOCK_SCOPE)
        if computed:
            return computed[0]
        assert cached.outcome is LookupOutcome.HIT
        return self._hit(request, served_name, model, cached.value)

    def _hit(
        self, request: pb.GenerateRequest, served_name: str, model: ResolvedModel, output: object
    ) -> pb.GenerateResponse:
        self.hits += 1
        response = pb.GenerateResponse(
            request_id=request.request_id, served_name=served_name, model=_resolved(model), cached=True
        )
        response.output.CopyFrom(output)  # type: ignore[arg-type]
        return response

    async def replay(
        self, request: pb.GenerateStreamRequest, key: CacheKey, served_name: str, model: ResolvedModel
    ) -> list[pb.GenerateStreamResponse] | None:
        """A stored answer as stream messages, or ``None`` on a miss."""
        found = await self.cache.lookup(key)
        if found.entry is None:
            return None
        output = CODEC.decode(found.entry.payload)
        if any(c.tool_calls for c in output.completions):
            return None  # replayed by the replica, which streams these parts itself
        self.hits += 1
        messages = []
        for c in output.completions:
            delta = pb.CompletionDelta(
                index=c.index,
                text_delta=c.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_sequence=c.stop_sequence,
            )
            if c.HasField("cumulative_logprob"):
                delta.cumulative_logprob = c.cumulative_logprob
            messages.append(
                pb.GenerateStreamResponse(request_id=request.request_id, cached=True, delta=delta)
            )
        end = pb.GenerateStreamEnd(
            served_name=served_name,
            model=_resolved(model),
            usage=output.usage,
            prompt_token_ids=output.prompt_token_ids,
            prompt_logprobs=output.prompt_logprobs,
        )
        messages.append(pb.GenerateStreamResponse(request_id=request.request_id, cached=True, end=end))
        return messages

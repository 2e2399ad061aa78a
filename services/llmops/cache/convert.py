"""Proto <-> domain conversions of the cache API (the servicer stays a thin adapter over these)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from llmops.common.errors import InvalidArgument
from llmops.common.response_cache import keys
from llmops.common.response_cache.domain import (
    CacheKey,
    CacheStats,
    InvalidationScope,
    LookupOutcome,
    ResolvedModel,
    StoreOutcome,
)
from llmops.common.response_cache.proto import prompt_from_proto, sampling_from_proto
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import model_pb2

LOOKUP_OUTCOMES = {
    LookupOutcome.HIT: pb.CACHE_OUTCOME_HIT,
    LookupOutcome.MISS: pb.CACHE_OUTCOME_MISS,
    LookupOutcome.BYPASS: pb.CACHE_OUTCOME_BYPASS,
    LookupOutcome.ERROR: pb.CACHE_OUTCOME_ERROR,
}
STORE_OUTCOMES = {
    StoreOutcome.STORED: pb.STORE_OUTCOME_STORED,
    StoreOutcome.SKIPPED_NONDETERMINISTIC: pb.STORE_OUTCOME_SKIPPED_NONDETERMINISTIC,
    StoreOutcome.SKIPPED_INCOMPLETE: pb.STORE_OUTCOME_SKIPPED_INCOMPLETE,
    StoreOutcome.SKIPPED_TOO_LARGE: pb.STORE_OUTCOME_SKIPPED_TOO_LARGE,
    StoreOutcome.ERROR: pb.STORE_OUTCOME_ERROR,
}


def model_from_proto(message: model_pb2.ResolvedModel) -> ResolvedModel:
    return ResolvedModel(message.name, message.version, message.alias)


def key_from_proto(message: pb.CacheKey, has_key: bool) -> CacheKey:
    """The domain key of a request's ``key`` field (hashing it unless a digest is given)."""
    if not has_key:
        raise InvalidArgument("a key is required", field="key")
    if not message.HasField("model"):
        raise InvalidArgument("the resolved model is required", field="key.model")
    model = model_from_proto(message.model)
    adapter = model_from_proto(message.adapter) if message.HasField("adapter") else None
    if message.digest:
        return keys.key_from_digest(model, message.digest, tenant=message.tenant, adapter=adapter)
    if not message.HasField("prompt"):
        raise InvalidArgument("a prompt (or a digest) is required", field="key.prompt")
    return keys.make_key(
        model,
        prompt_from_proto(message.prompt),
        sampling_from_proto(message.sampling),
        tenant=message.tenant,
        adapter=adapter,
    )


def scope_from_proto(message: pb.InvalidateRequest) -> InvalidationScope:
    which = message.WhichOneof("scope")
    if which == "alias" and not message.alias:
        raise InvalidArgument("must not be empty when set", field="alias")
    return InvalidationScope(
        model_name=message.model_name,
        version=message.version if which == "version" else None,
        alias=message.alias if which == "alias" else None,
        tenant=message.tenant or None,
    )


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def stats_to_proto(stats: CacheStats) -> pb.StatsResponse:
    return pb.StatsResponse(
        hits=stats.hits,
        misses=stats.misses,
        bypasses=stats.bypasses,
        errors=stats.errors,
        stores=stats.stores,
        invalidated=stats.invalidated,
        entries=stats.entries,
        bytes=stats.bytes,
        hit_ratio=stats.hit_ratio,
        since=timestamp(stats.since),
    )

"""Proto <-> domain conversions of the cache API (the servicer stays a thin adapter over these)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from llmops.common.errors import InvalidArgument
from llmops.common.response_cache import keys
from llmops.common.response_cache.domain import (
    CacheKey,
    CacheStats,
    ChatMessage,
    InvalidationScope,
    LookupOutcome,
    Prompt,
    ResolvedModel,
    SamplingParams,
    StoreOutcome,
)
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2

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


def prompt_from_proto(message: generation_pb2.Prompt) -> Prompt:
    kind = message.WhichOneof("kind")
    if kind == "text":
        return Prompt(text=message.text)
    if kind == "tokens":
        if not message.tokens.token_ids:
            raise InvalidArgument("at least one token id", field="key.prompt.tokens.token_ids")
        return Prompt(token_ids=tuple(message.tokens.token_ids))
    if kind == "chat":
        if not message.chat.messages:
            raise InvalidArgument("at least one message", field="key.prompt.chat.messages")
        return Prompt(
            messages=tuple(ChatMessage(m.role, m.content, m.name) for m in message.chat.messages),
            add_generation_prompt=(
                message.chat.add_generation_prompt if message.chat.HasField("add_generation_prompt") else True
            ),
        )
    raise InvalidArgument("one of text, tokens or chat must be set", field="key.prompt")


def sampling_from_proto(m: sampling_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        greedy=m.greedy,
        temperature=m.temperature if m.HasField("temperature") else None,
        top_k=m.top_k,
        top_p=m.top_p if m.HasField("top_p") else None,
        min_p=m.min_p,
        repetition_penalty=m.repetition_penalty if m.HasField("repetition_penalty") else None,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        logit_bias=dict(m.logit_bias),
        stop=tuple(m.stop),
        stop_token_ids=tuple(m.stop_token_ids),
        include_stop_str_in_output=m.include_stop_str_in_output,
        ignore_eos=m.ignore_eos,
        max_tokens=m.max_tokens if m.HasField("max_tokens") else None,
        min_tokens=m.min_tokens,
        seed=m.seed if m.HasField("seed") else None,
        n=m.n,
        use_beam_search=m.use_beam_search,
        beam_width=m.beam_width,
        length_penalty=m.length_penalty if m.HasField("length_penalty") else None,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        prompt_logprobs=m.prompt_logprobs if m.HasField("prompt_logprobs") else None,
        skip_special_tokens=m.skip_special_tokens if m.HasField("skip_special_tokens") else None,
    )


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

"""Proto -> domain forms of what a cache key hashes (the prompt and the sampling controls), shared by
the cache service (whose API carries them) and the router (which keys serving requests it answers
from the cache before choosing a replica)."""

from __future__ import annotations

from llmops.common.errors import InvalidArgument
from llmops.common.response_cache.domain import ChatMessage, Prompt, SamplingParams
from llmops.proto.common.v1 import generation_pb2, sampling_pb2


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


def deterministic(m: sampling_pb2.SamplingParams) -> bool:
    """Greedy (or temperature 0), beam search, or seeded: the requests whose answers are cached."""
    return (
        m.greedy
        or (m.HasField("temperature") and m.temperature == 0)
        or m.use_beam_search
        or m.HasField("seed")
    )

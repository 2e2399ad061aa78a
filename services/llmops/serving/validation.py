"""Request validation: every bad input fails here with INVALID_ARGUMENT naming the field.

:func:`to_decoding` turns the client's :class:`SamplingParams` into a :class:`Decoding` once the prompt
is tokenized (the context length bounds ``max_tokens``). The ranges are the API's, documented in
``protos/llmops/common/v1/sampling.proto``; :class:`Limits` holds the ones a server may tighten.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llmops.common.errors import InvalidArgument
from llmops.serving.domain import ChatMessage, Decoding, Prompt, SamplingParams
from llmops.serving.structured import check_structured_output

MAX_N = 16
MAX_BEAM_WIDTH = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 64
#: Prompt text (or chat content) per token of context, in UTF-8 bytes, checked before tokenizing:
#: real text averages 3-6 bytes a token, and tokenizing is the one cost a refused prompt would
#: still pay (8 MiB take ~6 s of CPU here), so a 2,048-token model takes at most 64 KiB.
MAX_PROMPT_BYTES_PER_TOKEN = 32
MAX_TEMPERATURE = 100.0
#: A positive temperature below this samples as this one (vLLM does the same): dividing logits by
#: 1e-97 gives infinities, and their softmax NaN probabilities that no sampler can draw from.
MIN_TEMPERATURE = 0.01
#: A repetition penalty divides or multiplies logits: outside this range they overflow the same way.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
#: Controls that only mean something when sampling; beam search refuses them.
SAMPLING_ONLY = ("greedy", "temperature", "top_k", "top_p", "min_p")
#: Controls the shared beam search cannot honour (it ranks raw log-probabilities), refused with it.
BEAM_UNSUPPORTED = (
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "stop", "logprobs",
    "prompt_logprobs", "structured_output",
)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Bounds a server enforces on every request."""

    max_n: int = MAX_N
    max_beam_width: int = MAX_BEAM_WIDTH
    max_logprobs: int = MAX_LOGPROBS
    #: Cap on max_tokens per completion; 0 means only the context length bounds it.
    max_tokens: int = 0


def check_served_name(name: str, field: str = "served_name") -> str:
    """A served or adapter name: 1-128 characters from ``[A-Za-z0-9._:/-]``."""
    if not _NAME.match(name):
        raise InvalidArgument(f"{name!r} must be 1-128 characters from [A-Za-z0-9._:/-]", field=field)
    return name


def check_request_id(request_id: str) -> str:
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgument(f"at most {MAX_REQUEST_ID_BYTES} bytes", field="request_id")
    return request_id


def check_prompt(prompt: Prompt) -> None:
    """Exactly one non-empty form of prompt."""
    given = [p for p in (prompt.text, prompt.token_ids, prompt.messages) if p is not None]
    if len(given) != 1:
        raise InvalidArgument("exactly one of text, tokens or chat must be set", field="prompt")
    if prompt.text is not None and not prompt.text:
        raise InvalidArgument("must not be empty", field="prompt.text")
    if prompt.token_ids is not None and not prompt.token_ids:
        raise InvalidArgument("must hold at least one token id", field="prompt.tokens.token_ids")
    if prompt.messages is not None:
        if not prompt.messages:
            raise InvalidArgument("must hold at least one message", field="prompt.chat.messages")
        for i, message in enumerate(prompt.messages):
            if not message.role:
                raise InvalidArgument("must not be empty", field=f"prompt.chat.messages[{i}].role")


def check_prompt_size(
    text: str | None,
    messages: Sequence[ChatMessage] | None,
    max_model_len: int,
    field: str,
    *,
    tokens: int | None = None,
) -> None:
    """Refuse text (or chat content) too long for the context before tokenizing it, and token lists
    longer than the context."""
    limit = MAX_PROMPT_BYTES_PER_TOKEN * max_model_len
    size = len(text.encode()) if text is not None else 0
    for message in messages or ():
        size += len(message.role.encode()) + len(message.content.encode())
    if size > limit:
        raise InvalidArgument(
            f"{size} bytes cannot fit the model's {max_model_len}-token context "
            f"(at most {limit} bytes: {MAX_PROMPT_BYTES_PER_TOKEN} per token)",
            field=field,
        )
    if tokens is not None and tokens > max_model_len:
        raise InvalidArgument(
            f"{tokens} token ids are more than the model's context of {max_model_len}", field=field
        )


def check_token_ids(token_ids: tuple[int, ...] | list[int], vocab_size: int, field: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidArgument(
                f"token id {token_id} is outside the vocabulary [0, {vocab_size})", field=field
            )


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument("must be a finite number", field=field)
    return value


def to_decoding(
    sampling: SamplingParams,
    *,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    limits: Limits | None = None,
) -> Decoding:
    """Check every control and fill in the defaults.

    Args:
        sampling: the controls as sent.
        prompt_len: tokens in the prompt after templating.
        max_model_len: the model's context length.
        vocab_size: size of the model's vocabulary (token ids are checked against it).
        limits: server bounds; the API's when omitted.

    Raises:
        InvalidArgument: naming the first bad field (``sampling.<name>``).
    """
    limits = limits or Limits()
    s = sampling
    f = "sampling."
    if prompt_len >= max_model_len:
        raise InvalidArgument(
            f"the prompt has {prompt_len} tokens; the model's context is {max_model_len}, "
            f"so at most {max_model_len - 1} leave room for output",
            field="prompt",
        )
    room = max_model_len - prompt_len
    # Sampling controls.
    temperature = 1.0 if s.temperature is None else _finite(s.temperature, f + "temperature")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"must be in [0, {MAX_TEMPERATURE:g}]", field=f + "temperature")
    greedy = s.greedy or temperature == 0
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    if s.top_k < 0:
        raise InvalidArgument("must be >= 0 (0 means no limit)", field=f + "top_k")
    top_p = 1.0 if s.top_p is None else _finite(s.top_p, f + "top_p")
    if not 0 < top_p <= 1:
        raise InvalidArgument("must be in (0, 1]", field=f + "top_p")
    if not 0 <= _finite(s.min_p, f + "min_p") <= 1:
        raise InvalidArgument("must be in [0, 1]", field=f + "min_p")
    # Penalties.
    repetition = (
        1.0 if s.repetition_penalty is None else _finite(s.repetition_penalty, f + "repetition_penalty")
    )
    low, high = REPETITION_PENALTY_RANGE
    if not low <= repetition <= high:
        raise InvalidArgument(f"must be in [{low:g}, {high:g}] (1 means off)", field=f + "repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= _finite(getattr(s, name), f + name) <= 2:
            raise InvalidArgument("must be in [-2, 2]", field=f + name)
    if len(s.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"at most {MAX_LOGIT_BIAS} entries", field=f + "logit_bias")
    for token_id, bias in s.logit_bias.items():
        check_token_ids([token_id], vocab_size, f + "logit_bias")
        if not -100 <= _finite(bias, f + "logit_bias") <= 100:
            raise InvalidArgument(f"bias of token {token_id} must be in [-100, 100]", field=f + "logit_bias")
    # Stopping.
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings", field=f + "stop")
    for stop in s.stop:
        if not stop or len(stop.encode()) > MAX_STOP_BYTES:
            raise InvalidArgument(f"each stop string must be 1-{MAX_STOP_BYTES} bytes", field=f + "stop")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop token ids", field=f + "stop_token_ids")
    check_token_ids(s.stop_token_ids, vocab_size, f + "stop_token_ids")
    if s.max_tokens is not None and s.max_tokens <= 0:
        raise InvalidArgument("must be >= 1", field=f + "max_tokens")
    if limits.max_tokens and s.max_tokens is not None and s.max_tokens > limits.max_tokens:
        raise InvalidArgument(f"must be <= {limits.max_tokens} on this server", field=f + "max_tokens")
    if s.max_tokens is not None and s.max_tokens > room:
        raise InvalidArgument(
            f"{s.max_tokens} output tokens do not fit: the prompt has {prompt_len} tokens and the "
            f"context is {max_model_len}, leaving room for {room}",
            field=f + "max_tokens",
        )
    max_tokens = s.max_tokens if s.max_tokens is not None else min(room, limits.max_tokens or room)
    if not 0 <= s.min_tokens <= max_tokens:
        raise InvalidArgument(f"must be in [0, max_tokens={max_tokens}]", field=f + "min_tokens")
    # Several completions and beam search.
    n = s.n or 1
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument(f"must be in [1, {limits.max_n}] (0 means 1)", field=f + "n")
    beam_width = 0
    if s.use_beam_search:
        set_controls = set(s.set_fields())
        clash = [name for name in SAMPLING_ONLY if name in set_controls]
        if clash:
            raise InvalidArgument(
                f"beam search does not sample: leave {', '.join(clash)} unset", field=f + clash[0]
            )
        clash = [name for name in BEAM_UNSUPPORTED if name in set_controls]
        if clash:
            raise InvalidArgument(
                f"not supported with beam search: leave {', '.join(clash)} unset", field=f + clash[0]
            )
        beam_width = s.beam_width or max(n, 4)
        if not 1 <= beam_width <= limits.max_beam_width:
            raise InvalidArgument(f"must be in [1, {limits.max_beam_width}]", field=f + "beam_width")
        if n > beam_width:
            raise InvalidArgument(f"n={n} beams cannot be returned from {beam_width}", field=f + "n")
        greedy = False
    elif s.beam_width:
        raise InvalidArgument("only meaningful with use_beam_search", field=f + "beam_width")
    elif greedy and n > 1:
        raise InvalidArgument(
            "greedy decoding would repeat one completion: sample to get n > 1", field=f + "n"
        )
    if s.length_penalty is not None:
        _finite(s.length_penalty, f + "length_penalty")
        if not s.use_beam_search:
            raise InvalidArgument("only meaningful with use_beam_search", field=f + "length_penalty")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(s, name)
        if value is not None and not 0 <= value <= limits.max_logprobs:
            raise InvalidArgument(f"must be in [0, {limits.max_logprobs}]", field=f + name)
    if s.structured_output is not None:
        check_structured_output(s.structured_output)
    return Decoding(
        max_tokens=max_tokens,
        greedy=greedy,
        temperature=0.0 if greedy else temperature,
        top_k=s.top_k,
        top_p=top_p,
        min_p=s.min_p,
        repetition_penalty=repetition,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias=dict(s.logit_bias),
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        include_stop_str_in_output=s.include_stop_str_in_output,
        ignore_eos=s.ignore_eos,
        min_tokens=s.min_tokens,
        seed=s.seed,
        n=n,
        use_beam_search=s.use_beam_search,
        beam_width=beam_width,
        length_penalty=1.0 if s.length_penalty is None else s.length_penalty,
        logprobs=s.logprobs,
        prompt_logprobs=s.prompt_logprobs,
        skip_special_tokens=True if s.skip_special_tokens is None else s.skip_special_tokens,
        set_controls=frozenset(s.set_fields()),
        structured_output=s.structured_output,
    )

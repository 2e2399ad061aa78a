"""Cache keys: a sha256 digest over a canonical encoding of everything that decides an answer.

Hashed: the resolved model version (name and number, never the alias: a version answers the same
whatever alias reached it, and an alias that moves reaches a different version, so a different
key), the adapter version, the tenant (entries are never shared across tenants), the prompt as the
client sent it (text, token ids, or chat messages plus ``add_generation_prompt``; the chat template
is fixed by the version and adapter, so equal messages render to equal text), and every sampling
parameter that can change the output, with defaults filled in.

Canonical form, so that equal requests always hash equal:

* JSON with sorted keys, no spaces, ASCII only; each value tagged by its field name.
* Floats are the protobuf ``float`` they travel as: rounded to IEEE float32 and written as the 8 hex
  digits of its bits (``-0.0`` is ``0.0``), so 0.7 from HTTP JSON and 0.7 through gRPC (0.69999999)
  hash alike, and no ``repr`` is involved. NaN is refused.
* Unset fields take their documented default (temperature, top_p, repetition and length penalties
  1.0; ``n`` 0 is 1; beam width 0 is ``max(n, 4)``; ``skip_special_tokens`` true), so sending a
  default explicitly or leaving it out is the same request.
* Greedy decoding (``greedy`` or temperature 0) drops exactly the controls sampling.proto says
  greedy ignores: temperature, top_k, top_p, min_p and seed.
* ``logit_bias`` is sorted by token id; ``stop_token_ids`` is a set (sorted, deduplicated). ``stop``
  strings keep their order (which one matched is part of the answer).
* Fields whose unset and zero differ (``logprobs``, ``max_tokens``...) keep ``null`` apart from 0.
* A structured-output constraint, a chat's tools, tool choice and ``parallel_tool_calls``, and a turn's
  tool calls and tool call id are hashed only when set, so requests without them keep their keys.

Anything not normalized above changes the digest when it changes: normalizing too little only costs
hits, normalizing too much would serve a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from llmops.common.errors import InvalidArgument
from llmops.common.response_cache.domain import CacheKey, ResolvedModel, check_model_name, check_tenant

#: Version of the canonical form; part of every digest, bumped when the encoding changes.
KEY_VERSION = "v1"
DIGEST_PATTERN = re.compile(r"^v1:[0-9a-f]{64}$")


class ModelLike(Protocol):
    """A resolved registry version: serving's ``ResolvedModel`` and ours both fit."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def alias(self) -> str: ...


class ChatMessageLike(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def name(self) -> str: ...


class PromptLike(Protocol):
    """Exactly one of ``text``, ``token_ids``, ``messages`` is not ``None``."""

    @property
    def text(self) -> str | None: ...
    @property
    def token_ids(self) -> Sequence[int] | None: ...
    @property
    def messages(self) -> Sequence[ChatMessageLike] | None: ...
    @property
    def add_generation_prompt(self) -> bool: ...


class SamplingLike(Protocol):
    """The fields of ``llmops.common.v1.SamplingParams``, ``None`` where optional and unset."""

    @property
    def greedy(self) -> bool: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> Mapping[int, float]: ...
    @property
    def stop(self) -> Sequence[str]: ...
    @property
    def stop_token_ids(self) -> Sequence[int]: ...
    @property
    def include_stop_str_in_output(self) -> bool: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def n(self) -> int: ...
    @property
    def use_beam_search(self) -> bool: ...
    @property
    def beam_width(self) -> int: ...
    @property
    def length_penalty(self) -> float | None: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def prompt_logprobs(self) -> int | None: ...
    @property
    def skip_special_tokens(self) -> bool | None: ...


def _is_greedy(sampling: SamplingLike) -> bool:
    return bool(sampling.greedy) or (sampling.temperature is not None and sampling.temperature == 0.0)


def is_cacheable(sampling: SamplingLike) -> bool:
    """Whether the request's answer is reproducible: greedy, beam search, or sampling with a seed."""
    return _is_greedy(sampling) or bool(sampling.use_beam_search) or sampling.seed is not None


def _f32(value: float, field: str) -> str:
    number = float(value)
    if math.isnan(number):
        raise InvalidArgument("must be a number, got NaN", field=field)
    try:
        return struct.pack(">f", number + 0.0).hex()  # + 0.0 turns -0.0 into 0.0
    except OverflowError:
        raise InvalidArgument(f"out of float32 range: {number}", field=field) from None


def _opt_f32(value: float | None, default: float, field: str) -> str:
    return _f32(default if value is None else value, field)


def canonical_sampling(sampling: SamplingLike) -> dict[str, Any]:
    """The sampling controls with defaults filled in and ignored controls dropped (see module doc)."""
    s = sampling
    n = int(s.n) or 1
    greedy = _is_greedy(s)
    mode = "beam" if s.use_beam_search else "greedy" if greedy else "sample"
    out: dict[str, Any] = {
        "mode": mode,
        "n": n,
        "repetition_penalty": _opt_f32(s.repetition_penalty, 1.0, "sampling.repetition_penalty"),
        "presence_penalty": _f32(s.presence_penalty, "sampling.presence_penalty"),
        "frequency_penalty": _f32(s.frequency_penalty, "sampling.frequency_penalty"),
        "logit_bias": [
            [int(token), _f32(bias, "sampling.logit_bias")] for token, bias in sorted(s.logit_bias.items())
        ],
        "stop": [str(text) for text in s.stop],
        "stop_token_ids": sorted({int(token) for token in s.stop_token_ids}),
        "include_stop_str_in_output": bool(s.include_stop_str_in_output),
        "ignore_eos": bool(s.ignore_eos),
        "max_tokens": None if s.max_tokens is None else int(s.max_tokens),
        "min_tokens": int(s.min_tokens),
        "beam_width": (int(s.beam_width) or max(n, 4)) if s.use_beam_search else int(s.beam_width),
        "length_penalty": _opt_f32(s.length_penalty, 1.0, "sampling.length_penalty"),
        "logprobs": None if s.logprobs is None else int(s.logprobs),
        "prompt_logprobs": None if s.prompt_logprobs is None else int(s.prompt_logprobs),
        "skip_special_tokens": True if s.skip_special_tokens is None else bool(s.skip_special_tokens),
    }
    structured = getattr(s, "structured_output", None)
    if structured is not None:  # only when set: keys of requests without one stay as they were
        out["structured_output"] = {
            "json_schema": structured.json_schema,
            "json_object": bool(structured.json_object),
            "regex": structured.regex,
            "choice": [str(c) for c in structured.choice],
        }
    if not greedy:  # greedy ignores these (sampling.proto); beam search keeps them, conservatively
        out["temperature"] = _opt_f32(s.temperature, 1.0, "sampling.temperature")
        out["top_k"] = int(s.top_k)
        out["top_p"] = _opt_f32(s.top_p, 1.0, "sampling.top_p")
        out["min_p"] = _f32(s.min_p, "sampling.min_p")
        out["seed"] = None if s.seed is None else int(s.seed)
    return out


def canonical_prompt(prompt: PromptLike) -> dict[str, Any]:
    """The prompt tagged by its form; raises :class:`InvalidArgument` unless exactly one is set."""
    forms = [f for f in ("text", "token_ids", "messages") if getattr(prompt, f) is not None]
    if len(forms) != 1:
        raise InvalidArgument("exactly one of text, token ids or chat messages must be set", field="prompt")
    if prompt.text is not None:
        return {"text": str(prompt.text)}
    if prompt.token_ids is not None:
        return {"token_ids": [int(token) for token in prompt.token_ids]}
    assert prompt.messages is not None
    chat: dict[str, Any] = {
        "messages": [_message(m) for m in prompt.messages],
        "add_generation_prompt": bool(prompt.add_generation_prompt),
    }
    tools = getattr(prompt, "tools", ())
    choice = getattr(prompt, "tool_choice", None)
    if tools or choice is not None:  # only when set: keys of chats without tools stay as they were
        chat["tools"] = [[t.name, t.description, t.parameters] for t in tools]
        chat["tool_choice"] = None if choice is None else [choice.mode, choice.function]
        chat["parallel_tool_calls"] = bool(getattr(prompt, "parallel_tool_calls", True))
    return chat


def _message(m: ChatMessageLike) -> list[Any]:
    """A turn: role, content, name, then its tool calls and tool call id when it has them."""
    turn: list[Any] = [str(m.role), str(m.content), str(m.name)]
    calls = getattr(m, "tool_calls", ())
    call_id = getattr(m, "tool_call_id", "")
    if calls or call_id:
        turn += [[[c.id, c.name, c.arguments] for c in calls], str(call_id)]
    return turn


def _model(model: ModelLike, field: str) -> ResolvedModel:
    check_model_name(model.name, f"{field}.name")
    if int(model.version) < 1:
        raise InvalidArgument(
            f"a resolved version >= 1 is required, got {model.version}", field=f"{field}.version"
        )
    return ResolvedModel(model.name, int(model.version), model.alias or "")


def canonical_encoding(
    model: ModelLike,
    prompt: PromptLike,
    sampling: SamplingLike,
    *,
    tenant: str = "",
    adapter: ModelLike | None = None,
) -> bytes:
    """The bytes the digest is taken over (exposed for tests and debugging)."""
    resolved = _model(model, "model")
    resolved_adapter = None if adapter is None else _model(adapter, "adapter")
    document = {
        "key": KEY_VERSION,
        "model": [resolved.name, resolved.version],  # never the alias
        "adapter": None if resolved_adapter is None else [resolved_adapter.name, resolved_adapter.version],
        "tenant": tenant,
        "prompt": canonical_prompt(prompt),
        "sampling": canonical_sampling(sampling),
    }
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def make_key(
    model: ModelLike,
    prompt: PromptLike,
    sampling: SamplingLike,
    *,
    tenant: str = "",
    adapter: ModelLike | None = None,
) -> CacheKey:
    """The key of a request; its digest is ``""`` (bypass) when the request is not reproducible.

    Raises:
        InvalidArgument: a bad model name or version, no prompt, or a NaN / out-of-range float.
    """
    check_tenant(tenant, "tenant")
    resolved = _model(model, "model")
    resolved_adapter = None if adapter is None else _model(adapter, "adapter")
    if not is_cacheable(sampling):
        canonical_prompt(prompt)  # still refuse malformed requests
        return CacheKey(resolved, "", tenant, resolved_adapter)
    encoded = canonical_encoding(model, prompt, sampling, tenant=tenant, adapter=adapter)
    return CacheKey(
        resolved, f"{KEY_VERSION}:{hashlib.sha256(encoded).hexdigest()}", tenant, resolved_adapter
    )


def key_from_digest(
    model: ModelLike, digest: str, *, tenant: str = "", adapter: ModelLike | None = None
) -> CacheKey:
    """A key whose digest the caller computed before (e.g. from an earlier lookup).

    Raises:
        InvalidArgument: the digest is not ``v1:`` and 64 lower-case hex digits, or a bad model.
    """
    if not DIGEST_PATTERN.match(digest):
        raise InvalidArgument("must be 'v1:' followed by 64 lower-case hex digits", field="digest")
    check_tenant(tenant, "tenant")
    return CacheKey(
        _model(model, "model"), digest, tenant, None if adapter is None else _model(adapter, "adapter")
    )

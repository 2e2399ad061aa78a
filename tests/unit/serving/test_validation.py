"""Request validation: every bad control fails with INVALID_ARGUMENT naming its field; defaults fill in.

A table of (controls, field) pairs guards the ranges documented in sampling.proto; the happy path
checks that unset values become the documented defaults and that beam search refuses sampling-only
and unsupported controls instead of ignoring them.
"""

from __future__ import annotations

import math

import pytest

from llmops.common.errors import InvalidArgument
from llmops.serving.domain import ChatMessage, Prompt, SamplingParams
from llmops.serving.validation import Limits, check_prompt, check_request_id, check_served_name, to_decoding

CONTEXT, VOCAB = 128, 100


def decode(prompt_len: int = 10, limits: Limits | None = None, **controls: object):
    return to_decoding(
        SamplingParams(**controls),  # type: ignore[arg-type]
        prompt_len=prompt_len,
        max_model_len=CONTEXT,
        vocab_size=VOCAB,
        limits=limits,
    )


BAD = [
    ({"temperature": -0.1}, "sampling.temperature"),
    ({"temperature": 101.0}, "sampling.temperature"),
    ({"temperature": math.nan}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_k": -1}, "sampling.top_k"),
    ({"min_p": 1.5}, "sampling.min_p"),
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
    ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
    ({"frequency_penalty": -3.0}, "sampling.frequency_penalty"),
    ({"logit_bias": {VOCAB: 1.0}}, "sampling.logit_bias"),
    ({"logit_bias": {3: 200.0}}, "sampling.logit_bias"),
    ({"stop": ("",)}, "sampling.stop"),
    ({"stop": tuple("abcdefghijklmnopq")}, "sampling.stop"),
    ({"stop": ("x" * 257,)}, "sampling.stop"),
    ({"stop_token_ids": (-1,)}, "sampling.stop_token_ids"),
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"max_tokens": -5}, "sampling.max_tokens"),
    ({"max_tokens": CONTEXT}, "sampling.max_tokens"),  # prompt + output above the context
    ({"max_tokens": 10, "min_tokens": 11}, "sampling.min_tokens"),
    ({"n": 17}, "sampling.n"),
    ({"n": -1}, "sampling.n"),
    ({"greedy": True, "n": 2}, "sampling.n"),
    ({"temperature": 0.0, "n": 3}, "sampling.n"),
    ({"use_beam_search": True, "beam_width": 17}, "sampling.beam_width"),
    ({"use_beam_search": True, "beam_width": 2, "n": 3}, "sampling.n"),
    ({"use_beam_search": True, "temperature": 0.5}, "sampling.temperature"),
    ({"use_beam_search": True, "top_k": 5}, "sampling.top_k"),
    ({"use_beam_search": True, "presence_penalty": 1.0}, "sampling.presence_penalty"),
    ({"use_beam_search": True, "stop": ("x",)}, "sampling.stop"),
    ({"use_beam_search": True, "logprobs": 2}, "sampling.logprobs"),
    ({"beam_width": 4}, "sampling.beam_width"),
    ({"length_penalty": 1.2}, "sampling.length_penalty"),
    ({"logprobs": 21}, "sampling.logprobs"),
    ({"logprobs": -1}, "sampling.logprobs"),
    ({"prompt_logprobs": 21}, "sampling.prompt_logprobs"),
]


@pytest.mark.parametrize(("controls", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_control_names_its_field(controls: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(**controls)
    assert info.value.field == field
    assert info.value.message.startswith(field + ": ")


def test_prompt_filling_the_context_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(prompt_len=CONTEXT)
    assert info.value.field == "prompt"
    assert str(CONTEXT) in info.value.message


def test_server_cap_on_max_tokens() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(limits=Limits(max_tokens=8), max_tokens=9)
    assert info.value.field == "sampling.max_tokens"
    assert decode(limits=Limits(max_tokens=8)).max_tokens == 8


def test_defaults_follow_the_proto() -> None:
    d = decode(prompt_len=28)
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    assert d.max_tokens == CONTEXT - 28  # unset: as many as fit
    assert d.n == 1 and not d.greedy and d.skip_special_tokens
    assert d.set_controls == frozenset()
    assert not d.deterministic


def test_zero_temperature_is_greedy_and_deterministic() -> None:
    d = decode(temperature=0.0)
    assert d.greedy and d.temperature == 0.0 and d.deterministic
    assert decode(seed=7).deterministic


def test_a_tiny_positive_temperature_samples_at_the_floor() -> None:
    """1e-97 divides logits into infinities (NaN probabilities, a crash in the sampler): floored."""
    d = decode(temperature=1e-97)
    assert not d.greedy and d.temperature == 0.01
    assert decode(temperature=0.5).temperature == 0.5


@pytest.mark.parametrize("penalty", [1e-300, 0.0099, 100.5, 1e300])
def test_a_repetition_penalty_that_overflows_logits_is_refused(penalty: float) -> None:
    with pytest.raises(InvalidArgument) as refused:
        decode(repetition_penalty=penalty)
    assert refused.value.field == "sampling.repetition_penalty"


def test_beam_width_defaults_to_max_of_n_and_four() -> None:
    assert decode(use_beam_search=True).beam_width == 4
    assert decode(use_beam_search=True, n=6).beam_width == 6
    d = decode(use_beam_search=True, beam_width=3, length_penalty=0.5, seed=1)
    assert (d.beam_width, d.length_penalty, d.greedy) == (3, 0.5, False)


def test_set_controls_name_what_the_client_set() -> None:
    d = decode(top_k=5, stop=("x",), logprobs=0)
    assert d.set_controls == {"top_k", "stop", "logprobs"}


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        (Prompt(), "prompt"),
        (Prompt(text="a", token_ids=(1,)), "prompt"),
        (Prompt(text=""), "prompt.text"),
        (Prompt(token_ids=()), "prompt.tokens.token_ids"),
        (Prompt(messages=()), "prompt.chat.messages"),
        (Prompt(messages=(ChatMessage("", "hi"),)), "prompt.chat.messages[0].role"),
    ],
)
def test_bad_prompts(prompt: Prompt, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_prompt(prompt)
    assert info.value.field == field


def test_names_and_request_ids() -> None:
    assert check_served_name("tiny-llama_v1.2:q4/x") == "tiny-llama_v1.2:q4/x"
    for bad in ("", "has space", "x" * 129, "emoji🙂"):
        with pytest.raises(InvalidArgument):
            check_served_name(bad)
    assert check_request_id("r" * 128) == "r" * 128
    with pytest.raises(InvalidArgument) as info:
        check_request_id("r" * 129)
    assert info.value.field == "request_id"

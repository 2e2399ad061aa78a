"""Cache keys: equal requests always hash equal, and anything that can change the answer changes the hash.

Invariants: the digest is ``v1:`` + 64 hex; the alias is never hashed (the resolved version is);
defaults sent explicitly equal defaults left out; floats hash by their float32 value (so a value
that crossed gRPC as float32 equals the float64 it came from); greedy drops only the controls it
ignores; every other field, the model version, adapter, tenant and prompt form change the digest;
only greedy, beam search or seeded sampling is cacheable; proto requests hash like domain ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from llmops.cache import convert
from llmops.common.errors import InvalidArgument
from llmops.common.response_cache import keys
from llmops.common.response_cache.domain import ChatMessage, Prompt, ResolvedModel, SamplingParams
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2

MODEL = ResolvedModel("tiny", 3, "champion")
PROMPT = Prompt(text="Hello")
GREEDY = SamplingParams(greedy=True)
SEEDED = SamplingParams(temperature=0.7, seed=42)


def digest(
    sampling: SamplingParams = GREEDY,
    prompt: Any = PROMPT,
    model: Any = MODEL,
    tenant: str = "",
    adapter: Any = None,
) -> str:
    key = keys.make_key(model, prompt, sampling, tenant=tenant, adapter=adapter)
    return key.digest


def test_digest_format_and_stability() -> None:
    first = digest()
    assert re.fullmatch(r"v1:[0-9a-f]{64}", first)
    assert first == digest()  # deterministic within and across calls
    assert keys.key_from_digest(MODEL, first).digest == first


def test_encoding_is_canonical_json_without_the_alias() -> None:
    encoded = keys.canonical_encoding(MODEL, PROMPT, GREEDY, tenant="acme").decode()
    assert "champion" not in encoded
    assert encoded.startswith('{"adapter":null,"key":"v1","model":["tiny",3]')


EQUAL = [
    ("alias is not hashed", {}, {"model": ResolvedModel("tiny", 3, "challenger")}),
    ("no alias", {}, {"model": ResolvedModel("tiny", 3)}),
    ("temperature 0 is greedy", {}, {"sampling": SamplingParams(temperature=0.0)}),
    ("greedy ignores temperature", {}, {"sampling": SamplingParams(greedy=True, temperature=0.3)}),
    (
        "greedy ignores top_k/top_p/min_p",
        {},
        {"sampling": SamplingParams(greedy=True, top_k=5, top_p=0.5, min_p=0.1)},
    ),
    ("greedy ignores seed", {}, {"sampling": SamplingParams(greedy=True, seed=7)}),
    ("n 0 is 1", {}, {"sampling": SamplingParams(greedy=True, n=1)}),
    ("repetition penalty unset is 1", {}, {"sampling": SamplingParams(greedy=True, repetition_penalty=1.0)}),
    ("length penalty unset is 1", {}, {"sampling": SamplingParams(greedy=True, length_penalty=1.0)}),
    (
        "skip_special_tokens unset is true",
        {},
        {"sampling": SamplingParams(greedy=True, skip_special_tokens=True)},
    ),
    ("negative zero is zero", {}, {"sampling": SamplingParams(greedy=True, presence_penalty=-0.0)}),
    (
        "stop token ids are a set",
        {"sampling": SamplingParams(greedy=True, stop_token_ids=(5, 3))},
        {"sampling": SamplingParams(greedy=True, stop_token_ids=(3, 5, 3))},
    ),
    (
        "logit bias order",
        {"sampling": SamplingParams(greedy=True, logit_bias={1: 0.5, 2: -1.0})},
        {"sampling": SamplingParams(greedy=True, logit_bias={2: -1.0, 1: 0.5})},
    ),
    (
        "float32 rounding (0.7 over gRPC is 0.699999988)",
        {"sampling": SEEDED},
        {"sampling": SamplingParams(temperature=0.699999988079071, seed=42)},
    ),
    (
        "temperature unset is 1",
        {"sampling": SamplingParams(seed=1)},
        {"sampling": SamplingParams(temperature=1.0, seed=1)},
    ),
    (
        "top_p unset is 1",
        {"sampling": SamplingParams(seed=1)},
        {"sampling": SamplingParams(top_p=1.0, seed=1)},
    ),
    (
        "beam width 0 is max(n, 4)",
        {"sampling": SamplingParams(use_beam_search=True, n=2)},
        {"sampling": SamplingParams(use_beam_search=True, n=2, beam_width=4)},
    ),
    (
        "chat add_generation_prompt default",
        {"prompt": Prompt(messages=(ChatMessage("user", "hi"),))},
        {"prompt": Prompt(messages=(ChatMessage("user", "hi", ""),), add_generation_prompt=True)},
    ),
    ("token ids list or tuple", {"prompt": Prompt(token_ids=(1, 2))}, {"prompt": Prompt(token_ids=[1, 2])}),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("why", "left", "right"), EQUAL, ids=[c[0] for c in EQUAL])
def test_equivalent_requests_share_a_digest(why: str, left: dict[str, Any], right: dict[str, Any]) -> None:
    assert digest(**left) == digest(**right)


DIFFERENT = [
    ("version", {"model": ResolvedModel("tiny", 4, "champion")}),
    ("model name", {"model": ResolvedModel("tiny2", 3)}),
    ("adapter", {"adapter": ResolvedModel("lora", 1)}),
    ("tenant", {"tenant": "acme"}),
    ("prompt text", {"prompt": Prompt(text="Hello!")}),
    ("trailing space", {"prompt": Prompt(text="Hello ")}),
    ("prompt form: tokens", {"prompt": Prompt(token_ids=(1,))}),
    ("prompt form: chat", {"prompt": Prompt(messages=(ChatMessage("user", "Hello"),))}),
    ("sampled with seed", {"sampling": SEEDED}),
    ("beam search", {"sampling": SamplingParams(use_beam_search=True)}),
    ("n", {"sampling": SamplingParams(greedy=True, n=2)}),
    ("repetition penalty", {"sampling": SamplingParams(greedy=True, repetition_penalty=1.1)}),
    ("presence penalty", {"sampling": SamplingParams(greedy=True, presence_penalty=0.5)}),
    ("frequency penalty", {"sampling": SamplingParams(greedy=True, frequency_penalty=0.5)}),
    ("logit bias", {"sampling": SamplingParams(greedy=True, logit_bias={1: 1.0})}),
    ("stop", {"sampling": SamplingParams(greedy=True, stop=("\n",))}),
    ("stop token ids", {"sampling": SamplingParams(greedy=True, stop_token_ids=(2,))}),
    ("include stop str", {"sampling": SamplingParams(greedy=True, include_stop_str_in_output=True)}),
    ("ignore eos", {"sampling": SamplingParams(greedy=True, ignore_eos=True)}),
    ("max tokens", {"sampling": SamplingParams(greedy=True, max_tokens=16)}),
    ("min tokens", {"sampling": SamplingParams(greedy=True, min_tokens=2)}),
    ("logprobs 0 is not unset", {"sampling": SamplingParams(greedy=True, logprobs=0)}),
    ("prompt logprobs", {"sampling": SamplingParams(greedy=True, prompt_logprobs=1)}),
    ("skip special tokens off", {"sampling": SamplingParams(greedy=True, skip_special_tokens=False)}),
    ("length penalty", {"sampling": SamplingParams(greedy=True, length_penalty=2.0)}),
]


@pytest.mark.parametrize(("why", "change"), DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_output_changing_fields_change_the_digest(why: str, change: dict[str, Any]) -> None:
    assert digest(**change) != digest()


SAMPLED_DIFFERENT = [
    {"seed": 43},
    {"temperature": 0.8},
    {"top_k": 5},
    {"top_p": 0.9},
    {"min_p": 0.05},
]


@pytest.mark.parametrize("change", SAMPLED_DIFFERENT, ids=[next(iter(c)) for c in SAMPLED_DIFFERENT])
def test_sampling_controls_matter_when_sampling(change: dict[str, Any]) -> None:
    assert digest(dataclasses.replace(SEEDED, **change)) != digest(SEEDED)


def test_stop_strings_keep_their_order() -> None:
    assert digest(SamplingParams(greedy=True, stop=("a", "b"))) != digest(
        SamplingParams(greedy=True, stop=("b", "a"))
    )


def test_chat_messages_differ_by_role_name_and_generation_prompt() -> None:
    base = Prompt(messages=(ChatMessage("user", "hi"),))
    assert digest(prompt=base) != digest(prompt=Prompt(messages=(ChatMessage("system", "hi"),)))
    assert digest(prompt=base) != digest(prompt=Prompt(messages=(ChatMessage("user", "hi", "bob"),)))
    assert digest(prompt=base) != digest(prompt=dataclasses.replace(base, add_generation_prompt=False))


CACHEABLE = [
    (SamplingParams(greedy=True), True),
    (SamplingParams(temperature=0.0), True),
    (SamplingParams(use_beam_search=True), True),
    (SamplingParams(temperature=0.9, seed=0), True),
    (SamplingParams(), False),  # defaults: temperature 1, no seed
    (SamplingParams(temperature=0.9), False),
    (SamplingParams(temperature=1e-6, top_k=1), False),  # effectively greedy, but not declared so
]


@pytest.mark.parametrize(("sampling", "cacheable"), CACHEABLE)
def test_only_reproducible_requests_are_cacheable(sampling: SamplingParams, cacheable: bool) -> None:
    assert keys.is_cacheable(sampling) is cacheable
    key = keys.make_key(MODEL, PROMPT, sampling)
    assert key.cacheable is cacheable
    assert (key.digest == "") is not cacheable


BAD = [
    ({"model": ResolvedModel("Tiny", 1)}, "model.name"),
    ({"model": ResolvedModel("ti:ny", 1)}, "model.name"),
    ({"model": ResolvedModel("tiny", 0)}, "model.version"),
    ({"adapter": ResolvedModel("lora", 0)}, "adapter.version"),
    ({"prompt": Prompt()}, "prompt"),
    ({"prompt": Prompt(text="a", token_ids=(1,))}, "prompt"),
    ({"sampling": SamplingParams(greedy=True, presence_penalty=math.nan)}, "sampling.presence_penalty"),
    ({"sampling": SamplingParams(temperature=1e39, seed=1)}, "sampling.temperature"),
    ({"tenant": "x" * 300}, "tenant"),
]


@pytest.mark.parametrize(("change", "field"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_malformed_requests_are_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        digest(**change)
    assert raised.value.field == field


@pytest.mark.parametrize("bad", ["", "v1:abc", "v2:" + "0" * 64, "v1:" + "A" * 64, "v1:" + "0" * 65])
def test_foreign_digests_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        keys.key_from_digest(MODEL, bad)


@dataclasses.dataclass(frozen=True)
class OtherSampling:
    """Another service's sampling type with the same fields (serving's domain object)."""

    greedy: bool = False
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    seed: int | None = None
    n: int = 0
    use_beam_search: bool = False
    beam_width: int = 0
    length_penalty: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool | None = None


def test_any_object_with_the_fields_hashes_alike() -> None:
    assert digest(OtherSampling(temperature=0.7, seed=42, stop=("x",))) == digest(  # type: ignore[arg-type]
        dataclasses.replace(SEEDED, stop=("x",))
    )


def test_proto_request_hashes_like_the_domain_request() -> None:
    message = pb.CacheKey(
        model=model_pb2.ResolvedModel(name="tiny", version=3, alias="champion"),
        tenant="acme",
        prompt=generation_pb2.Prompt(
            chat=generation_pb2.ChatPrompt(messages=[generation_pb2.ChatMessage(role="user", content="hi")])
        ),
        sampling=sampling_pb2.SamplingParams(
            temperature=0.7, top_p=0.9, seed=42, max_tokens=8, logit_bias={5: -1.5}
        ),
    )
    from_proto = convert.key_from_proto(message, has_key=True)
    domain = keys.make_key(
        MODEL,
        Prompt(messages=(ChatMessage("user", "hi"),)),
        SamplingParams(temperature=0.7, top_p=0.9, seed=42, max_tokens=8, logit_bias={5: -1.5}),
        tenant="acme",
    )
    assert from_proto.digest == domain.digest
    # unset optional fields stay unset through the proto (logprobs unset differs from logprobs=0)
    assert convert.sampling_from_proto(message.sampling).logprobs is None

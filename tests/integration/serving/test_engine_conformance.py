"""One conformance suite for every engine (fake, transformers, vLLM): each decoding control does what
the API says, checked through the service so validation runs too.

Each test compares an engine with itself (never text across engines): top_k=1, a tiny top_p, min_p=1
and a near-zero temperature all reproduce greedy decoding; a seed reproduces a sample; n gives n
completions; a stop string ends the text right before it (or after it when included); a stop token
id ends the completion on that token; min_tokens holds stops off; penalties lower repeats; a logit
bias forces or bans a token; logprobs return the top-N with the chosen token's rank; beam search of
width 1 is greedy and wider beams come back best first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from llmops.serving.config import ServingConfig
from llmops.serving.domain import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    LoadRequest,
    ModelSelector,
    ModelSource,
    Prompt,
    SamplingParams,
)
from llmops.serving.engines.base import Engine
from llmops.serving.engines.fake import FakeEngine
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import LocalPathResolver
from llmops.serving.service import ServingService
from tests.integration.serving.conftest import borrowing_factory

PROMPT = "def forward(self, x):\n    "
#: Greedy with a repetition penalty: deterministic, and varied enough to pick stop strings from.
BASE = {"greedy": True, "ignore_eos": True, "repetition_penalty": 1.3}


@pytest.fixture(scope="module", params=["fake", "transformers", "vllm"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "fake":
        fake = FakeEngine(context=1024)
        fake.started = True
        yield fake
    else:
        yield request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture(scope="module")
def eos_id(engine: Engine) -> int:
    return 2 if isinstance(engine, FakeEngine) else 1  # the tiny model's <|eos|> is id 1


@pytest.fixture
async def service(engine: Engine, tiny_model_path) -> ServingService:  # type: ignore[no-untyped-def]
    kind = engine.kind
    svc = ServingService(
        borrowing_factory({kind: engine}),
        LocalPathResolver(),
        ServingMetrics(CollectorRegistry()),
        EngineShimMetrics(),
        ServingConfig(default_engine=kind),
    )
    await svc.load_model(
        LoadRequest(ModelSource(local_path=str(tiny_model_path)), served_name="m", engine=kind)
    )
    return svc


async def run(
    service: ServingService, max_tokens: int = 24, prompt: str = PROMPT, **controls: object
) -> GenerationResult:
    params = SamplingParams(max_tokens=max_tokens, **controls)  # type: ignore[arg-type]
    return await service.generate(
        GenerationRequest(ModelSelector(served_name="m"), Prompt(text=prompt), params)
    )


async def one(service: ServingService, **controls: object) -> Completion:
    result = await run(service, **controls)
    assert len(result.completions) == 1
    return result.completions[0]


async def test_greedy_is_deterministic(service: ServingService) -> None:
    a, b = await one(service, greedy=True, ignore_eos=True), await one(service, greedy=True, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert a.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("controls", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"temperature": 0.01}])
async def test_sampling_narrowed_to_one_token_is_greedy(
    service: ServingService, controls: dict[str, object]
) -> None:
    greedy = await one(service, greedy=True, ignore_eos=True, max_tokens=12)
    for seed in (1, 2):
        narrowed = await one(service, ignore_eos=True, max_tokens=12, seed=seed, **controls)
        assert narrowed.token_ids == greedy.token_ids


async def test_same_seed_same_sample_and_seeds_differ(service: ServingService) -> None:
    a = await one(service, seed=7, ignore_eos=True)
    b = await one(service, seed=7, ignore_eos=True)
    assert a.token_ids == b.token_ids
    others = {tuple((await one(service, seed=s, ignore_eos=True)).token_ids) for s in (11, 12, 13)}
    assert len(others | {tuple(a.token_ids)}) >= 2


async def test_n_returns_n_completions(service: ServingService) -> None:
    result = await run(service, n=3, seed=5, ignore_eos=True, max_tokens=10)
    assert [c.index for c in result.completions] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in result.completions)
    assert len({tuple(c.token_ids) for c in result.completions}) >= 2
    assert result.usage.completion_tokens == 30


async def test_stop_string_ends_the_text_before_it(service: ServingService) -> None:
    base = await one(service, **BASE, max_tokens=32)
    text = base.text
    assert len(text) >= 8, f"baseline too short to pick a stop string from: {text!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.index(stop)
    stopped = await one(service, **BASE, max_tokens=32, stop=(stop,))
    assert stopped.text == text[:cut]
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE and stopped.stop_sequence == stop
    included = await one(service, **BASE, max_tokens=32, stop=(stop,), include_stop_str_in_output=True)
    assert included.text == text[: cut + len(stop)]


async def test_stop_token_id_ends_the_completion_on_it(service: ServingService) -> None:
    base = await one(service, **BASE)
    token = base.token_ids[3]
    first = base.token_ids.index(token)
    stopped = await one(service, **{**BASE, "ignore_eos": False}, stop_token_ids=(token,))
    assert stopped.token_ids == base.token_ids[: first + 1]
    assert stopped.finish_reason is FinishReason.STOP


async def test_min_tokens_holds_stop_tokens_off(service: ServingService) -> None:
    base = await one(service, **BASE)
    first = base.token_ids[0]
    controls = {**BASE, "ignore_eos": False, "stop_token_ids": (first,)}
    assert len((await one(service, **controls)).token_ids) == 1
    held = await one(service, **controls, min_tokens=5)
    assert len(held.token_ids) >= 5 and first not in held.token_ids[:5]


async def test_max_tokens_and_ignore_eos(service: ServingService) -> None:
    completion = await one(service, greedy=True, ignore_eos=True, max_tokens=5)
    assert len(completion.token_ids) == 5 and completion.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    "penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}]
)
async def test_penalties_lower_repeats(service: ServingService, penalty: dict[str, object]) -> None:
    def repeats(c: Completion) -> int:
        return len(c.token_ids) - len(set(c.token_ids))

    plain = await one(service, greedy=True, ignore_eos=True, max_tokens=48)
    penalized = await one(service, greedy=True, ignore_eos=True, max_tokens=48, **penalty)
    assert repeats(penalized) < repeats(plain)


async def test_logit_bias_forces_and_bans_tokens(service: ServingService) -> None:
    greedy = await one(service, greedy=True, ignore_eos=True, max_tokens=4)
    forced_token = 40
    forced = await one(service, greedy=True, ignore_eos=True, max_tokens=4, logit_bias={forced_token: 100.0})
    assert forced.token_ids == [forced_token] * 4
    banned = await one(
        service, greedy=True, ignore_eos=True, max_tokens=4, logit_bias={greedy.token_ids[0]: -100.0}
    )
    assert greedy.token_ids[0] not in banned.token_ids


async def test_logprobs_return_top_n_and_rank(service: ServingService) -> None:
    completion = await one(service, greedy=True, ignore_eos=True, max_tokens=6, logprobs=3)
    assert len(completion.logprobs) == 6
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert entry.token_id == token_id and entry.rank == 1 and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0].token_id == token_id
        values = [t.logprob for t in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(entry.top[0].logprob, abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(
        sum(e.logprob for e in completion.logprobs), abs=1e-3
    )
    sampled = await one(service, seed=3, ignore_eos=True, max_tokens=6, logprobs=0)
    assert all(e.top == () and e.rank >= 1 for e in sampled.logprobs) and len(sampled.logprobs) == 6


async def test_prompt_logprobs(service: ServingService) -> None:
    result = await run(service, greedy=True, max_tokens=1, prompt_logprobs=2)
    assert len(result.prompt_logprobs) == len(result.prompt_token_ids) - 1
    assert [e.token_id for e in result.prompt_logprobs] == list(result.prompt_token_ids[1:])
    assert all(len(e.top) == 2 and e.rank >= 1 for e in result.prompt_logprobs)


async def test_beam_search(service: ServingService) -> None:
    greedy = await one(service, greedy=True, ignore_eos=True, max_tokens=8, logprobs=0)
    narrow = await one(service, use_beam_search=True, beam_width=1, ignore_eos=True, max_tokens=8)
    assert narrow.token_ids == greedy.token_ids
    result = await run(service, use_beam_search=True, beam_width=4, n=3, ignore_eos=True, max_tokens=8)
    beams = result.completions
    assert [b.index for b in beams] == [0, 1, 2] and all(len(b.token_ids) == 8 for b in beams)
    scores = [b.cumulative_logprob for b in beams]
    assert all(s is not None for s in scores) and scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert len({tuple(b.token_ids) for b in beams}) == 3
    assert greedy.cumulative_logprob is not None
    assert beams[0].cumulative_logprob >= greedy.cumulative_logprob - 1e-4  # type: ignore[operator]


async def test_skip_special_tokens(service: ServingService, eos_id: int) -> None:
    forced = {"greedy": True, "ignore_eos": True, "max_tokens": 3, "logit_bias": {eos_id: 100.0}}
    hidden = await one(service, **forced)
    shown = await one(service, **forced, skip_special_tokens=False)
    assert hidden.token_ids == shown.token_ids == [eos_id] * 3
    assert hidden.text == "" and shown.text != ""


async def test_chat_prompt(service: ServingService) -> None:
    messages = (ChatMessage("system", "You write Python."), ChatMessage("user", "A loop, please."))
    params = SamplingParams(max_tokens=8, greedy=True, ignore_eos=True)
    result = await service.generate(
        GenerationRequest(ModelSelector(served_name="m"), Prompt(messages=messages), params)
    )
    assert len(result.completions[0].token_ids) == 8
    assert result.usage.prompt_tokens == len(result.prompt_token_ids) > 10

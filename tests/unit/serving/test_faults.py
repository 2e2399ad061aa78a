"""Fault injection (``serving.faults``): off by default, and when on, exactly the faults it names.

Invariants: with no fault set there is no wrapper at all; the TTFT delay is waited once before the
first token and the inter-token delay before every later token; a seeded share of generations fails
before its first token with INTERNAL (the same seed draws the same failures), on unary and streamed
generation alike, and the failed request frees its engine slot and is counted as an error; the
settings map from ``LLMOPS_SERVING_FAULTS__*`` (or JSON) and refuse bad values naming the variable;
``serve serving --check`` says when faults are on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from llmops.cli import app
from llmops.common.settings import ServingFaults, Settings, SettingsError
from llmops.serving.domain import (
    CompletionDelta,
    EngineOutput,
    GenerationRequest,
    ModelSelector,
    Prompt,
    SamplingParams,
)
from llmops.serving.faults import FaultInjector, InjectedFault
from tests.unit.serving.conftest import Harness


class Recorder:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def outputs(tokens: int) -> AsyncGenerator[EngineOutput, None]:
    yield EngineOutput(deltas=[])  # an output without tokens (prompt details only) waits for nothing
    for i in range(tokens):
        yield EngineOutput(deltas=[CompletionDelta(index=0, token_ids=[i], text="x")])


def request(max_tokens: int = 4) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # type: ignore[call-arg]
    return GenerationRequest(ModelSelector(served_name="fake"), Prompt(text="def f(x):"), sampling)


def test_no_fault_set_means_no_injector() -> None:
    assert not Settings.load(env={}).serving.faults.enabled
    assert FaultInjector.from_settings(ServingFaults()) is None
    assert FaultInjector.from_settings(ServingFaults(error_ratio=0.1)) is not None


async def test_delays_go_before_the_first_token_and_between_later_ones() -> None:
    sleep = Recorder()
    injector = FaultInjector(ServingFaults(ttft_delay_ms=250, inter_token_delay_ms=20), sleep=sleep)
    got = [o async for o in injector.wrap(outputs(5))]
    assert len(got) == 6
    assert sleep.waits == [0.25, 0.02, 0.02, 0.02, 0.02]


def test_the_seed_decides_which_generations_fail() -> None:
    def draws(seed: int) -> list[bool]:
        injector = FaultInjector(ServingFaults(error_ratio=0.25, seed=seed))
        return [injector.fails_next() for _ in range(2000)]

    first = draws(7)
    assert first == draws(7) and first != draws(8)
    assert 400 <= sum(first) <= 600  # binomial(2000, 0.25): mean 500, sd 19


async def test_an_injected_error_is_internal_frees_the_slot_and_is_counted() -> None:
    h = Harness()
    await h.load()
    h.service.faults = FaultInjector(ServingFaults(error_ratio=1.0))
    with pytest.raises(InjectedFault) as info:
        await h.service.generate(request())
    assert info.value.code is grpc.StatusCode.INTERNAL and "injected fault" in info.value.message
    _, events = await h.service.generate_stream(request())
    with pytest.raises(InjectedFault):
        await anext(events)
    await events.aclose()  # type: ignore[attr-defined]
    assert h.engines[0].running == 0
    assert h.metric("llmops_serving_requests_total", model="fake", finish_reason="error") == 2
    assert h.service.faults.injected_errors == 2
    h.service.faults = None
    result = await h.service.generate(request())
    assert len(result.completions[0].token_ids) == 4


async def test_added_latency_shows_in_the_services_own_ttft() -> None:
    h = Harness()
    await h.load()
    h.service.faults = FaultInjector(ServingFaults(ttft_delay_ms=60))
    await h.service.generate(request())
    assert h.metric("llmops_serving_time_to_first_token_seconds_sum", model="fake") >= 0.06


def test_settings_map_from_nested_variables_and_json() -> None:
    nested = Settings.load(
        env={"LLMOPS_SERVING_FAULTS__TTFT_DELAY_MS": "200", "LLMOPS_SERVING_FAULTS__ERROR_RATIO": "0.1"}
    ).serving.faults
    assert (nested.ttft_delay_ms, nested.error_ratio, nested.inter_token_delay_ms) == (200, 0.1, 0)
    whole = Settings.load(env={"LLMOPS_SERVING_FAULTS": '{"inter_token_delay_ms": 5}'}).serving
    assert whole.faults.inter_token_delay_ms == 5 and whole.max_waiting == 256
    with pytest.raises(SettingsError, match="LLMOPS_SERVING_FAULTS__ERROR_RATIO"):
        Settings.load(env={"LLMOPS_SERVING_FAULTS__ERROR_RATIO": "1.5"})
    with pytest.raises(SettingsError, match="LLMOPS_SERVING_FAULTS__NOSUCH"):
        Settings.load(env={"LLMOPS_SERVING_FAULTS__NOSUCH": "1"})


def test_check_says_when_faults_are_on(tmp_path: Path) -> None:
    env = {"LLMOPS_DATA_DIR": str(tmp_path), "LLMOPS_SERVING_FAULTS__ERROR_RATIO": "0.5"}
    result = CliRunner().invoke(app, ["serve", "serving", "--port", "50051", "--check"], env=env)
    assert result.exit_code == 0, result.output
    assert "fault injection is on" in result.output and "errors 50%" in result.output
    quiet = CliRunner().invoke(
        app,
        ["serve", "serving", "--port", "50051", "--check"],
        env=env | {"LLMOPS_SERVING_FAULTS__ERROR_RATIO": "0"},
    )
    assert quiet.exit_code == 0 and "fault injection" not in quiet.output

"""Cold-start phases: every model load observes resolve, weights and engine start once when READY,
and first token once, at its first request's first token (not at later requests, not for a load that
failed); a reload is a new cold start; an engine that splits off its weight loading reports it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llmops.common.errors import FailedPrecondition
from llmops.common.metric_names import COLD_START_PHASES, SERVING_COLD_START_SECONDS
from llmops.serving.domain import (
    EngineKind,
    EngineOptions,
    GenerationRequest,
    LoadRequest,
    ModelSelector,
    ModelSource,
    Prompt,
    SamplingParams,
)
from llmops.serving.engines.fake import FakeEngine
from llmops.serving.engines.vllm_phases import weights_seconds
from tests.unit.serving.conftest import Harness

COUNT = SERVING_COLD_START_SECONDS + "_count"
SUM = SERVING_COLD_START_SECONDS + "_sum"


def counts(h: Harness, model: str = "fake") -> dict[str, float]:
    return {phase: h.metric(COUNT, model=model, phase=phase) for phase in COLD_START_PHASES}


def ask(name: str = "fake") -> GenerationRequest:
    return GenerationRequest(
        ModelSelector(served_name=name), Prompt(text="hi"), SamplingParams(max_tokens=3, ignore_eos=True)
    )


class SplitEngine(FakeEngine):
    """A fake that says it spent 0.25 s of its start on weights."""

    async def start(self) -> None:
        await super().start()
        self.load_phases = {"weights": 0.25, "engine_start": 0.5}


async def test_each_phase_once_per_load_and_first_token_at_the_first_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    with caplog.at_level(logging.INFO, logger="llmops.serving.coldstart"):
        await h.load()
    assert counts(h) == {"resolve": 1, "weights": 1, "engine_start": 1, "first_token": 0}
    assert any("cold start of fake on fake: resolve" in r.getMessage() for r in caplog.records)
    await h.service.generate(ask())
    await h.service.generate(ask())
    assert counts(h) == {"resolve": 1, "weights": 1, "engine_start": 1, "first_token": 1}
    # the first token is the first request's time to its first token, the same figure as its TTFT
    ttft = h.metric("llmops_serving_time_to_first_token_seconds_sum", model="fake")
    assert 0 < h.metric(SUM, model="fake", phase="first_token") <= ttft

    await h.load(replace=True)  # a reload is a new cold start
    await h.service.generate(ask())
    assert counts(h) == {"resolve": 2, "weights": 2, "engine_start": 2, "first_token": 2}


async def test_a_failed_load_observes_nothing() -> None:
    h = Harness(fail_start="no memory")
    with pytest.raises(FailedPrecondition):
        await h.load()
    assert counts(h) == dict.fromkeys(COLD_START_PHASES, 0)


async def test_an_engine_that_splits_its_start_reports_weights() -> None:
    h = Harness()

    def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
        return SplitEngine(path, served_name, options)

    h.service._factory = factory
    await h.service.load_model(LoadRequest(ModelSource(local_path="/models/split"), served_name="split"))
    assert h.metric(SUM, model="split", phase="weights") == pytest.approx(0.25)
    assert h.metric(SUM, model="split", phase="engine_start") == pytest.approx(0.5)


def test_vllm_weight_loading_time_is_read_from_its_log() -> None:
    log = (
        "INFO 12-07 19:40:01 [default_loader.py:291] Loading weights took 0.42 seconds\n"
        "INFO 12-07 19:40:05 [core.py:250] init engine (profile, create kv cache, warmup model) took 3.1 s\n"
    )
    assert weights_seconds(log) == pytest.approx(0.42)
    assert weights_seconds("Model loading took 0.1 GiB memory and 1.500000 seconds") == pytest.approx(1.5)
    assert weights_seconds("nothing about weights") is None

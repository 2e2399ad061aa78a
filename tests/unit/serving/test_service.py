"""The serving service on the fake engine: queueing, cancellation, deadlines, unloads, the model table.

Invariants: a full queue refuses with RESOURCE_EXHAUSTED (with a retry hint) and never blocks; a
closed stream aborts the engine request and frees its slot; a deadline ends a request with
DEADLINE_EXCEEDED and frees its slot; an unload drains, then aborts what is left with finish reason
ABORT; a failed load is listed FAILED and can be loaded again; a control the engine cannot honour is
refused, not ignored; metrics count what happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from llmops.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmops.serving.domain import (
    CompletionDelta,
    EngineKind,
    EngineOptions,
    FinishReason,
    GenerationRequest,
    LoadRequest,
    ModelRef,
    ModelSelector,
    ModelSource,
    ModelState,
    Prompt,
    SamplingParams,
    StreamEnd,
    StreamEvent,
    TokenizeRequest,
)
from llmops.serving.engines.base import ALL_CONTROLS
from llmops.serving.engines.fake import FakeEngine
from tests.unit.serving.conftest import Harness

FAKE = ModelSelector(served_name="fake")


def request(max_tokens: int = 8, timeout: float | None = None, **sampling: object) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    return GenerationRequest(FAKE, Prompt(text="def f(x):"), params, timeout=timeout)


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def first_delta(events: AsyncIterator[StreamEvent]) -> CompletionDelta:
    event = await anext(events)
    assert isinstance(event, CompletionDelta)
    return event


async def test_generate_returns_completion_and_usage() -> None:
    h = Harness()
    await h.load()
    result = await h.service.generate(request(max_tokens=12, greedy=True))
    (completion,) = result.completions
    assert len(completion.token_ids) == 12 and completion.finish_reason is FinishReason.LENGTH
    assert result.usage.prompt_tokens == len(result.prompt_token_ids) == 10  # BOS + 9 characters
    assert result.usage.completion_tokens == 12 and result.usage.total_tokens == 22
    assert result.served_name == "fake" and len(result.request_id) == 32
    assert h.metric("llmops_serving_generated_tokens_total", model="fake") == 12
    assert h.metric("llmops_serving_requests_total", model="fake", finish_reason="length") == 1
    assert h.metric("llmops_serving_time_to_first_token_seconds_count", model="fake") == 1


async def test_stream_deltas_add_up_to_the_unary_answer() -> None:
    h = Harness()
    await h.load()
    unary = await h.service.generate(request(max_tokens=20, greedy=True))
    _, events = await h.service.generate_stream(request(max_tokens=20, greedy=True))
    collected = [e async for e in events]
    assert isinstance(collected[-1], StreamEnd)
    deltas = [e for e in collected if isinstance(e, CompletionDelta)]
    assert "".join(d.text for d in deltas) == unary.completions[0].text
    assert [t for d in deltas for t in d.token_ids] == unary.completions[0].token_ids
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert collected[-1].usage.completion_tokens == 20


async def test_full_queue_is_resource_exhausted_and_does_not_block() -> None:
    h = Harness(max_waiting=1, step_delay=0.02, max_concurrency=1)
    await h.load()
    running = asyncio.ensure_future(h.service.generate(request(max_tokens=30)))
    await wait_for(lambda: h.engines[0].running == 1)
    waiting = asyncio.ensure_future(h.service.generate(request(max_tokens=2)))
    await wait_for(lambda: h.service.waiting("fake") == 1)
    assert h.metric("llmops_serving_requests_waiting", model="fake") == 1
    with pytest.raises(ResourceExhausted) as info:
        await h.service.generate(request(max_tokens=2))
    assert info.value.retry_after_seconds is not None and info.value.retry_after_seconds > 0
    results = await asyncio.gather(running, waiting)
    assert [len(r.completions[0].token_ids) for r in results] == [30, 2]
    assert h.service.waiting("fake") == 0
    assert h.metric("llmops_serving_requests_running", model="fake") == 0


async def test_closing_a_stream_aborts_the_engine_request_and_frees_the_slot() -> None:
    h = Harness(max_waiting=1, step_delay=0.01, max_concurrency=1)
    await h.load()
    engine = h.engines[0]
    _, events = await h.service.generate_stream(request(max_tokens=500))
    await first_delta(events)
    assert engine.running == 1
    await events.aclose()  # type: ignore[attr-defined]
    assert engine.running == 0 and engine.aborted == 1
    assert h.metric("llmops_serving_requests_running", model="fake") == 0
    assert h.metric("llmops_serving_requests_total", model="fake", finish_reason="abort") == 1
    result = await h.service.generate(request(max_tokens=3))  # the slot is free again
    assert len(result.completions[0].token_ids) == 3


async def test_cancelling_the_consumer_task_frees_the_slot() -> None:
    h = Harness(max_waiting=1, step_delay=0.01, max_concurrency=1)
    await h.load()

    async def consume() -> None:
        _, events = await h.service.generate_stream(request(max_tokens=500))
        async for _ in events:
            pass

    task = asyncio.ensure_future(consume())
    await wait_for(lambda: h.engines[0].running == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.engines[0].running == 0 and h.engines[0].aborted == 1
    assert h.metric("llmops_serving_requests_running", model="fake") == 0


async def test_deadline_during_generation() -> None:
    h = Harness(step_delay=0.02, max_concurrency=1)
    await h.load()
    with pytest.raises(DeadlineExceeded):
        await h.service.generate(request(max_tokens=500, timeout=0.2))
    assert h.engines[0].running == 0
    assert h.metric("llmops_serving_requests_total", model="fake", finish_reason="error") == 1


async def test_deadline_while_queued() -> None:
    h = Harness(step_delay=0.02, max_concurrency=1)
    await h.load()
    blocker = asyncio.ensure_future(h.service.generate(request(max_tokens=40)))
    await wait_for(lambda: h.engines[0].running == 1)
    with pytest.raises(DeadlineExceeded):
        await h.service.generate(request(max_tokens=2, timeout=0.05))
    await blocker
    assert h.service.waiting("fake") == 0


async def test_unload_drains_then_aborts_in_flight_streams() -> None:
    h = Harness(step_delay=0.01)
    await h.load()
    _, events = await h.service.generate_stream(request(max_tokens=2000, n=2))
    await first_delta(events)
    consumer = asyncio.ensure_future(_collect(events))
    result = await h.service.unload_model(FAKE, drain_timeout=0.05)
    assert result.aborted_requests == 1
    collected = await consumer
    finishes = {
        e.index: e.finish_reason for e in collected if isinstance(e, CompletionDelta) and e.finish_reason
    }
    assert finishes == {0: FinishReason.ABORT, 1: FinishReason.ABORT}
    assert isinstance(collected[-1], StreamEnd)
    assert h.service.list_models() == []
    assert not h.engines[0].started  # the engine was shut down
    with pytest.raises(NotFound):
        await h.service.generate(request())


async def _collect(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [e async for e in events]


async def test_unload_while_the_consumer_is_busy_elsewhere_still_ends_the_stream() -> None:
    """The abort must not cancel the consumer where it awaits its own work (a transport's write):
    the stream ends with ABORT at the consumer's next read, and the consumer is never cancelled."""
    h = Harness(step_delay=0.005)
    await h.load()
    _, events = await h.service.generate_stream(request(max_tokens=2000))
    busy = asyncio.Event()

    async def slow_consumer() -> list[StreamEvent]:
        collected = []
        async for event in events:
            collected.append(event)
            busy.set()
            await asyncio.sleep(0.2)  # a slow write to the client
        return collected

    consumer = asyncio.ensure_future(slow_consumer())
    await busy.wait()
    result = await h.service.unload_model(FAKE, drain_timeout=0.01)
    assert result.aborted_requests == 1
    collected = await asyncio.wait_for(consumer, 5)
    finishes = [e.finish_reason for e in collected if isinstance(e, CompletionDelta) and e.finish_reason]
    assert finishes == [FinishReason.ABORT]
    assert isinstance(collected[-1], StreamEnd)
    assert h.engines[0].running == 0


async def test_unload_refuses_requests_still_waiting_in_the_queue() -> None:
    h = Harness(step_delay=0.01, max_concurrency=1)
    await h.load()
    running = asyncio.ensure_future(h.service.generate(request(max_tokens=2000)))
    await wait_for(lambda: h.engines[0].running == 1)
    queued = asyncio.ensure_future(h.service.generate(request(max_tokens=2)))
    await wait_for(lambda: h.service.waiting("fake") == 1)
    result = await h.service.unload_model(FAKE, drain_timeout=0.01)
    assert result.aborted_requests == 2
    assert (await running).completions[0].finish_reason is FinishReason.ABORT
    with pytest.raises(Unavailable, match="unloaded while the request waited"):
        await queued
    assert h.metric("llmops_serving_requests_waiting", model="fake") == 0


async def test_unload_lets_short_requests_finish() -> None:
    h = Harness(step_delay=0.01)
    await h.load()
    pending = asyncio.ensure_future(h.service.generate(request(max_tokens=5)))
    await wait_for(lambda: h.engines[0].running == 1)
    result = await h.service.unload_model(FAKE, drain_timeout=5)
    assert result.aborted_requests == 0
    assert (await pending).completions[0].finish_reason is FinishReason.LENGTH


async def test_model_table_states_and_errors() -> None:
    h = Harness()
    assert h.service.list_models() == [] and not await h.service.ready()
    with pytest.raises(NotFound):
        await h.service.generate(request())
    await h.load()
    (info,) = h.service.list_models()
    assert info.state is ModelState.READY and info.engine is EngineKind.FAKE and info.max_model_len == 2048
    assert await h.service.ready()
    assert h.metric("llmops_serving_model_loaded", model="fake", engine="fake") == 1
    with pytest.raises(AlreadyExists):
        await h.load()
    await h.load(replace=True)  # swapped in; the old engine is shut down
    assert len(h.engines) == 2 and not h.engines[0].started and h.engines[1].started
    with pytest.raises(InvalidArgument) as info_err:
        await h.service.load_model(LoadRequest(ModelSource(local_path="/m"), served_name="bad name"))
    assert info_err.value.field == "served_name"


async def test_failed_load_is_listed_and_can_be_retried() -> None:
    h = Harness(fail_start="weights are corrupt")
    with pytest.raises(FailedPrecondition) as info:
        await h.load()
    assert "weights are corrupt" in info.value.message
    (listed,) = h.service.list_models()
    assert listed.state is ModelState.FAILED and "weights are corrupt" in listed.error_message
    with pytest.raises(Unavailable):
        await h.service.generate(request())
    h.fake_args = {"context": 2048}
    await h.load()  # loading again over a FAILED entry needs no replace
    assert h.service.list_models()[0].state is ModelState.READY


async def test_no_wait_load_reports_loading_then_ready() -> None:
    h = Harness()
    info = await h.service.load_model(
        LoadRequest(ModelSource(local_path="/models/fake"), served_name="fake", no_wait=True)
    )
    assert info.state is ModelState.LOADING
    await wait_for(lambda: h.service.list_models()[0].state is ModelState.READY)


async def test_follow_alias_reloads_when_the_alias_moves() -> None:
    h = Harness()
    ref = ModelRef("tiny", alias="champion")
    await h.service.load_model(LoadRequest(ModelSource(model_ref=ref), follow_alias=True))
    (info,) = h.service.list_models()
    assert info.served_name == "tiny" and info.model is not None and info.model.version == 1
    result = await h.service.generate(
        GenerationRequest(ModelSelector(model_ref=ref), Prompt(text="x"), SamplingParams(max_tokens=2))
    )
    assert result.model is not None and str(result.model) == "tiny@champion"
    h.resolver.version = 2
    await wait_for(lambda: h.service.list_models()[0].model.version == 2)  # type: ignore[union-attr]
    assert not h.engines[0].started and h.engines[1].started
    await h.service.close()


async def test_follow_alias_needs_an_alias() -> None:
    h = Harness()
    with pytest.raises(InvalidArgument) as info:
        await h.service.load_model(LoadRequest(ModelSource(local_path="/m"), follow_alias=True))
    assert info.value.field == "follow_alias"


async def test_model_ref_selector_needs_the_resolved_version_loaded() -> None:
    h = Harness()
    await h.load()
    with pytest.raises(FailedPrecondition):
        await h.service.generate(
            GenerationRequest(ModelSelector(model_ref=ModelRef("other")), Prompt(text="x"))
        )


class RestrictedFake(FakeEngine):
    supported_controls: ClassVar[frozenset[str]] = ALL_CONTROLS - {"min_p", "logit_bias"}


async def test_engine_refuses_controls_it_cannot_honour() -> None:
    h = Harness()
    h.factory = lambda kind, path, name, options: RestrictedFake(path, name, options)  # type: ignore[method-assign]
    h.service._factory = h.factory
    await h.load()
    with pytest.raises(InvalidArgument) as info:
        await h.service.generate(request(min_p=0.1))
    assert info.value.field == "sampling.min_p" and "fake engine does not support" in info.value.message
    assert (await h.service.generate(request(top_k=3))).completions


async def test_unknown_engine_options_are_refused() -> None:
    h = Harness()
    h.service._factory = lambda kind, path, name, options: _TransformersLike(path, name, options)
    with pytest.raises(InvalidArgument) as info:
        await h.service.load_model(
            LoadRequest(ModelSource(local_path="/m"), options=EngineOptions(tensor_parallel_size=2))
        )
    assert info.value.field == "options.tensor_parallel_size"


class _TransformersLike(FakeEngine):
    supported_options: ClassVar[frozenset[str]] = frozenset({"dtype", "max_model_len"})


async def test_tokenize_detokenize_and_adapters() -> None:
    h = Harness()
    await h.load()
    result = await h.service.tokenize(TokenizeRequest(FAKE, text="ab", return_token_strings=True))
    assert result.token_strings == ("<bos>", "a", "b") and result.max_model_len == 2048
    assert await h.service.detokenize(FAKE, result.token_ids, True) == "ab"
    with pytest.raises(InvalidArgument):
        await h.service.detokenize(FAKE, (9999,), True)
    with pytest.raises(NotFound):
        await h.service.generate(GenerationRequest(FAKE, Prompt(text="x"), adapter="sql"))
    adapter = await h.service.load_adapter(FAKE, ModelSource(local_path="/adapters/sql"), "", False)
    assert adapter.name == "sql" and adapter.rank == 8
    assert (
        await h.service.generate(
            GenerationRequest(FAKE, Prompt(text="x"), SamplingParams(max_tokens=2), adapter="sql")
        )
    ).completions
    with pytest.raises(AlreadyExists):
        await h.service.load_adapter(FAKE, ModelSource(local_path="/adapters/sql"), "", False)
    info = await h.service.unload_adapter(FAKE, "sql")
    assert info.adapters == ()
    with pytest.raises(NotFound):
        await h.service.unload_adapter(FAKE, "sql")


async def test_prompt_forms_and_bad_token_ids() -> None:
    h = Harness()
    await h.load()
    with pytest.raises(InvalidArgument) as info:
        await h.service.generate(GenerationRequest(FAKE, Prompt(token_ids=(1, 500))))
    assert info.value.field == "prompt.tokens.token_ids"
    result = await h.service.generate(
        GenerationRequest(FAKE, Prompt(token_ids=(1, 5, 6)), SamplingParams(max_tokens=1))
    )
    assert result.prompt_token_ids == (1, 5, 6)
    with pytest.raises(InvalidArgument) as info:
        await h.service.generate(GenerationRequest(FAKE, Prompt(text="x" * 3000)))
    assert info.value.field == "prompt"


async def test_engine_metrics_under_vllm_names_for_engines_without_their_own() -> None:
    from llmops.serving.metrics import EngineMetricsBridge

    h = Harness()
    await h.load()
    await h.service.generate(request(max_tokens=4))
    bridge = EngineMetricsBridge(h.service.shim, h.service.refresh_engine_gauges, source=h.registry)
    families = {f.name: f for f in bridge.collect()}
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds",
            "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"} <= set(families)  # fmt: skip
    tokens = next(s for s in families["vllm:generation_tokens"].samples if s.name.endswith("_total"))
    assert tokens.labels == {"model_name": "fake", "engine": "0"} and tokens.value == 4


@pytest.mark.parametrize("unload_first", [False, True])
async def test_a_replacing_load_can_unload_first_for_models_that_fit_once(unload_first: bool) -> None:
    """A 70B model on two GPUs does not fit twice: with replace_unloads_first the old copy is shut
    down before the new engine is built; by default the old one serves until the new one is READY."""
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from llmops.serving.config import ServingConfig
    from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
    from llmops.serving.service import ServingService
    from tests.unit.serving.conftest import StaticResolver

    engines: list[FakeEngine] = []
    running_when_built: list[list[bool]] = []

    def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
        running_when_built.append([engine.started for engine in engines])
        engines.append(FakeEngine(path, served_name, options, context=2048))
        return engines[-1]

    config = ServingConfig(default_engine=EngineKind.FAKE, replace_unloads_first=unload_first)
    service = ServingService(
        factory, StaticResolver(), ServingMetrics(CollectorRegistry()), EngineShimMetrics(), config
    )
    load = LoadRequest(ModelSource(local_path="/models/fake"), served_name="fake")
    await service.load_model(load)
    await service.load_model(dataclasses.replace(load, replace=True))
    assert running_when_built == [[], [not unload_first]]
    assert [m.state for m in service.list_models()] == [ModelState.READY]
    assert not engines[0].started and engines[1].started
    await service.close()

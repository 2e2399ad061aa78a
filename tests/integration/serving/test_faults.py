"""Fault injection on a real serving server (gRPC unary, gRPC stream, OpenAI HTTP), transformers engine.

Invariants: with ``serving.faults`` on, exactly the generations its seeded generator picks fail with
INTERNAL ("injected fault") on every API, the others answer whole; every answered generation's first
token comes no sooner than the added TTFT delay, in the service's own histogram; the server logs a
warning at start.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import EngineKind
from llmops.serving.engines.base import Engine
from tests.integration.serving.conftest import (
    Stack,
    borrowing_factory,
    serving_settings,
    start_stack,
    stop_stack,
)

SEED, RATIO, TTFT_MS = 11, 0.4, 120
ROUNDS = 6  # each round: unary, stream, HTTP, in that order (the generator draws in arrival order)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def faulty(transformers_engine: Engine, tiny_model_path: Path) -> AsyncIterator[Stack]:
    settings = serving_settings(
        LLMOPS_SERVING_FAULTS__ERROR_RATIO=str(RATIO),
        LLMOPS_SERVING_FAULTS__SEED=str(SEED),
        LLMOPS_SERVING_FAULTS__TTFT_DELAY_MS=str(TTFT_MS),
    )
    s = await start_stack(borrowing_factory({EngineKind.TRANSFORMERS: transformers_engine}), settings)
    load = pb.LoadModelRequest(
        local_path=str(tiny_model_path), served_name="tiny", engine=pb.ENGINE_TRANSFORMERS
    )
    await s.client.unary(s.client.stub.LoadModel, load)
    yield s
    await stop_stack(s)


async def test_the_seeded_generations_fail_with_internal_on_every_api(faulty: Stack) -> None:
    draws = random.Random(SEED)
    expected = [draws.random() < RATIO for _ in range(3 * ROUNDS)]
    assert any(expected) and not all(expected)  # the seed exercises both outcomes
    selector = pb.ModelSelector(served_name="tiny")
    prompt = generation_pb2.Prompt(text="def main():")
    sampling = sampling_pb2.SamplingParams(max_tokens=4, greedy=True, ignore_eos=True)
    stub = faulty.client.stub
    failed: list[bool] = []
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(ROUNDS):
            try:
                answer = await stub.Generate(
                    pb.GenerateRequest(model=selector, prompt=prompt, sampling=sampling)
                )
                assert len(answer.output.completions[0].token_ids) == 4
                failed.append(False)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.INTERNAL and "injected fault" in (exc.details() or "")
                failed.append(True)
            try:
                messages = [
                    m
                    async for m in stub.GenerateStream(
                        pb.GenerateStreamRequest(model=selector, prompt=prompt, sampling=sampling)
                    )
                ]
                assert messages[-1].HasField("end") and messages[-1].end.usage.completion_tokens == 4
                failed.append(False)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.INTERNAL and "injected fault" in (exc.details() or "")
                failed.append(True)
            reply = await http.post(
                faulty.http_url + "/v1/completions",
                json={"model": "tiny", "prompt": "def main():", "max_tokens": 4, "temperature": 0},
            )
            assert reply.status_code in (200, 500), reply.text
            if reply.status_code == 500:
                assert "injected fault" in reply.text
            failed.append(reply.status_code == 500)
    assert failed == expected
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(faulty.metrics_url)).text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("llmops_serving_")
    }
    answered = expected.count(False)
    assert samples['llmops_serving_requests_total{finish_reason="error",model="tiny"}'] == expected.count(
        True
    )
    assert samples['llmops_serving_time_to_first_token_seconds_count{model="tiny"}'] == answered
    assert (
        samples['llmops_serving_time_to_first_token_seconds_sum{model="tiny"}'] >= answered * TTFT_MS / 1000
    )


async def test_a_faulty_server_warns_at_start(
    transformers_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    settings = serving_settings(LLMOPS_SERVING_FAULTS__INTER_TOKEN_DELAY_MS="5")
    with caplog.at_level(logging.WARNING, logger="llmops.serving.faults"):
        s = await start_stack(borrowing_factory({EngineKind.TRANSFORMERS: transformers_engine}), settings)
        await stop_stack(s)
    assert any(
        "FAULT INJECTION IS ON" in r.getMessage() and "inter-token +5 ms" in r.getMessage()
        for r in caplog.records
    )

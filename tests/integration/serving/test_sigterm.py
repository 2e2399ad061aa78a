"""``llmops serve serving`` as a real process: SIGTERM drains a stream in flight, then exits cleanly.

Invariants: the process loads ``serving.model`` at start and only then announces its ports (ready);
on SIGTERM a stream already running finishes with every token and its end message, new calls are
refused, and the process exits 0 within the grace period.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from llmops.common.clients import ServingClient
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.integration.serving.conftest import serving_process


@pytest.mark.slow
async def test_sigterm_drains_a_stream_in_flight(tiny_model_path: Path, tmp_path: Path) -> None:
    async with serving_process(tiny_model_path, tmp_path, grace=60, LLMOPS_SERVING_HTTP_PORT="0") as (
        process,
        address,
    ):
        async with ServingClient.connect(address) as client:
            await client.wait_ready(timeout=30)
            request = pb.GenerateStreamRequest(
                model=pb.ModelSelector(served_name="tiny"),
                prompt=generation_pb2.Prompt(text="import os\n"),
                sampling=sampling_pb2.SamplingParams(max_tokens=300, ignore_eos=True, greedy=True),
            )
            call = client.stub.GenerateStream(request, timeout=120)
            first = await call.read()
            assert first.WhichOneof("event") == "delta"
            process.send_signal(signal.SIGTERM)
            messages = [first]
            while (message := await call.read()) is not grpc.aio.EOF:
                messages.append(message)
            tokens = sum(len(m.delta.token_ids) for m in messages if m.WhichOneof("event") == "delta")
            assert tokens == 300
            assert (
                messages[-1].WhichOneof("event") == "end" and messages[-1].end.usage.completion_tokens == 300
            )
            assert await call.code() == grpc.StatusCode.OK
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.stub.Generate(
                    pb.GenerateRequest(model=request.model, prompt=request.prompt), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(process.wait(), 60) == 0

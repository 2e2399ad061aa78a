"""The typed clients against real servers: answers arrive typed, failures arrive as domain errors.

Invariants: a status raised on the server reaches the caller as the same error class (with its retry
delay); UNAVAILABLE from a draining or flapping server is retried transparently; a server that is
not there gives Unavailable, not a hang; streams translate their final status too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmops.common import errors
from llmops.common.clients import CacheClient, TrainingClient
from llmops.common.server import LLMOpsServer, ServiceBinding, create_server
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from llmops.proto.common.v1 import job_pb2
from llmops.proto.training.v1 import training_service_pb2, training_service_pb2_grpc


class FlakyCache(cache_service_pb2_grpc.CacheServiceServicer):
    """Stats fails with the error queued in ``failures`` (one per call), then answers."""

    def __init__(self) -> None:
        self.failures: list[errors.LLMOpsError] = []
        self.calls = 0

    async def Stats(self, request: Any, context: Any) -> cache_service_pb2.StatsResponse:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return cache_service_pb2.StatsResponse(hits=3, misses=1, hit_ratio=0.75)


class Watcher(training_service_pb2_grpc.TrainingServiceServicer):
    async def WatchJob(
        self, request: Any, context: Any
    ) -> AsyncIterator[training_service_pb2.WatchJobResponse]:
        for seq in (1, 2):
            event = job_pb2.JobEvent(job_id=request.job_id, sequence=seq, state=job_pb2.JOB_STATE_RUNNING)
            yield training_service_pb2.WatchJobResponse(event=event)
        raise errors.NotFound(f"job {request.job_id} vanished")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack() -> AsyncIterator[tuple[LLMOpsServer, FlakyCache]]:
    cache = FlakyCache()
    bindings = [
        ServiceBinding(
            CacheClient.service_name, cache, cache_service_pb2_grpc.add_CacheServiceServicer_to_server
        ),
        ServiceBinding(
            TrainingClient.service_name,
            Watcher(),
            training_service_pb2_grpc.add_TrainingServiceServicer_to_server,
        ),
    ]
    server, _ = await create_server("127.0.0.1:0", bindings, Settings.load(env={}))
    yield server, cache
    await server.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def cache_client(stack) -> AsyncIterator[CacheClient]:
    server, _ = stack
    async with CacheClient.connect(f"127.0.0.1:{server.port}", timeout=10) as client:
        await client.wait_ready(timeout=10)
        yield client


async def test_unary_answer_is_typed(stack, cache_client: CacheClient) -> None:
    stats = await cache_client.unary(cache_client.stub.Stats, cache_service_pb2.StatsRequest())
    assert (stats.hits, stats.misses, stats.hit_ratio) == (3, 1, 0.75)


@pytest.mark.parametrize(
    "error",
    [
        errors.NotFound("no such model"),
        errors.InvalidArgument("bad", field="tenant"),
        errors.ResourceExhausted("busy", retry_after_seconds=0.75),
        errors.DataLoss("sha256 mismatch"),
    ],
)
async def test_server_errors_arrive_as_domain_errors(stack, cache_client: CacheClient, error) -> None:
    _, cache = stack
    cache.failures = [error]
    with pytest.raises(type(error)) as info:
        await cache_client.unary(cache_client.stub.Stats, cache_service_pb2.StatsRequest())
    assert info.value.message == error.message
    if isinstance(error, errors.ResourceExhausted):
        assert info.value.retry_after_seconds == pytest.approx(0.75)


async def test_unavailable_is_retried_transparently(stack, cache_client: CacheClient) -> None:
    _, cache = stack
    cache.failures = [errors.Unavailable("redis down"), errors.Unavailable("redis down")]
    cache.calls = 0
    stats = await cache_client.unary(cache_client.stub.Stats, cache_service_pb2.StatsRequest())
    assert stats.hits == 3 and cache.calls == 3


async def test_stream_items_then_domain_error(stack) -> None:
    server, _ = stack
    async with TrainingClient.connect(f"127.0.0.1:{server.port}") as client:
        seen = []
        with pytest.raises(errors.NotFound, match="job j1 vanished"):
            async for response in client.stream(
                client.stub.WatchJob, training_service_pb2.WatchJobRequest(job_id="j1")
            ):
                seen.append(response.event.sequence)
        assert seen == [1, 2]


async def test_unimplemented_rpc_is_unimplemented(stack, cache_client: CacheClient) -> None:
    with pytest.raises(errors.Unimplemented):
        await cache_client.unary(cache_client.stub.Lookup, cache_service_pb2.LookupRequest())


async def test_absent_server_is_unavailable_not_a_hang() -> None:
    probe = await create_server("127.0.0.1:0", [], Settings.load(env={}))
    port = probe[1]
    await probe[0].stop(0)  # nothing listens on this port any more
    async with CacheClient.connect(f"127.0.0.1:{port}", timeout=3) as client:
        with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
            await client.unary(client.stub.Stats, cache_service_pb2.StatsRequest())
        with pytest.raises(errors.Unavailable, match="not ready"):
            await client.wait_ready(timeout=0.5)


async def test_wrong_channel_status_codes_map(stack) -> None:
    assert isinstance(errors.error_from_status(grpc.StatusCode.UNKNOWN, "x"), errors.Internal)

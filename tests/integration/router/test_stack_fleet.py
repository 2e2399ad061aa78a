"""``llmops up --serving-replicas 2``: the embedded stack runs two serving replicas behind the router.

Invariants: the stack starts the replicas and then the router pointed at them; a model loaded on
each replica is reachable through the router, which spreads requests over both; ``down`` stops
every part.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmops.common.clients import ServingClient, open_channel
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.router.v1 import router_service_pb2 as rpb
from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.stack.stack import LocalStack, StackOptions, alive
from tests.conftest import require_tool


@pytest.mark.slow
async def test_two_replicas_behind_the_router(tmp_path: Path) -> None:
    require_tool("redis-server")
    model = build_tiny_model().path
    options = StackOptions(
        data_dir=tmp_path / "stack",
        env={
            "LLMOPS_SERVING_ENGINE": "transformers",
            "LLMOPS_SERVING_MODEL": str(model),
            "LLMOPS_SERVING_SERVED_NAME": "tiny",
            "LLMOPS_ROUTER_POLICY": "round_robin",
        },
        services=("registry", "serving"),
        prometheus=False,
        mlflow_ui=False,
        grace_seconds=30,
        serving_replicas=2,
    )
    stack = LocalStack(options)
    state = await asyncio.to_thread(stack.up)
    try:
        assert [p.name for p in state.parts] == ["redis", "registry", "serving", "serving-2", "router"]
        router = state.part("router")
        assert router is not None and router.url.endswith("/v1")
        channel = open_channel(router.address)
        admin = rpb_grpc.RouterServiceStub(channel)
        async with ServingClient.connect(router.address, timeout=120) as client:
            for _ in range(600):
                listed = await admin.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
                if sum(e.state == rpb.ENDPOINT_STATE_READY for e in listed.endpoints) == 2:
                    break
                await asyncio.sleep(0.2)
            for i in range(4):
                await client.generate_text("tiny", f"hello {i}", max_tokens=2, greedy=True)
            listed = await admin.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
            assert sorted(e.requests for e in listed.endpoints) == [2, 2]
            models = await client.unary(client.stub.ListModels, pb.ListModelsRequest())
            assert [m.served_name for m in models.models] == ["tiny"]
        await channel.close(None)
    finally:
        await asyncio.to_thread(stack.down)
    for _ in range(300):  # a part killed after its grace may take a moment to be gone
        if not any(alive(p.pid) for p in state.parts):
            break
        await asyncio.sleep(0.1)
    assert [p.name for p in state.parts if alive(p.pid)] == []

"""The serving service as a Ray Serve deployment (local Ray, fake engine).

Invariants: a replica loads its start-up model and reports where its own gRPC server listens; that
server answers directly (the hot path); Ray Serve's gRPC proxy reaches the same replica, with domain
errors keeping their status code, and Serve's HTTP proxy reaches its OpenAI API; the replica's
health check passes only with a model ready.
"""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest

from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(model: str, top_p: float = 1.0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=pb.ModelSelector(served_name=model),
        prompt=generation_pb2.Prompt(text="x"),
        sampling=sampling_pb2.SamplingParams(max_tokens=3, ignore_eos=True, top_p=top_p),
    )


@pytest.mark.slow
async def test_ray_serve_replica_direct_and_through_the_proxy(
    tiny_model_path: Path, ray_runtime: Path
) -> None:
    from ray import serve
    from ray.serve.config import gRPCOptions

    from llmops.serving.serve_app import SERVICER_FUNCTION, deployment

    proxy_port, http_proxy_port = _free_port(), _free_port()
    temp = str(ray_runtime)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_proxy_port},
            grpc_options=gRPCOptions(port=proxy_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
        )
        env = {"LLMOPS_HOST": "127.0.0.1", "LLMOPS_SERVING_PORT": "0", "LLMOPS_SERVING_METRICS_PORT": "0",
               "LLMOPS_SERVING_HTTP_PORT": "0", "LLMOPS_SERVING_MODEL": str(tiny_model_path),
               "LLMOPS_SERVING_SERVED_NAME": "fake", "LLMOPS_DATA_DIR": temp}  # fmt: skip
        app = deployment(
            env=env, engine_factory="llmops.serving.engines.fake:fake_engine_factory", num_cpus=0.5
        )
        serve.run(app, name="llmops-serving", route_prefix="/llmops-serving")
        handle = serve.get_deployment_handle("llmops-serving", app_name="llmops-serving")
        addresses = await handle.addresses.remote()
        assert addresses["grpc"].startswith("127.0.0.1:") and addresses["http"].startswith(
            "http://127.0.0.1:"
        )
        await handle.check_health.remote()
        async with grpc.aio.insecure_channel(addresses["grpc"]) as channel:
            direct = serving_service_pb2_grpc.ServingServiceStub(channel)
            response = await direct.Generate(_request("fake"), timeout=30)
            assert len(response.output.completions[0].token_ids) == 3
        metadata = (("application", "llmops-serving"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as channel:
            proxied = serving_service_pb2_grpc.ServingServiceStub(channel)
            response = await proxied.Generate(_request("fake"), metadata=metadata, timeout=30)
            assert len(response.output.completions[0].token_ids) == 3
            listed = await proxied.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
            assert [m.served_name for m in listed.models] == ["fake"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await proxied.Generate(_request("fake", top_p=2.0), metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sampling.top_p" in (info.value.details() or "")
        # Serve's HTTP proxy reaches the OpenAI API through the replica's __call__ (the RayService
        # mode, where replicas bind no HTTP port of their own)
        import httpx

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_proxy_port}", timeout=30) as client:
            models = await client.get("/llmops-serving/v1/models")
            assert models.status_code == 200, models.text
            assert [m["id"] for m in models.json()["data"]] == ["fake"]
    finally:
        serve.shutdown()

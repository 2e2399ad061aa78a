"""The embedded stack serves registry versions from the shared artifact folder, never through the registry.

Invariants: in ``llmops up`` (registry and serving as their own processes on one machine, MLflow's
artifact store a local folder) a LoadModel of ``name@alias`` reads the version's files from the
artifact store's path (GetArtifactLocations, shared-path mode) into the node cache and says so in
the serving log; nothing is streamed through the registry; a second load of the same version (a
reload, another replica on the node) is a node-cache hit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import RegistryClient, ServingClient
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.serving.v1 import serving_service_pb2 as spb
from llmops.stack.stack import LocalStack, StackOptions
from tests.conftest import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


async def _register_and_load_twice(
    registry_address: str, serving_address: str, model: Path
) -> rpb.ModelVersion:
    async with RegistryClient.connect(registry_address, timeout=60) as registry:
        meta = rpb.VersionMetadata(
            model_name="stack-tiny",
            create_model=True,
            format=model_pb2.MODEL_FORMAT_FP32,
            aliases=["champion"],
        )
        version = await upload_directory(registry, meta, model)
    async with ServingClient.connect(serving_address, timeout=120) as serving:
        ref = model_pb2.ModelRef(name="stack-tiny", alias="champion")
        await serving.unary(serving.stub.LoadModel, spb.LoadModelRequest(model_ref=ref))
        again = spb.LoadModelRequest(model_ref=ref, served_name="stack-tiny-again")
        await serving.unary(serving.stub.LoadModel, again)
    return version


def test_stack_loads_weights_from_the_shared_artifact_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    require_tool("redis-server")
    options = StackOptions(
        data_dir=tmp_path / "stack",
        env={"LLMOPS_SERVING_ENGINE": "transformers"},
        services=("registry", "serving"),
        prometheus=False,
        mlflow_ui=False,
        grace_seconds=5,
    )
    stack = LocalStack(options)
    state = stack.up()
    try:
        registry_part, serving_part = state.part("registry"), state.part("serving")
        assert registry_part is not None and serving_part is not None and serving_part.log
        version = asyncio.run(
            _register_and_load_twice(registry_part.address, serving_part.address, tiny_model_path)
        )
        log = Path(serving_part.log).read_text(errors="replace")
        assert f"fetched stack-tiny:{version.version} from the store (shared_path)" in log
        assert f"node cache hit for stack-tiny:{version.version}" in log
        assert "through the registry" not in log
        cache = options.data_dir / "serving" / "models" / "sha256" / version.manifest_sha256
        assert (cache / "model.safetensors").read_bytes() == (
            tiny_model_path / "model.safetensors"
        ).read_bytes()
    finally:
        stack.down()

"""Serving resolves models through a real registry server: by alias, verified download, alias moves.

Invariants: ``LoadModel`` of ``name@alias`` downloads that version (files checked against their
sha256) into a cache folder and reports the resolved version with the alias it came through; a
second load of the same version reuses the cache; a request may pick the model by registry
reference; a model loaded with ``follow_alias`` is reloaded when the alias moves. Runs only where the
registry package is part of the build.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("llmops.registry.app", reason="the registry service is not part of this build")

from prometheus_client import CollectorRegistry

from llmops.common.artifacts.client import upload_directory
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.serving.config import ServingConfig
from llmops.serving.domain import (
    EngineKind,
    GenerationRequest,
    LoadRequest,
    ModelRef,
    ModelSelector,
    ModelSource,
    Prompt,
    SamplingParams,
)
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import COMPLETE_MARKER, RegistryResolver
from llmops.serving.service import ServingService
from tests.integration.registry.conftest import start_registry, stop_registry
from tests.integration.serving.test_grpc_load import Fakes


@pytest.mark.slow
async def test_load_by_alias_through_the_registry(
    tiny_model_path: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    registry = await start_registry(tmp_path / "registry", tmp_path_factory.getbasetemp())
    fakes = Fakes()
    from llmops.common.clients import RegistryClient

    resolver = RegistryResolver(RegistryClient.connect(registry.address, timeout=120), tmp_path / "cache")
    service = ServingService(
        fakes,
        resolver,
        ServingMetrics(CollectorRegistry()),
        EngineShimMetrics(),
        ServingConfig(default_engine=EngineKind.FAKE, alias_poll_seconds=0.1),
    )
    try:
        meta = rpb.VersionMetadata(
            model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32, aliases=["champion"]
        )
        first = await upload_directory(registry.client, meta, tiny_model_path)
        ref = ModelRef("tiny", alias="champion")
        info = await service.load_model(LoadRequest(ModelSource(model_ref=ref), follow_alias=True))
        assert info.served_name == "tiny" and info.model is not None
        assert (info.model.version, info.model.alias) == (first.version, "champion")
        folder = fakes.engines[0].model_path
        assert (folder / COMPLETE_MARKER).is_file()
        assert (folder / "model.safetensors").read_bytes() == (
            tiny_model_path / "model.safetensors"
        ).read_bytes()
        again = await resolver.resolve(ModelSource(model_ref=ModelRef("tiny", version=first.version)))
        assert again.path == folder  # cached by version and manifest hash
        result = await service.generate(
            GenerationRequest(ModelSelector(model_ref=ref), Prompt(text="x"), SamplingParams(max_tokens=2))
        )
        assert result.model is not None and result.model.version == first.version
        meta2 = rpb.VersionMetadata(model_name="tiny", format=model_pb2.MODEL_FORMAT_FP32)
        second = await upload_directory(registry.client, meta2, tiny_model_path)
        await registry.client.unary(
            registry.client.stub.SetAlias,
            rpb.SetAliasRequest(model_name="tiny", alias="champion", version=second.version, reason="test"),
        )
        for _ in range(300):
            models = service.list_models()
            if models and models[0].model is not None and models[0].model.version == second.version:
                break
            await asyncio.sleep(0.05)
        assert service.list_models()[0].model.version == second.version  # type: ignore[union-attr]
    finally:
        await service.close()
        await stop_registry(registry)

"""Wires the quantization service (``llmops serve quantization``): settings -> model source and
result sink (local folders, or the registry service with ``quantization.use_registry``) -> job
runner (Ray actors on a local runtime or ``ray_address``, or threads with ``quantization.runner:
thread``) -> MLflow tracker (``quantization.tracking``) -> :class:`QuantizationService` -> gRPC
servicer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llmops.common.app import ServiceApp
from llmops.common.artifacts.sinks import LocalDirectorySink, RegistrySink, ResultSink
from llmops.common.artifacts.sources import LocalModelSource, ModelSource, RegistryModelSource
from llmops.common.datasets import DataRepository
from llmops.common.runners import JobRunner
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.quantization.v1 import quantization_service_pb2_grpc as pb_grpc
from llmops.quantization.dispatch import ThreadDispatcher
from llmops.quantization.domain import Limits
from llmops.quantization.grpc_app import SERVICE_NAME, QuantizationServicer
from llmops.quantization.methods import default_quantizers
from llmops.quantization.metrics import register_metrics
from llmops.quantization.service import QuantizationService
from llmops.quantization.tracking import MlflowTracker, NullTracker, Tracker


class QuantizationApp(ServiceApp):
    """The quantization service hosted on one server."""

    def __init__(self, service: QuantizationService, source: ModelSource) -> None:
        self.service = service
        self._source = source

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                QuantizationServicer(self.service, self._source),
                pb_grpc.add_QuantizationServiceServicer_to_server,
            )
        ]

    async def close(self) -> None:
        await asyncio.to_thread(self.service.shutdown)


def build_runner(settings: Settings) -> JobRunner | None:
    """Ray actors running ``llmops.quantization.worker:run``; ``None`` for threads of the service
    (which then quantize with its own methods)."""
    if settings.quantization.runner == "thread":
        return None
    from llmops.common.runners.ray_runner import RayRunner
    from llmops.quantization.worker import BODY

    return RayRunner(
        settings.ray_address,
        body=BODY,
        default_cpus=settings.quantization.default_cpus,
        temp_dir=str(settings.ray_temp_dir) if settings.ray_temp_dir else None,
        namespace="llmops-quantization",
    )


def build_app(settings: Settings, registry: CollectorRegistry) -> QuantizationApp:
    """The service as ``settings.quantization`` describes it, its job metrics in ``registry``."""
    section = settings.quantization
    models_dir = section.models_dir or settings.data_dir / "quantization" / "models"
    work_dir = section.work_dir or settings.data_dir / "quantization" / "work"
    source: ModelSource
    sink: ResultSink
    if section.use_registry:
        address = settings.registry.address
        source = RegistryModelSource(address, settings.data_dir / "quantization" / "sources")
        sink = RegistrySink(address)
    else:
        source, sink = LocalModelSource(models_dir), LocalDirectorySink(models_dir)
    tracker: Tracker = NullTracker()
    if section.tracking:
        tracking_uri, artifact_root = settings.mlflow_locations()
        tracker = MlflowTracker(tracking_uri, artifact_root, section.mlflow_experiment)
    service = QuantizationService(
        default_quantizers(),
        sink,
        ThreadDispatcher(section.workers),
        work_dir,
        max_pending=section.max_pending,
        tracker=tracker,
        runner=build_runner(settings),
        limits=Limits(cancel_grace_seconds=section.cancel_grace_seconds, poll_seconds=section.poll_seconds),
        # the platform's one DVC data repository (training's setting): calibration data at a revision
        repository=DataRepository(settings.training.data_repo.expanduser().absolute()),
    )
    register_metrics(registry, service.list_jobs, sorted(default_quantizers()))
    return QuantizationApp(service, source)

"""Wires the quantization service (``llmops serve quantization``): settings -> model source and
result sink (local folders, or the registry service with ``quantization.use_registry``) -> thread job
runner -> MLflow tracker (``quantization.tracking``) -> :class:`QuantizationService` -> gRPC servicer.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llmops.common.app import ServiceApp
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.quantization.v1 import quantization_service_pb2_grpc as pb_grpc
from llmops.quantization.grpc_app import SERVICE_NAME, QuantizationServicer
from llmops.quantization.methods import default_quantizers
from llmops.quantization.service import JobRunner, QuantizationService, ThreadJobRunner
from llmops.quantization.tracking import MlflowTracker, NullTracker, Tracker
from llmops.registry.sinks import LocalDirectorySink, RegistrySink, ResultSink
from llmops.registry.sources import LocalModelSource, ModelSource, RegistryModelSource


class QuantizationApp(ServiceApp):
    """The quantization service hosted on one server."""

    def __init__(self, service: QuantizationService, source: ModelSource, runner: JobRunner) -> None:
        self.service = service
        self._source = source
        self._runner = runner

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                QuantizationServicer(self.service, self._source),
                pb_grpc.add_QuantizationServiceServicer_to_server,
            )
        ]

    async def close(self) -> None:
        self._runner.shutdown()


def build_app(settings: Settings, registry: CollectorRegistry) -> QuantizationApp:
    """The service as ``settings.quantization`` describes it (metrics are not wired yet)."""
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
    runner = ThreadJobRunner(section.workers)
    tracker: Tracker = NullTracker()
    if section.tracking:
        tracking_uri, artifact_root = settings.mlflow_locations()
        tracker = MlflowTracker(tracking_uri, artifact_root, section.mlflow_experiment)
    service = QuantizationService(
        default_quantizers(), sink, runner, work_dir, max_pending=section.max_pending, tracker=tracker
    )
    return QuantizationApp(service, source, runner)

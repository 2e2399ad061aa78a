"""Wires the quantization service (``llmops serve quantization``): settings -> local model source
and result sink -> thread job runner -> :class:`QuantizationService` -> gRPC servicer.
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
from llmops.quantization.sinks import LocalDirectorySink
from llmops.quantization.sources import LocalModelSource, ModelSource


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
    runner = ThreadJobRunner(section.workers)
    service = QuantizationService(
        default_quantizers(),
        LocalDirectorySink(models_dir),
        runner,
        work_dir,
        max_pending=section.max_pending,
    )
    return QuantizationApp(service, LocalModelSource(models_dir), runner)

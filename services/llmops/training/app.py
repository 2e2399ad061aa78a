"""Wires the training service (``llmops serve training``): settings -> model source and result sink
(the registry service, or local folders) -> job runner (Ray actors, or threads) -> MLflow tracker ->
:class:`TrainingService` -> gRPC servicer. ``start`` resumes jobs a previous process left unfinished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llmops.common.app import ServiceApp
from llmops.common.artifacts.sinks import LocalDirectorySink, RegistrySink, ResultSink
from llmops.common.artifacts.sources import LocalModelSource, ModelSource, RegistryModelSource
from llmops.common.datasets import DataRepository
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.training.v1 import training_service_pb2_grpc as pb_grpc
from llmops.training.grpc_app import SERVICE_NAME, TrainingServicer
from llmops.training.metrics import register_metrics
from llmops.training.runners import JobRunner
from llmops.training.service import Limits, TrainingService
from llmops.training.store import JobStore
from llmops.training.tracking import MlflowTracker, NullTracker, Tracker

FIELD = "spec.base_model"


class TrainingApp(ServiceApp):
    """The training service hosted on one server."""

    def __init__(self, service: TrainingService) -> None:
        self.service = service

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME, TrainingServicer(self.service), pb_grpc.add_TrainingServiceServicer_to_server
            )
        ]

    async def start(self) -> None:
        await asyncio.to_thread(self.service.start)

    async def close(self) -> None:
        await asyncio.to_thread(self.service.shutdown)


def build_runner(settings: Settings) -> JobRunner:
    section = settings.training
    if section.runner == "thread":
        from llmops.training.runners.local import ThreadRunner

        return ThreadRunner()
    from llmops.training.runners.ray_runner import RayRunner
    from llmops.training.runners.ray_train import DistributedRunner

    single = RayRunner(
        settings.ray_address,
        default_cpus=section.default_cpus,
        temp_dir=str(settings.ray_temp_dir) if settings.ray_temp_dir else None,
        warm=section.warm_worker,
    )
    storage = section.checkpoint_storage or str(
        settings.data_dir.expanduser().absolute() / "training" / "ray-storage"
    )
    return DistributedRunner(
        single,
        storage_path=storage,
        default_cpus=section.default_cpus,
        max_failures=section.max_worker_failures,
        fixed_cluster=not settings.ray_address,  # the embedded runtime: this machine's CPUs, no more
    )


def build_app(
    settings: Settings, registry: CollectorRegistry, *, runner: JobRunner | None = None
) -> TrainingApp:
    """The service as ``settings.training`` describes it (``runner`` overrides the settings' one)."""
    section = settings.training
    data_dir = settings.data_dir.expanduser().absolute()
    source: ModelSource
    sink: ResultSink
    if section.use_registry:
        address = settings.registry.address
        source = RegistryModelSource(address, data_dir / "training" / "bases", field=FIELD)
        sink = RegistrySink(address)
    else:
        models = section.models_dir or data_dir / "training" / "models"
        source, sink = LocalModelSource(models, field=FIELD), LocalDirectorySink(models)
    tracker: Tracker = NullTracker()
    if section.tracking:
        tracking_uri, artifact_root = settings.mlflow_locations()
        tracker = MlflowTracker(tracking_uri, artifact_root, section.mlflow_experiment)
    service = TrainingService(
        source=source,
        sink=sink,
        runner=runner or build_runner(settings),
        tracker=tracker,
        repository=DataRepository(
            section.data_repo.expanduser().absolute(), max_bytes=section.max_dataset_bytes
        ),
        store=JobStore(section.work_dir or data_dir / "training" / "jobs"),
        limits=Limits(
            max_concurrent=section.max_concurrent_jobs,
            max_queued=section.max_queued_jobs,
            max_attempts=section.max_attempts,
            cancel_grace_seconds=section.cancel_grace_seconds,
            poll_seconds=section.poll_seconds,
        ),
    )
    register_metrics(registry, service.list_jobs)
    return TrainingApp(service)

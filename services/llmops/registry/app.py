"""Wires the registry: settings -> MLflow store -> service -> gRPC servicer (``llmops serve registry``)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from llmops.common.app import ServiceApp
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.registry.v1 import registry_service_pb2_grpc as pb_grpc
from llmops.registry.fleet import FleetStore
from llmops.registry.fleet_service import FleetService, fleet_bindings
from llmops.registry.grpc_app import SERVICE_NAME, RegistryServicer
from llmops.registry.locations import LocationConfig, LocationService
from llmops.registry.metrics import RegistryMetrics
from llmops.registry.requests import RegistryLimits
from llmops.registry.rollouts_grpc import rollout_bindings, rollout_service
from llmops.registry.service import RegistryService
from llmops.registry.stores.base import RegistryStore
from llmops.registry.stores.mlflow_store import MlflowRegistryStore
from llmops.registry.validation import warm_up

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryPaths:
    """Where the registry keeps its state, with the data_dir defaults filled in."""

    tracking_uri: str
    artifact_root: str | None
    alias_db_url: str
    staging_dir: Path
    cache_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryPaths:
        data_dir = settings.data_dir.expanduser().absolute()
        section = settings.registry
        tracking_uri, artifact_root = settings.mlflow_locations()
        return cls(
            tracking_uri=tracking_uri,
            artifact_root=artifact_root,
            alias_db_url=section.alias_db_url or f"sqlite:///{data_dir / 'registry' / 'aliases.db'}",
            staging_dir=section.staging_dir or data_dir / "registry" / "staging",
            cache_dir=section.cache_dir or data_dir / "registry" / "cache",
        )


class RegistryApp(ServiceApp):
    """The registry service hosted on one server."""

    def __init__(
        self,
        service: RegistryService,
        paths: RegistryPaths | None = None,
        fleet: FleetService | None = None,
        *,
        locations: LocationConfig | None = None,
    ) -> None:
        self.service = service
        self.locations = LocationService(service, locations or LocationConfig())
        self.fleet = fleet
        self.store: RegistryStore = service.store
        self.paths = paths
        self.rollouts = rollout_service(service.store, paths.alias_db_url if paths else None)
        self._ready = False
        self._warm_up: asyncio.Future[None] | None = None
        self._opening: asyncio.Future[None] | None = None

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                RegistryServicer(self.service, self.locations),
                pb_grpc.add_RegistryServiceServicer_to_server,
                readiness=self.readiness,
            ),
            *fleet_bindings(self.fleet),
            *rollout_bindings(self.rollouts, self.readiness),
        ]

    async def start(self) -> None:
        if self.paths is not None:
            for folder in (self.paths.cache_dir, _sqlite_parent(self.paths.alias_db_url)):
                if folder is not None:
                    folder.mkdir(parents=True, exist_ok=True)
            tracking_folder = _sqlite_parent(self.paths.tracking_uri)
            if tracking_folder is not None:
                tracking_folder.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.service.clear_staging)
        # Validation needs transformers, whose import takes seconds: pay it now, in the background.
        self._warm_up = asyncio.ensure_future(asyncio.to_thread(warm_up))
        # MLflow may come up after us (a Kubernetes rollout, `mlflow server` starting beside us):
        # keep trying in the background and stay NOT_SERVING until it answers.
        self._opening = asyncio.ensure_future(self._open_store())

    async def _open_store(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.store.open()
                if self.fleet is not None:
                    await self.fleet.open()
            except Exception as exc:
                log.warning("registry store not reachable yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                self._ready = True
                return

    async def readiness(self) -> bool:
        """Ready once the store is open and answers."""
        return self._ready and await self.store.ping()

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._warm_up is not None:
            self._warm_up.cancel()  # the import finishes in its thread; nobody waits for it
        await self.store.close()
        if self.rollouts is not None:
            await self.rollouts.rollouts.close()
        if self.fleet is not None:
            self.fleet.store.dispose()


def _sqlite_parent(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]).parent if url.startswith(prefix) else None


def build_app(settings: Settings, registry: CollectorRegistry) -> RegistryApp:
    """The registry on MLflow as ``settings`` describe it; metrics go to ``registry``."""
    paths = RegistryPaths.from_settings(settings)
    section = settings.registry
    store = MlflowRegistryStore(
        tracking_uri=paths.tracking_uri,
        artifact_root=paths.artifact_root,
        alias_db_url=paths.alias_db_url,
        experiment_name=section.experiment_name,
        cache_dir=paths.cache_dir,
        disable_telemetry=not section.mlflow_telemetry,
    )
    limits = RegistryLimits(
        max_artifact_bytes=section.max_artifact_bytes,
        source_uri_schemes=tuple(section.source_uri_schemes),
    )
    service = RegistryService(store, paths.staging_dir, RegistryMetrics(registry), limits)
    locations = LocationConfig(
        artifact_root=paths.artifact_root,
        artifacts_destination=section.artifacts_destination,
        # MLflow's S3 store reads this variable; the registry presigns at the same endpoint.
        s3_endpoint_url=section.s3_endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
        default_ttl_seconds=section.presign_seconds,
    )
    fleet = FleetService(store, FleetStore(paths.alias_db_url))
    return RegistryApp(service, paths, fleet, locations=locations)

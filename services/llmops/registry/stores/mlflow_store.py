"""The registry on MLflow: the Model Registry holds models, versions and aliases; runs hold files.

How a version lands in MLflow (all or nothing):

1. a run is created in the registry's experiment (``llmops-registry`` by default);
2. the verified files move into the run's artifact folder under ``model/`` (a rename when the
   artifact store is a local folder on the same disk as the upload staging area, else MLflow's
   artifact repository uploads them: S3, GCS, ``mlflow-artifacts:``...);
3. under the model's lock, ``create_model_version(source=<run artifacts>/model, run_id=...)`` adds
   the version with every field as a tag in one transaction (see :mod:`.mlflow_tags`). This is
   what ``mlflow.register_model("runs:/...")`` does for a run holding an MLflow model; our folders
   are plain Hugging Face layout without an ``MLmodel`` file, so the client call is made directly,
   with the same source and run id a tracking server's validation accepts.

If any step fails the run's files are deleted and the run is marked deleted, so nothing is left
that a user could mistake for a version. Aliases use MLflow's alias API (the UI shows them); the
move history and the compare-and-set lock live in :class:`.alias_log.AliasLog`.

MLflow is imported lazily (it takes seconds) and every MLflow call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from llmops.common.artifacts.manifest import local_path
from llmops.common.errors import (
    AlreadyExists,
    InvalidArgument,
    LLMOpsError,
    NotFound,
    Unavailable,
)
from llmops.registry.domain import (
    AliasMove,
    Model,
    ModelVersion,
    NewVersion,
    ResolvedAlias,
    VersionStatus,
)
from llmops.registry.stores import mlflow_tags as tags_codec
from llmops.registry.stores.alias_log import AliasLog
from llmops.registry.stores.base import RegistryStore, check_alias_move, local_uri_path
from llmops.registry.weights import AliasWeights, check_alias_delete, check_weights_change

T = TypeVar("T")
ARTIFACT_SUBDIR = "model"
_SEARCH_PAGE = 1000


class _Duplicate(Exception):
    def __init__(self, version: ModelVersion) -> None:
        self.version = version


def _translate(exc: BaseException) -> BaseException:
    """MLflow and database failures as domain errors (anything else passes through)."""
    if isinstance(exc, LLMOpsError):
        return exc
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = str(exc.error_code)
        message = str(exc.message)
        if code == "RESOURCE_DOES_NOT_EXIST":
            return NotFound(message)
        if code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return AlreadyExists(message)
        if code == "INVALID_PARAMETER_VALUE":
            return InvalidArgument(message)
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or "API request" in message:
            return Unavailable("the MLflow tracking server is unavailable")
        return exc
    name = type(exc).__name__
    if name in ("OperationalError", "ConnectionError", "ConnectTimeout", "ReadTimeout"):
        return Unavailable("the registry's database is unavailable")
    return exc


class MlflowRegistryStore(RegistryStore):
    """Models and versions in MLflow's Model Registry, files in its artifact store.

    Args:
        tracking_uri: MLflow tracking and registry URI (``sqlite:///...``, ``postgresql://...``,
            ``http(s)://`` of a tracking server).
        artifact_root: artifact location of the registry's experiment when it is created
            (``file:///...``, ``s3://...``, ``mlflow-artifacts:/...``); None leaves it to MLflow
            (a tracking server's default artifact root).
        alias_db_url: SQLAlchemy URL of the alias history and lock table (SQLite or PostgreSQL).
        experiment_name: experiment whose runs hold the versions' files.
        cache_dir: where files of remote artifact stores are downloaded to be streamed.
        disable_telemetry: turn MLflow's usage telemetry off (set before MLflow is imported).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        artifact_root: str | None,
        alias_db_url: str,
        experiment_name: str = "llmops-registry",
        cache_dir: Path,
        disable_telemetry: bool = True,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.alias_db_url = alias_db_url
        self.experiment_name = experiment_name
        self.cache_dir = cache_dir
        self._disable_telemetry = disable_telemetry
        self._client: Any = None
        self._log: AliasLog | None = None
        self._experiment_id = ""
        self._open_lock = asyncio.Lock()
        self._cache_locks: dict[str, threading.Lock] = {}
        self._cache_guard = threading.Lock()

    # --- plumbing ----------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._client is None:
                await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        if self._disable_telemetry:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                self._experiment_id = client.create_experiment(
                    self.experiment_name,
                    artifact_location=self.artifact_root,
                    tags={"llmops.purpose": "files of registry model versions"},
                )
            except Exception as exc:  # another replica created it first
                if not isinstance(_translate(exc), AlreadyExists):
                    raise
                created = client.get_experiment_by_name(self.experiment_name)
                if created is None:
                    raise
                self._experiment_id = created.experiment_id
        else:
            self._experiment_id = experiment.experiment_id
        log = AliasLog(self.alias_db_url)
        log.create_tables()
        self._log = log
        self._client = client

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        await self.open()
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    @property
    def log(self) -> AliasLog:
        assert self._log is not None, "store not open"
        return self._log

    async def close(self) -> None:
        if self._log is not None:
            await asyncio.to_thread(self._log.dispose)

    async def ping(self) -> bool:
        def check() -> bool:
            self._client.search_registered_models(max_results=1)
            self.log.ping()
            return True

        return await self._call(check)

    def _versions(self, name: str, extra_filter: str = "") -> list[Any]:
        """Every MLflow version of a model, newest first."""
        query = f"name='{name}'" + (f" and {extra_filter}" if extra_filter else "")
        out: list[Any] = []
        token = None
        while True:
            page = self._client.search_model_versions(
                query, max_results=_SEARCH_PAGE, order_by=["version_number DESC"], page_token=token
            )
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _model(self, rm: Any) -> Model:
        versions = self._versions(rm.name)
        last = self.log.last_moves(rm.name)
        updated = max((m.moved_at for m in last.values()), default=None)
        latest = int(versions[0].version) if versions else 0
        return tags_codec.model_from_mlflow(
            rm, latest_version=latest, version_count=len(versions), updated_at=updated
        )

    # --- models ------------------------------------------------------------------------------------

    async def create_model(
        self, name: str, description: str, tags: Mapping[str, str], created_by: str
    ) -> Model:
        def create() -> Model:
            all_tags = {**tags, tags_codec.CREATED_BY: created_by} if created_by else dict(tags)
            rm = self._client.create_registered_model(name, tags=all_tags, description=description or None)
            return tags_codec.model_from_mlflow(rm, latest_version=0, version_count=0)

        return await self._call(create)

    async def get_model(self, name: str) -> Model:
        return await self._call(lambda: self._model(self._client.get_registered_model(name)))

    async def list_models(
        self, *, name_prefix: str, tags: Mapping[str, str], after: str, limit: int
    ) -> list[Model]:
        def search() -> list[Model]:
            # Sorted here, not by the database: its collation may order '.', '-' and '_' differently.
            query = f"name LIKE '{name_prefix}%'" if name_prefix else ""
            found: list[Any] = []
            token = None
            while True:
                page = self._client.search_registered_models(
                    filter_string=query, max_results=_SEARCH_PAGE, page_token=token
                )
                found.extend(page)
                token = page.token
                if not token:
                    break
            chosen = sorted(
                (
                    rm
                    for rm in found
                    if rm.name.startswith(name_prefix)
                    and rm.name > after
                    and all((rm.tags or {}).get(k) == v for k, v in tags.items())
                ),
                key=lambda rm: str(rm.name),
            )[:limit]
            return [self._model(rm) for rm in chosen]

        return await self._call(search)

    # --- versions ----------------------------------------------------------------------------------

    def _find_request_sync(self, name: str, request_id: str) -> ModelVersion | None:
        sha = tags_codec.request_sha256(request_id)
        found = self._versions(name, f"tags.`{tags_codec.REQUEST_SHA256}` = '{sha}'")
        return tags_codec.version_from_mlflow(found[-1]) if found else None

    async def find_request(self, name: str, request_id: str) -> ModelVersion | None:
        return await self._call(self._find_request_sync, name, request_id)

    async def add_version(self, new: NewVersion, staged_dir: Path | None) -> ModelVersion:
        return await self._call(self._add_version_sync, new, staged_dir)

    def _add_version_sync(self, new: NewVersion, staged_dir: Path | None) -> ModelVersion:
        from mlflow.entities import Metric

        client = self._client
        name = new.model_name
        client.get_registered_model(name)  # NotFound before any work
        if new.request_id and (earlier := self._find_request_sync(name, new.request_id)):
            return earlier
        run = client.create_run(
            self._experiment_id,
            run_name=f"{name}-registration",
            tags={"llmops.model": name, "llmops.format": new.format.value},
        )
        run_id = run.info.run_id
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_SUBDIR}"
        try:
            if new.status is VersionStatus.READY:
                if staged_dir is None:
                    raise ValueError("a READY version needs its files")
                self._put_files(run_id, source, staged_dir, [f.path for f in new.manifest])
            if new.metrics:
                now_ms = int(datetime.now(UTC).timestamp() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in new.metrics.items()])
            with self.log.locked(f"model:{name}"):
                if new.request_id and (earlier := self._find_request_sync(name, new.request_id)):
                    raise _Duplicate(earlier)
                mv = client.create_model_version(
                    name,
                    source=source,
                    run_id=run_id,
                    tags=tags_codec.version_tags(new),
                    description=new.description or None,
                )
            client.set_terminated(run_id, "FINISHED" if new.status is VersionStatus.READY else "FAILED")
            return tags_codec.version_from_mlflow(mv, aliases=[])
        except _Duplicate as duplicate:
            self._discard_run(run_id, source)
            return duplicate.version
        except BaseException:
            self._discard_run(run_id, source)
            raise

    def _put_files(self, run_id: str, source: str, staged_dir: Path, paths: list[str]) -> None:
        target = local_uri_path(source)
        if target is None:
            self._client.log_artifacts(run_id, str(staged_dir), artifact_path=ARTIFACT_SUBDIR)
            return
        for path in paths:
            dest = local_path(target, path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                local_path(staged_dir, path).replace(dest)  # same disk: a rename, no copy
            except OSError:
                shutil.copyfile(local_path(staged_dir, path), dest)

    def _discard_run(self, run_id: str, source: str) -> None:
        target = local_uri_path(source)
        try:
            if target is not None:
                # <artifact root>/<run id>/artifacts/model: remove the run's whole folder.
                run_dir = target.parent.parent if target.parent.parent.name == run_id else target.parent
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                get_artifact_repository(source).delete_artifacts()  # type: ignore[no-untyped-call]
        finally:
            self._client.delete_run(run_id)

    async def get_version(self, name: str, version: int) -> ModelVersion:
        def get() -> ModelVersion:
            return tags_codec.version_from_mlflow(self._client.get_model_version(name, str(version)))

        return await self._call(get)

    async def list_versions(
        self, name: str, *, statuses: frozenset[VersionStatus] | None, below: int, limit: int
    ) -> list[ModelVersion]:
        def search() -> list[ModelVersion]:
            self._client.get_registered_model(name)
            out = []
            for mv in self._versions(name):
                if below and int(mv.version) >= below:
                    continue
                version = tags_codec.version_from_mlflow(mv)
                if statuses is None or version.status in statuses:
                    out.append(version)
                if len(out) == limit:
                    break
            return out

        return await self._call(search)

    # --- aliases -----------------------------------------------------------------------------------

    async def move_alias(
        self,
        name: str,
        alias: str,
        to_version: int | None,
        *,
        expected: int | None,
        moved_by: str,
        reason: str,
    ) -> AliasMove:
        def move() -> AliasMove:
            with self.log.locked(f"model:{name}") as conn:
                aliases = self._client.get_registered_model(name).aliases or {}
                current = int(aliases[alias]) if alias in aliases else None
                from_version = check_alias_move(alias, current, to_version, expected)
                entry = AliasMove(
                    name, alias, from_version, to_version or 0, moved_by, datetime.now(UTC), reason
                )
                if current == to_version:
                    return entry
                # The row first: if MLflow refuses the move, the transaction rolls the row back.
                if to_version is None:
                    check_alias_delete(self.log.current_weights(name, conn), alias)
                AliasLog.append(conn, entry)
                if to_version is None:
                    self._client.delete_registered_model_alias(name, alias)
                else:
                    self._client.set_registered_model_alias(name, alias, str(to_version))
                return entry

        return await self._call(move)

    async def resolve_alias(self, name: str, alias: str) -> ResolvedAlias:
        def resolve() -> ResolvedAlias:
            rm = self._client.get_registered_model(name)
            aliases = rm.aliases or {}
            if alias not in aliases:
                raise NotFound(f"alias {alias!r} of model {name!r} does not exist")
            version = int(aliases[alias])
            last = self.log.history(name, alias, offset=0, limit=1)
            if last and last[0].to_version == version:
                moved_at = last[0].moved_at
            else:  # moved outside the registry API (in the MLflow UI): the model's last change
                moved_at = datetime.fromtimestamp((rm.last_updated_timestamp or 0) / 1000, UTC)
            return ResolvedAlias(name, alias, version, moved_at)

        return await self._call(resolve)

    async def alias_history(self, name: str, alias: str, *, offset: int, limit: int) -> list[AliasMove]:
        def history() -> list[AliasMove]:
            self._client.get_registered_model(name)
            return self.log.history(name, alias, offset=offset, limit=limit)

        return await self._call(history)

    # --- traffic-split weights ----------------------------------------------------------------------

    async def set_alias_weights(
        self, name: str, weights: dict[str, int], *, expected: int | None, set_by: str, reason: str
    ) -> AliasWeights:
        def change() -> AliasWeights:
            with self.log.locked(f"model:{name}") as conn:
                aliases = self._client.get_registered_model(name).aliases or {}
                current = self.log.current_weights(name, conn)
                check_weights_change(current, weights, aliases, expected)
                if current.weights == weights:
                    return current
                entry = AliasWeights(
                    name,
                    current.revision + 1,
                    dict(weights),
                    dict(current.weights),
                    set_by,
                    datetime.now(UTC),
                    reason,
                )
                AliasLog.append_weights(conn, entry)
                return entry

        return await self._call(change)

    async def get_alias_weights(self, name: str) -> AliasWeights:
        def get() -> AliasWeights:
            self._client.get_registered_model(name)
            return self.log.current_weights(name)

        return await self._call(get)

    async def alias_weights_history(self, name: str, *, offset: int, limit: int) -> list[AliasWeights]:
        def history() -> list[AliasWeights]:
            self._client.get_registered_model(name)
            return self.log.weights_history(name, offset=offset, limit=limit)

        return await self._call(history)

    # --- artifacts ---------------------------------------------------------------------------------

    async def artifact_dir(self, version: ModelVersion) -> Path:
        local = local_uri_path(version.artifact_uri)
        if local is not None:
            return local
        return await self._call(self._cached_copy, version)

    def _cached_copy(self, version: ModelVersion) -> Path:
        key = f"{version.name}/{version.version}"
        with self._cache_guard:
            lock = self._cache_locks.setdefault(key, threading.Lock())
        target = self.cache_dir / version.name / str(version.version)
        with lock:
            if target.is_dir():
                return target
            self._download(version.artifact_uri, target)
            return target

    def _download(self, uri: str, target: Path) -> None:
        from mlflow.artifacts import download_artifacts

        scratch = target.parent / f".llmops-download-{uuid.uuid4().hex}"
        scratch.mkdir(parents=True)
        try:
            got = Path(
                download_artifacts(artifact_uri=uri, dst_path=str(scratch), tracking_uri=self.tracking_uri)
            )
            got.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def fetch_source(self, uri: str, dest: Path) -> None:
        if local_uri_path(uri) is not None:
            await super().fetch_source(uri, dest)
            return

        def fetch() -> None:
            self._download(uri, dest)

        await self._call(fetch)

"""In-memory registry store for tests: metadata in dicts, artifact files in a local folder.

It keeps the same guarantees as the MLflow store (checked by the conformance suite) with one
``asyncio.Lock`` per model, since everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from llmops.common.artifacts.manifest import local_path
from llmops.common.errors import AlreadyExists, NotFound
from llmops.registry.domain import (
    AliasMove,
    Model,
    ModelVersion,
    NewVersion,
    ResolvedAlias,
    VersionStatus,
)
from llmops.registry.stores.base import RegistryStore, check_alias_move
from llmops.registry.weights import AliasWeights, check_alias_delete, check_weights_change


@dataclasses.dataclass
class _ModelState:
    model: Model
    versions: dict[int, ModelVersion] = dataclasses.field(default_factory=dict)
    aliases: dict[str, int] = dataclasses.field(default_factory=dict)
    history: list[AliasMove] = dataclasses.field(default_factory=list)
    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    weights: list[AliasWeights] = dataclasses.field(default_factory=list)  # oldest first
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


def _now() -> datetime:
    return datetime.now(UTC)


class FakeRegistryStore(RegistryStore):
    """Dicts for metadata, ``artifact_root/<model>/<version>/`` for files."""

    def __init__(self, artifact_root: Path) -> None:
        self.artifact_root = artifact_root
        self._models: dict[str, _ModelState] = {}
        #: Set to make the next ``add_version`` fail after it has placed the files (fault injection).
        self.fail_next_add: Exception | None = None

    def _state(self, name: str) -> _ModelState:
        state = self._models.get(name)
        if state is None:
            raise NotFound(f"model {name!r} does not exist")
        return state

    def _model_view(self, state: _ModelState) -> Model:
        versions = state.versions
        return dataclasses.replace(
            state.model,
            latest_version=max(versions, default=0),
            version_count=len(versions),
            aliases=dict(state.aliases),
        )

    def _version_view(self, state: _ModelState, version: ModelVersion) -> ModelVersion:
        aliases = tuple(sorted(a for a, v in state.aliases.items() if v == version.version))
        return dataclasses.replace(version, aliases=aliases)

    async def create_model(
        self, name: str, description: str, tags: Mapping[str, str], created_by: str
    ) -> Model:
        if name in self._models:
            raise AlreadyExists(f"model {name!r} already exists")
        now = _now()
        model = Model(name, description, dict(tags), now, now, created_by, 0, 0, {})
        self._models[name] = _ModelState(model)
        return self._model_view(self._models[name])

    async def get_model(self, name: str) -> Model:
        return self._model_view(self._state(name))

    async def list_models(
        self, *, name_prefix: str, tags: Mapping[str, str], after: str, limit: int
    ) -> list[Model]:
        names = sorted(n for n in self._models if n.startswith(name_prefix) and n > after)
        out = []
        for name in names:
            model = self._models[name].model
            if all(model.tags.get(k) == v for k, v in tags.items()):
                out.append(self._model_view(self._models[name]))
            if len(out) == limit:
                break
        return out

    async def add_version(self, new: NewVersion, staged_dir: Path | None) -> ModelVersion:
        state = self._state(new.model_name)
        async with state.lock:
            if new.request_id in state.requests:
                return self._version_view(state, state.versions[state.requests[new.request_id]])
            number = max(state.versions, default=0) + 1
            target = self.artifact_root / new.model_name / str(number)
            if new.status is VersionStatus.READY:
                if staged_dir is None:
                    raise ValueError("a READY version needs its files")
                try:
                    await asyncio.to_thread(_move_files, staged_dir, target, [f.path for f in new.manifest])
                    if self.fail_next_add is not None:
                        failure, self.fail_next_add = self.fail_next_add, None
                        raise failure
                except BaseException:
                    shutil.rmtree(target, ignore_errors=True)
                    raise
            version = ModelVersion(
                name=new.model_name,
                version=number,
                format=new.format,
                status=new.status,
                artifact_uri=target.as_uri() if new.status is VersionStatus.READY else "",
                manifest=new.manifest,
                manifest_sha256=new.manifest_sha256,
                parameter_count=new.parameter_count,
                base_model=new.base_model,
                adapter_base=new.adapter_base,
                lineage=new.lineage,
                metrics=dict(new.metrics),
                tags=dict(new.tags),
                description=new.description,
                created_at=_now(),
                created_by=new.created_by,
                failure_reason=new.failure_reason,
            )
            state.versions[number] = version
            if new.request_id:
                state.requests[new.request_id] = number
            state.model = dataclasses.replace(state.model, updated_at=version.created_at)
            return self._version_view(state, version)

    async def find_request(self, name: str, request_id: str) -> ModelVersion | None:
        state = self._state(name)
        number = state.requests.get(request_id)
        return None if number is None else self._version_view(state, state.versions[number])

    async def get_version(self, name: str, version: int) -> ModelVersion:
        state = self._state(name)
        found = state.versions.get(version)
        if found is None:
            raise NotFound(f"version {version} of model {name!r} does not exist")
        return self._version_view(state, found)

    async def list_versions(
        self, name: str, *, statuses: frozenset[VersionStatus] | None, below: int, limit: int
    ) -> list[ModelVersion]:
        state = self._state(name)
        numbers = sorted((n for n in state.versions if not below or n < below), reverse=True)
        out = []
        for number in numbers:
            version = state.versions[number]
            if statuses is None or version.status in statuses:
                out.append(self._version_view(state, version))
            if len(out) == limit:
                break
        return out

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
        state = self._state(name)
        async with state.lock:
            current = state.aliases.get(alias)
            from_version = check_alias_move(alias, current, to_version, expected)
            now = _now()
            move = AliasMove(name, alias, from_version, to_version or 0, moved_by, now, reason)
            if current == to_version:
                return move
            if to_version is None:
                check_alias_delete(self._weights(state), alias)
                del state.aliases[alias]
            else:
                if to_version not in state.versions:
                    raise NotFound(f"version {to_version} of model {name!r} does not exist")
                state.aliases[alias] = to_version
            state.history.append(move)
            state.model = dataclasses.replace(state.model, updated_at=now)
            return move

    async def resolve_alias(self, name: str, alias: str) -> ResolvedAlias:
        state = self._state(name)
        version = state.aliases.get(alias)
        if version is None:
            raise NotFound(f"alias {alias!r} of model {name!r} does not exist")
        moved_at = next(m.moved_at for m in reversed(state.history) if m.alias == alias)
        return ResolvedAlias(name, alias, version, moved_at)

    async def alias_history(self, name: str, alias: str, *, offset: int, limit: int) -> list[AliasMove]:
        state = self._state(name)
        moves = [m for m in reversed(state.history) if not alias or m.alias == alias]
        return moves[offset : offset + limit]

    @staticmethod
    def _weights(state: _ModelState) -> AliasWeights:
        return state.weights[-1] if state.weights else AliasWeights(state.model.name)

    async def set_alias_weights(
        self, name: str, weights: dict[str, int], *, expected: int | None, set_by: str, reason: str
    ) -> AliasWeights:
        state = self._state(name)
        async with state.lock:
            current = self._weights(state)
            check_weights_change(current, weights, state.aliases, expected)
            if current.weights == weights:
                return current
            entry = AliasWeights(
                name, current.revision + 1, dict(weights), dict(current.weights), set_by, _now(), reason
            )
            state.weights.append(entry)
            return entry

    async def get_alias_weights(self, name: str) -> AliasWeights:
        return self._weights(self._state(name))

    async def alias_weights_history(self, name: str, *, offset: int, limit: int) -> list[AliasWeights]:
        return list(reversed(self._state(name).weights))[offset : offset + limit]

    async def artifact_dir(self, version: ModelVersion) -> Path:
        return self.artifact_root / version.name / str(version.version)


def _move_files(staged_dir: Path, target: Path, paths: list[str]) -> None:
    target.mkdir(parents=True, exist_ok=False)
    for path in paths:
        dest = local_path(target, path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        local_path(staged_dir, path).replace(dest)

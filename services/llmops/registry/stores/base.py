"""The registry's storage interface: model metadata, versions, aliases with history, and artifacts.

A store owns three guarantees the service builds on:

- a version is added whole or not at all: its files and its record appear together, and a failure
  part-way leaves neither (no record, no files);
- alias moves are atomic compare-and-sets, serialized per model, each recorded in the history in
  the same step (``from_version`` of one entry is ``to_version`` of the one before);
- a registration with a ``request_id`` already used for the model returns the earlier version;
- traffic-split weights change by compare-and-set on a revision under the same per-model lock as
  alias moves, so a positive weight never names a missing alias.

Every implementation runs the conformance suite in ``tests/unit/registry/test_store_conformance.py``.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, caller_path
from llmops.registry.domain import (
    AliasMove,
    Model,
    ModelVersion,
    NewVersion,
    ResolvedAlias,
    VersionStatus,
)
from llmops.registry.weights import AliasWeights


class RegistryStore(abc.ABC):
    """Metadata and artifact storage of the registry."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and create what is missing (tables, experiment). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def ping(self) -> bool:
        """True when the backing store answers (readiness)."""
        return True

    # --- models ------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_model(
        self, name: str, description: str, tags: Mapping[str, str], created_by: str
    ) -> Model:
        """Create an empty model. ``AlreadyExists`` when the name is taken."""

    @abc.abstractmethod
    async def get_model(self, name: str) -> Model:
        """A model. ``NotFound`` when it does not exist."""

    @abc.abstractmethod
    async def list_models(
        self, *, name_prefix: str, tags: Mapping[str, str], after: str, limit: int
    ) -> list[Model]:
        """Up to ``limit`` models named after ``after`` (exclusive), ascending by name."""

    # --- versions ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_version(self, new: NewVersion, staged_dir: Path | None) -> ModelVersion:
        """Add a version numbered one past the model's highest, whole or not at all.

        Args:
            new: the version's record. READY needs ``staged_dir``; FAILED has no files.
            staged_dir: a folder holding exactly ``new.manifest``'s files. The store takes them
                (it may move them away); the caller removes whatever is left afterwards.

        Returns:
            The new version, or the earlier one when ``new.request_id`` was used before.

        Raises:
            NotFound: the model does not exist.
        """

    @abc.abstractmethod
    async def find_request(self, name: str, request_id: str) -> ModelVersion | None:
        """The version an earlier registration with this idempotency key added, if any."""

    @abc.abstractmethod
    async def get_version(self, name: str, version: int) -> ModelVersion:
        """One version. ``NotFound`` when the model or the version does not exist."""

    @abc.abstractmethod
    async def list_versions(
        self, name: str, *, statuses: frozenset[VersionStatus] | None, below: int, limit: int
    ) -> list[ModelVersion]:
        """Up to ``limit`` versions numbered below ``below`` (0: no bound), newest first.

        ``statuses`` None means any. ``NotFound`` when the model does not exist.
        """

    # --- aliases -----------------------------------------------------------------------------------

    @abc.abstractmethod
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
        """Point ``alias`` at ``to_version`` (None deletes it) atomically, and record the move.

        The caller has checked that ``to_version`` is READY. See :func:`check_alias_move` for the
        compare-and-set rules. When the alias already points at ``to_version`` nothing is recorded
        and the returned move has ``from_version == to_version``.
        """

    @abc.abstractmethod
    async def resolve_alias(self, name: str, alias: str) -> ResolvedAlias:
        """Where an alias points. ``NotFound`` when the model or the alias does not exist."""

    @abc.abstractmethod
    async def alias_history(self, name: str, alias: str, *, offset: int, limit: int) -> list[AliasMove]:
        """Alias moves of a model (only ``alias``'s when not empty), newest first."""

    # --- traffic-split weights (see llmops.registry.weights) -----------------------------------------

    @abc.abstractmethod
    async def set_alias_weights(
        self, name: str, weights: dict[str, int], *, expected: int | None, set_by: str, reason: str
    ) -> AliasWeights:
        """Replace the model's weights as a new revision, atomically, and record the change.

        ``weights`` has been checked by :func:`~llmops.registry.weights.check_weights`; the store
        applies :func:`~llmops.registry.weights.check_weights_change` under the model's lock (the
        one alias moves take). The same weights again record nothing and return the current entry.
        ``NotFound`` when the model does not exist.
        """

    @abc.abstractmethod
    async def get_alias_weights(self, name: str) -> AliasWeights:
        """The weights in force (revision 0 when never set). ``NotFound`` when the model does not exist."""

    @abc.abstractmethod
    async def alias_weights_history(self, name: str, *, offset: int, limit: int) -> list[AliasWeights]:
        """Weight changes of a model, newest first. ``NotFound`` when the model does not exist."""

    # --- artifacts ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def artifact_dir(self, version: ModelVersion) -> Path:
        """A local folder holding the version's files as stored (a cached copy for remote stores).

        The files are not verified here: readers check them against the manifest.
        """

    async def fetch_source(self, uri: str, dest: Path) -> None:
        """Copy the folder ``uri`` names into ``dest`` (which must not exist yet).

        The base class reads ``file://`` folders; stores that reach remote storage add schemes.
        Symbolic links are copied as links, so the manifest scan refuses them.
        """
        source = local_uri_path(uri)
        if source is None:
            scheme = urllib.parse.urlparse(uri).scheme
            raise InvalidArgument(f"source URI scheme {scheme!r} is not supported", field="source_uri")
        with caller_path(uri, field="source_uri"):  # the caller's path: too long, unreadable...
            if not source.is_dir():
                raise InvalidArgument(f"source {uri} is not a readable folder", field="source_uri")
            with os.scandir(source):
                pass
        try:
            await asyncio.to_thread(shutil.copytree, source, dest, symlinks=True)
        except shutil.Error as exc:  # the source's files that could not be copied, each with why
            first = exc.args[0][0] if exc.args and exc.args[0] else ()
            reason = str(first[2]) if isinstance(first, tuple) and len(first) == 3 else str(exc)
            error = PermissionDenied if "Permission denied" in reason else InvalidArgument
            raise error(f"source {uri}: a file cannot be copied ({reason[:200]})") from exc


def local_uri_path(uri: str) -> Path | None:
    """The local path a ``file://`` (or absolute, scheme-less) URI names; None for remote URIs."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def check_alias_move(alias: str, current: int | None, to_version: int | None, expected: int | None) -> int:
    """The compare-and-set rules every store applies under its lock; returns ``from_version``.

    Args:
        alias: the alias (for messages).
        current: where the alias points now; None when it does not exist.
        to_version: where it should point; None to delete it.
        expected: None for an unconditional move; else the version the alias must point at now
            (0: it must not exist).

    Raises:
        FailedPrecondition: the alias is not where ``expected`` says.
        NotFound: deleting an alias that does not exist.
    """
    if expected is not None and (current or 0) != expected:
        where = f"version {current}" if current else "nothing"
        wanted = f"version {expected}" if expected else "nothing"
        raise FailedPrecondition(f"alias {alias!r} points at {where}, expected {wanted}")
    if to_version is None and current is None:
        raise NotFound(f"alias {alias!r} does not exist")
    return current or 0

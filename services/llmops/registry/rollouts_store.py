"""Rollout records in a small SQL table beside the alias log (same database: a SQLite file by
default, or PostgreSQL), so they survive a registry restart like the alias weights do.

One row per rollout: its model, state and revision as columns (to filter and compare-and-set), the
whole record as the serialized ``llmops.registry.v1.Rollout`` (transitions and evidence included).
A change is ``UPDATE ... WHERE id = ? AND revision = ?``: a writer that read an older revision
changes nothing and gets ``Aborted``. Creating a rollout checks that the model has no active one in
the same transaction, under the alias log's per-key lock (SQLite's write lock or a PostgreSQL
advisory lock), so two registry replicas cannot both start one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy as sa

from llmops.common.errors import Aborted, FailedPrecondition, NotFound
from llmops.common.rollout_client import rollout_from_proto, rollout_to_proto
from llmops.common.rollouts import Rollout, RolloutState
from llmops.proto.registry.v1 import rollout_service_pb2 as pb
from llmops.registry.stores.alias_log import AliasLog

T = TypeVar("T")
_METADATA = sa.MetaData()
ROLLOUTS = sa.Table(
    "llmops_rollouts",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Index("ix_llmops_rollouts_model", "model_name", "id"),
)
ACTIVE = tuple(s.value for s in RolloutState if s.active)


def _decode(blob: bytes) -> Rollout:
    message = pb.Rollout()
    message.ParseFromString(blob)
    return rollout_from_proto(message)


class RolloutStore:
    """Rollout rows on the alias log's database (an :class:`AliasLog` of its own on the same URL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._log: AliasLog | None = None
        self._opening = threading.Lock()

    @property
    def log(self) -> AliasLog:
        """The database, opened (and its table created) on first use: the registry's own start-up
        waits for MLflow, and a rollout call before then fails like any other registry call."""
        with self._opening:
            if self._log is None:
                log = AliasLog(self.url)
                _METADATA.create_all(log.engine)
                self._log = log
            return self._log

    async def close(self) -> None:
        if self._log is not None:
            self._log.dispose()
            self._log = None

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    async def create(self, build: Callable[[int], Rollout]) -> Rollout:
        """Insert the rollout ``build(id)`` returns; ``FailedPrecondition`` when the model has an active one.

        ``build`` receives the new id (the row is inserted first, in the same transaction).
        """

        def create_sync() -> Rollout:
            probe = build(0)
            with self.log.locked(f"rollouts:{probe.spec.model_name}") as conn:
                active = conn.execute(
                    sa.select(ROLLOUTS.c.id, ROLLOUTS.c.state).where(
                        ROLLOUTS.c.model_name == probe.spec.model_name, ROLLOUTS.c.state.in_(ACTIVE)
                    )
                ).first()
                if active is not None:
                    raise FailedPrecondition(
                        f"model {probe.spec.model_name!r} already has an active rollout "
                        f"(id {active.id}, {active.state}): abort it or wait for it to end"
                    )
                result = conn.execute(
                    ROLLOUTS.insert().values(
                        model_name=probe.spec.model_name,
                        state=probe.state.value,
                        revision=probe.revision,
                        record=b"",
                    )
                )
                key = result.inserted_primary_key
                assert key is not None
                new_id = int(key[0])
                rollout = build(new_id)
                conn.execute(
                    ROLLOUTS.update()
                    .where(ROLLOUTS.c.id == new_id)
                    .values(record=rollout_to_proto(rollout).SerializeToString())
                )
                return rollout

        return await self._call(create_sync)

    async def get(self, rollout_id: int) -> Rollout:
        def get_sync() -> Rollout:
            with self.log.engine.connect() as conn:
                row = conn.execute(sa.select(ROLLOUTS.c.record).where(ROLLOUTS.c.id == rollout_id)).first()
            if row is None or not row.record:
                raise NotFound(f"no rollout {rollout_id}")
            return _decode(row.record)

        return await self._call(get_sync)

    async def list(self, *, model_name: str, active_only: bool, offset: int, limit: int) -> list[Rollout]:
        """Rollouts newest first."""

        def list_sync() -> list[Rollout]:
            query = sa.select(ROLLOUTS.c.record).where(ROLLOUTS.c.record != b"")
            if model_name:
                query = query.where(ROLLOUTS.c.model_name == model_name)
            if active_only:
                query = query.where(ROLLOUTS.c.state.in_(ACTIVE))
            query = query.order_by(ROLLOUTS.c.id.desc()).offset(offset).limit(limit)
            with self.log.engine.connect() as conn:
                return [_decode(row.record) for row in conn.execute(query)]

        return await self._call(list_sync)

    async def replace(self, rollout: Rollout, expected_revision: int) -> Rollout:
        """Store ``rollout`` if the row is still at ``expected_revision``, else ``Aborted``."""

        def replace_sync() -> Rollout:
            with self.log.engine.begin() as conn:
                result = conn.execute(
                    ROLLOUTS.update()
                    .where(ROLLOUTS.c.id == rollout.id, ROLLOUTS.c.revision == expected_revision)
                    .values(
                        state=rollout.state.value,
                        revision=rollout.revision,
                        record=rollout_to_proto(rollout).SerializeToString(),
                    )
                )
                if result.rowcount != 1:
                    raise Aborted(
                        f"rollout {rollout.id} changed since revision {expected_revision}: read it again"
                    )
            return rollout

        return await self._call(replace_sync)


def now() -> datetime:
    return datetime.now(UTC)

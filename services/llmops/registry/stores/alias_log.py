"""Alias history and per-model locks in a small SQL table next to MLflow.

MLflow's Model Registry stores where each alias points (its alias API; the MLflow UI shows it) but
neither a history of moves nor a compare-and-set. This table adds both:

- ``llmops_alias_history``: one row per move (model, alias, from, to, who, when, why), append-only;
- ``llmops_alias_weights``: one row per revision of a model's traffic-split weights (the weights
  and the ones they replaced as JSON, who, when, why), append-only; the newest row is in force;
- :meth:`AliasLog.locked`: a transaction that holds a per-model lock across processes — SQLite's
  write lock (``BEGIN IMMEDIATE``) or a PostgreSQL transaction-level advisory lock — so that
  "read the alias in MLflow, check, move it in MLflow, append the row" runs as one step even with
  several registry replicas.

It lives in its own database (a SQLite file by default, or PostgreSQL), never inside MLflow's
SQLite file: holding SQLite's write lock while MLflow writes to the same file would deadlock.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from llmops.registry.domain import AliasMove
from llmops.registry.weights import AliasWeights

_METADATA = sa.MetaData()
HISTORY = sa.Table(
    "llmops_alias_history",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("from_version", sa.BigInteger, nullable=False),
    sa.Column("to_version", sa.BigInteger, nullable=False),
    sa.Column("moved_by", sa.String(256), nullable=False),
    sa.Column("moved_at_us", sa.BigInteger, nullable=False),  # microseconds since the epoch, UTC
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("ix_llmops_alias_history_model", "model_name", "id"),
)

WEIGHTS = sa.Table(
    "llmops_alias_weights",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("weights_json", sa.Text, nullable=False),
    sa.Column("previous_json", sa.Text, nullable=False),
    sa.Column("set_by", sa.String(256), nullable=False),
    sa.Column("set_at_us", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.UniqueConstraint("model_name", "revision", name="uq_llmops_alias_weights_revision"),
)


def _to_us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _from_us(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1_000_000, UTC)


def _lock_id(key: str) -> int:
    # A signed 64-bit id for pg_advisory_xact_lock.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class AliasLog:
    """The alias-history table and the per-model lock, on one SQLAlchemy engine."""

    def __init__(self, url: str, *, busy_timeout_seconds: float = 30.0) -> None:
        self.url = url
        self.engine = sa.create_engine(url, **_engine_options(url, busy_timeout_seconds))
        self._dialect = self.engine.dialect.name
        if self._dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"alias log database must be SQLite or PostgreSQL, not {self._dialect}")
        # Reads go through their own engine: with SQLite's WAL journal they never wait for a writer.
        self._reader = self.engine
        if self._dialect == "sqlite":
            _sqlite_wal(self.engine)
            _sqlite_immediate_transactions(self.engine)
            self._reader = sa.create_engine(url, **_engine_options(url, busy_timeout_seconds))
            _sqlite_wal(self._reader)
        self._local_locks: dict[str, threading.Lock] = {}
        self._local_guard = threading.Lock()

    def create_tables(self) -> None:
        _METADATA.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
        self._reader.dispose()

    def ping(self) -> None:
        with self._reader.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    @contextmanager
    def locked(self, key: str) -> Iterator[sa.Connection]:
        """A transaction holding the lock named ``key`` until it commits (or rolls back on error)."""
        with self._local_guard:
            local = self._local_locks.setdefault(key, threading.Lock())
        # The in-process lock first: threads of one replica queue here instead of polling SQLite.
        with local, self.engine.begin() as conn:
            if self._dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _lock_id(key)})
            yield conn

    @staticmethod
    def append(conn: sa.Connection, move: AliasMove) -> None:
        conn.execute(
            HISTORY.insert().values(
                model_name=move.model_name,
                alias=move.alias,
                from_version=move.from_version,
                to_version=move.to_version,
                moved_by=move.moved_by,
                moved_at_us=_to_us(move.moved_at),
                reason=move.reason,
            )
        )

    def history(self, model_name: str, alias: str, *, offset: int, limit: int) -> list[AliasMove]:
        """Moves of a model (only ``alias``'s when not empty), newest first."""
        query = sa.select(HISTORY).where(HISTORY.c.model_name == model_name)
        if alias:
            query = query.where(HISTORY.c.alias == alias)
        query = query.order_by(HISTORY.c.id.desc()).offset(offset).limit(limit)
        with self._reader.connect() as conn:
            return [_move(row) for row in conn.execute(query).mappings()]

    def last_moves(self, model_name: str) -> dict[str, AliasMove]:
        """The latest move of each alias of a model."""
        latest = (
            sa.select(sa.func.max(HISTORY.c.id))
            .where(HISTORY.c.model_name == model_name)
            .group_by(HISTORY.c.alias)
            .scalar_subquery()
        )
        query = sa.select(HISTORY).where(HISTORY.c.id.in_(latest))
        with self._reader.connect() as conn:
            return {row["alias"]: _move(row) for row in conn.execute(query).mappings()}

    @staticmethod
    def append_weights(conn: sa.Connection, entry: AliasWeights) -> None:
        assert entry.set_at is not None
        conn.execute(
            WEIGHTS.insert().values(
                model_name=entry.model_name,
                revision=entry.revision,
                weights_json=json.dumps(entry.weights, sort_keys=True),
                previous_json=json.dumps(entry.previous_weights, sort_keys=True),
                set_by=entry.set_by,
                set_at_us=_to_us(entry.set_at),
                reason=entry.reason,
            )
        )

    def current_weights(self, model_name: str, conn: sa.Connection | None = None) -> AliasWeights:
        """The newest weights of a model (revision 0 when none); inside ``locked`` pass its ``conn``."""
        found = self.weights_history(model_name, offset=0, limit=1, conn=conn)
        return found[0] if found else AliasWeights(model_name)

    def weights_history(
        self, model_name: str, *, offset: int, limit: int, conn: sa.Connection | None = None
    ) -> list[AliasWeights]:
        """Weight revisions of a model, newest first."""
        query = (
            sa.select(WEIGHTS)
            .where(WEIGHTS.c.model_name == model_name)
            .order_by(WEIGHTS.c.revision.desc())
            .offset(offset)
            .limit(limit)
        )
        if conn is not None:
            return [_weights(row) for row in conn.execute(query).mappings()]
        with self._reader.connect() as reader:
            return [_weights(row) for row in reader.execute(query).mappings()]


def _weights(row: Any) -> AliasWeights:
    return AliasWeights(
        model_name=row["model_name"],
        revision=int(row["revision"]),
        weights={str(k): int(v) for k, v in json.loads(row["weights_json"]).items()},
        previous_weights={str(k): int(v) for k, v in json.loads(row["previous_json"]).items()},
        set_by=row["set_by"],
        set_at=_from_us(int(row["set_at_us"])),
        reason=row["reason"],
    )


def _move(row: Any) -> AliasMove:
    return AliasMove(
        model_name=row["model_name"],
        alias=row["alias"],
        from_version=int(row["from_version"]),
        to_version=int(row["to_version"]),
        moved_by=row["moved_by"],
        moved_at=_from_us(int(row["moved_at_us"])),
        reason=row["reason"],
    )


def _engine_options(url: str, busy_timeout_seconds: float) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": busy_timeout_seconds, "check_same_thread": False}}
    return {"pool_pre_ping": True}


def _sqlite_wal(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _wal(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()


def _sqlite_immediate_transactions(engine: sa.Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead, so a
    # locked() transaction excludes every other writer (in this process or another) from its start.
    @sa.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

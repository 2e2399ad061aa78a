"""Serving pools and their reload lease, kept in SQL beside the alias history.

A pool is (model, pool name) -> an alias to follow or a pinned version, plus:

- a *generation*, bumped by ``llmops fleet reload``: every replica reloads once per increase;
- a *reload lease* (holder, expiry): at most one replica of a pool reloads at a time, so the pool's
  capacity never drops below its replicas minus one. Taking it is one conditional UPDATE (a
  compare-and-set that SQLite and PostgreSQL both run atomically): granted when the lease is free,
  lapsed, or already the caller's (a renewal). Only the holder releases it; a replica that dies
  mid-reload loses it when its ttl lapses;
- *members*: each replica's last report (version, phase, serving), counted live for its own ttl.

Replicas declare their pool (``SyncPool``): the first declaration creates it, a different target
replaces it (the chart changed the pool's values). Everything lives in the registry's alias
database (SQLite file or PostgreSQL), so it survives a registry restart.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound
from llmops.registry.domain import check_alias_name, check_model_name
from llmops.registry.stores.alias_log import _sqlite_immediate_transactions, _sqlite_wal

POOL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
REPLICA_ID = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
MAX_LEASE_SECONDS = 3600
MAX_MEMBER_TTL_SECONDS = 600


class ReloadPhase(enum.IntEnum):
    """Where a replica is (values match the proto enum)."""

    UNSPECIFIED = 0
    STARTING = 1
    READY = 2
    WAITING = 3
    DRAINING = 4
    UNLOADING = 5
    LOADING = 6
    FAILED = 7
    IDLE = 8


@dataclass(frozen=True)
class Lease:
    holder: str = ""
    expires_at: datetime | None = None

    def held(self, now: datetime) -> bool:
        return bool(self.holder) and self.expires_at is not None and self.expires_at > now


@dataclass(frozen=True)
class Member:
    replica_id: str
    address: str = ""
    version: int = 0
    phase: ReloadPhase = ReloadPhase.UNSPECIFIED
    serving: bool = False
    generation: int = 0
    ttl_seconds: int = 15
    seen_at: datetime | None = None


@dataclass(frozen=True)
class Pool:
    model_name: str
    pool: str
    alias: str = ""
    version: int = 0  # pinned version (alias empty)
    generation: int = 0
    lease: Lease = field(default_factory=Lease)
    updated_at: datetime | None = None
    target_version: int = 0  # resolved by the service, not stored
    members: tuple[Member, ...] = ()


def check_pool_name(pool: str, field_name: str = "pool") -> str:
    if not POOL_NAME.match(pool):
        raise InvalidArgument(
            f"pool {pool!r} must be a DNS label: 1-63 characters from [a-z0-9-], not starting or ending with '-'",
            field=field_name,
        )
    return pool


def check_replica_id(replica_id: str, field_name: str = "replica_id") -> str:
    if not REPLICA_ID.match(replica_id):
        raise InvalidArgument("must be 1-253 characters from [A-Za-z0-9._:-]", field=field_name)
    return replica_id


def check_target(alias: str, version: int) -> tuple[str, int]:
    """(alias, 0) or ("", version): exactly one target."""
    if bool(alias) == bool(version):
        raise InvalidArgument("exactly one of alias or version is required", field="target")
    if alias:
        check_alias_name(alias)
    elif version < 1:
        raise InvalidArgument("must be >= 1", field="version")
    return alias, version


def check_ids(model_name: str, pool: str) -> None:
    check_model_name(model_name, "model_name")
    check_pool_name(pool)


def check_ttl(seconds: int, limit: int, field_name: str) -> int:
    if not 1 <= seconds <= limit:
        raise InvalidArgument(f"must be in [1, {limit}], got {seconds}", field=field_name)
    return seconds


_METADATA = sa.MetaData()
POOLS = sa.Table(
    "llmops_fleet_pools",
    _METADATA,
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("pool", sa.String(63), primary_key=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("lease_holder", sa.String(253), nullable=False),
    sa.Column("lease_expires_us", sa.BigInteger, nullable=False),
    sa.Column("updated_at_us", sa.BigInteger, nullable=False),
)
MEMBERS = sa.Table(
    "llmops_fleet_members",
    _METADATA,
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("pool", sa.String(63), primary_key=True),
    sa.Column("replica_id", sa.String(253), primary_key=True),
    sa.Column("address", sa.String(256), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("phase", sa.Integer, nullable=False),
    sa.Column("serving", sa.Boolean, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("ttl_seconds", sa.Integer, nullable=False),
    sa.Column("seen_at_us", sa.BigInteger, nullable=False),
)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _at(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1_000_000, UTC)


def _pool(row: sa.RowMapping) -> Pool:
    expires = int(row["lease_expires_us"])
    return Pool(
        model_name=row["model_name"],
        pool=row["pool"],
        alias=row["alias"],
        version=int(row["version"]),
        generation=int(row["generation"]),
        lease=Lease(row["lease_holder"], _at(expires) if row["lease_holder"] else None),
        updated_at=_at(int(row["updated_at_us"])),
    )


def _member(row: sa.RowMapping) -> Member:
    return Member(
        replica_id=row["replica_id"],
        address=row["address"],
        version=int(row["version"]),
        phase=ReloadPhase(int(row["phase"])),
        serving=bool(row["serving"]),
        generation=int(row["generation"]),
        ttl_seconds=int(row["ttl_seconds"]),
        seen_at=_at(int(row["seen_at_us"])),
    )


class FleetStore:
    """Pools, members and leases in SQL (SQLite or PostgreSQL); synchronous, call from a thread.

    ``clock`` is injectable so the lease rules are testable without sleeping.
    """

    def __init__(self, url: str, *, clock: type[datetime] | None = None) -> None:
        options: dict[str, object] = {}
        if url.startswith("sqlite"):
            options = {"connect_args": {"timeout": 30.0, "check_same_thread": False}}
        self.engine = sa.create_engine(url, **options)  # type: ignore[arg-type]
        self._reader = self.engine
        if url.startswith("sqlite"):
            # as the alias log does: writers take SQLite's write lock at BEGIN (a deferred transaction
            # that reads, then writes, fails at once with "database is locked" when another writer
            # went first, instead of waiting its turn); readers use their own engine and never wait
            _sqlite_wal(self.engine)
            _sqlite_immediate_transactions(self.engine)
            self._reader = sa.create_engine(url, **options)  # type: ignore[arg-type]
            _sqlite_wal(self._reader)
        self._clock = clock

    def now(self) -> datetime:
        return self._clock.now(UTC) if self._clock is not None else datetime.now(UTC)

    def create_tables(self) -> None:
        _METADATA.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
        self._reader.dispose()

    def _where(self, table: sa.Table, model_name: str, pool: str) -> sa.ColumnElement[bool]:
        return sa.and_(table.c.model_name == model_name, table.c.pool == pool)

    def _get(self, conn: sa.Connection, model_name: str, pool: str) -> Pool | None:
        row = conn.execute(sa.select(POOLS).where(self._where(POOLS, model_name, pool))).mappings().first()
        return _pool(row) if row is not None else None

    def _with_members(self, conn: sa.Connection, found: Pool) -> Pool:
        now = self.now()
        rows = conn.execute(
            sa.select(MEMBERS)
            .where(self._where(MEMBERS, found.model_name, found.pool))
            .order_by(MEMBERS.c.replica_id)
        ).mappings()
        members = []
        for row in rows:
            member = _member(row)
            assert member.seen_at is not None
            if member.seen_at + timedelta(seconds=member.ttl_seconds) > now:
                members.append(member)
        return replace(found, members=tuple(members))

    def sync(self, model_name: str, pool: str, alias: str, version: int, member: Member) -> Pool:
        """Create or retarget the pool, record ``member``'s report; the pool with its live members."""
        now = self.now()
        with self.engine.begin() as conn:
            found = self._get(conn, model_name, pool)
            if found is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            POOLS.insert().values(
                                model_name=model_name,
                                pool=pool,
                                alias=alias,
                                version=version,
                                generation=0,
                                lease_holder="",
                                lease_expires_us=0,
                                updated_at_us=_us(now),
                            )
                        )
                except sa.exc.IntegrityError:
                    pass  # another replica created it a moment ago: it declares the same target
            elif (found.alias, found.version) != (alias, version):
                conn.execute(
                    POOLS.update()
                    .where(self._where(POOLS, model_name, pool))
                    .values(alias=alias, version=version, updated_at_us=_us(now))
                )
            values = {
                "address": member.address,
                "version": member.version,
                "phase": int(member.phase),
                "serving": member.serving,
                "generation": member.generation,
                "ttl_seconds": member.ttl_seconds,
                "seen_at_us": _us(now),
            }
            key = sa.and_(self._where(MEMBERS, model_name, pool), MEMBERS.c.replica_id == member.replica_id)
            if conn.execute(MEMBERS.update().where(key).values(**values)).rowcount == 0:
                conn.execute(
                    MEMBERS.insert().values(
                        model_name=model_name, pool=pool, replica_id=member.replica_id, **values
                    )
                )
            # members gone for ten times their ttl are forgotten
            conn.execute(
                MEMBERS.delete().where(
                    self._where(MEMBERS, model_name, pool),
                    MEMBERS.c.seen_at_us + MEMBERS.c.ttl_seconds * 10_000_000 < _us(now),
                )
            )
            stored = self._get(conn, model_name, pool)
            assert stored is not None
            return self._with_members(conn, stored)

    def get(self, model_name: str, pool: str) -> Pool:
        with self._reader.connect() as conn:
            found = self._get(conn, model_name, pool)
            if found is None:
                raise NotFound(f"model {model_name!r} has no pool {pool!r}")
            return self._with_members(conn, found)

    def list(self, model_name: str = "") -> list[Pool]:
        query = sa.select(POOLS).order_by(POOLS.c.model_name, POOLS.c.pool)
        if model_name:
            query = query.where(POOLS.c.model_name == model_name)
        with self._reader.connect() as conn:
            return [self._with_members(conn, _pool(row)) for row in conn.execute(query).mappings()]

    def bump(self, model_name: str, pool: str) -> Pool:
        """Generation + 1 (``llmops fleet reload``)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                POOLS.update()
                .where(self._where(POOLS, model_name, pool))
                .values(generation=POOLS.c.generation + 1, updated_at_us=_us(self.now()))
            )
            if done.rowcount == 0:
                raise NotFound(f"model {model_name!r} has no pool {pool!r}")
            found = self._get(conn, model_name, pool)
            assert found is not None
            return self._with_members(conn, found)

    def acquire(self, model_name: str, pool: str, holder: str, ttl_seconds: int) -> tuple[bool, Lease]:
        """Compare-and-set: the lease becomes ``holder``'s if free, lapsed or already its own."""
        now = self.now()
        with self.engine.begin() as conn:
            done = conn.execute(
                POOLS.update()
                .where(
                    self._where(POOLS, model_name, pool),
                    sa.or_(
                        POOLS.c.lease_holder == "",
                        POOLS.c.lease_holder == holder,
                        POOLS.c.lease_expires_us <= _us(now),
                    ),
                )
                .values(lease_holder=holder, lease_expires_us=_us(now + timedelta(seconds=ttl_seconds)))
            )
            found = self._get(conn, model_name, pool)
            if found is None:
                raise NotFound(f"model {model_name!r} has no pool {pool!r}")
            return done.rowcount == 1, found.lease

    def release(self, model_name: str, pool: str, holder: str) -> None:
        """Free the lease; ``FailedPrecondition`` unless ``holder`` holds it (a lapsed one included)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                POOLS.update()
                .where(self._where(POOLS, model_name, pool), POOLS.c.lease_holder == holder)
                .values(lease_holder="", lease_expires_us=0)
            )
            if done.rowcount == 0:
                found = self._get(conn, model_name, pool)
                if found is None:
                    raise NotFound(f"model {model_name!r} has no pool {pool!r}")
                raise FailedPrecondition(
                    f"the reload lease of pool {pool!r} is held by {found.lease.holder or 'nobody'}, not {holder!r}"
                )

"""``llmops.registry.v1.FleetService``: pool records, reload generations and leases (see :mod:`.fleet`).

:class:`FleetService` validates and resolves each pool's target against the registry store (the alias's
version now); :class:`FleetServicer` is the thin gRPC adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from llmops.common.errors import InvalidArgument
from llmops.common.identity import Context
from llmops.common.server import ServiceBinding
from llmops.proto.registry.v1 import fleet_service_pb2 as pb
from llmops.proto.registry.v1 import fleet_service_pb2_grpc as pb_grpc
from llmops.registry.convert import timestamp
from llmops.registry.domain import Page, check_model_name
from llmops.registry.fleet import (
    MAX_LEASE_SECONDS,
    MAX_MEMBER_TTL_SECONDS,
    FleetStore,
    Lease,
    Member,
    Pool,
    ReloadPhase,
    check_ids,
    check_replica_id,
    check_target,
    check_ttl,
)
from llmops.registry.requests import decode_token, encode_token, page_size_or_default
from llmops.registry.stores.base import RegistryStore

FLEET_SERVICE_NAME = "llmops.registry.v1.FleetService"
T = TypeVar("T")


class FleetService:
    """Pool logic over a :class:`FleetStore`, with targets resolved by the registry store."""

    def __init__(self, registry: RegistryStore, store: FleetStore) -> None:
        self.registry = registry
        self.store = store
        self.opened = False

    async def open(self) -> None:
        """Create the tables (idempotent); the service is ready from then on."""
        await asyncio.to_thread(self.store.create_tables)
        self.opened = True

    async def ready(self) -> bool:
        """Readiness without a round trip: replicas sync every few seconds, so a probe must stay cheap."""
        return self.opened

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def _resolved(self, pool: Pool, aliases: dict[str, int] | None = None) -> Pool:
        if aliases is None:  # NotFound when the model went away
            aliases = dict((await self.registry.get_model(pool.model_name)).aliases)
        target = aliases.get(pool.alias, 0) if pool.alias else pool.version
        return replace(pool, target_version=int(target))

    async def sync(self, model_name: str, pool: str, alias: str, version: int, member: Member) -> Pool:
        check_ids(model_name, pool)
        alias, version = check_target(alias, version)
        check_replica_id(member.replica_id, "member.replica_id")
        check_ttl(member.ttl_seconds, MAX_MEMBER_TTL_SECONDS, "member.ttl_seconds")
        if member.version < 0 or member.generation < 0:
            raise InvalidArgument("version and generation must be >= 0", field="member")
        model = await self.registry.get_model(model_name)  # NOT_FOUND before a pool of nothing is recorded
        if version:
            await self.registry.get_version(model_name, version)
        synced: Pool = await self._run(self.store.sync, model_name, pool, alias, version, member)
        return await self._resolved(synced, dict(model.aliases))

    async def get(self, model_name: str, pool: str) -> Pool:
        check_ids(model_name, pool)
        return await self._resolved(await self._run(self.store.get, model_name, pool))

    async def list(self, model_name: str, page_size: int = 0, page_token: str = "") -> Page[Pool]:
        """One page of pools (by model, then pool name), each with its target resolved now."""
        if model_name:
            check_model_name(model_name, "model_name")
        limit = page_size_or_default(page_size)
        offset = int(decode_token(page_token, int) or 0)
        if offset < 0:
            raise InvalidArgument("not a token this service issued", field="page_token")
        pools: list[Pool] = await self._run(self.store.list, model_name)
        page = pools[offset : offset + limit]
        more = offset + limit < len(pools)
        aliases: dict[str, dict[str, int]] = {}  # one registry read per model, not one per pool
        for name in {p.model_name for p in page}:
            aliases[name] = dict((await self.registry.get_model(name)).aliases)
        resolved = tuple([await self._resolved(p, aliases[p.model_name]) for p in page])
        return Page(resolved, encode_token(offset + limit) if more else "")

    async def reload(self, model_name: str, pool: str) -> Pool:
        check_ids(model_name, pool)
        return await self._resolved(await self._run(self.store.bump, model_name, pool))

    async def acquire(self, model_name: str, pool: str, holder: str, ttl_seconds: int) -> tuple[bool, Lease]:
        check_ids(model_name, pool)
        check_replica_id(holder, "holder")
        check_ttl(ttl_seconds, MAX_LEASE_SECONDS, "ttl_seconds")
        return await self._run(self.store.acquire, model_name, pool, holder, ttl_seconds)

    async def release(self, model_name: str, pool: str, holder: str) -> None:
        check_ids(model_name, pool)
        check_replica_id(holder, "holder")
        await self._run(self.store.release, model_name, pool, holder)


def lease_to_proto(lease: Lease) -> pb.ReloadLease:
    out = pb.ReloadLease(holder=lease.holder)
    if lease.expires_at is not None:
        out.expires_at.CopyFrom(timestamp(lease.expires_at))
    return out


def pool_to_proto(pool: Pool) -> pb.Pool:
    out = pb.Pool(
        model_name=pool.model_name,
        pool=pool.pool,
        target_version=pool.target_version,
        generation=pool.generation,
        lease=lease_to_proto(pool.lease),
    )
    if pool.alias:
        out.alias = pool.alias
    else:
        out.version = pool.version
    if pool.updated_at is not None:
        out.updated_at.CopyFrom(timestamp(pool.updated_at))
    for m in pool.members:
        member = out.members.add(
            replica_id=m.replica_id,
            address=m.address,
            version=m.version,
            phase=int(m.phase),  # type: ignore[arg-type]
            serving=m.serving,
            generation=m.generation,
            ttl_seconds=m.ttl_seconds,
        )
        if m.seen_at is not None:
            member.seen_at.CopyFrom(timestamp(m.seen_at))
    return out


def member_from_proto(m: pb.PoolMember) -> Member:
    try:
        phase = ReloadPhase(m.phase)
    except ValueError:
        raise InvalidArgument(f"unknown phase {m.phase}", field="member.phase") from None
    return Member(
        replica_id=m.replica_id,
        address=m.address,
        version=m.version,
        phase=phase,
        serving=m.serving,
        generation=m.generation,
        ttl_seconds=m.ttl_seconds,
    )


class FleetServicer(pb_grpc.FleetServiceServicer):
    """Adapts :class:`FleetService` to the generated servicer interface."""

    def __init__(self, service: FleetService) -> None:
        self.service = service

    async def SyncPool(self, request: pb.SyncPoolRequest, context: Context) -> pb.SyncPoolResponse:
        pool = await self.service.sync(
            request.model_name,
            request.pool,
            request.alias if request.HasField("alias") else "",
            request.version if request.HasField("version") else 0,
            member_from_proto(request.member),
        )
        return pb.SyncPoolResponse(pool=pool_to_proto(pool))

    async def GetPool(self, request: pb.GetPoolRequest, context: Context) -> pb.GetPoolResponse:
        return pb.GetPoolResponse(
            pool=pool_to_proto(await self.service.get(request.model_name, request.pool))
        )

    async def ListPools(self, request: pb.ListPoolsRequest, context: Context) -> pb.ListPoolsResponse:
        page = await self.service.list(request.model_name, request.page_size, request.page_token)
        return pb.ListPoolsResponse(
            pools=[pool_to_proto(p) for p in page.items], next_page_token=page.next_token
        )

    async def ReloadPool(self, request: pb.ReloadPoolRequest, context: Context) -> pb.ReloadPoolResponse:
        pool = await self.service.reload(request.model_name, request.pool)
        return pb.ReloadPoolResponse(pool=pool_to_proto(pool))

    async def AcquireReloadLease(
        self, request: pb.AcquireReloadLeaseRequest, context: Context
    ) -> pb.AcquireReloadLeaseResponse:
        granted, lease = await self.service.acquire(
            request.model_name, request.pool, request.holder, request.ttl_seconds
        )
        return pb.AcquireReloadLeaseResponse(granted=granted, lease=lease_to_proto(lease))

    async def ReleaseReloadLease(
        self, request: pb.ReleaseReloadLeaseRequest, context: Context
    ) -> pb.ReleaseReloadLeaseResponse:
        await self.service.release(request.model_name, request.pool, request.holder)
        return pb.ReleaseReloadLeaseResponse()


def fleet_bindings(fleet: FleetService | None) -> list[ServiceBinding]:
    """The FleetService binding of the registry server (none without a fleet store)."""
    if fleet is None:
        return []
    return [
        ServiceBinding(
            FLEET_SERVICE_NAME,
            FleetServicer(fleet),
            pb_grpc.add_FleetServiceServicer_to_server,
            readiness=fleet.ready,
        )
    ]


__all__ = ["FLEET_SERVICE_NAME", "FleetService", "FleetServicer", "fleet_bindings", "pool_to_proto"]

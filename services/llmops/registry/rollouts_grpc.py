"""Thin gRPC servicer of ``llmops.registry.v1.RolloutService``: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from llmops.common.errors import InvalidArgument
from llmops.common.identity import Context, caller_identity
from llmops.common.rollout_client import (
    ROLLOUT_SERVICE_NAME,
    decision_from_proto,
    evidence_from_proto,
    rollout_to_proto,
    spec_from_proto,
)
from llmops.common.server import ServiceBinding
from llmops.proto.registry.v1 import rollout_service_pb2 as pb
from llmops.proto.registry.v1 import rollout_service_pb2_grpc as pb_grpc
from llmops.registry.rollouts import RolloutService
from llmops.registry.rollouts_store import RolloutStore
from llmops.registry.stores.base import RegistryStore

__all__ = ["ROLLOUT_SERVICE_NAME", "RolloutServicer", "rollout_bindings", "rollout_service"]


def rollout_service(store: RegistryStore, alias_db_url: str | None) -> RolloutService | None:
    """Rollouts kept in the alias log's database (``alias_db_url``); None without one (no rollouts)."""
    return RolloutService(store, RolloutStore(alias_db_url)) if alias_db_url else None


def rollout_bindings(
    service: RolloutService | None, readiness: Callable[[], Awaitable[bool]]
) -> list[ServiceBinding]:
    """The RolloutService binding for the registry server (none when ``service`` is None)."""
    if service is None:
        return []
    return [
        ServiceBinding(
            ROLLOUT_SERVICE_NAME,
            RolloutServicer(service),
            pb_grpc.add_RolloutServiceServicer_to_server,
            readiness,
        )
    ]


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    """Adapts :class:`RolloutService` to the generated servicer interface."""

    def __init__(self, service: RolloutService) -> None:
        self.service = service

    async def StartRollout(
        self, request: pb.StartRolloutRequest, context: Context
    ) -> pb.StartRolloutResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("a spec is required", field="spec")
        rollout = await self.service.start(spec_from_proto(request.spec), caller_identity(context))
        return pb.StartRolloutResponse(rollout=rollout_to_proto(rollout))

    async def GetRollout(self, request: pb.GetRolloutRequest, context: Context) -> pb.GetRolloutResponse:
        rollout = await self.service.get(request.id, request.model_name)
        return pb.GetRolloutResponse(rollout=rollout_to_proto(rollout))

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Context
    ) -> pb.ListRolloutsResponse:
        page = await self.service.list(
            request.model_name, request.active_only, request.page_size, request.page_token
        )
        return pb.ListRolloutsResponse(
            rollouts=[rollout_to_proto(r) for r in page.items], next_page_token=page.next_token
        )

    async def PauseRollout(
        self, request: pb.PauseRolloutRequest, context: Context
    ) -> pb.PauseRolloutResponse:
        rollout = await self.service.pause(request.id, request.reason, caller_identity(context))
        return pb.PauseRolloutResponse(rollout=rollout_to_proto(rollout))

    async def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context: Context
    ) -> pb.ResumeRolloutResponse:
        rollout = await self.service.resume(request.id, request.reason, caller_identity(context))
        return pb.ResumeRolloutResponse(rollout=rollout_to_proto(rollout))

    async def AbortRollout(
        self, request: pb.AbortRolloutRequest, context: Context
    ) -> pb.AbortRolloutResponse:
        rollout = await self.service.abort(request.id, request.reason, caller_identity(context))
        return pb.AbortRolloutResponse(rollout=rollout_to_proto(rollout))

    async def AdvanceRollout(
        self, request: pb.AdvanceRolloutRequest, context: Context
    ) -> pb.AdvanceRolloutResponse:
        rollout = await self.service.advance(
            request.id,
            request.expected_revision,
            decision_from_proto(request.decision),
            request.reason,
            evidence_from_proto(request.evidence) if request.HasField("evidence") else None,
            caller_identity(context),
        )
        return pb.AdvanceRolloutResponse(rollout=rollout_to_proto(rollout))

"""Thin servicers: ``llmops.serving.v1.ServingService`` forwarded through :class:`Router`, and the
admin ``llmops.router.v1.RouterService``.

Model management RPCs (LoadModel, UnloadModel, LoadAdapter, UnloadAdapter) act on the server that
receives them, so the router refuses them (UNIMPLEMENTED): address a replica (ListEndpoints lists
them). WatchLoad is a replica's own signal and is refused too.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2

from llmops.common.errors import InvalidArgument, Unimplemented
from llmops.proto.common.v1 import model_pb2
from llmops.proto.router.v1 import router_service_pb2 as rpb
from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc
from llmops.router.endpoints import EndpointState
from llmops.router.policy import Policy
from llmops.router.service import Router

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any

SERVING_SERVICE_NAME = "llmops.serving.v1.ServingService"
ROUTER_SERVICE_NAME = "llmops.router.v1.RouterService"

POLICIES = {
    Policy.ROUND_ROBIN: rpb.POLICY_ROUND_ROBIN,
    Policy.LEAST_LOADED: rpb.POLICY_LEAST_LOADED,
    Policy.PREFIX_AFFINITY: rpb.POLICY_PREFIX_AFFINITY,
    Policy.SESSION_AFFINITY: rpb.POLICY_SESSION_AFFINITY,
}
STATES = {
    EndpointState.CONNECTING: rpb.ENDPOINT_STATE_CONNECTING,
    EndpointState.READY: rpb.ENDPOINT_STATE_READY,
    EndpointState.NOT_READY: rpb.ENDPOINT_STATE_NOT_READY,
    EndpointState.DOWN: rpb.ENDPOINT_STATE_DOWN,
}


def _timeout(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, float(remaining))


def _metadata(context: Context) -> tuple[tuple[str, Any], ...]:
    return tuple(context.invocation_metadata() or ())


def _refuse(what: str) -> Unimplemented:
    return Unimplemented(f"the router does not {what}: call a replica directly (RouterService.ListEndpoints)")


class ServingProxy(pb_grpc.ServingServiceServicer):
    """ServingService on the router: each call goes to the replica the policy picks."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        route = self.router.route(request, _metadata(context), _timeout(context))
        response: pb.GenerateResponse = await self.router.unary("Generate", request, route)
        return response

    async def GenerateStream(  # type: ignore[override]
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        route = self.router.route(request, _metadata(context), _timeout(context))
        async for message in self.router.stream(request, route):
            yield message

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        route = self.router.route(request, _metadata(context), _timeout(context))
        response: pb.TokenizeResponse = await self.router.unary("Tokenize", request, route)
        return response

    async def Detokenize(self, request: pb.DetokenizeRequest, context: Context) -> pb.DetokenizeResponse:
        route = self.router.route(request, _metadata(context), _timeout(context))
        response: pb.DetokenizeResponse = await self.router.unary("Detokenize", request, route)
        return response

    async def Embed(self, request: Any, context: Context) -> Any:
        route = self.router.route(request, _metadata(context), _timeout(context))
        return await self.router.unary("Embed", request, route)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return await self.router.list_models(_metadata(context))

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.LoadModelResponse:
        raise _refuse("load models")

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> pb.UnloadModelResponse:
        raise _refuse("unload models")

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Context) -> pb.LoadAdapterResponse:
        raise _refuse("load adapters")

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: Context
    ) -> pb.UnloadAdapterResponse:
        raise _refuse("unload adapters")

    async def WatchLoad(  # type: ignore[override]
        self, request: pb.WatchLoadRequest, context: Context
    ) -> AsyncIterator[pb.WatchLoadResponse]:
        raise _refuse("report a replica's load")
        yield  # pragma: no cover - makes this a generator


def _resolved(model: Any) -> model_pb2.ResolvedModel | None:
    return (
        None
        if model is None
        else model_pb2.ResolvedModel(name=model.name, version=model.version, alias=model.alias)
    )


class RouterAdmin(rpb_grpc.RouterServiceServicer):
    """RouterService: what the router knows and decides."""

    def __init__(self, router: Router, discovery: str) -> None:
        self.router = router
        self.discovery = discovery

    async def ListEndpoints(
        self, request: rpb.ListEndpointsRequest, context: Context
    ) -> rpb.ListEndpointsResponse:
        response = rpb.ListEndpointsResponse()
        for address in sorted(self.router.pool.endpoints):
            e = self.router.pool.endpoints[address]
            item = response.endpoints.add(
                address=e.address,
                state=STATES[e.state],
                source=e.source,
                in_flight=e.in_flight,
                requests=e.requests,
                failures=e.failures,
                http_port=e.http_port,
                pool=e.pool,
                reload_phase=e.reload_phase,
            )
            if e.last_report_at is not None:
                item.last_report.FromDatetime(e.last_report_at)
            for slot in e.models.values():
                item.models.add(
                    served_name=slot.served_name,
                    model=_resolved(slot.model),
                    ready=slot.ready,
                    waiting=slot.waiting,
                    running=slot.running,
                    capacity=slot.capacity,
                    kv_cache_usage=slot.kv_cache_usage,
                )
        return response

    async def GetStats(self, request: rpb.GetStatsRequest, context: Context) -> rpb.GetStatsResponse:
        s = self.router.stats
        since = timestamp_pb2.Timestamp()
        since.FromNanoseconds(int(s.since * 1e9))
        return rpb.GetStatsResponse(
            decisions=[rpb.PolicyDecisions(policy=POLICIES[p], decisions=n) for p, n in s.decisions.items()],
            prefix_hits=s.outcomes["prefix_hit"],
            prefix_misses=s.outcomes["prefix_miss"],
            saturation_spills=s.outcomes["spill"],
            retries=s.retries,
            held=s.held,
            pending=s.pending,
            cache_hits=s.cache_hits,
            decision_p50_seconds=s.decision_quantile(0.5),
            decision_p99_seconds=s.decision_quantile(0.99),
            versions=[
                rpb.VersionTraffic(model=_resolved(model), requests=n)
                for model, n in sorted(
                    s.versions.items(), key=lambda kv: (kv[0].name, kv[0].version, kv[0].alias)
                )
            ],
            since=since,
        )

    async def GetVersionStats(
        self, request: rpb.GetVersionStatsRequest, context: Context
    ) -> rpb.GetVersionStatsResponse:
        if not math.isfinite(request.window_seconds) or request.window_seconds < 0:
            raise InvalidArgument("must be a number of seconds >= 0", field="window_seconds")
        stats, span = self.router.slis.window(request.model_name, request.window_seconds)
        return rpb.GetVersionStatsResponse(
            versions=[
                rpb.VersionStats(
                    model=model_pb2.ResolvedModel(name=v.model_name, version=v.version),
                    requests=v.requests,
                    errors=v.errors,
                    error_ratio=v.error_ratio,
                    ttft_samples=v.ttft_samples,
                    ttft_p50_seconds=v.ttft_p50_seconds,
                    ttft_p95_seconds=v.ttft_p95_seconds,
                    inter_token_samples=v.inter_token_samples,
                    inter_token_p50_seconds=v.inter_token_p50_seconds,
                    inter_token_p95_seconds=v.inter_token_p95_seconds,
                )
                for v in stats
            ],
            window_seconds=span,
        )

    async def GetPolicy(self, request: rpb.GetPolicyRequest, context: Context) -> rpb.GetPolicyResponse:
        s = self.router.settings
        return rpb.GetPolicyResponse(
            policy=POLICIES[self.router.policy],
            policy_header=s.policy_header,
            session_header=s.session_header,
            prefix_block_chars=s.prefix_block_chars,
            prefix_max_blocks=s.prefix_max_blocks,
            saturation_waiting=s.saturation_waiting,
            discovery=self.discovery,
        )

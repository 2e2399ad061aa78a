"""Thin gRPC servicer of ``llmops.cache.v1.CacheService``: proto in, :class:`ResponseCache` call, proto out.

Backend failures never fail Lookup, Store or Stats (outcome ERROR in an OK response; Stats keeps
the last sizes counted); Invalidate answers UNAVAILABLE when the backend is down; bad input is
INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmops.cache import convert
from llmops.common.errors import InvalidArgument
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.codec import is_complete
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.cache.v1 import cache_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any

SERVICE_NAME = "llmops.cache.v1.CacheService"


class CacheServicer(pb_grpc.CacheServiceServicer):
    """Adapts :class:`ResponseCache` to the generated servicer interface."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def Lookup(self, request: pb.LookupRequest, context: Context) -> pb.LookupResponse:
        key = convert.key_from_proto(request.key, request.HasField("key"))
        result = await self.cache.lookup(key)
        response = pb.LookupResponse(outcome=convert.LOOKUP_OUTCOMES[result.outcome], digest=result.digest)
        if result.entry is not None:
            response.output.ParseFromString(result.entry.payload)
            response.stored_at.CopyFrom(convert.timestamp(result.entry.stored_at))
            if result.entry.expires_at is not None:
                response.expires_at.CopyFrom(convert.timestamp(result.entry.expires_at))
        return response

    async def Store(self, request: pb.StoreRequest, context: Context) -> pb.StoreResponse:
        key = convert.key_from_proto(request.key, request.HasField("key"))
        if not request.HasField("output"):
            raise InvalidArgument("the output to store is required", field="output")
        ttl: float | None = None
        if request.HasField("ttl"):
            if request.ttl.seconds < 0 or request.ttl.nanos < 0:
                raise InvalidArgument("must not be negative", field="ttl")
            ttl = request.ttl.ToNanoseconds() / 1e9
        result = await self.cache.store(
            key, request.output.SerializeToString(), ttl=ttl, complete=is_complete(request.output)
        )
        response = pb.StoreResponse(outcome=convert.STORE_OUTCOMES[result.outcome], digest=result.digest)
        if result.expires_at is not None:
            response.expires_at.CopyFrom(convert.timestamp(result.expires_at))
        return response

    async def Invalidate(self, request: pb.InvalidateRequest, context: Context) -> pb.InvalidateResponse:
        removed = await self.cache.invalidate(convert.scope_from_proto(request))
        return pb.InvalidateResponse(removed=removed)

    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        return convert.stats_to_proto(await self.cache.stats())

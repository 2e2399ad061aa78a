"""The gRPC servicer of ``llmops.serving.v1.ServingService``: proto in, domain call, proto out.

Errors are domain exceptions raised by the service; the shared interceptor maps them to status codes.
A cancelled stream (client gone, deadline passed) closes the service's event stream, which aborts the
engine request and frees its slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc
from llmops.serving import convert
from llmops.serving.domain import StreamEnd, TokenizeRequest
from llmops.serving.load import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_MIN_INTERVAL_SECONDS, watch_load
from llmops.serving.service import ServingService

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any

SERVICE_NAME = "llmops.serving.v1.ServingService"


def _remaining(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, float(remaining))


class ServingServicer(serving_service_pb2_grpc.ServingServiceServicer):
    """Adapts :class:`ServingService` to gRPC."""

    def __init__(
        self,
        service: ServingService,
        http_port: Callable[[], int | None] = lambda: None,
        pool_info: Callable[[], tuple[str, str]] | None = None,
    ) -> None:
        self._service = service
        self._http_port = http_port
        self._pool_info = pool_info or (lambda: ("", ""))

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        result = await self._service.generate(convert.generation_request(request, _remaining(context)))
        return convert.generate_response(result)

    async def GenerateStream(  # type: ignore[override]
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        request_id, events = await self._service.generate_stream(
            convert.generation_request(request, _remaining(context))
        )
        try:
            async for event in events:
                if isinstance(event, StreamEnd):
                    yield convert.stream_end(request_id, event)
                else:
                    yield convert.stream_delta(request_id, event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        which = request.WhichOneof("input")
        messages, add = convert.chat(request.chat) if which == "chat" else (None, True)
        result = await self._service.tokenize(
            TokenizeRequest(
                model=convert.selector(request.model),
                text=request.text if which == "text" else None,
                messages=messages,
                add_generation_prompt=add,
                add_special_tokens=request.add_special_tokens
                if request.HasField("add_special_tokens")
                else True,
                return_token_strings=request.return_token_strings,
            )
        )
        return pb.TokenizeResponse(
            token_ids=result.token_ids, token_strings=result.token_strings, max_model_len=result.max_model_len
        )

    async def Detokenize(self, request: pb.DetokenizeRequest, context: Context) -> pb.DetokenizeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await self._service.detokenize(convert.selector(request.model), tuple(request.token_ids), skip)
        return pb.DetokenizeResponse(text=text)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.loaded_model(m) for m in self._service.list_models()])

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.LoadModelResponse:
        info = await self._service.load_model(convert.load_request(request))
        return pb.LoadModelResponse(model=convert.loaded_model(info))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> pb.UnloadModelResponse:
        drain = convert.drain_timeout(request)
        result = await self._service.unload_model(convert.selector(request.model), drain)
        return pb.UnloadModelResponse(
            served_name=result.served_name, aborted_requests=result.aborted_requests
        )

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Context) -> pb.LoadAdapterResponse:
        adapter = await self._service.load_adapter(
            convert.selector(request.base),
            convert.adapter_source(request),
            request.adapter_name,
            request.replace,
        )
        return pb.LoadAdapterResponse(adapter=convert.loaded_adapter(adapter))

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: Context
    ) -> pb.UnloadAdapterResponse:
        info = await self._service.unload_adapter(convert.selector(request.base), request.adapter_name)
        return pb.UnloadAdapterResponse(model=convert.loaded_model(info))

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        return convert.embed_response(await self._service.embed(convert.embed_request(request)))

    async def WatchLoad(  # type: ignore[override]
        self, request: pb.WatchLoadRequest, context: Context
    ) -> AsyncIterator[pb.WatchLoadResponse]:
        min_interval = min(request.min_interval_ms, 10_000) / 1000 or DEFAULT_MIN_INTERVAL_SECONDS
        heartbeat = max(min(request.heartbeat_ms, 60_000) / 1000 or DEFAULT_HEARTBEAT_SECONDS, min_interval)
        sequence = 0
        async for loads in watch_load(self._service.loads, min_interval, heartbeat):
            sequence += 1
            pool, phase = self._pool_info()
            yield pb.WatchLoadResponse(
                models=[convert.model_load(load) for load in loads],
                http_port=self._http_port() or 0,
                sequence=sequence,
                pool=pool,
                reload_phase=phase,
            )

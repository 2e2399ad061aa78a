"""Thin gRPC servicer of ``llmops.registry.v1.RegistryService``: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from llmops.common.convert import model_ref_from_proto
from llmops.common.errors import InvalidArgument
from llmops.common.identity import Context, caller_identity
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.proto.registry.v1 import registry_service_pb2_grpc as pb_grpc
from llmops.registry import convert
from llmops.registry.domain import DownloadRequest, UploadPart
from llmops.registry.locations import Access, LocationConfig, LocationService
from llmops.registry.service import RegistryService
from llmops.registry.weights_service import WeightsService

SERVICE_NAME = "llmops.registry.v1.RegistryService"


async def _upload_parts(requests: AsyncIterator[pb.RegisterVersionRequest]) -> AsyncIterator[UploadPart]:
    async for request in requests:
        part = request.WhichOneof("part")
        if part == "chunk":
            yield convert.chunk_from_proto(request.chunk)
        elif part == "summary":
            yield convert.summary_from_proto(request.summary)
        else:
            raise InvalidArgument("metadata must be sent exactly once, first", field="metadata")


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """Adapts :class:`RegistryService` to the generated servicer interface."""

    def __init__(self, service: RegistryService, locations: LocationService | None = None) -> None:
        self.service = service
        self.weights = WeightsService(service.store)
        self.locations = locations or LocationService(service, LocationConfig())

    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.CreateModelResponse:
        model = await self.service.create_model(
            request.name, request.description, dict(request.tags), caller_identity(context)
        )
        return pb.CreateModelResponse(model=convert.model_to_proto(model))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model_to_proto(await self.service.get_model(request.name)))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        page = await self.service.list_models(
            page_size=request.page_size,
            page_token=request.page_token,
            name_prefix=request.name_prefix,
            tags=dict(request.tags),
        )
        return pb.ListModelsResponse(
            models=[convert.model_to_proto(m) for m in page.items], next_page_token=page.next_token
        )

    async def RegisterVersion(
        self, request_iterator: AsyncIterator[pb.RegisterVersionRequest], context: Context
    ) -> pb.RegisterVersionResponse:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument(
                "empty stream: the first message must carry metadata", field="metadata"
            ) from None
        if first.WhichOneof("part") != "metadata":
            raise InvalidArgument("the first message must carry metadata", field="metadata")
        version = await self.service.register_version(
            convert.spec_from_proto(first.metadata), _upload_parts(requests), caller_identity(context)
        )
        return pb.RegisterVersionResponse(version=convert.version_to_proto(version))

    async def GetVersion(self, request: pb.GetVersionRequest, context: Context) -> pb.GetVersionResponse:
        version = await self.service.get_version(model_ref_from_proto(request.model))
        return pb.GetVersionResponse(version=convert.version_to_proto(version))

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Context
    ) -> pb.ListVersionsResponse:
        page = await self.service.list_versions(
            request.model_name,
            page_size=request.page_size,
            page_token=request.page_token,
            statuses=convert.statuses_from_proto(list(request.statuses)),
        )
        return pb.ListVersionsResponse(
            versions=[convert.version_to_proto(v) for v in page.items], next_page_token=page.next_token
        )

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.SetAliasResponse:
        move = await self.service.set_alias(
            request.model_name,
            request.alias,
            request.version,
            expected=request.expected_current_version
            if request.HasField("expected_current_version")
            else None,
            reason=request.reason,
            caller=caller_identity(context),
        )
        return pb.SetAliasResponse(entry=convert.move_to_proto(move))

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: Context) -> pb.DeleteAliasResponse:
        move = await self.service.delete_alias(
            request.model_name,
            request.alias,
            expected=request.expected_current_version
            if request.HasField("expected_current_version")
            else None,
            reason=request.reason,
            caller=caller_identity(context),
        )
        return pb.DeleteAliasResponse(entry=convert.move_to_proto(move))

    async def ResolveAlias(
        self, request: pb.ResolveAliasRequest, context: Context
    ) -> pb.ResolveAliasResponse:
        resolved = await self.service.resolve_alias(request.model_name, request.alias)
        return pb.ResolveAliasResponse(
            model=model_pb2.ResolvedModel(
                name=resolved.model_name, version=resolved.version, alias=resolved.alias
            ),
            moved_at=convert.timestamp(resolved.moved_at),
        )

    async def ListAliasHistory(
        self, request: pb.ListAliasHistoryRequest, context: Context
    ) -> pb.ListAliasHistoryResponse:
        page = await self.service.alias_history(
            request.model_name, request.alias, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListAliasHistoryResponse(
            entries=[convert.move_to_proto(m) for m in page.items], next_page_token=page.next_token
        )

    async def SetAliasWeights(
        self, request: pb.SetAliasWeightsRequest, context: Context
    ) -> pb.SetAliasWeightsResponse:
        entry = await self.weights.set_weights(
            request.model_name,
            dict(request.weights),
            expected=request.expected_revision if request.HasField("expected_revision") else None,
            reason=request.reason,
            caller=caller_identity(context),
        )
        return pb.SetAliasWeightsResponse(weights=convert.weights_to_proto(entry))

    async def GetAliasWeights(
        self, request: pb.GetAliasWeightsRequest, context: Context
    ) -> pb.GetAliasWeightsResponse:
        entry, aliases = await self.weights.get_weights(request.model_name)
        return pb.GetAliasWeightsResponse(weights=convert.weights_to_proto(entry), alias_versions=aliases)

    async def ListAliasWeightsHistory(
        self, request: pb.ListAliasWeightsHistoryRequest, context: Context
    ) -> pb.ListAliasWeightsHistoryResponse:
        page = await self.weights.history(
            request.model_name, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListAliasWeightsHistoryResponse(
            entries=[convert.weights_to_proto(e) for e in page.items], next_page_token=page.next_token
        )

    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: Context
    ) -> AsyncIterator[pb.DownloadArtifactResponse]:
        domain_request = DownloadRequest(
            ref=model_ref_from_proto(request.model),
            paths=tuple(request.paths),
            chunk_size_bytes=request.chunk_size_bytes,
            resume_path=request.resume_path,
            resume_offset=request.resume_offset,
        )
        async for chunk in self.service.download(domain_request):
            yield pb.DownloadArtifactResponse(
                path=chunk.path,
                offset=chunk.offset,
                data=chunk.data,
                file_size=chunk.file_size,
                total_bytes=chunk.total_bytes,
                bytes_sent=chunk.bytes_sent,
                sha256=chunk.sha256,
                file_index=chunk.file_index,
                file_count=chunk.file_count,
            )

    async def GetArtifactLocations(
        self, request: pb.GetArtifactLocationsRequest, context: Context
    ) -> pb.GetArtifactLocationsResponse:
        found = await self.locations.locations(model_ref_from_proto(request.model), request.url_ttl_seconds)
        response = pb.GetArtifactLocationsResponse(
            version=convert.version_to_proto(found.version), shared_root=found.shared_root
        )
        shared = found.access is Access.SHARED_PATH
        response.access = pb.ARTIFACT_ACCESS_SHARED_PATH if shared else pb.ARTIFACT_ACCESS_PRESIGNED_URL
        for item in found.files:
            location = response.files.add(file=convert.manifest_to_proto((item.file,))[0])
            if shared:
                location.shared_path = item.where
            else:
                location.url = item.where
        if found.expires_at is not None:
            response.expires_at.CopyFrom(convert.timestamp(found.expires_at))
        return response

    async def GetLineage(self, request: pb.GetLineageRequest, context: Context) -> pb.GetLineageResponse:
        chain = await self.service.lineage(model_ref_from_proto(request.model), request.max_depth)
        return pb.GetLineageResponse(
            versions=[convert.version_to_proto(v) for v in chain.versions], truncated=chain.truncated
        )


__all__ = ["SERVICE_NAME", "RegistryServicer", "caller_identity"]

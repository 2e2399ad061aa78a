"""Thin gRPC servicer of ``llmops.training.v1.TrainingService``: proto in, domain call, proto out.

Blocking service calls (submission reads the dataset and may download the base model; the job book
takes a lock; watching waits on a condition) run in worker threads so the event loop stays free.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llmops.common.errors import InvalidArgument
from llmops.common.identity import Context, caller_identity
from llmops.proto.training.v1 import training_service_pb2 as pb
from llmops.proto.training.v1 import training_service_pb2_grpc as pb_grpc
from llmops.training import convert
from llmops.training.service import TrainingService

SERVICE_NAME = "llmops.training.v1.TrainingService"
#: How long one WatchJob wait lasts before the stream checks whether the client went away.
_WATCH_POLL_SECONDS = 1.0


class TrainingServicer(pb_grpc.TrainingServiceServicer):  # type: ignore[misc]
    def __init__(self, service: TrainingService) -> None:
        self._service = service

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Context) -> pb.SubmitJobResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("required", field="spec")
        spec = convert.spec_from_proto(request.spec)
        job = await asyncio.to_thread(
            self._service.submit, spec, request.request_id, caller_identity(context)
        )
        return pb.SubmitJobResponse(job=convert.job_to_proto(job))

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        job = await asyncio.to_thread(self._service.get, request.job_id)
        return pb.GetJobResponse(job=convert.job_to_proto(job))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument("must be in [0, 1000]", field="page_size")
        wanted = {state for state, code in convert.STATES.items() if code in set(request.states)}
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument("not a token this server issued", field="page_token") from None
        if offset < 0:
            raise InvalidArgument("not a token this server issued", field="page_token")
        if request.states and not wanted:
            return pb.ListJobsResponse()
        jobs = await asyncio.to_thread(self._service.list_jobs, frozenset(wanted), request.output_model_name)
        size = request.page_size or 50
        page = jobs[offset : offset + size]
        token = str(offset + size) if offset + size < len(jobs) else ""
        return pb.ListJobsResponse(jobs=[convert.job_to_proto(j) for j in page], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.CancelJobResponse:
        if len(request.reason.encode()) > 1024:
            raise InvalidArgument("at most 1024 bytes", field="reason")
        job = await asyncio.to_thread(
            self._service.cancel, request.job_id, request.reason, caller_identity(context)
        )
        return pb.CancelJobResponse(job=convert.job_to_proto(job))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        if request.from_sequence < 0:
            raise InvalidArgument("must be >= 0", field="from_sequence")
        next_sequence = max(request.from_sequence, 1)
        while True:
            batch = await asyncio.to_thread(
                self._service.events_since, request.job_id, next_sequence, _WATCH_POLL_SECONDS
            )
            for event in batch:
                if event.kind != "log" or request.include_logs:
                    yield pb.WatchJobResponse(event=convert.event_to_proto(event))
            if batch:
                next_sequence = batch[-1].sequence + 1
                if batch[-1].state.terminal:
                    return

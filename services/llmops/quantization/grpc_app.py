"""Thin gRPC servicer for ``llmops.quantization.v1.QuantizationService``: proto <-> domain.

Blocking service calls (the job store takes a lock; watching waits on a condition) run in worker
threads so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from llmops.common.artifacts.sources import ModelSource
from llmops.common.errors import InvalidArgument, NotFound, caller_path
from llmops.common.jobs import JOB_STATES, JobState, timestamp
from llmops.common.runners import Resources
from llmops.proto.common.v1 import compute_pb2, job_pb2, model_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
from llmops.proto.quantization.v1 import quantization_service_pb2_grpc as pb_grpc
from llmops.quantization import evaluate
from llmops.quantization.domain import EvalSpec, Job, JobEvent, JobSpec
from llmops.quantization.methods import CalibrationSpec, QuantizationSpec
from llmops.quantization.service import QuantizationService

SERVICE_NAME = "llmops.quantization.v1.QuantizationService"
METHODS = {
    pb.QUANTIZATION_METHOD_INT8_DYNAMIC: "int8_dynamic",
    pb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY: "int8_weight_only",
    pb.QUANTIZATION_METHOD_INT4_WEIGHT_ONLY: "int4_weight_only",
    pb.QUANTIZATION_METHOD_GPTQ: "gptq",
    pb.QUANTIZATION_METHOD_AWQ: "awq",
    pb.QUANTIZATION_METHOD_GGUF: "gguf",
}
DEVICES = {
    compute_pb2.DEVICE_UNSPECIFIED: "cpu",
    compute_pb2.DEVICE_CPU: "cpu",
    compute_pb2.DEVICE_CUDA: "cuda",
}
STATES = JOB_STATES
FORMATS = {
    "int8": model_pb2.MODEL_FORMAT_INT8,
    "int4": model_pb2.MODEL_FORMAT_INT4,
    "gguf": model_pb2.MODEL_FORMAT_GGUF,
}
#: How long one WatchJob wait lasts before the stream checks whether the client went away.
_WATCH_POLL_SECONDS = 1.0


class QuantizationServicer(pb_grpc.QuantizationServiceServicer):  # type: ignore[misc]
    def __init__(self, service: QuantizationService, source: ModelSource) -> None:
        self._service = service
        self._source = source
        self._submitted: dict[str, pb.QuantizationJobSpec] = {}

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.SubmitJobResponse:
        spec = request.spec
        if spec.method not in METHODS:
            raise InvalidArgument(
                f"method is required; one of {', '.join(sorted(METHODS.values()))}", field="spec.method"
            )
        if spec.bits < 0 or spec.group_size < -1:
            raise InvalidArgument("bits >= 0 and group_size >= -1", field="spec")
        selector = spec.source.WhichOneof("selector")
        source = await asyncio.to_thread(
            self._source.resolve,
            spec.source.name,
            spec.source.version if selector == "version" else None,
            spec.source.alias if selector == "alias" else None,
        )
        evaluation = EvalSpec()
        if spec.HasField("eval"):
            sample = spec.eval.dataset
            evaluation = EvalSpec(
                num_samples=(sample.num_samples or evaluate.DEFAULT_NUM_SAMPLES)
                if spec.eval.HasField("dataset")
                else 0,
                seq_len=sample.seq_len or evaluate.DEFAULT_SEQ_LEN,
                throughput_tokens=(spec.eval.throughput_tokens or evaluate.DEFAULT_THROUGHPUT_TOKENS)
                if spec.eval.measure_throughput
                else 0,
                text_path=_eval_text(sample.ref.path),
            )
        job_spec = JobSpec(
            source_dir=source.path,
            source_name=source.name,
            source_version=source.version,
            quantization=QuantizationSpec(
                method=METHODS[spec.method],
                bits=spec.bits,
                group_size=spec.group_size,
                gguf_type=spec.gguf_type,
                device=DEVICES.get(spec.device, "unknown"),
                calibration=_calibration(spec),
            ),
            eval=evaluation,
            output_model_name=spec.output_model_name,
            register=spec.register if spec.HasField("register") else True,
            aliases=tuple(spec.aliases),
            tags=dict(spec.tags),
            description=spec.description,
            resources=Resources(
                cpus=spec.resources.cpus,
                gpus=spec.resources.gpus,
                memory_bytes=spec.resources.memory_bytes,
                accelerator_type=spec.resources.accelerator_type,
            ),
        )
        job = await asyncio.to_thread(self._service.submit, job_spec, request.request_id)
        resolved = pb.QuantizationJobSpec()
        resolved.CopyFrom(spec)
        resolved.source.version = source.version
        self._submitted.setdefault(job.id, resolved)
        return pb.SubmitJobResponse(job=self._job(job))

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=self._job(await asyncio.to_thread(self._service.get, request.job_id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument("must be in [0, 1000]", field="page_size")
        wanted = {state for state, code in STATES.items() if code in set(request.states)}
        jobs = await asyncio.to_thread(self._service.list_jobs, frozenset(wanted))
        if request.source_model_name:
            jobs = [j for j in jobs if j.spec.source_name == request.source_model_name]
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument("not a token this server issued", field="page_token") from None
        size = request.page_size or 50
        page = jobs[offset : offset + size]
        token = str(offset + size) if offset + size < len(jobs) else ""
        return pb.ListJobsResponse(jobs=[self._job(j) for j in page], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        job = await asyncio.to_thread(self._service.cancel, request.job_id, request.reason)
        return pb.CancelJobResponse(job=self._job(job))

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.WatchJobResponse]:
        if request.from_sequence < 0:
            raise InvalidArgument("must be >= 0", field="from_sequence")
        next_sequence = max(request.from_sequence, 1)
        while True:
            batch = await asyncio.to_thread(
                self._service.events_since, request.job_id, next_sequence, _WATCH_POLL_SECONDS
            )
            for event in batch:
                yield pb.WatchJobResponse(event=_event(event))
            if batch:
                next_sequence = batch[-1].sequence + 1
                if batch[-1].state.terminal:
                    return

    def _job(self, job: Job) -> pb.QuantizationJob:
        message = pb.QuantizationJob(
            id=job.id,
            spec=self._submitted.get(job.id),
            state=STATES[job.state],
            created_at=timestamp(job.created_at),
            started_at=timestamp(job.started_at),
            finished_at=timestamp(job.finished_at),
            progress=job.progress,
            phase=job.phase if job.state is not JobState.QUEUED else "",
            error_message=job.error_message,
            request_id=job.request_id,
            cancel_requested=job.cancel_requested,
            mlflow_run_id=job.mlflow_run_id,
        )
        if job.result is not None:
            result = job.result
            values = {
                k: v for k, v in dataclasses.asdict(result).items() if k.startswith(("perplexity", "tokens"))
            }
            message.result.CopyFrom(
                pb.QuantizationResult(
                    size_bytes_before=result.size_bytes_before,
                    size_bytes_after=result.size_bytes_after,
                    size_ratio=result.size_ratio,
                    format=FORMATS[result.format],
                    output_uri=result.registered.uri
                    if result.registered
                    else result.output_dir.resolve().as_uri(),
                    **{k: v for k, v in values.items() if v is not None},
                )
            )
            if result.registered is not None:
                message.result.result_version.CopyFrom(
                    model_pb2.ModelRef(name=result.registered.name, version=result.registered.version)
                )
        return message


def _eval_text(path: str) -> Path | None:
    """The evaluation text a job names (``None``: the default), checked now rather than at the end."""
    if not path:
        return None
    with caller_path(path, field="spec.eval.dataset.ref.path"):  # too long, unreadable...
        if not Path(path).exists():
            raise NotFound(f"evaluation data {path} does not exist")
    return Path(path)


def _calibration(spec: pb.QuantizationJobSpec) -> CalibrationSpec | None:
    """The spec's calibration sample (``None`` when unset); an empty path is the default text."""
    if not spec.HasField("calibration"):
        return None
    sample = spec.calibration
    ref = sample.ref
    path = unquote(urlparse(ref.path).path) if ref.path.startswith("file://") else ref.path
    return CalibrationSpec(
        num_samples=sample.num_samples,
        seq_len=sample.seq_len,
        text_path=Path(path) if path else None,
        # a revision or repo without a path is kept, so validation refuses it rather than ignoring it
        dataset=(ref.path, ref.revision, ref.repo) if ref.path or ref.revision or ref.repo else None,
    )


def _event(event: JobEvent) -> job_pb2.JobEvent:
    message = job_pb2.JobEvent(
        job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time), state=STATES[event.state]
    )
    if event.kind == "queued":
        message.queued.SetInParent()
    elif event.kind == "started":
        message.started.worker = event.worker or "local"
        message.started.attempt = 1
        message.started.mlflow_run_id = event.mlflow_run_id
    elif event.kind == "eval":
        message.eval.SetInParent()
        message.eval.metrics.update(event.metrics)
        if "perplexity_after" in event.metrics:
            message.eval.perplexity = event.metrics["perplexity_after"]
    elif event.kind == "finished":
        message.finished.SetInParent()
        message.finished.metrics.update(event.metrics)
        if event.registered is not None:
            message.finished.result.CopyFrom(
                model_pb2.ModelRef(name=event.registered.name, version=event.registered.version)
            )
            message.finished.output_uri = event.registered.uri
    elif event.kind == "failed":
        message.failed.SetInParent()
        message.failed.reason = event.message
    elif event.kind == "cancelled":
        message.cancelled.SetInParent()
        message.cancelled.reason = event.message
    else:
        message.step.progress = event.progress
        message.step.phase = event.phase
    return message

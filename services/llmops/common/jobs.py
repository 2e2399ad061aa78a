"""The life of a long-running job (training, quantization), shared by the services that run them.

One enum for the domain, its mapping to ``llmops.common.v1.JobState``, and the timestamp conversion
job records and events use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from google.protobuf import timestamp_pb2

from llmops.proto.common.v1 import job_pb2


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


#: Domain state -> proto enum value.
JOB_STATES: dict[JobState, job_pb2.JobState.ValueType] = {
    JobState.QUEUED: job_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: job_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: job_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: job_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: job_pb2.JOB_STATE_CANCELLED,
}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """A ``time.time()`` value as a protobuf Timestamp (``None`` stays unset)."""
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


class _Event(Protocol):
    @property
    def sequence(self) -> int: ...

    @property
    def state(self) -> JobState: ...


EventT = TypeVar("EventT", bound=_Event)


def follow_events(
    events_since: Callable[[str, int, float | None], Sequence[EventT]],
    job_id: str,
    from_sequence: int = 0,
    timeout: float | None = None,
) -> Iterator[EventT]:
    """A job's events from ``from_sequence`` until the terminal one, read through ``events_since``
    (which waits up to its timeout for new ones).

    Raises:
        TimeoutError: no new event within ``timeout`` seconds.
    """
    next_sequence = max(from_sequence, 1)
    while True:
        batch = events_since(job_id, next_sequence, timeout)
        if not batch:
            raise TimeoutError(f"no event from job {job_id} in {timeout} s")
        yield from batch
        next_sequence = batch[-1].sequence + 1
        if batch[-1].state.terminal:
            return

"""One error hierarchy for every service, each class carrying its gRPC status code.

Services raise these from domain code; the server interceptor turns them into gRPC statuses through
:func:`status_for`. Anything else that escapes a handler becomes ``INTERNAL`` with a short generic
message and an error id that is also logged (with the stack trace) so an operator can find it; the
trace never reaches the client.
"""

from __future__ import annotations

import contextlib
import errno
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

#: Trailing-metadata key under which gRPC carries a serialized ``google.rpc.Status``.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LLMOpsError(Exception):
    """Base of every error a service raises on purpose.

    Attributes:
        code: the gRPC status code the error maps to.
        message: text safe to show to the caller.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[object]:
        """Extra ``google.rpc`` detail messages to attach to the status (none by default)."""
        return []


class InvalidArgument(LLMOpsError):
    """The caller sent a request that can never succeed as written."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def details(self) -> list[object]:
        if self.field is None:
            return []
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class NotFound(LLMOpsError):
    """A named thing (model, version, alias, job) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LLMOpsError):
    """The caller tried to create something that exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LLMOpsError):
    """The system is not in a state where the request can run (e.g. QLoRA without a GPU)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LLMOpsError):
    """A concurrency conflict, such as a compare-and-set alias move that lost the race; retry."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(LLMOpsError):
    """A value past the valid range of the current state (e.g. reading past the end of a stream)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unauthenticated(LLMOpsError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LLMOpsError):
    """The credentials are valid but do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LLMOpsError):
    """Overload or a quota: the caller should retry after ``retry_after_seconds``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[object]:
        if self.retry_after_seconds is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(LLMOpsError):
    """A dependency (Redis, MLflow, Ray, an engine) is down or the service is draining; retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LLMOpsError):
    """The work did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LLMOpsError):
    """The operation was cancelled (usually by the caller)."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(LLMOpsError):
    """Stored data is corrupt (e.g. an artifact whose sha256 no longer matches its manifest)."""

    code = grpc.StatusCode.DATA_LOSS


class Unimplemented(LLMOpsError):
    """The operation is not supported by this service or backend."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LLMOpsError):
    """A bug or broken invariant on our side."""

    code = grpc.StatusCode.INTERNAL


#: Every error class, by the gRPC code it carries: the single table both directions use.
ERROR_TABLE: dict[grpc.StatusCode, type[LLMOpsError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        DataLoss,
        Unimplemented,
        Internal,
    )
}

GENERIC_INTERNAL_MESSAGE = "internal error"


@dataclass(frozen=True)
class MappedStatus:
    """What the server sends for an exception."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, bytes], ...] = ()
    error_id: str | None = None  # set for unexpected errors; logged with the trace


def status_for(exc: BaseException) -> MappedStatus:
    """Map any exception to the status the client sees.

    Domain errors keep their message and details. Anything else becomes ``INTERNAL`` with a generic
    message and a fresh error id, so no stack trace or internal text leaks to the caller.
    """
    if isinstance(exc, LLMOpsError):
        details = exc.details()
        metadata: tuple[tuple[str, bytes], ...] = ()
        if details:
            status = status_pb2.Status(code=exc.code.value[0], message=exc.message)
            for detail in details:
                status.details.add().Pack(detail)
            metadata = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
        return MappedStatus(exc.code, exc.message, metadata)
    if type(exc) is NotImplementedError:  # a generated servicer base whose RPC nobody implemented
        return MappedStatus(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
    error_id = uuid.uuid4().hex[:12]
    return MappedStatus(
        grpc.StatusCode.INTERNAL, f"{GENERIC_INTERNAL_MESSAGE} (error id {error_id})", (), error_id
    )


#: OS errors on a path the caller chose, by what they say about the request (see :func:`path_error`).
_PATH_NOT_FOUND = frozenset({errno.ENOENT, errno.ENOTDIR})
_PATH_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_PATH_INVALID = frozenset(
    {errno.ENAMETOOLONG, errno.ELOOP, errno.EISDIR, errno.EINVAL, errno.EILSEQ, errno.EEXIST}
)


def path_error(exc: BaseException, path: str, *, field: str | None = None) -> LLMOpsError | None:
    """The caller error an OS error on a caller-supplied ``path`` means; ``None`` when it is ours.

    A path from a request (a folder to load, a file to read, an artifact's file name) can fail in
    the file system for reasons that are the caller's: it does not exist or runs through a file
    (``NOT_FOUND``), it is not readable by the server (``PERMISSION_DENIED``), or it cannot be a
    path at all: too long, a symlink loop, a folder where a file is wanted, a NUL byte
    (``INVALID_ARGUMENT``). Anything else (``EIO``, a full disk) is the server's and stays
    ``INTERNAL`` (or what the caller maps it to).
    """
    shown = path if len(path) <= 200 else f"{path[:200]}…"
    if isinstance(exc, ValueError) and "null" in str(exc):  # os functions refuse embedded NUL bytes
        return InvalidArgument(f"{shown!r} is not a valid path (it holds a NUL byte)", field=field)
    if not isinstance(exc, OSError):
        return None
    reason = exc.strerror or str(exc)
    if exc.errno in _PATH_NOT_FOUND:
        return NotFound(f"{shown}: {reason}")
    if exc.errno in _PATH_DENIED:
        return PermissionDenied(f"{shown}: the server may not read or write it ({reason})")
    if exc.errno in _PATH_INVALID:
        return InvalidArgument(f"{shown}: {reason}", field=field)
    return None


@contextlib.contextmanager
def caller_path(path: str | object, *, field: str | None = None) -> Iterator[None]:
    """Run file-system work on a caller-supplied ``path``, raising what :func:`path_error` maps.

    Use it around every ``stat``/``open``/``is_dir`` of a path that came in a request: ``Path``
    predicates such as ``is_dir`` raise (rather than answer ``False``) on a name that is too long.
    """
    try:
        yield
    except (OSError, ValueError) as exc:
        mapped = path_error(exc, str(path), field=field)
        if mapped is None:
            raise
        raise mapped from exc


def error_from_status(code: grpc.StatusCode, message: str) -> LLMOpsError:
    """Turn a status received by a client back into the matching domain error."""
    return ERROR_TABLE.get(code, Internal)(message)


def retry_delay_from_metadata(trailing_metadata: object) -> float | None:
    """Read a ``RetryInfo`` delay (seconds) from a status's trailing metadata, if there is one."""
    for key, value in trailing_metadata or ():  # type: ignore[attr-defined]
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


__all__ = [
    "ERROR_TABLE",
    "GENERIC_INTERNAL_MESSAGE",
    "STATUS_DETAILS_KEY",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LLMOpsError",
    "MappedStatus",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "caller_path",
    "error_from_status",
    "path_error",
    "retry_delay_from_metadata",
    "status_for",
]

"""The single error table: each domain error keeps its code and message, and nothing else leaks.

Invariants: every class maps to a distinct gRPC code and back; unexpected exceptions become INTERNAL
with a generic message and an error id; retry and field details survive as google.rpc details; an OS error on a path the caller chose
(too long, missing, unreadable, a symlink loop) is the caller's error, any other stays INTERNAL.
"""

from __future__ import annotations

import errno
import pathlib

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llmops.common import errors


@pytest.mark.parametrize("cls", sorted(errors.ERROR_TABLE.values(), key=lambda c: c.__name__))
def test_each_error_round_trips_through_its_code(cls: type[errors.LLMOpsError]) -> None:
    mapped = errors.status_for(cls("boom"))
    assert mapped.code == cls.code
    assert mapped.message == "boom"
    assert mapped.error_id is None
    back = errors.error_from_status(mapped.code, mapped.message)
    assert type(back) is cls and back.message == "boom"


def test_codes_are_distinct_and_never_ok() -> None:
    codes = [cls.code for cls in errors.ERROR_TABLE.values()]
    assert len(codes) == len(set(codes))
    assert grpc.StatusCode.OK not in codes and grpc.StatusCode.UNKNOWN not in codes


def test_unexpected_exception_is_generic_internal() -> None:
    mapped = errors.status_for(RuntimeError("db password is hunter2"))
    assert mapped.code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in mapped.message
    assert mapped.error_id is not None and mapped.error_id in mapped.message
    assert errors.status_for(RuntimeError("x")).error_id != mapped.error_id


def test_resource_exhausted_packs_retry_info() -> None:
    mapped = errors.status_for(errors.ResourceExhausted("slow down", retry_after_seconds=1.25))
    assert errors.retry_delay_from_metadata(mapped.trailing_metadata) == pytest.approx(1.25)
    ((key, raw),) = mapped.trailing_metadata
    status = status_pb2.Status.FromString(raw)
    assert key == errors.STATUS_DETAILS_KEY
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.message == "slow down"


def test_invalid_argument_packs_field_violation() -> None:
    mapped = errors.status_for(errors.InvalidArgument("must be > 0", field="top_k"))
    assert mapped.message == "top_k: must be > 0"
    status = status_pb2.Status.FromString(mapped.trailing_metadata[0][1])
    request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(request)
    assert request.field_violations[0].field == "top_k"


def test_no_retry_info_without_delay() -> None:
    assert errors.status_for(errors.ResourceExhausted("full")).trailing_metadata == ()
    assert errors.retry_delay_from_metadata(()) is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.ENAMETOOLONG, "File name too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (OSError(errno.ELOOP, "Too many levels of symbolic links"), grpc.StatusCode.INVALID_ARGUMENT),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError("embedded null byte"), grpc.StatusCode.INVALID_ARGUMENT),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), grpc.StatusCode.NOT_FOUND),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory"), grpc.StatusCode.NOT_FOUND),
        (PermissionError(errno.EACCES, "Permission denied"), grpc.StatusCode.PERMISSION_DENIED),
        (PermissionError(errno.EPERM, "Operation not permitted"), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=lambda v: getattr(v, "name", None) or type(v).__name__ + str(getattr(v, "errno", "")),
)
def test_os_errors_on_a_caller_path_become_caller_errors(error: Exception, code: grpc.StatusCode) -> None:
    with pytest.raises(errors.LLMOpsError) as caught, errors.caller_path("/x" * 200, field="local_path"):
        raise error
    assert caught.value.code == code
    assert caught.value.__cause__ is error
    assert len(caught.value.message) < 300  # a 400-byte path is shortened in the message
    assert errors.status_for(caught.value).code == code


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EIO, "Input/output error"), OSError(errno.ENOSPC, "No space left"), ValueError("bad")],
    ids=["EIO", "ENOSPC", "ValueError"],
)
def test_server_side_errors_on_a_path_stay_ours(error: Exception) -> None:
    assert errors.path_error(error, "/p") is None
    with pytest.raises(type(error)), errors.caller_path("/p"):
        raise error


def test_real_file_system_errors_map_by_errno(tmp_path: pathlib.Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / ("a" * 300)): grpc.StatusCode.INVALID_ARGUMENT,  # ENAMETOOLONG
        str(tmp_path / "loop" / "x"): grpc.StatusCode.INVALID_ARGUMENT,  # ELOOP
        str(tmp_path / "file" / "x"): grpc.StatusCode.NOT_FOUND,  # ENOTDIR
        str(tmp_path / "missing"): grpc.StatusCode.NOT_FOUND,  # ENOENT
    }
    for path, code in cases.items():
        with pytest.raises(errors.LLMOpsError) as caught, errors.caller_path(path):
            pathlib.Path(path).stat()
        assert caught.value.code == code, path

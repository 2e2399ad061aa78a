"""The single error table: each domain error keeps its code and message, and nothing else leaks.

Invariants: every class maps to a distinct gRPC code and back; unexpected exceptions become INTERNAL
with a generic message and an error id; retry and field details survive as google.rpc details.
"""

from __future__ import annotations

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

"""Proto <-> domain conversions of the ``llmops.common.v1`` types every service reads the same way."""

from __future__ import annotations

from llmops.common.domain import ModelRef
from llmops.proto.common.v1 import model_pb2


def model_ref_from_proto(ref: model_pb2.ModelRef) -> ModelRef:
    """A version by number, through an alias, or (neither set) the latest READY one."""
    selector = ref.WhichOneof("selector")
    if selector == "version":
        return ModelRef(ref.name, version=ref.version)
    if selector == "alias":
        return ModelRef(ref.name, alias=ref.alias)
    return ModelRef(ref.name)


def model_ref_to_proto(ref: ModelRef) -> model_pb2.ModelRef:
    if ref.version is not None:
        return model_pb2.ModelRef(name=ref.name, version=ref.version)
    if ref.alias is not None:
        return model_pb2.ModelRef(name=ref.name, alias=ref.alias)
    return model_pb2.ModelRef(name=ref.name)

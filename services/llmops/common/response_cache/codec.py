"""The stored payload is a serialized ``llmops.common.v1.GeneratedOutput``: this codec reads and writes it.

Serving may pass this codec to :meth:`ResponseCache.flight` with the proto it already builds for its
responses, or write its own codec over its domain result as long as the bytes are this message.
"""

from __future__ import annotations

from llmops.proto.common.v1 import generation_pb2


class GeneratedOutputCodec:
    """``GeneratedOutput`` <-> bytes; an output with an ABORT completion is incomplete."""

    def encode(self, value: generation_pb2.GeneratedOutput) -> bytes:
        return value.SerializeToString()

    def decode(self, data: bytes) -> generation_pb2.GeneratedOutput:
        return generation_pb2.GeneratedOutput.FromString(data)

    def complete(self, value: generation_pb2.GeneratedOutput) -> bool:
        return is_complete(value)


def is_complete(output: generation_pb2.GeneratedOutput) -> bool:
    """False when a completion ended with ABORT (the output was cut short) or has not finished."""
    return all(
        c.finish_reason not in (generation_pb2.FINISH_REASON_ABORT, generation_pb2.FINISH_REASON_UNSPECIFIED)
        for c in output.completions
    )

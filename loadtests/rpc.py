"""gRPC plumbing shared by the users and the pre-run checks (no Locust import here)."""

from __future__ import annotations

import grpc

#: Metadata key of the API key (the servers' ``llmops.common.clients.API_KEY_METADATA``).
API_KEY_METADATA = "x-api-key"
#: Message size limit the services use.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class RpcFailure(Exception):
    """A failed call as Locust's failure table shows it: ``CODE: details``."""

    def __init__(self, error: grpc.RpcError) -> None:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        self.code = code
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {details}")


def open_channel(address: str) -> grpc.Channel:
    """A plain (insecure) channel with the services' message size limits."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.insecure_channel(address, options=options)

"""Who is calling a servicer: the identity jobs and alias moves are recorded under."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from llmops.common.clients import API_KEY_METADATA

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any


def caller_identity(context: Context) -> str:
    """The TLS peer identity, else a fingerprint of the API key, else ``anonymous``.

    The key itself is never stored; its fingerprint is stable, so the calls of one key group together.
    """
    identities = list(context.peer_identities() or ())
    if identities:
        return str(identities[0].decode(errors="replace"))
    for key, value in context.invocation_metadata() or ():
        if key == API_KEY_METADATA:
            raw = value if isinstance(value, bytes) else str(value).encode()
            return "key:" + hashlib.sha256(raw).hexdigest()[:12]
    return "anonymous"

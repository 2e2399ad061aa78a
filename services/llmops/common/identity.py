"""Who is calling a servicer: the identity jobs and alias moves are recorded under."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from llmops.common.auth import OPEN, current_identity
from llmops.common.clients import API_KEY_METADATA

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any


def caller_identity(context: Context) -> str:
    """The authenticated key's id (``key:<id>``), else the TLS peer identity, else a fingerprint of
    the API key sent to an open server, else ``anonymous``.

    The key itself is never stored; its fingerprint is stable, so the calls of one key group together.
    """
    identity = current_identity()
    if identity is not None and identity is not OPEN:
        return identity.name
    identities = list(context.peer_identities() or ())
    if identities:
        return str(identities[0].decode(errors="replace"))
    for key, value in context.invocation_metadata() or ():
        if key == API_KEY_METADATA:
            raw = value if isinstance(value, bytes) else str(value).encode()
            return "key:" + hashlib.sha256(raw).hexdigest()[:12]
    return "anonymous"

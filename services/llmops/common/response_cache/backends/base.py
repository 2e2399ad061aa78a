"""What a cache backend must do, and the entry format every backend stores.

A backend keeps entries under a :class:`~llmops.common.response_cache.domain.CacheKey` (its digest; its model,
adapter and tenant index it for invalidation), expires them after their TTL, removes them by
model / version / alias (optionally one tenant's only), and offers short locks for single flight.
Every failure (down, slow, refused, corrupt) surfaces as :class:`CacheBackendError`, which the
:class:`~llmops.common.response_cache.cache.ResponseCache` turns into a miss (fail open).
"""

from __future__ import annotations

import abc
import struct
from datetime import UTC, datetime

from llmops.common.response_cache.domain import BackendSizes, CacheKey, InvalidationScope, StoredEntry


class CacheBackendError(Exception):
    """The backend failed; callers treat it as a miss and count an error."""


_HEADER = struct.Struct(">Bqq")  # format version, stored_at ms, expires_at ms (0: never)
_FORMAT = 1


def encode_entry(payload: bytes, stored_at_ms: int, expires_at_ms: int) -> bytes:
    """An entry as stored: a 17-byte header (format, stored_at, expires_at in ms), then the payload."""
    return _HEADER.pack(_FORMAT, stored_at_ms, expires_at_ms) + payload


def decode_entry(data: bytes) -> StoredEntry:
    """Read an entry written by :func:`encode_entry`.

    Raises:
        CacheBackendError: the bytes are not an entry of a known format.
    """
    if len(data) < _HEADER.size:
        raise CacheBackendError("corrupt cache entry: shorter than its header")
    version, stored_at_ms, expires_at_ms = _HEADER.unpack_from(data)
    if version != _FORMAT:
        raise CacheBackendError(f"cache entry of unknown format {version}")
    return StoredEntry(
        payload=bytes(data[_HEADER.size :]),
        stored_at=from_ms(stored_at_ms),
        expires_at=from_ms(expires_at_ms) if expires_at_ms else None,
    )


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class CacheBackend(abc.ABC):
    """Storage of cache entries; see the module docstring for the contract."""

    @abc.abstractmethod
    async def get(self, key: CacheKey) -> StoredEntry | None:
        """The live entry under ``key`` (a cacheable one), or ``None``."""

    @abc.abstractmethod
    async def put(self, key: CacheKey, payload: bytes, *, stored_at_ms: int, ttl_ms: int) -> None:
        """Store ``payload`` under ``key``, replacing any entry; ``ttl_ms`` 0 means no expiry.

        The entry is indexed under its model's and adapter's version and, when they were reached
        through one, alias.
        """

    @abc.abstractmethod
    async def invalidate(self, scope: InvalidationScope) -> int:
        """Remove the entries ``scope`` matches so no later ``get`` returns them; how many were removed."""

    @abc.abstractmethod
    async def try_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        """Take the lock ``name`` for ``ttl_ms`` if nobody holds it; whether it was taken."""

    @abc.abstractmethod
    async def extend_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        """Give a held lock ``ttl_ms`` more; false if ``token`` no longer holds it."""

    @abc.abstractmethod
    async def release_lock(self, name: str, token: str) -> None:
        """Release the lock if ``token`` still holds it."""

    @abc.abstractmethod
    async def sizes(self) -> BackendSizes:
        """Entries held and bytes they take now (all tenants)."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the backend answers; never raises."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and check (or set) the backend's memory settings."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

"""API keys: who is calling, in which tenant, and what they may do.

Keys live in a YAML file (``api_keys_file``; in Kubernetes a mounted Secret), stored hashed — the
file holds each key's SHA-256, never the key. A key is a random 256-bit token, so a plain hash is
the right tool (nothing to brute-force; no salt or slow hash needed)::

    tenants:                       # optional: per-tenant rate limits (absent: unlimited)
      team-a: {requests_per_minute: 600, tokens_per_minute: 200000}
    keys:
      - id: team-a-app             # shown in logs and job records instead of the key
        tenant: team-a
        role: user                 # user: generate and read; admin: also register, train, quantize, move aliases
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

``llmops auth new-key --id team-a-app --tenant team-a --role user`` prints a new key (once) and its
entry. Callers send the key as ``authorization: Bearer <key>`` (gRPC metadata or HTTP header) or
``x-api-key: <key>``. With no keys file the platform is open (the embedded stack, tests): every
caller is an ``admin`` of no tenant (``""``, the cache's key for untenanted entries).

The file is re-read when it changes (a rotated Secret takes effect without a restart); a file that
no longer parses keeps the last good book and logs why.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from llmops.common.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

KEY_PREFIX = "llmops_"
API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
#: The tenant of callers of an open platform: none (cache entries keyed as before tenants existed).
OPEN_TENANT = ""
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class TenantLimits:
    """Per-minute budgets of one tenant; ``None`` is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclasses.dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    key_id: str
    tenant: str
    role: Role
    limits: TenantLimits = TenantLimits()

    @property
    def name(self) -> str:
        return f"key:{self.key_id}"


#: The caller when no keys file is configured.
OPEN = Identity("open", OPEN_TENANT, Role.ADMIN)

#: Methods a ``user`` may call (``admin`` may call every method); health and reflection need no key.
USER_METHODS: frozenset[str] = frozenset(
    f"{service}/{method}"
    for service, methods in {
        "llmops.serving.v1.ServingService": ("Generate", "GenerateStream", "Tokenize", "Detokenize", "ListModels"),
        "llmops.registry.v1.RegistryService": (
            "GetModel", "ListModels", "GetVersion", "ListVersions", "ResolveAlias", "ListAliasHistory", "GetLineage",
            "GetAliasWeights", "ListAliasWeightsHistory",
        ),
    }.items()
    for method in methods
)  # fmt: skip
PUBLIC_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key (shown once; only its :func:`fingerprint` is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_from_metadata(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The key a caller sent: ``authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    for name, value in metadata:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        name = name.lower()
        if name == AUTHORIZATION_HEADER:
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == API_KEY_HEADER and text.strip():
            return text.strip()
    return None


class KeyBookError(ValueError):
    """The keys file is unreadable or malformed (the message names the entry)."""


@dataclasses.dataclass(frozen=True)
class KeyBook:
    """Keys by fingerprint, and tenants' limits."""

    by_fingerprint: Mapping[str, Identity]

    @classmethod
    def parse(cls, text: str, source: str = "keys file") -> KeyBook:
        try:
            document = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise KeyBookError(f"{source}: not YAML: {exc}") from None
        if not isinstance(document, dict):
            raise KeyBookError(f"{source}: expected a mapping with 'keys' (and 'tenants')")
        tenants: dict[str, TenantLimits] = {}
        for name, limits in (document.get("tenants") or {}).items():
            if not isinstance(limits, dict):
                raise KeyBookError(f"{source}: tenants.{name}: expected a mapping")
            unknown = set(limits) - {"requests_per_minute", "tokens_per_minute"}
            if unknown:
                raise KeyBookError(f"{source}: tenants.{name}: unknown fields {sorted(unknown)}")
            values = {}
            for field, value in limits.items():
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise KeyBookError(f"{source}: tenants.{name}.{field}: expected a positive integer")
                values[field] = value
            tenants[str(name)] = TenantLimits(**values)
        by_fingerprint: dict[str, Identity] = {}
        ids: set[str] = set()
        for index, entry in enumerate(document.get("keys") or []):
            where = f"{source}: keys[{index}]"
            if not isinstance(entry, dict):
                raise KeyBookError(f"{where}: expected a mapping")
            unknown = set(entry) - {"id", "tenant", "role", "sha256"}
            if unknown:
                raise KeyBookError(f"{where}: unknown fields {sorted(unknown)}")
            key_id, tenant = str(entry.get("id", "")), str(entry.get("tenant", ""))
            digest, role = str(entry.get("sha256", "")).lower(), str(entry.get("role", ""))
            if not _NAME.match(key_id) or not _NAME.match(tenant):
                raise KeyBookError(f"{where}: id and tenant must match {_NAME.pattern}")
            if key_id in ids:
                raise KeyBookError(f"{where}: id {key_id!r} appears twice")
            if not _HEX64.match(digest):
                raise KeyBookError(f"{where} ({key_id}): sha256 must be 64 hex digits (the key's SHA-256)")
            if role not in {r.value for r in Role}:
                raise KeyBookError(f"{where} ({key_id}): role must be one of {[r.value for r in Role]}")
            ids.add(key_id)
            by_fingerprint[digest] = Identity(key_id, tenant, Role(role), tenants.get(tenant, TenantLimits()))
        return cls(by_fingerprint)

    def identify(self, key: str) -> Identity | None:
        return self.by_fingerprint.get(fingerprint(key))


class Authenticator:
    """Checks each call's key against the keys file (``None``: the platform is open)."""

    def __init__(self, path: Path | None, *, reload_seconds: float = 5.0) -> None:
        self.path = path
        self._reload_seconds = reload_seconds
        self._book = KeyBook({})
        self._mtime: float | None = None
        self._checked = 0.0
        if path is not None:
            self._book = KeyBook.parse(self._read(path), str(path))  # a bad file stops start-up
            self._mtime = path.stat().st_mtime

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise KeyBookError(f"cannot read the API keys file {path}: {exc.strerror}") from None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self._reload_seconds:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._book = KeyBook.parse(self._read(self.path), str(self.path))
                self._mtime = mtime
                log.info("reloaded API keys: %d keys", len(self._book.by_fingerprint))
        except (OSError, KeyBookError) as exc:
            log.warning("keeping the last good API keys: %s", exc)

    def authenticate(self, key: str | None) -> Identity:
        """The caller of ``key``; raises :class:`Unauthenticated` for a missing or unknown key."""
        if self.path is None:
            return OPEN
        if not key:
            raise Unauthenticated(
                "an API key is required: send 'authorization: Bearer <key>' (or 'x-api-key: <key>')"
            )
        self._maybe_reload()
        identity = self._book.identify(key)
        if identity is None:
            raise Unauthenticated("the API key is not valid (unknown, revoked or mistyped)")
        return identity

    def check(self, metadata: Iterable[tuple[str, Any]], service: str, method: str) -> Identity | None:
        """Authenticate and authorize one call; ``None`` for public services (health, reflection)."""
        if service in PUBLIC_SERVICES:
            return None
        if self.path is None:
            return OPEN  # no keys file: nothing to read from the metadata
        identity = self.authenticate(key_from_metadata(metadata))
        authorize(identity, service, method)
        return identity


def authorize(identity: Identity, service: str, method: str) -> None:
    if identity.role is Role.ADMIN or f"{service}/{method}" in USER_METHODS:
        return
    short = service.rsplit(".", 1)[-1]
    raise PermissionDenied(
        f"key {identity.key_id!r} has role {identity.role.value!r}; {short}/{method} needs role 'admin'"
    )


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("llmops_identity", default=None)


def current_identity() -> Identity | None:
    """The authenticated caller of the call being handled (``None`` outside a call or for public ones)."""
    return _current.get()


@contextlib.contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    token = _current.set(identity)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # a generator closed from another context
            _current.reset(token)


def current_tenant() -> str:
    identity = _current.get()
    return identity.tenant if identity is not None else OPEN_TENANT


def key_entry(key: str, key_id: str, tenant: str, role: Role) -> dict[str, str]:
    """The keys-file entry of ``key``."""
    return {"id": key_id, "tenant": tenant, "role": role.value, "sha256": fingerprint(key)}


# --- keeping secrets out of logs ---------------------------------------------------------------------

_SECRET_PATTERNS: Sequence[re.Pattern[str]] = (
    re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{16,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
)


def redact(text: str) -> str:
    """``text`` with anything shaped like an API key or a bearer token replaced."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", text)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner`` and removes API keys from the whole line (message, fields, traceback)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record))

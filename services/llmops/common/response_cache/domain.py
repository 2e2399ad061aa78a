"""Domain objects of the response cache: keys' inputs, entries, outcomes. No proto types here.

The request-side classes (:class:`ResolvedModel`, :class:`Prompt`, :class:`SamplingParams`) mirror
``llmops.common.v1`` field for field, with ``None`` where the proto field is ``optional`` and unset.
The key functions accept any object with these attributes (see :mod:`llmops.common.response_cache.keys`), so
serving hands over its own domain objects unchanged.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from llmops.common.domain import ChatMessage as ChatMessage  # re-exported: shared request types
from llmops.common.domain import Prompt as Prompt
from llmops.common.domain import ResolvedModel as ResolvedModel
from llmops.common.domain import SamplingParams as SamplingParams
from llmops.common.errors import InvalidArgument

#: Registered model names (the registry's rule): they appear in Redis key names, so no ':' can occur.
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
#: Alias names (the registry's rule).
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: Tenants are free text from credentials; bounded so keys stay small.
MAX_TENANT_CHARS = 256


def check_model_name(name: str, field_name: str) -> None:
    """Raise :class:`InvalidArgument` unless ``name`` is a registry model name."""
    if not MODEL_NAME.match(name):
        raise InvalidArgument(
            f"model name must be 1-128 characters from [a-z0-9._-], starting with a letter or digit; got {name!r}",
            field=field_name,
        )


def check_alias(alias: str, field_name: str) -> None:
    """Raise :class:`InvalidArgument` unless ``alias`` is a registry alias name."""
    if not ALIAS_NAME.match(alias):
        raise InvalidArgument(
            f"alias must be 1-64 characters from [a-z0-9_-], starting with a letter; got {alias!r}",
            field=field_name,
        )


def check_tenant(tenant: str, field_name: str) -> None:
    """Raise :class:`InvalidArgument` when ``tenant`` is too long."""
    if len(tenant) > MAX_TENANT_CHARS:
        raise InvalidArgument(f"at most {MAX_TENANT_CHARS} characters", field=field_name)


@dataclass(frozen=True)
class CacheKey:
    """Where an answer lives: its digest, and the model, adapter and tenant that index it.

    ``digest`` is ``""`` when the request cannot be reproduced (sampling without a seed): such a key
    is never looked up or stored (outcome BYPASS).
    """

    model: ResolvedModel
    digest: str
    tenant: str = ""
    adapter: ResolvedModel | None = None

    @property
    def cacheable(self) -> bool:
        return bool(self.digest)


class LookupOutcome(enum.Enum):
    """What a lookup found; the value is the ``result`` label of ``llmops_cache_requests_total``."""

    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"
    ERROR = "error"


class StoreOutcome(enum.Enum):
    """Whether an answer was stored, or why not."""

    STORED = "stored"
    SKIPPED_NONDETERMINISTIC = "skipped_nondeterministic"
    SKIPPED_INCOMPLETE = "skipped_incomplete"
    SKIPPED_TOO_LARGE = "skipped_too_large"
    ERROR = "error"


@dataclass(frozen=True)
class StoredEntry:
    """A stored answer: the payload (a serialized ``GeneratedOutput``) and when it was written."""

    payload: bytes
    stored_at: datetime
    expires_at: datetime | None = None


@dataclass(frozen=True)
class LookupResult:
    """The answer to a lookup; ``entry`` is set on a hit."""

    outcome: LookupOutcome
    digest: str
    entry: StoredEntry | None = None


@dataclass(frozen=True)
class StoreResult:
    """The answer to a store."""

    outcome: StoreOutcome
    digest: str
    expires_at: datetime | None = None


@dataclass(frozen=True)
class InvalidationScope:
    """Which entries to remove: those whose model or adapter is ``model_name``, narrowed by a version
    or an alias (at most one), and by a tenant when ``tenant`` is not ``None``."""

    model_name: str
    version: int | None = None
    alias: str | None = None
    tenant: str | None = None

    def __post_init__(self) -> None:
        check_model_name(self.model_name, "model_name")
        if self.version is not None and self.alias is not None:
            raise InvalidArgument("give a version or an alias, not both", field="scope")
        if self.version is not None and self.version < 1:
            raise InvalidArgument(f"must be >= 1, got {self.version}", field="version")
        if self.alias is not None:
            check_alias(self.alias, "alias")
        if self.tenant is not None:
            check_tenant(self.tenant, "tenant")


@dataclass(frozen=True)
class BackendSizes:
    """What the backend holds now, all tenants."""

    entries: int
    bytes: int


@dataclass(frozen=True)
class CacheStats:
    """Counters of this process since ``since``, and the backend's sizes."""

    hits: int
    misses: int
    bypasses: int
    errors: int
    stores: int
    invalidated: int
    entries: int
    bytes: int
    since: datetime

    @property
    def hit_ratio(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

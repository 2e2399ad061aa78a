"""Bounds on what callers send the registry, and the opaque page tokens it hands out."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass

from llmops.common.errors import InvalidArgument
from llmops.registry.domain import RESERVED_TAG_PREFIXES

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_DESCRIPTION_BYTES = 4096
MAX_TAG_KEY_BYTES = 128
MAX_TAG_VALUE_BYTES = 1024
MAX_REASON_BYTES = 1024
MAX_REQUEST_ID_BYTES = 128
#: Counts, each a row (or an MLflow call) per entry: bounded so one request is bounded work.
MAX_TAGS = 64
MAX_METRICS = 256
MAX_ALIASES = 16
MAX_DOWNLOAD_PATHS = 10_000


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds the service enforces beyond the proto's own."""

    max_artifact_bytes: int = 1 << 40
    source_uri_schemes: tuple[str, ...] = ("file", "s3", "gs", "runs", "models", "mlflow-artifacts")


def check_text(value: str, limit: int, field: str) -> str:
    """``value`` if it fits in ``limit`` UTF-8 bytes, else ``InvalidArgument`` naming ``field``."""
    if len(value.encode()) > limit:
        raise InvalidArgument(f"at most {limit} bytes", field=field)
    return value


def check_tags(tags: Mapping[str, str], field: str = "tags") -> dict[str, str]:
    """Caller tags: at most 64, keys 1-128 bytes outside the reserved prefixes, values at most 1024 bytes."""
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"at most {MAX_TAGS} tags ({len(tags)} given)", field=field)
    for key, value in tags.items():
        if not key or len(key.encode()) > MAX_TAG_KEY_BYTES:
            raise InvalidArgument(f"tag keys must be 1-{MAX_TAG_KEY_BYTES} bytes", field=field)
        if key.startswith(RESERVED_TAG_PREFIXES):
            raise InvalidArgument(
                f"tag key {key!r} uses a reserved prefix {RESERVED_TAG_PREFIXES}", field=field
            )
        check_text(value, MAX_TAG_VALUE_BYTES, f"{field}[{key}]")
    return dict(tags)


def page_size_or_default(size: int) -> int:
    """A page size in [0, 1000], 0 meaning the default of 50."""
    if not 0 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"must be in [0, {MAX_PAGE_SIZE}]", field="page_size")
    return size or DEFAULT_PAGE_SIZE


def encode_token(value: str | int) -> str:
    """An opaque page token holding where the next page starts."""
    return base64.urlsafe_b64encode(json.dumps({"k": value}).encode()).decode()


def decode_token(token: str, kind: type[str] | type[int]) -> str | int | None:
    """The value in a token from :func:`encode_token`; None for the first page."""
    if not token:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))["k"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument("not a token this service issued", field="page_token") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgument("not a token this service issued", field="page_token")
    return value

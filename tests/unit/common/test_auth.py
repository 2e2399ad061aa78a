"""API keys, roles and redaction (pure logic; the runtime's enforcement is in tests/integration).

Invariants: a keys file is parsed strictly (each bad entry named); a key is found by its SHA-256
only; both metadata forms carry a key; every method granted to ``user`` is a real RPC, and admin-only
ones (register, train, quantize, move aliases, load models, the cache) are refused to users;
anything shaped like a key or bearer token is redacted from log lines.
"""

from __future__ import annotations

import logging

import pytest
import yaml

from llmops.common.auth import (
    USER_METHODS,
    Identity,
    KeyBook,
    KeyBookError,
    RedactingFormatter,
    Role,
    authorize,
    fingerprint,
    key_entry,
    key_from_metadata,
    new_key,
    redact,
)
from llmops.common.errors import PermissionDenied
from llmops.proto.cache.v1 import cache_service_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2
from llmops.proto.registry.v1 import registry_service_pb2
from llmops.proto.serving.v1 import serving_service_pb2
from llmops.proto.training.v1 import training_service_pb2

MODULES = (
    registry_service_pb2,
    training_service_pb2,
    quantization_service_pb2,
    serving_service_pb2,
    cache_service_pb2,
)


def _all_methods() -> set[str]:
    return {
        f"{service.full_name}/{method.name}"
        for module in MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_a_book_finds_keys_by_their_hash_and_carries_tenant_limits() -> None:
    key = new_key()
    text = yaml.safe_dump({
        "tenants": {"team-a": {"requests_per_minute": 60}},
        "keys": [key_entry(key, "app", "team-a", Role.USER)],
    })  # fmt: skip
    assert key not in text and fingerprint(key) in text
    identity = KeyBook.parse(text).identify(key)
    assert identity == Identity("app", "team-a", Role.USER, identity.limits if identity else None)  # type: ignore[arg-type]
    assert identity is not None and identity.limits.requests_per_minute == 60
    assert identity.limits.tokens_per_minute is None
    assert KeyBook.parse(text).identify(new_key()) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"keys": [{"id": "a", "tenant": "t", "role": "root", "sha256": "0" * 64}]}, "role must be one of"),
        ({"keys": [{"id": "a", "tenant": "t", "role": "user", "sha256": "abc"}]}, "64 hex digits"),
        (
            {"keys": [{"id": "A B", "tenant": "t", "role": "user", "sha256": "0" * 64}]},
            "id and tenant must match",
        ),
        (
            {"keys": [{"id": "a", "tenant": "t", "role": "user", "sha256": "0" * 64, "key": "x"}]},
            "unknown fields",
        ),
        ({"keys": [{"id": "a", "tenant": "t", "role": "user", "sha256": "0" * 64}] * 2}, "appears twice"),
        ({"tenants": {"t": {"requests_per_minute": 0}}}, "positive integer"),
        ({"tenants": {"t": {"rpm": 5}}}, "unknown fields"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_keys_files_are_refused_with_the_entry_named(document: object, message: str) -> None:
    with pytest.raises(KeyBookError, match=message):
        KeyBook.parse(yaml.safe_dump(document))


def test_keys_travel_as_bearer_tokens_or_x_api_key() -> None:
    assert key_from_metadata([("authorization", "Bearer abc")]) == "abc"
    assert key_from_metadata([("Authorization", b"bearer  abc ")]) == "abc"
    assert key_from_metadata([("x-api-key", "k")]) == "k"
    assert key_from_metadata([("authorization", "Basic abc")]) is None
    assert key_from_metadata([("user-agent", "x")]) is None


def test_users_generate_and_read_admins_do_everything() -> None:
    real = _all_methods()
    assert real >= USER_METHODS  # a typo would silently deny a method
    user, admin = Identity("u", "t", Role.USER), Identity("a", "t", Role.ADMIN)
    for method in sorted(real):
        service, _, name = method.partition("/")
        authorize(admin, service, name)
        if method in USER_METHODS:
            authorize(user, service, name)
        else:
            with pytest.raises(PermissionDenied, match="needs role 'admin'"):
                authorize(user, service, name)
    admin_only = {
        "llmops.registry.v1.RegistryService/RegisterVersion", "llmops.registry.v1.RegistryService/SetAlias",
        "llmops.training.v1.TrainingService/SubmitJob", "llmops.quantization.v1.QuantizationService/SubmitJob",
        "llmops.serving.v1.ServingService/LoadModel", "llmops.cache.v1.CacheService/Lookup",
    }  # fmt: skip
    assert not admin_only & USER_METHODS
    assert "llmops.serving.v1.ServingService/GenerateStream" in USER_METHODS


def test_keys_and_bearer_tokens_are_redacted_from_log_lines() -> None:
    key = new_key()
    assert key not in redact(f"called with {key} and more")
    assert redact("authorization: Bearer abcdefghijkl") == "authorization: Bearer [redacted]"
    assert redact("nothing secret here") == "nothing secret here"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", (key,), None)
    assert key not in RedactingFormatter(logging.Formatter("%(message)s")).format(record)


def test_an_open_platform_has_no_tenant() -> None:
    """Without a keys file, cache entries keep the untenanted key ("") they had before API keys."""
    from llmops.common.auth import OPEN, Authenticator, acting_as, current_tenant

    assert current_tenant() == "" and OPEN.tenant == ""
    identity = Authenticator(None).check(
        [("x-api-key", new_key())], "llmops.serving.v1.ServingService", "Generate"
    )
    assert identity is OPEN
    with acting_as(Identity("a", "team-a", Role.USER)):
        assert current_tenant() == "team-a"

"""Security of the shared gRPC runtime, through real servers on 127.0.0.1 port 0 (the probe service).

Invariants:
* with a keys file, a call without a key or with an unknown key is UNAUTHENTICATED, a ``user`` key
  on an admin-only method is PERMISSION_DENIED naming the role it needs, an ``admin`` key passes;
  ``authorization: Bearer`` and ``x-api-key`` both work; health needs no key; without a keys file
  the runtime is open; a rotated keys file takes effect without a restart;
* a tenant over its requests-per-minute budget gets RESOURCE_EXHAUSTED with a retry delay in the
  status details, counted in a real Redis shared by two servers; with Redis gone the limiter fails
  open, or closed (UNAVAILABLE) when set so;
* TLS and mutual TLS from certificate files (made by the test): a TLS client is served, a
  plaintext one is not; with a client CA, a client without a certificate is refused and the peer's
  certificate identity is what calls are recorded under;
* API keys never reach a log line (captured logs of failing and passing calls are scanned).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmops.cache.redis_server import RedisServer
from llmops.common.auth import RedactingFormatter, Role, key_entry, new_key
from llmops.common.clients import ClientSecurity
from llmops.common.errors import retry_delay_from_metadata
from llmops.common.server import LLMOpsServer, create_server
from llmops.common.settings import Settings
from tests.integration.probe import SERVICE, ProbeApp
from tests.redis_fixture import make_redis_server, redis_server

__all__ = ["make_redis_server", "redis_server"]

ADMIN, USER, LIMITED = new_key(), new_key(), new_key()


def _keys_file(folder: Path, *, limit: int = 3) -> Path:
    path = folder / "keys.yaml"
    book = {
        "tenants": {"team-b": {"requests_per_minute": limit}},
        "keys": [
            key_entry(ADMIN, "ops", "team-a", Role.ADMIN),
            key_entry(USER, "app", "team-a", Role.USER),
            key_entry(LIMITED, "bot", "team-b", Role.ADMIN),
        ],
    }
    path.write_text(yaml.safe_dump(book))
    return path


def _settings(**overrides: object) -> Settings:
    return Settings.model_validate({"grace_seconds": 1.0, "health_poll_seconds": 0.05, **overrides})


async def _server(settings: Settings) -> tuple[LLMOpsServer, int]:
    return await create_server("127.0.0.1:0", ProbeApp().bindings(), settings)


def _echo(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/Echo")


async def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        await call()  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_keys_roles_and_an_open_runtime(tmp_path: Path) -> None:
    server, port = await _server(_settings(api_keys_file=_keys_file(tmp_path)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = _echo(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await echo(b"0", timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key is required" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await echo(b"0", timeout=10, metadata=(("authorization", f"Bearer {new_key()}"),))
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await echo(b"0", timeout=10, metadata=(("x-api-key", USER),))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "role 'user'" in (denied.value.details() or "") and "needs role 'admin'" in (
            denied.value.details() or ""
        )
        assert await echo(b"0", timeout=10, metadata=(("authorization", f"Bearer {ADMIN}"),)) == b"0"
        assert await echo(b"0", timeout=10, metadata=(("x-api-key", ADMIN),)) == b"0"
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key
    await server.stop(0)

    open_server, open_port = await _server(_settings())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{open_port}") as channel:
        assert await _echo(channel)(b"0", timeout=10) == b"0"
    await open_server.stop(0)


async def test_a_rotated_keys_file_takes_effect_without_a_restart(tmp_path: Path) -> None:
    keys = _keys_file(tmp_path)
    server, port = await _server(_settings(api_keys_file=keys))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = _echo(channel)
        assert await echo(b"0", timeout=10, metadata=(("x-api-key", ADMIN),)) == b"0"
        replacement = new_key()
        keys.write_text(yaml.safe_dump({"keys": [key_entry(replacement, "ops2", "team-a", Role.ADMIN)]}))
        os.utime(keys, (keys.stat().st_atime, keys.stat().st_mtime + 10))
        for _ in range(100):  # the file is re-read at most every 5 s
            if (
                await _code(lambda: echo(b"0", timeout=10, metadata=(("x-api-key", ADMIN),)))
                != grpc.StatusCode.OK
            ):
                break
            await asyncio.sleep(0.1)
        assert await _code(lambda: echo(b"0", timeout=10, metadata=(("x-api-key", ADMIN),))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert await echo(b"0", timeout=10, metadata=(("x-api-key", replacement),)) == b"0"
    await server.stop(0)


async def test_tenant_request_budget_is_shared_across_servers_and_fails_open_or_closed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = _settings(api_keys_file=_keys_file(tmp_path, limit=3), redis_url=redis_server.url)
    first, first_port = await _server(settings)
    second, second_port = await _server(settings)
    bot = (("x-api-key", LIMITED),)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first_port}") as a,
        grpc.aio.insecure_channel(f"127.0.0.1:{second_port}") as b,
    ):
        assert await _echo(a)(b"0", timeout=10, metadata=bot) == b"0"
        assert await _echo(b)(b"0", timeout=10, metadata=bot) == b"0"
        assert await _echo(a)(b"0", timeout=10, metadata=bot) == b"0"
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await _echo(b)(b"0", timeout=10, metadata=bot)  # the fourth in a minute, on the other server
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "team-b" in (over.value.details() or "") and "3 requests per minute" in (
            over.value.details() or ""
        )
        delay = retry_delay_from_metadata(over.value.trailing_metadata())
        assert delay is not None and 0 < delay <= 20.5  # one request refills in 20 s
        admin = (("x-api-key", ADMIN),)
        for _ in range(5):  # team-a has no limits
            assert await _echo(a)(b"0", timeout=10, metadata=admin) == b"0"
    await first.stop(0)
    await second.stop(0)

    dead = "redis://127.0.0.1:1/0"
    for fail_open, expected in ((True, grpc.StatusCode.OK), (False, grpc.StatusCode.UNAVAILABLE)):
        server, port = await _server(
            _settings(api_keys_file=_keys_file(tmp_path), redis_url=dead, rate_limit_fail_open=fail_open)
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _code(lambda c=channel: _echo(c)(b"0", timeout=10, metadata=bot)) == expected
        await server.stop(0)


# --- TLS ----------------------------------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(subject), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca_cert, ca_key = _certificate("llmops test CA", None, ca=True)
    files: dict[str, Path] = {"ca": tmp_path / "ca.pem"}
    files["ca"].write_bytes(_pem(ca_cert))
    for who in ("server", "client"):
        cert, key = _certificate(f"{who}.llmops.test", (ca_cert.subject, ca_key))
        files[f"{who}_cert"], files[f"{who}_key"] = tmp_path / f"{who}.pem", tmp_path / f"{who}-key.pem"
        files[f"{who}_cert"].write_bytes(_pem(cert))
        files[f"{who}_key"].write_bytes(_key_pem(key))
    yield files


async def test_tls_and_mutual_tls_from_certificate_files(pki: dict[str, Path]) -> None:
    tls = _settings(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"])
    server, port = await _server(tls)
    target = f"127.0.0.1:{port}"
    secure = ClientSecurity.build(None, pki["ca"]).credentials
    assert secure is not None
    async with grpc.aio.secure_channel(target, secure) as channel:
        assert await _echo(channel)(b"0", timeout=10) == b"0"
    async with grpc.aio.insecure_channel(target) as plain:
        assert await _code(lambda: _echo(plain)(b"0", timeout=3)) == grpc.StatusCode.UNAVAILABLE
    # the chart's exec probe: `llmops probe` over TLS (Kubernetes' own gRPC probes cannot)
    assert await _probe(target, SERVICE, {"LLMOPS_TLS_CA_FILE": str(pki["ca"])}) == 0
    assert await _probe(target, SERVICE, {}) == 1  # plaintext against TLS: not serving
    await server.stop(0)

    mutual = _settings(
        tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]
    )
    server, port = await _server(mutual)
    target = f"127.0.0.1:{port}"
    async with grpc.aio.secure_channel(target, secure) as no_cert:
        assert await _code(lambda: _echo(no_cert)(b"0", timeout=3)) == grpc.StatusCode.UNAVAILABLE
    with_cert = ClientSecurity.build(None, pki["ca"], pki["client_cert"], pki["client_key"]).credentials
    assert with_cert is not None
    async with grpc.aio.secure_channel(target, with_cert) as channel:
        assert await _echo(channel)(b"0", timeout=10) == b"0"
    await server.stop(0)


async def _probe(target: str, service: str, env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmops.cli", "probe", "--address", target, "--service", service, "--timeout", "5",
        env={**clean, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode


async def test_tls_settings_that_cannot_work_are_refused(pki: dict[str, Path]) -> None:
    # On the session's loop: grpc.aio binds to every event loop that touches it and is made for one
    # per process (a second loop from asyncio.run here crashed the interpreter later, in GC).
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        await _server(_settings(tls_cert_file=pki["server_cert"]))
    with pytest.raises(ValueError, match="mutual TLS is TLS first"):
        await _server(_settings(tls_client_ca_file=pki["ca"]))


async def test_a_refused_or_unbindable_server_leaves_no_grpc_server_behind(
    pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings that cannot work are refused before a grpc.aio server exists, and a server that
    cannot bind is stopped before the error reaches the caller. grpc logs a never-started server
    with the server itself as an argument as it frees it: a kept record must hold only text, or the
    next garbage collection walks freed memory (scripts/repro/grpc_second_loop_segfault.py)."""
    caplog.set_level(logging.DEBUG)
    built: list[grpc.aio.Server] = []
    stopped: list[grpc.aio.Server] = []
    make_server = grpc.aio.server

    def recording_server(*args: object, **kwargs: object) -> grpc.aio.Server:
        server = make_server(*args, **kwargs)  # type: ignore[arg-type]
        stop = server.stop

        async def recording_stop(grace: float | None) -> None:
            stopped.append(server)
            await stop(grace)

        server.stop = recording_stop  # type: ignore[method-assign]
        built.append(server)
        return server

    monkeypatch.setattr(grpc.aio, "server", recording_server)
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        await _server(_settings(tls_cert_file=pki["server_cert"]))
    assert built == []

    holder, port = await _server(_settings())
    with pytest.raises((OSError, RuntimeError)):
        await create_server(f"127.0.0.1:{port}", ProbeApp().bindings(), _settings())
    assert len(built) == 2 and stopped == [built[1]]  # the unbindable one, stopped where it was built
    await holder.stop(0)
    built.clear()
    stopped.clear()
    gc.collect()
    freed = [r for r in caplog.records if r.name == "grpc._cython.cygrpc" and "__dealloc__" in r.getMessage()]
    assert freed, "grpc no longer logs a freed, never-started server: revisit the log filter"
    assert all(r.args == () for r in freed)  # text only: nothing points at the freed server


async def test_api_keys_never_reach_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server, port = await _server(_settings(api_keys_file=_keys_file(tmp_path)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        raise_ = channel.unary_unary(f"/{SERVICE}/Raise")
        for key in (ADMIN, USER, new_key()):
            for payload in (b"ok", b"ValueError", b"NotFound"):
                await _code(
                    lambda k=key, p=payload: raise_(
                        p, timeout=10, metadata=(("authorization", f"Bearer {k}"),)
                    )
                )
        logging.getLogger("llmops.test").warning("a careless line with %s in it", ADMIN)
    await server.stop(0)
    formatter = RedactingFormatter(logging.Formatter("%(name)s %(message)s"))
    lines = "\n".join(formatter.format(record) for record in caplog.records)
    assert "unexpected error" in lines  # the ValueError was logged, with its traceback
    assert "[redacted]" in lines  # the careless line was caught
    for key in (ADMIN, USER):
        assert key not in lines and key[len("llmops_") :][:16] not in lines

"""`llmops serve <service> --check` answers whether the service would start, without starting it.

Exit 0 when the arguments, the LLMOPS_* environment and the settings file are accepted and the app
graph builds; exit 2 with a message naming what is wrong otherwise. Nothing binds a port. The chart's
contract test (tests/charts/test_contract.py) runs every rendered container through it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmops.cli import app
from llmops.common.settings import SERVICE_NAMES


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"LLMOPS_DATA_DIR": str(tmp_path / "data"), "LLMOPS_TRAINING_RUNNER": "thread"}


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_each_service_checks_ok_with_defaults(service: str, env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["serve", service, "--port", "50051", "--check"], env=env)
    assert result.exit_code == 0, result.output
    assert f"llmops {service}: settings and app graph OK" in result.output


@pytest.mark.parametrize(
    ("args", "extra_env", "named"),
    [
        (["serve", "serving", "--http-port", "8000"], {}, "--http-port"),
        (["serve", "serving"], {"LLMOPS_SERVING_HTTP_PROT": "8000"}, "LLMOPS_SERVING_HTTP_PROT"),
        (["serve", "serving"], {"LLMOPS_SERVING_MAX_WAITING": "lots"}, "LLMOPS_SERVING_MAX_WAITING"),
        (
            ["serve", "serving", "--model", "llm@champion"],
            {"LLMOPS_SERVING_ENGINE_OPTIONS": '{"tensor_parallel": 2}'},
            "tensor_parallel",
        ),
        (["serve", "nosuch"], {}, "nosuch"),
        (["serve", "registry"], {"LLMOPS_TLS_CERT_FILE": "/nonexistent/tls.crt"}, "tls"),
        (["serve", "cache", "--model", "x"], {}, "--model"),
    ],
)
def test_what_would_stop_start_up_exits_2_naming_it(
    args: list[str], extra_env: dict[str, str], named: str, env: dict[str, str]
) -> None:
    result = CliRunner().invoke(app, [*args, "--check"], env=env | extra_env)
    assert result.exit_code == 2, result.output
    assert named.lower() in result.output.lower(), result.output


def test_a_settings_file_is_read(tmp_path: Path, env: dict[str, str]) -> None:
    config = tmp_path / "llmops.yaml"
    config.write_text("serving:\n  max_waiting: 0\n")
    result = CliRunner().invoke(app, ["serve", "serving", "--config", str(config), "--check"], env=env)
    assert result.exit_code == 2, result.output
    assert "max_waiting" in result.output
    config.write_text("serving:\n  max_waiting: 7\n")
    result = CliRunner().invoke(app, ["serve", "serving", "--config", str(config), "--check"], env=env)
    assert result.exit_code == 0, result.output

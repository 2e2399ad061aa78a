"""Settings: defaults, file, environment; typos and bad values stop start-up naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmops.common.settings import SERVICE_NAMES, Settings, SettingsError


def test_defaults_give_each_service_its_own_ports() -> None:
    settings = Settings.load(env={})
    ports = {settings.section(s).port for s in SERVICE_NAMES}
    metrics = {settings.section(s).metrics_port for s in SERVICE_NAMES}
    assert len(ports) == len(SERVICE_NAMES) and len(metrics) == len(SERVICE_NAMES)
    assert settings.registry.address == f"127.0.0.1:{settings.registry.port}"


def test_environment_overrides_top_level_and_sections() -> None:
    settings = Settings.load(
        env={
            "LLMOPS_GRACE_SECONDS": "7.5",
            "LLMOPS_SERVING_ENGINE": "transformers",
            "LLMOPS_CACHE_ADDRESS": "cache:50051",
            "LLMOPS_REGISTRY_PORT": "6000",
            "UNRELATED": "x",
        }
    )
    assert settings.grace_seconds == 7.5
    assert settings.serving.engine == "transformers"
    assert settings.cache.address == "cache:50051"
    assert settings.registry.port == 6000 and settings.registry.address == "127.0.0.1:6000"
    assert settings.registry.metrics_port == 9101  # the rest of the section keeps its defaults


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "llmops.yaml"
    path.write_text("log_level: DEBUG\ngrace_seconds: 3\nserving:\n  max_waiting: 9\n")
    settings = Settings.load(env={"LLMOPS_CONFIG_FILE": str(path), "LLMOPS_GRACE_SECONDS": "4"})
    assert settings.log_level == "DEBUG"
    assert settings.grace_seconds == 4
    assert settings.serving.max_waiting == 9
    assert Settings.from_file(path).grace_seconds == 3


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLMOPS_GRACE_SECONDS": "soon"}, "LLMOPS_GRACE_SECONDS"),
        ({"LLMOPS_MAX_MESSAGE_BYTES": "12"}, "LLMOPS_MAX_MESSAGE_BYTES"),
        ({"LLMOPS_SERVING_ENGINE": "magic"}, "LLMOPS_SERVING_ENGINE"),
        ({"LLMOPS_LOG_LEVEL": "LOUD"}, "LLMOPS_LOG_LEVEL"),
        ({"LLMOPS_GRACE_SECOND": "1"}, "unknown setting LLMOPS_GRACE_SECOND"),
        ({"LLMOPS_SERVING_MODLE": "x"}, "unknown setting LLMOPS_SERVING_MODLE"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.load(env=env)


def test_file_typo_and_bad_value_name_the_key(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("serving:\n  engien: vllm\n")
    with pytest.raises(SettingsError, match=r"typo.yaml: serving.engien: Extra inputs"):
        Settings.from_file(typo)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grace_seconds: -1\n")
    with pytest.raises(SettingsError, match="grace_seconds"):
        Settings.from_file(bad)
    with pytest.raises(SettingsError, match="not valid YAML"):
        (tmp_path / "broken.yaml").write_text("a: [")
        Settings.from_file(tmp_path / "broken.yaml")
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.from_file(tmp_path / "missing.yaml")


def test_settings_are_frozen() -> None:
    settings = Settings.load(env={})
    with pytest.raises(Exception, match="frozen"):
        settings.grace_seconds = 1  # type: ignore[misc]

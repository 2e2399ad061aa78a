"""Settings for every llmops process: one pydantic model, read once in ``main()``.

Values come from (lowest to highest priority) the defaults here, a YAML file (``from_file`` or the
``LLMOPS_CONFIG_FILE`` variable), and ``LLMOPS_*`` environment variables. A top-level field ``x`` is
``LLMOPS_X``; a field ``y`` of the section ``serving`` is ``LLMOPS_SERVING_Y``. Unknown keys in the
file and unknown ``LLMOPS_*`` variables are rejected as typos, and a bad value stops start-up with a
:class:`SettingsError` that names the variable or key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "LLMOPS_"
#: ``LLMOPS_`` variables that are read elsewhere, not settings fields.
NON_SETTINGS_ENV = frozenset({"LLMOPS_CONFIG_FILE", "LLMOPS_TINY_MODEL_CACHE"})

ServiceName = Literal["registry", "training", "quantization", "serving", "cache"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("registry", "training", "quantization", "serving", "cache")


class SettingsError(ValueError):
    """A setting is missing, unknown or has a bad value; the message names it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class ServiceEndpoint(_Model):
    """Where a service listens by default, and where its clients reach it."""

    port: int = Field(description="gRPC port this service binds when it is started (0 picks a free one).")
    metrics_port: int = Field(description="HTTP port of /metrics (0 picks a free one).")
    address: str = Field(description="host:port clients use to reach this service.")


class RegistrySection(ServiceEndpoint):
    """Registry service settings."""


class TrainingSection(ServiceEndpoint):
    """Training service settings."""


class QuantizationSection(ServiceEndpoint):
    """Quantization service settings."""


class ServingSection(ServiceEndpoint):
    """Serving service settings."""

    http_port: int = Field(default=8000, description="Port of the OpenAI-compatible HTTP API.")
    model: str | None = Field(default=None, description="Model to load at start: name@alias or name:version.")
    engine: Literal["vllm", "transformers", "tensorrt_llm"] = Field(
        default="vllm", description="Engine used for models loaded without an explicit engine."
    )
    max_waiting: int = Field(
        default=256,
        ge=1,
        description="Queued requests per model beyond which new ones get RESOURCE_EXHAUSTED.",
    )


class CacheSection(ServiceEndpoint):
    """Cache service settings."""


def _section(cls: type[ServiceEndpoint], port: int, metrics_port: int) -> Any:
    return Field(
        default_factory=lambda: cls(port=port, metrics_port=metrics_port, address=f"127.0.0.1:{port}"),
        description=f"{cls.__doc__}",
    )


class Settings(_Model):
    """Everything a process of the platform can be configured with."""

    host: str = Field(default="0.0.0.0", description="Interface the gRPC and metrics servers bind.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    log_format: Literal["json", "console"] = Field(default="console", description="Log line format.")
    grace_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="How long a stopping server lets in-flight calls finish."
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest gRPC message accepted or sent, in bytes.",
    )
    max_concurrent_rpcs: int | None = Field(
        default=None, ge=1, description="Calls served at once; beyond it callers get RESOURCE_EXHAUSTED."
    )
    health_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often readiness checks run to update grpc.health.v1."
    )
    data_dir: Path = Field(default=Path(".llmops"), description="Folder for local state (SQLite, artifacts).")
    model_cache_dir: Path | None = Field(default=None, description="Where served models are unpacked.")
    redis_url: str | None = Field(default=None, description="redis://host:port/db of the cache and limits.")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking/registry store URI.")
    mlflow_artifact_root: str | None = Field(default=None, description="MLflow artifact root (file or s3).")
    ray_address: str | None = Field(
        default=None, description="Ray cluster address; unset starts a local one."
    )
    api_keys_file: Path | None = Field(default=None, description="YAML file of hashed API keys.")
    registry: RegistrySection = _section(RegistrySection, 50051, 9101)
    training: TrainingSection = _section(TrainingSection, 50052, 9102)
    quantization: QuantizationSection = _section(QuantizationSection, 50053, 9103)
    serving: ServingSection = _section(ServingSection, 50054, 9104)
    cache: CacheSection = _section(CacheSection, 50055, 9105)

    def section(self, service: ServiceName) -> ServiceEndpoint:
        """The endpoint section of one service."""
        section: ServiceEndpoint = getattr(self, service)
        return section

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, config_file: Path | str | None = None) -> Settings:
        """Build settings from a file and ``LLMOPS_*`` variables; call once, in ``main()``.

        Args:
            env: the environment to read (``os.environ`` when omitted).
            config_file: a YAML file; when omitted, ``LLMOPS_CONFIG_FILE`` names one if set.

        Raises:
            SettingsError: naming each unknown or bad variable or key.
        """
        env = os.environ if env is None else env
        config_file = config_file or env.get("LLMOPS_CONFIG_FILE")
        data: dict[str, Any] = _read_file(Path(config_file)) if config_file else {}
        sources: dict[tuple[str, ...], str] = {}
        for var, raw in sorted(env.items()):
            if not var.startswith(ENV_PREFIX) or var in NON_SETTINGS_ENV:
                continue
            path = _env_path(var)
            if path is None:
                raise SettingsError(f"unknown setting {var}: no such field (check the spelling)")
            target = data
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = _parse_env_value(raw)
            sources[path] = var
        return cls._validate(data, sources, str(config_file) if config_file else None)

    @classmethod
    def from_file(cls, path: Path | str) -> Settings:
        """Settings from a YAML file alone (no environment)."""
        return cls._validate(_read_file(Path(path)), {}, str(path))

    @classmethod
    def _validate(
        cls, data: dict[str, Any], sources: dict[tuple[str, ...], str], file: str | None
    ) -> Settings:
        # Fill section defaults before validation so partial sections keep their per-service ports.
        for service in SERVICE_NAMES:
            if service in data and isinstance(data[service], dict):
                default = cls.model_fields[service].get_default(call_default_factory=True)
                merged = default.model_dump()
                merged.update(data[service])
                if "port" in data[service] and "address" not in data[service]:
                    merged["address"] = f"127.0.0.1:{data[service]['port']}"
                data[service] = merged
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = tuple(str(part) for part in err["loc"])
                where = sources.get(loc) or (f"{file}: {'.'.join(loc)}" if file else ".".join(loc))
                value = (
                    f" (got {err['input']!r})"
                    if "input" in err and not isinstance(err["input"], dict)
                    else ""
                )
                problems.append(f"{where}: {err['msg']}{value}")
            raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None


def _env_path(var: str) -> tuple[str, ...] | None:
    name = var[len(ENV_PREFIX) :].lower()
    for service in SERVICE_NAMES:
        prefix = service + "_"
        if name.startswith(prefix):
            field = name[len(prefix) :]
            section_cls = Settings.model_fields[service].annotation
            if isinstance(section_cls, type) and field in section_cls.model_fields:
                return (service, field)
    if name in Settings.model_fields and name not in SERVICE_NAMES:
        return (name,)
    return None


def _parse_env_value(raw: str) -> Any:
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    return loaded

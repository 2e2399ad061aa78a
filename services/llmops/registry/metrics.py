"""Prometheus metrics of the registry (names from :mod:`llmops.common.metric_names`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from llmops.common import metric_names as names


class RegistryMetrics:
    """Versions registered by format, artifact bytes moved by direction, verification failures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.versions_registered = Counter(
            names.REGISTRY_VERSIONS_REGISTERED_TOTAL,
            "Model versions registered READY, by format (safetensors | adapter | gguf).",
            ["format"],
            registry=registry,
        )
        self.artifact_bytes = Counter(
            names.REGISTRY_ARTIFACT_BYTES_TOTAL,
            "Artifact bytes received (upload) and sent (download).",
            ["direction"],
            registry=registry,
        )
        self.verification_failures = Counter(
            names.REGISTRY_VERIFICATION_FAILURES_TOTAL,
            "Checksum mismatches: uploads that disagree with their summary, downloads of corrupt files.",
            registry=registry,
        )
        for direction in ("upload", "download"):
            self.artifact_bytes.labels(direction)
        for fmt in ("safetensors", "adapter", "gguf"):
            self.versions_registered.labels(fmt)

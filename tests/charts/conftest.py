"""Shared fixtures of the chart checks: the chart rendered once per values set, and the tools.

Tools missing on a developer's machine skip the tests that need them, with the reason; in CI (the
``CI`` variable set) a missing tool fails them, so a green CI run has really run every check.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmops"
INFRA = ROOT / "infra"
RELEASE = "prod"
NAMESPACE = "llmops"
KUBE_VERSIONS = ("1.29.0", "1.32.0")
#: Custom resource APIs the chart renders, as `helm template --api-versions` announces them.
API_VERSIONS = ("monitoring.coreos.com/v1", "ray.io/v1", "keda.sh/v1alpha1")
#: Values sets every rendered-object test runs on: the defaults and each file in charts/llmops/ci/.
VALUES_SETS: dict[str, Path | None] = {"defaults": None} | {
    path.stem: path for path in sorted((CHART / "ci").glob("*.yaml"))
}
LLMOPS_SERVICES = ("registry", "training", "quantization", "serving", "cache", "router")

Doc = dict[str, Any]


def require_module(name: str) -> ModuleType:
    """Import a Python module; missing in CI is a failure, elsewhere a skip with the reason."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        message = f"Python module {name} is not installed (run `make setup`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def metric_names() -> ModuleType:
    """``llmops.common.metric_names``: from the installed package, else from its file (stdlib only)."""
    try:
        return importlib.import_module("llmops.common.metric_names")
    except ModuleNotFoundError:
        path = ROOT / "services" / "llmops" / "common" / "metric_names.py"
        spec = importlib.util.spec_from_file_location("llmops_metric_names", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def helm_template(
    helm: str,
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    kube_version: str = KUBE_VERSIONS[-1],
    release: str = RELEASE,
) -> subprocess.CompletedProcess[str]:
    """Run ``helm template`` on the chart; the caller checks the return code."""
    command = [
        helm,
        "template",
        release,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
    ]
    for api in API_VERSIONS:
        command += ["--api-versions", api]
    for path in values:
        command += ["-f", str(path)]
    for item in sets:
        command += ["--set", item]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def render(helm: str, values: Sequence[Path] = (), sets: Sequence[str] = (), **kwargs: Any) -> Rendered:
    """Rendered objects of the chart; fails the test with helm's message when rendering fails."""
    result = helm_template(helm, values, sets, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"helm template {' '.join(map(str, values))} {' '.join(sets)} failed:\n{result.stderr}")
    return Rendered([doc for doc in yaml.safe_load_all(result.stdout) if doc])


def labels_match(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) selects ``labels``."""
    if not selector:
        return True
    match_labels = selector.get("matchLabels") or {}
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class PodTemplate:
    """A pod template found in a rendered object (a Deployment's, a Ray worker group's, a test Pod)."""

    owner_kind: str
    owner_name: str
    role: str
    template: Doc

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.template.get("metadata", {}).get("labels") or {}
        return labels

    @property
    def spec(self) -> Doc:
        spec: Doc = self.template["spec"]
        return spec

    @property
    def containers(self) -> list[Doc]:
        return list(self.spec.get("initContainers") or []) + list(self.spec["containers"])

    @property
    def where(self) -> str:
        return f"{self.owner_kind}/{self.owner_name} ({self.role})"

    def container_ports(self) -> dict[str | int, int]:
        """Container ports by name and by number -> number."""
        ports: dict[str | int, int] = {}
        for container in self.spec["containers"]:
            for port in container.get("ports") or []:
                ports[port["containerPort"]] = port["containerPort"]
                if "name" in port:
                    ports[port["name"]] = port["containerPort"]
        return ports


@dataclass
class Rendered:
    """The objects one ``helm template`` run produced."""

    docs: list[Doc]
    _pods: list[PodTemplate] = field(default_factory=list, init=False)

    def of_kind(self, kind: str) -> list[Doc]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"no {kind} named {name}; have {[d['metadata']['name'] for d in self.of_kind(kind)]}")

    def names(self, kind: str) -> set[str]:
        return {doc["metadata"]["name"] for doc in self.of_kind(kind)}

    def pod_templates(self) -> list[PodTemplate]:
        if not self._pods:
            self._pods = list(self._find_pod_templates())
        return self._pods

    def _find_pod_templates(self) -> Iterator[PodTemplate]:
        for doc in self.docs:
            kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec") or {}
            if kind in ("Deployment", "StatefulSet"):
                yield PodTemplate(kind, name, "pods", spec["template"])
            elif kind == "Pod":
                yield PodTemplate(kind, name, "pod", {"metadata": doc["metadata"], "spec": spec})
            elif kind in ("RayCluster", "RayService"):
                cluster = spec if kind == "RayCluster" else spec["rayClusterConfig"]
                yield PodTemplate(kind, name, "head", cluster["headGroupSpec"]["template"])
                for group in cluster.get("workerGroupSpecs") or []:
                    yield PodTemplate(kind, name, f"worker group {group['groupName']}", group["template"])

    def pods_selected_by(self, selector: dict[str, Any] | None) -> list[PodTemplate]:
        return [pod for pod in self.pod_templates() if labels_match(selector, pod.labels)]

    def serving_deployments(self) -> list[Doc]:
        return [
            doc
            for doc in self.of_kind("Deployment")
            if doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "serving"
        ]


def values_file(name: str) -> Path:
    """The file of a values set from charts/llmops/ci/ (not the defaults)."""
    path = VALUES_SETS[name]
    assert path is not None, f"{name} has no file"
    return path


def load_values(name: str) -> Doc:
    """The chart's values merged with one values set (shallow merge is enough for what tests read)."""
    values: Doc = yaml.safe_load((CHART / "values.yaml").read_text())
    path = VALUES_SETS[name]
    if path is not None:
        _deep_merge(values, yaml.safe_load(path.read_text()) or {})
    return values


def serving_pools(values: Doc) -> dict[str, Doc]:
    """``serving.models`` as the chart's ``llmops.servingPools`` flattens them, by :func:`pool_key`: a
    pool's fields over its entry's (maps merged), ``model`` the reference it serves."""
    pools: dict[str, Doc] = {}
    for entry in values["serving"]["models"]:
        if not entry.get("pools"):
            pools[entry["name"]] = dict(entry)
            continue
        for pool in entry["pools"]:
            unit = {k: v for k, v in entry.items() if k not in ("pools", "model")}
            _deep_merge(unit, {k: v for k, v in pool.items() if k not in ("alias", "version")})
            version = pool.get("version")
            unit["model"] = (
                f"{entry['model']}:{version}" if version not in (None, "") else
                f"{entry['model']}@{pool.get('alias') or pool['name']}"
            )  # fmt: skip
            unit["name"], unit["pool"] = f"{entry['name']}-{pool['name']}", pool["name"]
            pools[unit["name"]] = unit
    return pools


def pool_key(labels: dict[str, str]) -> str:
    """The :func:`serving_pools` key of an object carrying llmops.io/model (and llmops.io/pool) labels."""
    pool = labels.get("llmops.io/pool")
    return f"{labels['llmops.io/model']}-{pool}" if pool else labels["llmops.io/model"]


def _deep_merge(base: Doc, override: Doc) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


@pytest.fixture(scope="session")
def helm() -> str:
    return require_tool("helm")


@pytest.fixture(scope="session")
def renders(helm: str) -> dict[str, Rendered]:
    """The chart rendered with every values set, once per session."""
    return {name: render(helm, [path] if path else []) for name, path in VALUES_SETS.items()}

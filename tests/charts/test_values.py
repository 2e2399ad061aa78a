"""The chart's values are checked before anything is deployed, and documented.

Invariants: `helm lint --strict` passes on the defaults and every charts/llmops/ci/ values file;
values.schema.json rejects a misspelt key or a wrong type at any depth (so `helm install` fails
instead of silently ignoring it) and every object in it forbids unknown keys; contradictory values
fail with a message naming them; every key in values.yaml is documented by a `# --` comment on
itself or on the map that holds it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.conftest import CHART, KUBE_VERSIONS, VALUES_SETS, helm_template


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_helm_lint_strict(helm: str, name: str, kube_version: str) -> None:
    path = VALUES_SETS[name]
    command = [helm, "lint", "--strict", "--kube-version", kube_version, str(CHART)]
    if path is not None:
        command += ["-f", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("servng.enabled=true", "servng"),  # top level
        ("serving.autoscaling.hpa.targetAverageValu=2", "targetAverageValu"),  # deep
        ("serving.gpu.cuont=2", "cuont"),
        ("registry.resources.requests.memroy=1Gi", "memroy"),  # resource names are checked too
        ("serving.autoscaling.mode=kda", "mode"),  # enum
        ("registry.replicaCount=two", "replicaCount"),  # type
        ("serving.models[0].name=Chat_Model", "name"),  # DNS label
        ("registry.env.not-a-variable=1", "env"),
        ("raycluster.gpuWorkers.tolerations[0].opertor=Exists", "opertor"),
        ("networkPolicy.servingPeers[0].podSelectr.matchLabels.a=b", "podSelectr"),
        # one writer per job store: a second training or quantization pod would run jobs twice
        ("training.replicaCount=2", "replicaCount"),
        ("quantization.replicaCount=2", "replicaCount"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(helm: str, setting: str, complaint: str) -> None:
    result = helm_template(helm, sets=[setting])
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr


_TWO_MODELS_NAMED_A = """
serving:
  models:
    - {name: a, model: x@champion, minReplicas: 1, maxReplicas: 2}
    - {name: a, model: y@champion, minReplicas: 1, maxReplicas: 2}
"""


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        (_TWO_MODELS_NAMED_A, "appears twice"),
        (
            "serving: {models: [{name: a, model: x@champion, minReplicas: 3, maxReplicas: 2}]}",
            "above maxReplicas",
        ),
        (
            "serving: {models: [{name: a, model: x@champion, minReplicas: 0, maxReplicas: 2}]}",
            "needs autoscaling.mode keda",
        ),
        (
            "serving: {autoscaling: {mode: keda}, models: [{name: a, model: x@champion, minReplicas: 0, maxReplicas: 2}]}",
            "needs router.enabled",
        ),
        ("serving: {models: []}", "serving.models is empty"),
        ("redis: {enabled: false}", "cache.enabled needs Redis"),
        ("mlflow: {replicaCount: 2}", "external backend store"),
        (
            "mlflow: {replicaCount: 2, backendStore: {uri: 'postgresql://db/mlflow'}}",
            "shared artifact storage",
        ),
    ],
)
def test_contradictory_values_fail_with_a_message_naming_them(
    helm: str, tmp_path: Path, overrides: str, complaint: str
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(overrides)
    result = helm_template(helm, values=[values])
    assert result.returncode != 0
    assert complaint in result.stderr


def _objects(schema: Any, path: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            found.append((path, schema))
        for key, value in schema.items():
            found += _objects(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found += _objects(value, f"{path}/{index}")
    return found


def test_every_object_in_the_schema_forbids_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    objects = _objects(schema)
    assert len(objects) > 40
    open_objects = [path for path, obj in objects if obj.get("additionalProperties") is not False]
    assert open_objects == [], f"objects that accept any key: {open_objects}"


def test_schema_accepts_the_defaults_as_they_are() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def _undocumented(lines: list[str]) -> list[str]:
    """Keys of values.yaml with no `# --` comment on themselves or on a map that holds them."""
    missing: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    documented_next = False
    content = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    position = -1
    for raw in lines:
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            position += 1
        if stripped.startswith("# --"):
            documented_next = True
            continue
        if stripped.startswith("#"):
            continue  # continuation lines of a comment
        if not stripped:
            documented_next = False
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if stripped.startswith("- ") or ":" not in stripped:
            documented_next = False
            continue  # list items belong to the documented key above them
        key = stripped.split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inherited = any(doc for _, _, doc in stack)
        following = content[position + 1] if position + 1 < len(content) else ""
        # A value on the key's line, or a list below it, is a value that needs its own documentation.
        is_leaf = stripped.split(":", 1)[1].strip() != "" or following.startswith("- ")
        if is_leaf and not (documented_next or inherited):
            missing.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, documented_next or inherited))
        documented_next = False
    return missing


def test_every_value_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert _undocumented(lines) == []
    assert _undocumented(["a:", "  b: 1"]) == ["a.b"], "the check itself must catch a bare key"
    assert _undocumented(["a:", "  - 1"]) == ["a"], "and a bare list"
    assert _undocumented(["# -- documented", "a:", "  b: 1", "  c:", "    - 2"]) == []


def test_ci_values_files_say_what_they_cover() -> None:
    for path in sorted((CHART / "ci").glob("*.yaml")):
        first = Path(path).read_text().splitlines()[0]
        assert first.startswith("# "), f"{path.name} should open with a comment saying what it covers"

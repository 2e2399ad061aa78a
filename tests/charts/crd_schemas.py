"""The operators' own CRD schemas (vendored under tests/charts/crds/) as JSON Schema validators.

A CRD's ``openAPIV3Schema`` is a structural schema with Kubernetes extensions; this turns it into
JSON Schema the way the API server applies it with strict field validation (``kubectl apply
--validate=strict``): an object that lists its properties rejects any other field unless it says
``x-kubernetes-preserve-unknown-fields``; ``x-kubernetes-int-or-string`` takes either; ``nullable``
allows null. CEL rules (``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

CRDS = Path(__file__).resolve().parent / "crds"

#: (apiVersion, kind) -> vendored file, for every custom resource the chart renders.
CRD_FILES: dict[tuple[str, str], str] = {
    ("ray.io/v1", "RayCluster"): "rayclusters.ray.io.json",
    ("ray.io/v1", "RayService"): "rayservices.ray.io.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors.monitoring.coreos.com.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules.monitoring.coreos.com.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects.keda.sh.json",
}


def to_json_schema(node: Any) -> Any:
    """One structural-schema node as strict JSON Schema (draft 4, as OpenAPI 3.0 is)."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "example"):
            continue
        elif key == "pattern" and "(?i)" in value[1:]:
            # Go's RE2 takes flags anywhere; Python's re only at the start
            out[key] = "(?i)" + value.replace("(?i)", "")
        else:
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "properties" in node  # a bare object (metadata, a template's metadata) is ObjectMeta
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and not node.get("x-kubernetes-embedded-resource")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def vendored(api_version: str, kind: str) -> dict[str, Any]:
    """The vendored file of a custom resource: group, kind, version and openAPIV3Schema."""
    data: dict[str, Any] = json.loads((CRDS / CRD_FILES[(api_version, kind)]).read_text())
    assert f"{data['group']}/{data['version']}" == api_version and data["kind"] == kind
    return data


@functools.cache
def validator(api_version: str, kind: str) -> Any:
    """A jsonschema validator of whole objects (apiVersion, kind, metadata, spec) of that kind."""
    import jsonschema

    schema = to_json_schema(vendored(api_version, kind)["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def problems(doc: dict[str, Any]) -> list[str]:
    """What the operator's CRD refuses in a rendered object, one line each."""
    errors = validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    return sorted(f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)

"""Every object the chart renders is one Kubernetes 1.29 and 1.32 accept, on every values set.

Built-in kinds are validated strictly (unknown fields rejected) against the schemas that
kubernetes-validate bundles. Custom resources have no bundled schema, so each is checked against
the fields its operator's CRD defines (ServiceMonitor, PrometheusRule, RayCluster, RayService,
ScaledObject); the pod templates inside RayClusters and RayServices, and the HPA behaviour inside
ScaledObjects, are validated strictly as the built-in objects they become. Any other kind, such as
a misspelt apiVersion, fails.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.charts.conftest import KUBE_VERSIONS, VALUES_SETS, Doc, render, require_module, values_file

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


_LABEL_SELECTOR = _obj({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}})
_RAY_START_PARAMS = _STR_MAP  # KubeRay passes each as `--key=value`: values must be strings
_WORKER_GROUP = _obj(
    {"groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
     "rayStartParams": _RAY_START_PARAMS, "template": _OBJ},
    ("groupName", "minReplicas", "maxReplicas", "template"),
)  # fmt: skip
_RAY_CLUSTER_SPEC = _obj(
    {
        "rayVersion": _STR,
        "enableInTreeAutoscaling": _BOOL,
        "autoscalerOptions": _obj({
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": _INT, "image": _STR, "imagePullPolicy": _STR, "resources": _OBJ,
            "env": {"type": "array"}, "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
            "securityContext": _OBJ,
        }),
        "headGroupSpec": _obj(
            {"rayStartParams": _RAY_START_PARAMS, "template": _OBJ, "serviceType": _STR}, ("template",)
        ),
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
    ("headGroupSpec",),
)  # fmt: skip

#: The fields of each custom resource's spec that its CRD defines, as far as the chart uses them.
CRD_SPECS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _obj(
        {
            "jobLabel": _STR,
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _obj({"matchNames": {"type": "array", "items": _STR}, "any": _BOOL}),
            "endpoints": {"type": "array", "minItems": 1, "items": _obj({
                "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https"]},
                "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": _BOOL,
            }, ("port",))},
        },
        ("selector", "endpoints"),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _obj(
        {"groups": {"type": "array", "minItems": 1, "items": _obj({
            "name": _STR, "interval": _DURATION,
            "rules": {"type": "array", "minItems": 1, "items": {
                "oneOf": [
                    _obj({"record": _STR, "expr": _STR, "labels": _STR_MAP}, ("record", "expr")),
                    _obj({"alert": _STR, "expr": _STR, "for": _DURATION, "labels": _STR_MAP,
                          "annotations": _STR_MAP}, ("alert", "expr")),
                ]}},
        }, ("name", "rules"))}},
        ("groups",),
    ),
    ("ray.io/v1", "RayCluster"): _RAY_CLUSTER_SPEC,
    ("ray.io/v1", "RayService"): _obj(
        {"serveConfigV2": _STR, "rayClusterConfig": _RAY_CLUSTER_SPEC}, ("serveConfigV2", "rayClusterConfig")
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _obj(
        {
            "scaleTargetRef": _obj({"apiVersion": _STR, "kind": _STR, "name": _STR}, ("name",)),
            "minReplicaCount": _INT, "maxReplicaCount": _INT, "pollingInterval": _INT, "cooldownPeriod": _INT,
            "advanced": _obj({"horizontalPodAutoscalerConfig": _obj({"name": _STR, "behavior": _OBJ})}),
            "triggers": {"type": "array", "minItems": 1, "items": _obj({
                "type": _STR, "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "metadata": _STR_MAP,  # KEDA reads trigger metadata as strings only
            }, ("type", "metadata"))},
        },
        ("scaleTargetRef", "triggers"),
    ),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _parse_each_bundled_schema_once() -> Iterator[None]:
    """kubernetes-validate reads a 1.3 MB definitions file per object; read each file once instead."""
    kubernetes_validate = require_module("kubernetes_validate")
    with pytest.MonkeyPatch.context() as patch:
        cached = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)
        patch.setattr(kubernetes_validate.utils, "schema_contents", cached)
        yield


def _embedded_builtins(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """Built-in objects a custom resource turns into, wrapped so that Kubernetes' schemas apply."""
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    if doc["kind"] in ("RayCluster", "RayService"):
        cluster = spec if doc["kind"] == "RayCluster" else spec["rayClusterConfig"]
        groups = [("head", cluster["headGroupSpec"])] + [
            (g["groupName"], g) for g in cluster["workerGroupSpecs"]
        ]
        for group_name, group in groups:
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{group_name}"},
                        "template": group["template"]}  # fmt: skip
            yield f"{group_name} pod template", template
        autoscaler = cluster["autoscalerOptions"]
        container = {"name": "autoscaler", "image": "x"} | {
            k: autoscaler[k]
            for k in ("resources", "env", "securityContext", "imagePullPolicy")
            if k in autoscaler
        }
        yield "autoscaler container", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "autoscaler"},
                                       "spec": {"containers": [container]}}  # fmt: skip
    if doc["kind"] == "ScaledObject":
        hpa = spec["advanced"]["horizontalPodAutoscalerConfig"]
        yield "HPA behaviour", {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": hpa["name"]},
            "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": spec["maxReplicaCount"],
                     "behavior": hpa["behavior"]},
        }  # fmt: skip


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_rendered_objects_match_kubernetes_schemas(helm: str, name: str, kube_version: str) -> None:
    kubernetes_validate = require_module("kubernetes_validate")
    jsonschema = require_module("jsonschema")
    path = VALUES_SETS[name]
    rendered = render(helm, [path] if path else [], kube_version=kube_version)
    problems: list[str] = []
    custom = 0
    for doc in rendered.docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SPECS:
            custom += 1
            errors = sorted(jsonschema.Draft202012Validator(CRD_SPECS[key]).iter_errors(doc["spec"]), key=str)
            problems += [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
            checks = list(_embedded_builtins(doc))
        else:
            checks = [("", doc)]
        for what, obj in checks:
            try:
                kubernetes_validate.validate(copy.deepcopy(obj), kube_version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(
                    f"{where} {what}: no schema for {obj['apiVersion']} {obj['kind']} in {kube_version}"
                )
            except kubernetes_validate.ValidationError as error:
                field = ".".join(map(str, error.path))
                problems.append(f"{where} {what}: {field}: {error.message}")
    assert not problems, "\n".join(problems)
    if name == "defaults":
        assert custom >= 3, "the defaults render a ServiceMonitor, a PrometheusRule and a RayCluster"


def test_the_crd_checks_catch_mistakes() -> None:
    jsonschema = require_module("jsonschema")
    monitor = {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "15s"}]}
    assert list(jsonschema.Draft202012Validator(CRD_SPECS[("monitoring.coreos.com/v1", "ServiceMonitor")])
                .iter_errors(monitor))  # fmt: skip
    trigger = {
        "scaleTargetRef": {"name": "x"},
        "triggers": [{"type": "prometheus", "metadata": {"threshold": 4}}],
    }
    assert list(jsonschema.Draft202012Validator(CRD_SPECS[("keda.sh/v1alpha1", "ScaledObject")])
                .iter_errors(trigger))  # fmt: skip


def test_ray_service_serve_config_is_a_serve_application(helm: str) -> None:
    rendered = render(helm, [values_file("rayservice-values")])
    [service] = rendered.of_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert set(config) == {"proxy_location", "http_options", "grpc_options", "applications"}
    [app] = config["applications"]
    assert set(app) == {"name", "route_prefix", "import_path", "args"}
    assert app["args"]["min_replicas"] <= app["args"]["max_replicas"]
    assert config["grpc_options"]["grpc_servicer_functions"], "Serve's gRPC proxy needs the servicer"

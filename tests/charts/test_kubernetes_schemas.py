"""Every object the chart renders is one Kubernetes 1.29 and 1.32 accept, on every values set.

Built-in kinds are validated strictly (unknown fields rejected) against the schemas that
kubernetes-validate bundles. Custom resources have no bundled schema, so each is checked against
its operator's real CRD, vendored under tests/charts/crds/ (KubeRay RayCluster and RayService,
prometheus-operator ServiceMonitor and PrometheusRule, KEDA ScaledObject; versions in the README
there); the pod templates inside RayClusters and RayServices, and the HPA behaviour inside
ScaledObjects, are also validated strictly as the built-in objects they become. Any other kind,
such as a misspelt apiVersion, fails.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import pytest
import yaml

from tests.charts import crd_schemas
from tests.charts.conftest import KUBE_VERSIONS, VALUES_SETS, Doc, render, require_module, values_file


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
    require_module("jsonschema")
    path = VALUES_SETS[name]
    rendered = render(helm, [path] if path else [], kube_version=kube_version)
    problems: list[str] = []
    custom = 0
    for doc in rendered.docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        key = (doc["apiVersion"], doc["kind"])
        if key in crd_schemas.CRD_FILES:
            custom += 1
            problems += crd_schemas.problems(doc)
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


def test_the_crd_checks_catch_mistakes(helm: str) -> None:
    require_module("jsonschema")
    rendered = render(helm, [values_file("keda-values")])
    monitor = copy.deepcopy(rendered.of_kind("ServiceMonitor")[0])
    assert not crd_schemas.problems(monitor)
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in p for p in crd_schemas.problems(monitor))
    scaled = copy.deepcopy(rendered.of_kind("ScaledObject")[0])
    assert not crd_schemas.problems(scaled)
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA reads trigger metadata as strings
    assert any("threshold" in p or "metadata" in p for p in crd_schemas.problems(scaled))
    cluster = copy.deepcopy(rendered.of_kind("RayCluster")[0])
    assert not crd_schemas.problems(cluster)
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert any("imagePullPolice" in p for p in crd_schemas.problems(cluster))
    rule = copy.deepcopy(rendered.of_kind("PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert crd_schemas.problems(rule)


def test_vendored_crds_are_the_versions_the_readme_names() -> None:
    readme = (crd_schemas.CRDS / "README.md").read_text()
    for (api_version, kind), file in crd_schemas.CRD_FILES.items():
        data = crd_schemas.vendored(api_version, kind)
        assert file in readme, f"{file} is not described in tests/charts/crds/README.md"
        assert data["openAPIV3Schema"]["properties"]["spec"]["properties"], f"{file} has no spec schema"
    for licence in ("LICENSE.kuberay", "LICENSE.prometheus-operator", "LICENSE.keda"):
        assert "Apache License" in (crd_schemas.CRDS / licence).read_text()


def test_ray_service_serve_config_is_a_serve_application(helm: str) -> None:
    rendered = render(helm, [values_file("rayservice-values")])
    [service] = rendered.of_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert set(config) == {"proxy_location", "http_options", "grpc_options", "applications"}
    [app] = config["applications"]
    assert set(app) == {"name", "route_prefix", "import_path", "args"}
    assert app["args"]["min_replicas"] <= app["args"]["max_replicas"]
    assert config["grpc_options"]["grpc_servicer_functions"], "Serve's gRPC proxy needs the servicer"

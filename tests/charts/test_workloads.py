"""What the chart deploys behaves as designed, on every values set in charts/llmops/ci/.

Invariants: serving is scaled by exactly one autoscaler (the HPA on the Pods custom metric that
Prometheus Adapter serves, or KEDA, or Ray in RayService mode); serving pods request GPUs and land on
GPU nodes; health probes are native gRPC (liveness on "", readiness on the service's name); every
container runs as non-root with a read-only root filesystem, no privilege escalation and no
capabilities; every port a probe, Service or ServiceMonitor names exists; NetworkPolicies select
real pods and let exactly the platform's own traffic through; each workload has its own
ServiceAccount and only training may touch the Kubernetes API; the settings the ConfigMaps carry are
accepted by the services' settings loader; the `helm test` pod asks every enabled service for
SERVING; names stay within Kubernetes' limits with a long release name; NOTES.txt says where each
service is and how to check its health.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.conftest import (
    CHART,
    INFRA,
    LLMOPS_SERVICES,
    NAMESPACE,
    RELEASE,
    VALUES_SETS,
    Doc,
    PodTemplate,
    Rendered,
    helm_template,
    labels_match,
    load_values,
    pool_key,
    render,
    require_module,
    serving_pools,
    values_file,
)

SETS = list(VALUES_SETS)


def _component(pod: PodTemplate) -> str:
    return pod.labels.get("app.kubernetes.io/component", "")


def _llmops_containers(rendered: Rendered) -> list[tuple[PodTemplate, Doc]]:
    """Containers that run an llmops service (`llmops serve <service>`)."""
    return [
        (pod, container)
        for pod in rendered.pod_templates()
        if pod.owner_kind == "Deployment"
        for container in pod.spec["containers"]
        if (container.get("args") or [""])[0] == "serve"
    ]


def _adapter_metric_names() -> set[str]:
    adapter = yaml.safe_load((INFRA / "prometheus-adapter" / "values.yaml").read_text())
    return {rule["name"]["as"] for rule in adapter["rules"]["custom"]}


# --- autoscaling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n for n in SETS if load_values(n)["serving"]["autoscaling"]["mode"] == "hpa"]
)
def test_hpa_scales_each_serving_deployment_on_waiting_requests_per_pod(
    renders: dict[str, Rendered], name: str
) -> None:
    rendered, values = renders[name], load_values(name)
    hpa_values = values["serving"]["autoscaling"]["hpa"]
    deployments = {d["metadata"]["name"]: d for d in rendered.serving_deployments()}
    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    assert deployments, "no serving Deployment rendered"
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == set(deployments)
    for hpa in hpas:
        spec = hpa["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert spec["scaleTargetRef"]["apiVersion"] == "apps/v1"
        [metric] = spec["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == hpa_values["metricName"]
        assert metric["pods"]["metric"]["name"] in _adapter_metric_names(), (
            "Prometheus Adapter does not serve it"
        )
        assert metric["pods"]["target"] == {
            "type": "AverageValue",
            "averageValue": hpa_values["targetAverageValue"],
        }
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        # GPU pods take minutes to start: scale-up is paced and scale-down waits.
        behavior = spec["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        assert all(p["periodSeconds"] >= 60 for p in behavior["scaleUp"]["policies"])
        # The HPA owns the replica count: the Deployment must not reset it on upgrade.
        assert "replicas" not in deployments[spec["scaleTargetRef"]["name"]]["spec"]


@pytest.mark.parametrize("mode", ["hpa", "keda", "rayservice", "none"])
def test_exactly_one_autoscaler_acts_on_serving_pods(helm: str, mode: str) -> None:
    rendered = render(helm, sets=[f"serving.autoscaling.mode={mode}"])
    deployments = {d["metadata"]["name"] for d in rendered.serving_deployments()}
    hpa_targets = [h["spec"]["scaleTargetRef"]["name"] for h in rendered.of_kind("HorizontalPodAutoscaler")]
    keda_targets = [s["spec"]["scaleTargetRef"]["name"] for s in rendered.of_kind("ScaledObject")]
    ray_services = rendered.of_kind("RayService")
    models = serving_pools(load_values("defaults"))
    if mode == "rayservice":
        assert not deployments and not hpa_targets and not keda_targets
        assert len(ray_services) == len(models)
        return
    assert not ray_services
    assert len(deployments) == len(models)
    expected = {"hpa": (sorted(deployments), []), "keda": ([], sorted(deployments)), "none": ([], [])}[mode]
    assert (sorted(hpa_targets), sorted(keda_targets)) == expected
    for deployment in rendered.serving_deployments():
        assert ("replicas" in deployment["spec"]) == (mode == "none")


@pytest.mark.parametrize("name", SETS)
def test_no_serving_workload_has_two_autoscalers(renders: dict[str, Rendered], name: str) -> None:
    rendered = renders[name]
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in rendered.of_kind("HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"]["name"] for s in rendered.of_kind("ScaledObject")]
    assert len(targets) == len(set(targets)), f"a Deployment has two autoscalers: {targets}"
    routers = {
        d["metadata"]["name"]
        for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "router"
    }  # the router has its own HPA (on CPU): it is not a serving workload
    assert set(targets) <= {d["metadata"]["name"] for d in rendered.serving_deployments()} | routers
    if rendered.of_kind("RayService"):
        assert not targets and not rendered.serving_deployments()


def test_keda_scales_on_router_held_plus_in_flight_requests(renders: dict[str, Rendered]) -> None:
    """Scale from zero: with no serving pod, only the router's held requests can wake a model."""
    rendered, values = renders["keda-values"], load_values("keda-values")
    models = serving_pools(values)
    for scaled in rendered.of_kind("ScaledObject"):
        [trigger] = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        model = models[pool_key(scaled["metadata"]["labels"])]
        # the router's metric, for this model, exists with zero pods (the `or vector(0)` keeps the sum)
        assert "llmops_router_pending_requests{" in query and f"{model['name']}|" in query
        assert "llmops:serving_requests_in_flight:pod" in query, "the HPA's metric, for pods that exist"
        assert query.count("or vector(0)") == 2
        assert f'namespace="{NAMESPACE}"' in query
        assert scaled["spec"]["scaleTargetRef"]["name"] in query, "the query must select the target's pods"
    assert {s["spec"]["minReplicaCount"] for s in rendered.of_kind("ScaledObject")} == {0, 1}
    assert values["router"]["enabled"], "scale to zero is rendered only with the router on"


# --- GPU scheduling -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in SETS if load_values(n)["serving"]["enabled"]])
def test_serving_pods_request_gpus_and_land_on_gpu_nodes(renders: dict[str, Rendered], name: str) -> None:
    rendered, values = renders[name], load_values(name)
    serving = values["serving"]
    gpu = serving["gpu"]
    models = serving_pools(values)
    pods = [
        p for p in rendered.pod_templates() if p.owner_kind == "Deployment" and _component(p) == "serving"
    ]
    pods += [p for p in rendered.pod_templates() if p.owner_kind == "RayService" and p.role != "head"]
    assert len(pods) == len(models)
    for pod in pods:
        [container] = pod.spec["containers"]
        resources = container["resources"]
        model = models[pool_key(pod.labels)]
        if not gpu["enabled"]:
            assert gpu["resourceName"] not in resources.get("limits", {}), pod.where
            assert container["image"].startswith(values["image"]["repository"] + ":")
            continue
        count = model.get("gpus", gpu["count"])
        assert resources["requests"][gpu["resourceName"]] == count, pod.where
        assert resources["limits"][gpu["resourceName"]] == count, pod.where
        assert container["image"].startswith(values["gpuImage"]["repository"] + ":")
        node_selector = pod.spec.get("nodeSelector") or {}
        # exactly the GPU selector and the extra one: a profile that nulls the GPU one replaces it
        assert node_selector == (gpu["nodeSelector"] or {}) | serving["nodeSelector"], pod.where
        assert node_selector, f"{pod.where} would land on any node"
        for toleration in (gpu["tolerations"] or []) + serving["tolerations"]:
            assert toleration in pod.spec["tolerations"], pod.where
        if pod.owner_kind == "Deployment":
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {serving["modelCache"]["mountPath"], "/dev/shm"} <= mounts
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "too short to load weights"


@pytest.mark.parametrize("name", [n for n in SETS if load_values(n)["raycluster"]["enabled"]])
def test_ray_gpu_workers_request_gpus_and_autoscale(renders: dict[str, Rendered], name: str) -> None:
    rendered, values = renders[name], load_values(name)
    [cluster] = rendered.of_kind("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_workers = values["raycluster"]["gpuWorkers"]
    group = groups["gpu"]
    assert (group["minReplicas"], group["maxReplicas"]) == (
        gpu_workers["minReplicas"],
        gpu_workers["maxReplicas"],
    )
    [container] = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu_workers["gpus"]
    assert group["template"]["spec"]["tolerations"] == gpu_workers["tolerations"]
    assert container["image"].startswith(values["gpuImage"]["repository"] + ":")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "jobs must not land on the head"


# --- probes ---------------------------------------------------------------------------------------


def _health_probe(probe: dict[str, Any], tls: bool) -> tuple[int, str]:
    """(port, health service) a probe asks: a native gRPC probe, or ``llmops probe`` with TLS on
    (Kubernetes' gRPC probes cannot speak TLS)."""
    kinds = set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"}
    if not tls:
        assert kinds == {"grpc"}
        return probe["grpc"]["port"], probe["grpc"].get("service", "")
    assert kinds == {"exec"}
    command = probe["exec"]["command"]
    assert command[:2] == ["llmops", "probe"]
    options = dict(zip(command[2::2], command[3::2], strict=True))
    host, _, port = options["--address"].rpartition(":")
    assert host == "localhost"  # the certificate must name it (values.yaml says so)
    return int(port), options["--service"]


@pytest.mark.parametrize("name", SETS)
def test_llmops_probes_are_grpc_health_checks(renders: dict[str, Rendered], name: str) -> None:
    containers = _llmops_containers(renders[name])
    tls = bool(load_values(name)["tls"]["existingSecret"])
    assert containers
    for pod, container in containers:
        service = container["args"][1]
        assert service in LLMOPS_SERVICES
        grpc_port = pod.container_ports()["grpc"]
        ready = f"llmops.{service}.v1.{service.title()}Service"
        targets = {}
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            port, health = _health_probe(container[probe_name], tls)
            assert port == grpc_port, f"{pod.where} {probe_name} probes a port it does not open"
            targets[probe_name] = health
        assert targets["livenessProbe"] == ""
        assert targets["readinessProbe"] == ready
        assert container["args"][:6] == ["serve", service, "--port", str(grpc_port), "--metrics-port",
                                         str(pod.container_ports()["metrics"])]  # fmt: skip


@pytest.mark.parametrize("name", SETS)
def test_api_keys_and_tls_reach_every_llmops_container(renders: dict[str, Rendered], name: str) -> None:
    values = load_values(name)
    auth, tls = values["auth"], values["tls"]
    config = next(
        doc["data"]
        for doc in renders[name].of_kind("ConfigMap")
        if doc["metadata"]["name"].endswith("-config") and "LLMOPS_DATA_DIR" in doc["data"]
    )
    assert ("LLMOPS_API_KEYS_FILE" in config) == bool(auth["existingSecret"])
    assert ("LLMOPS_TLS_CERT_FILE" in config) == bool(tls["existingSecret"])
    assert ("LLMOPS_TLS_CLIENT_CA_FILE" in config) == bool(tls["existingSecret"] and tls["mutual"])
    for pod, container in _llmops_containers(renders[name]):
        mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
        assert ("/etc/llmops/auth" in mounts) == bool(auth["existingSecret"]), pod.where
        assert ("/etc/llmops/tls" in mounts) == bool(tls["existingSecret"]), pod.where
        env = {e["name"]: e for e in container.get("env") or []}
        if auth["serviceKey"]["existingSecret"]:
            ref = env["LLMOPS_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref == {
                "name": auth["serviceKey"]["existingSecret"],
                "key": auth["serviceKey"]["secretKey"],
            }
        else:
            assert "LLMOPS_API_KEY" not in env


def test_api_keys_without_the_services_own_key_are_refused(helm: str) -> None:
    result = helm_template(helm, sets=["auth.existingSecret=keys"])
    assert result.returncode != 0 and "auth.serviceKey.existingSecret" in result.stderr
    result = helm_template(helm, sets=["tls.mutual=true"])
    assert result.returncode != 0 and "tls.mutual needs tls.existingSecret" in result.stderr


@pytest.mark.parametrize("name", SETS)
def test_every_probe_names_a_port_its_container_opens(renders: dict[str, Rendered], name: str) -> None:
    for pod in renders[name].pod_templates():
        ports = pod.container_ports()
        for container in pod.spec["containers"]:
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(probe_name) or {}
                for action in ("grpc", "httpGet", "tcpSocket"):
                    if action in probe:
                        assert probe[action]["port"] in ports, f"{pod.where} {container['name']} {probe_name}"


# --- security -------------------------------------------------------------------------------------


def _effective(pod: PodTemplate, container: Doc, key: str) -> Any:
    return (container.get("securityContext") or {}).get(key, (pod.spec.get("securityContext") or {}).get(key))


@pytest.mark.parametrize("name", SETS)
def test_every_container_runs_locked_down(renders: dict[str, Rendered], name: str) -> None:
    rendered = renders[name]
    pods = rendered.pod_templates()
    assert pods
    for pod in pods:
        for container in pod.containers:
            where = f"{pod.where} container {container['name']}"
            context = container.get("securityContext") or {}
            assert _effective(pod, container, "runAsNonRoot") is True, where
            assert _effective(pod, container, "runAsUser") not in (None, 0), where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged", False) is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
        assert (pod.spec.get("securityContext") or {}).get("seccompProfile", {}).get(
            "type"
        ) == "RuntimeDefault"
    for kind in ("RayCluster", "RayService"):
        for doc in rendered.of_kind(kind):
            cluster = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterConfig"]
            context = cluster["autoscalerOptions"]["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["runAsNonRoot"] is True and context["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("name", SETS)
def test_workloads_have_their_own_service_account_and_none_talks_to_the_api(
    renders: dict[str, Rendered], name: str
) -> None:
    """Only the router calls the Kubernetes API (it reads EndpointSlices to find serving replicas):
    no other pod mounts a token (a token nobody uses is only something to steal), and the one Role
    reads EndpointSlices and nothing else."""
    rendered, values = renders[name], load_values(name)
    accounts = {sa["metadata"]["name"]: sa for sa in rendered.of_kind("ServiceAccount")}
    for account in accounts.values():
        assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]
    for pod in rendered.pod_templates():
        account = pod.spec.get("serviceAccountName")
        if pod.role == "head" or pod.owner_kind == "Pod":
            continue  # KubeRay gives the head its autoscaler's account; the test pod needs none
        uses_api = _component(pod) == "router"
        assert bool(pod.spec.get("automountServiceAccountToken")) is uses_api, pod.where
        if not values["serviceAccount"]["create"]:
            assert account == "default", pod.where
            continue
        assert account in accounts, f"{pod.where} uses ServiceAccount {account!r}, which is not rendered"
    for role in rendered.of_kind("Role"):
        assert role["metadata"]["labels"]["app.kubernetes.io/component"] == "router", role["metadata"]["name"]
        for rule in role["rules"]:
            assert set(rule["resources"]) <= {"endpointslices"}, rule
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        assert not rendered.of_kind(kind), f"{kind} rendered"


# --- Services, ServiceMonitors and what they point at ---------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_services_select_pods_that_open_their_target_ports(renders: dict[str, Rendered], name: str) -> None:
    rendered = renders[name]
    for service in rendered.of_kind("Service"):
        pods = rendered.pods_selected_by({"matchLabels": service["spec"]["selector"]})
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for pod in pods:
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in pod.container_ports(), (
                    f"Service {service['metadata']['name']} port {port['name']} -> {pod.where}"
                )


@pytest.mark.parametrize(
    "name", [n for n in SETS if load_values(n)["monitoring"]["serviceMonitor"]["enabled"]]
)
def test_service_monitor_scrapes_every_llmops_pod_once_on_its_metrics_port(
    renders: dict[str, Rendered], name: str
) -> None:
    rendered = renders[name]
    [monitor] = [
        m
        for m in rendered.of_kind("ServiceMonitor")
        if m["spec"]["jobLabel"] == "app.kubernetes.io/component"
    ]
    spec = monitor["spec"]
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    services = [
        s
        for s in rendered.of_kind("Service")
        if labels_match(spec["selector"], s["metadata"]["labels"])
        and s["metadata"]["labels"].get(spec["jobLabel"])
    ]
    scraped: dict[str, int] = {}
    for service in services:
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in port_names, (
                f"{service['metadata']['name']} has no port {endpoint['port']}"
            )
        for pod in rendered.pods_selected_by({"matchLabels": service["spec"]["selector"]}):
            scraped[pod.where] = scraped.get(pod.where, 0) + 1
    llmops_pods = {pod.where for pod, _ in _llmops_containers(rendered)}
    assert set(scraped) == llmops_pods, "every llmops pod, and only those, is scraped"
    assert all(count == 1 for count in scraped.values()), f"pods scraped twice: {scraped}"
    assert all(endpoint.get("honorLabels") is True for endpoint in spec["endpoints"])


# --- NetworkPolicies ------------------------------------------------------------------------------


def _peer_allows(peer: Doc, source_labels: dict[str, str], source_namespace: str) -> bool:
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        if source_namespace != NAMESPACE:
            return False
    elif not labels_match(namespace_selector, {"kubernetes.io/metadata.name": source_namespace}):
        return False
    return "ipBlock" not in peer and labels_match(peer.get("podSelector"), source_labels)


def _allowed(
    rendered: Rendered, source: dict[str, str], source_namespace: str, target: PodTemplate, port: str | int
) -> bool:
    """Whether the rendered NetworkPolicies let ``source`` reach ``target`` on ``port`` (ingress)."""
    policies = [
        p for p in rendered.of_kind("NetworkPolicy") if labels_match(p["spec"]["podSelector"], target.labels)
    ]
    if not policies:
        return True
    number = target.container_ports().get(port, port)
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(target.container_ports().get(p["port"], p["port"]) == number for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_allows(peer, source, source_namespace) for peer in peers):
                return True
    return False


def _pod(rendered: Rendered, component: str, role: str | None = None) -> PodTemplate:
    pods = [
        p for p in rendered.pod_templates() if _component(p) == component and (role is None or p.role == role)
    ]
    assert pods, f"no {component} pod"
    return pods[0]


@pytest.mark.parametrize("name", [n for n in SETS if load_values(n)["networkPolicy"]["enabled"]])
def test_network_policies_select_existing_pods(renders: dict[str, Rendered], name: str) -> None:
    rendered = renders[name]
    policies = rendered.of_kind("NetworkPolicy")
    assert policies
    for policy in policies:
        pods = rendered.pods_selected_by(policy["spec"]["podSelector"])
        assert pods, f"NetworkPolicy {policy['metadata']['name']} selects no pod"
        for rule in policy["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                assert all(port["port"] in pod.container_ports() for pod in pods), (
                    f"NetworkPolicy {policy['metadata']['name']} opens port {port['port']} that its pods lack"
                )
            for peer in rule.get("from") or []:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert rendered.pods_selected_by(peer["podSelector"]), (
                        f"NetworkPolicy {policy['metadata']['name']} admits pods that do not exist: {peer}"
                    )


@pytest.mark.parametrize("name", [n for n in SETS if load_values(n)["networkPolicy"]["enabled"]])
def test_network_policies_let_the_platform_talk_and_keep_others_out(
    renders: dict[str, Rendered], name: str
) -> None:
    rendered, values = renders[name], load_values(name)
    monitoring = values["networkPolicy"]["monitoringNamespace"]
    services = [c for c in ("registry", "training", "quantization", "cache") if values[c]["enabled"]]
    stranger = {"app": "something-else"}
    for service in services:
        target = _pod(rendered, service)
        for client in services:
            assert _allowed(rendered, _pod(rendered, client).labels, NAMESPACE, target, "grpc"), (
                client,
                service,
            )
        test_pod = _pod(rendered, "test")
        assert _allowed(rendered, test_pod.labels, NAMESPACE, target, "grpc"), (
            f"helm test cannot reach {service}"
        )
        assert _allowed(rendered, {}, monitoring, target, "metrics"), f"Prometheus cannot scrape {service}"
        assert not _allowed(rendered, stranger, "elsewhere", target, "grpc"), f"{service} is open to anyone"
        assert not _allowed(rendered, stranger, "elsewhere", target, "metrics")
    if values["redis"]["enabled"] and values["cache"]["enabled"]:
        redis = _pod(rendered, "redis")
        assert _allowed(rendered, _pod(rendered, "cache").labels, NAMESPACE, redis, "redis")
        assert not _allowed(rendered, stranger, NAMESPACE, redis, "redis")
    if values["mlflow"]["enabled"]:
        mlflow = _pod(rendered, "mlflow")
        for client in ("registry", "training", "quantization"):
            if values[client]["enabled"]:
                assert _allowed(rendered, _pod(rendered, client).labels, NAMESPACE, mlflow, "http"), client
        assert not _allowed(rendered, stranger, NAMESPACE, mlflow, "http")
    if values["raycluster"]["enabled"]:
        head = _pod(rendered, "raycluster", "head")
        worker = _pod(rendered, "raycluster", "worker group gpu")
        assert _allowed(rendered, _pod(rendered, "training").labels, NAMESPACE, head, "client")
        assert _allowed(rendered, worker.labels, NAMESPACE, head, 6379), "Ray workers cannot reach the GCS"
        assert _allowed(rendered, head.labels, NAMESPACE, worker, 12345), "Ray nodes need each other's ports"
        assert not _allowed(rendered, stranger, NAMESPACE, head, "client")
    serving_pods = [
        p for p in rendered.pod_templates() if p.owner_kind == "Deployment" and _component(p) == "serving"
    ]
    for pod in serving_pods:
        ingress = values["networkPolicy"]["servingPeers"]
        assert _allowed(rendered, stranger, "elsewhere", pod, "grpc") == (not ingress)
        assert _allowed(rendered, _pod(rendered, "test").labels, NAMESPACE, pod, "grpc")
        assert not _allowed(rendered, stranger, "elsewhere", pod, "metrics")


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_config_maps_and_claims_that_pods_mount_exist(renders: dict[str, Rendered], name: str) -> None:
    rendered, values = renders[name], load_values(name)
    config_maps = rendered.names("ConfigMap")
    claims = rendered.names("PersistentVolumeClaim") | {
        values["serving"]["modelCache"]["existingClaim"],
        values["mlflow"]["artifacts"].get("sharedClaim", {}).get("existingClaim", ""),
    }
    for pod in rendered.pod_templates():
        for container in pod.containers:
            for source in container.get("envFrom") or []:
                ref = source.get("configMapRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] in config_maps, f"{pod.where} reads missing ConfigMap {ref['name']}"
        for volume in pod.spec.get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, pod.where
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, pod.where


def _llmops_environment(rendered: Rendered, pod: PodTemplate, container: Doc) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref:
            env.update(rendered.get("ConfigMap", ref["name"]).get("data") or {})
    for item in container.get("env") or []:
        env[item["name"]] = item.get("value", "from-a-secret")
    return {key: value for key, value in env.items() if key.startswith("LLMOPS_")}


@pytest.mark.parametrize("name", SETS)
def test_services_accept_the_settings_the_chart_gives_them(renders: dict[str, Rendered], name: str) -> None:
    settings = require_module("llmops.common.settings")
    rendered = renders[name]
    for pod, container in _llmops_containers(rendered):
        env = _llmops_environment(rendered, pod, container)
        assert "LLMOPS_DATA_DIR" in env
        try:
            settings.Settings.load(env=env)
        except settings.SettingsError as error:
            pytest.fail(f"{pod.where}: the service would refuse to start: {error}")
        if (
            container["args"][1] in ("training", "quantization")
            and load_values(name)["raycluster"]["enabled"]
        ):
            assert env["LLMOPS_RAY_ADDRESS"].startswith("ray://") and env["LLMOPS_RAY_ADDRESS"].endswith(
                ":10001"
            )


@pytest.mark.parametrize("name", [n for n in SETS if load_values(n)["serving"]["enabled"]])
def test_each_served_model_gets_its_reference_and_engine(renders: dict[str, Rendered], name: str) -> None:
    rendered, values = renders[name], load_values(name)
    serving = values["serving"]
    containers = [(p, c) for p, c in _llmops_containers(rendered) if c["args"][1] == "serving"]
    if serving["autoscaling"]["mode"] == "rayservice":
        assert not containers
        for service in rendered.of_kind("RayService"):
            config = yaml.safe_load(service["spec"]["serveConfigV2"])
            [app] = config["applications"]
            assert app["import_path"] == serving["autoscaling"]["rayService"]["importPath"]
        return
    seen = {}
    for pod, container in containers:
        env = _llmops_environment(rendered, pod, container)
        seen[pool_key(pod.labels)] = (env["LLMOPS_SERVING_MODEL"], env["LLMOPS_SERVING_ENGINE"])
    expected = {
        k: (m["model"], m.get("engine") or serving["engine"]) for k, m in serving_pools(values).items()
    }
    assert seen == expected


@pytest.mark.parametrize("name", SETS)
def test_pod_disruption_budgets_cover_running_workloads(renders: dict[str, Rendered], name: str) -> None:
    rendered = renders[name]
    for budget in rendered.of_kind("PodDisruptionBudget"):
        pods = rendered.pods_selected_by(budget["spec"]["selector"])
        assert len(pods) == 1, (
            f"PodDisruptionBudget {budget['metadata']['name']} selects {len(pods)} workloads"
        )
        assert budget["spec"]["maxUnavailable"] >= 1, "a budget of 0 blocks node drains"


@pytest.mark.parametrize("name", SETS)
def test_helm_test_pod_checks_every_enabled_service(renders: dict[str, Rendered], name: str) -> None:
    rendered, values = renders[name], load_values(name)
    [pod] = rendered.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    probes = {}
    for container in pod["spec"]["containers"]:
        assert container["image"].startswith(values["tests"]["image"]["repository"] + ":")
        args = dict([*arg.lstrip("-").split("=", 1), ""][:2] for arg in container["args"])
        probes[args["addr"]] = args["service"]
        if values["tls"]["existingSecret"]:  # helm test speaks TLS where the servers do
            assert "tls" in args and args["tls-ca-cert"] == "/etc/llmops/tls/ca.crt", container["name"]
            assert ("tls-client-cert" in args) == values["tls"]["mutual"]
        else:
            assert "tls" not in args
    suffix = f".{NAMESPACE}.svc" if values["tls"]["existingSecret"] else ""
    expected = {}
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for pod_template, container in _llmops_containers(rendered):
        service = container["args"][1]
        [target] = [
            s
            for s in services.values()
            if labels_match({"matchLabels": s["spec"]["selector"]}, pod_template.labels)
            and s["spec"].get("clusterIP") != "None"
        ]
        expected[f"{target['metadata']['name']}{suffix}:{values['ports']['grpc']}"] = (
            f"llmops.{service}.v1.{service.title()}Service"
        )
    assert probes == expected


def test_names_fit_kubernetes_limits_with_a_long_release_name(helm: str) -> None:
    rendered = render(
        helm, [values_file("all-on-values")], release="a-very-long-release-name-for-a-production-cluster"
    )
    for doc in rendered.docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63, name
        for value in (doc["metadata"].get("labels") or {}).values():
            assert len(value) <= 63, (name, value)
    for ray in rendered.of_kind("RayCluster"):
        assert len(ray["metadata"]["name"] + "-head-svc") <= 50, "KubeRay cuts longer Service names"
    names = [d["metadata"]["name"] for d in rendered.docs if d["kind"] != "ConfigMap"]
    kinds = [d["kind"] for d in rendered.docs if d["kind"] != "ConfigMap"]
    assert len(set(zip(kinds, names, strict=True))) == len(names), "two objects of one kind share a name"


def test_release_name_and_namespace_reach_addresses(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    config = rendered.get("ConfigMap", f"{RELEASE}-llmops-config")["data"]
    assert config["LLMOPS_REGISTRY_ADDRESS"] == f"{RELEASE}-llmops-registry:50051"
    assert config["LLMOPS_SERVING_ADDRESS"] == f"{RELEASE}-llmops-serving-llm-champion:50051"
    assert config["LLMOPS_REDIS_URL"] == f"redis://{RELEASE}-llmops-redis:6379/0"
    assert config["LLMOPS_MLFLOW_TRACKING_URI"] == f"http://{RELEASE}-llmops-mlflow:5000"
    for address in (config["LLMOPS_REGISTRY_ADDRESS"], config["LLMOPS_SERVING_ADDRESS"]):
        host = address.split(":")[0]
        assert host in rendered.names("Service")


def _notes(helm: str, tmp_path: Path, values: list[Path]) -> str:
    """NOTES.txt as `helm install` would print it (helm template skips NOTES, so render a copy)."""
    chart = tmp_path / "llmops"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    body = "\n".join("  " + line for line in notes.splitlines())
    (chart / "templates" / "zz-notes.yaml").write_text("notes: |\n" + body + "\n")
    command = [
        helm,
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/zz-notes.yaml",
    ]
    for path in values:
        command += ["-f", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    text: str = yaml.safe_load(result.stdout)["notes"]
    return text


@pytest.mark.parametrize("name", ["defaults", "minimal-values", "rayservice-values"])
def test_notes_say_what_was_installed_and_how_to_check_it(
    helm: str, renders: dict[str, Rendered], tmp_path: Path, name: str
) -> None:
    path = VALUES_SETS[name]
    notes = _notes(helm, tmp_path, [path] if path else [])
    rendered = renders[name]
    for pod, container in _llmops_containers(rendered):
        service = container["args"][1]
        addresses = [
            s["metadata"]["name"]
            for s in rendered.of_kind("Service")
            if labels_match({"matchLabels": s["spec"]["selector"]}, pod.labels)
            and s["spec"].get("clusterIP") != "None"
        ]
        assert any(f"{address}:" in notes for address in addresses), f"NOTES do not say where {service} is"
    assert "grpc.health.v1.Health/Check" in notes
    assert f"helm test {RELEASE}" in notes
    # the commands NOTES gives must work against the servers as configured
    values = load_values(name)
    if values["tls"]["existingSecret"]:
        assert "-plaintext" not in notes and "grpcurl -cacert ca.crt" in notes
    else:
        assert "grpcurl -plaintext" in notes
    for service in rendered.of_kind("RayService"):
        assert f"{service['metadata']['name']}-serve-svc" in notes


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_training_pods_and_the_ray_cluster_share_the_job_volume(
    renders: dict[str, Rendered], name: str
) -> None:
    """A job the service writes (dataset snapshot, base cache, quantization source) is what its Ray
    worker reads, and the checkpoints a lost worker leaves are where the next one looks: one
    ReadWriteMany claim, mounted at the training and quantization work folders in those services'
    pods and every RayCluster pod, never in serving's."""
    rendered, values = renders[name], load_values(name)
    storage = values["training"]["sharedStorage"]
    if not (values["training"]["enabled"] and storage["enabled"]):
        assert not any(_mounts_jobs(pod) for pod in rendered.pod_templates())
        return
    claim = storage["existingClaim"] or f"{RELEASE}-llmops-training-jobs"
    if not storage["existingClaim"]:
        pvc = rendered.get("PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    sharing = [
        pod
        for pod in rendered.pod_templates()
        if _component(pod) in ("training", "quantization") or (pod.owner_kind == "RayCluster")
    ]
    assert any(_component(pod) == "training" for pod in sharing)
    for pod in sharing:
        assert _mounts_jobs(pod) == claim, pod.where
    for pod in rendered.pod_templates():
        if pod.owner_kind == "RayService" or _component(pod) == "serving":
            assert not _mounts_jobs(pod), pod.where


def _mounts_jobs(pod: PodTemplate) -> str:
    """The claim mounted at both job folders (own subpaths) in the pod's main container, else ''."""
    volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
    claims = set()
    for mount in pod.spec["containers"][0].get("volumeMounts") or []:
        for service in ("training", "quantization"):
            if mount["mountPath"] == f"/var/lib/llmops/{service}":
                assert mount.get("subPath") == service, pod.where
                claims.add(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    assert len(claims) <= 1, pod.where
    return claims.pop() if claims else ""


def test_users_may_add_topology_spread_priority_and_runtime_class(helm: str) -> None:
    spread = {
        "maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
    }
    sets = []
    for component in ("registry", "training", "quantization", "cache", "serving"):
        sets += [
            f"{component}.priorityClassName=llmops-high",
            f"{component}.runtimeClassName=nvidia",
            *(f"{component}.topologySpreadConstraints[0].{k}={v}" for k, v in spread.items()),
        ]
    rendered = render(helm, sets=sets)
    pods = [p for p in rendered.pod_templates() if p.owner_kind == "Deployment" and _component(p) != "mlflow"]
    assert {_component(p) for p in pods} >= {"registry", "training", "quantization", "cache", "serving"}
    for pod in pods:
        assert pod.spec["priorityClassName"] == "llmops-high", pod.where
        assert pod.spec["runtimeClassName"] == "nvidia", pod.where
        assert pod.spec["topologySpreadConstraints"] == [spread], pod.where

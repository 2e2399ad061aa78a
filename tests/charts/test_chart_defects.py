"""Rendered-chart checks of the defects found by reading the chart (issue 16), one test each.

Each test names the defect it guards: what a user would have seen on a real cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.conftest import (
    VALUES_SETS,
    Doc,
    Rendered,
    helm_template,
    load_values,
    pool_key,
    render,
    serving_pools,
)


def _deployment(rendered: Rendered, component: str) -> Doc:
    return next(
        d for d in rendered.of_kind("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    )  # fmt: skip


def _checksums(rendered: Rendered) -> dict[str, str]:
    found = {}
    for pod in rendered.pod_templates():
        annotations = pod.template.get("metadata", {}).get("annotations") or {}
        if "checksum/config" in annotations:
            found[pod.where] = annotations["checksum/config"]
    return found


def test_a_training_setting_restarts_training_not_serving(helm: str) -> None:
    """Defect 4: checksum/config hashed every ConfigMap, so a training-only change restarted every
    GPU serving pod (minutes of weight loading each); Ray pods had no checksum at all."""
    before = _checksums(render(helm))
    after = _checksums(render(helm, sets=["training.env.LLMOPS_TRAINING_MAX_QUEUED_JOBS=5"]))
    changed = {where for where in before if before[where] != after[where]}
    assert any("training" in w and "Deployment" in w for w in changed), changed
    assert any(w.startswith("RayCluster") for w in changed), "Ray pods run training's jobs: they read it"
    assert not any("serving" in w for w in changed), f"serving restarts for a training change: {changed}"
    assert not any("registry" in w or "cache" in w for w in changed), changed
    served = _checksums(render(helm, sets=["serving.maxWaiting=100"]))
    changed = {where for where in before if before[where] != served[where]}
    assert changed and all("serving" in w for w in changed), changed
    common = _checksums(render(helm, sets=["settings.logLevel=DEBUG"]))
    assert all(before[w] != common[w] for w in before), "a shared setting reaches every pod"


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_every_ray_pod_carries_a_config_checksum(renders: dict[str, Rendered], name: str) -> None:
    for pod in renders[name].pod_templates():
        if pod.owner_kind in ("RayCluster", "RayService"):
            assert "checksum/config" in (pod.template["metadata"].get("annotations") or {}), pod.where


def test_large_models_get_a_weights_claim_and_pods_request_ephemeral_storage(
    renders: dict[str, Rendered],
) -> None:
    """Defect 7: a 70B model (about 140 GB) in a 100Gi emptyDir is evicted mid-download, and no
    container requested ephemeral storage."""
    rendered = renders["gpu-hpa-values"]
    claims = {c["metadata"]["name"]: c for c in rendered.of_kind("PersistentVolumeClaim")}
    for deployment in rendered.serving_deployments():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], "the model's pods share it"
        assert claims[claim]["spec"]["resources"]["requests"]["storage"] == "300Gi"
    for name, rendered in renders.items():
        for pod in rendered.pod_templates():
            if pod.owner_kind != "Deployment" or pod.labels.get("app.kubernetes.io/component") == "mlflow":
                continue
            for container in pod.spec["containers"]:
                requests = container["resources"].get("requests") or {}
                assert "ephemeral-storage" in requests, f"{name}: {pod.where}"
    default = _deployment(renders["defaults"], "serving")
    [container] = default["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["ephemeral-storage"] == "100Gi", "the emptyDir cache's size"


def test_a_profile_replaces_the_gpu_node_selector(helm: str, tmp_path: Path) -> None:
    """Defect 8: Helm merges maps, so a GKE profile rendered both selectors and pods stayed Pending."""
    profile = tmp_path / "gke.yaml"
    profile.write_text(
        "serving:\n  gpu: {nodeSelector: null}\n  nodeSelector: {cloud.google.com/gke-accelerator: nvidia-l4}\n"
        "raycluster:\n  gpuWorkers: {nodeSelector: {cloud.google.com/gke-accelerator: nvidia-l4, "
        "nvidia.com/gpu.present: null}}\n"
    )
    rendered = render(helm, [profile])
    [serving] = rendered.serving_deployments()
    assert serving["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }
    [cluster] = rendered.of_kind("RayCluster")
    gpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu_group["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


@pytest.mark.parametrize("name", [n for n in VALUES_SETS if load_values(n)["serving"]["enabled"]])
def test_serving_drains_within_its_grace_after_endpoints_go(renders: dict[str, Rendered], name: str) -> None:
    """Defect 9: serving drained 30 s of a 120 s grace, with no preStop pause for endpoints to go."""
    rendered, values = renders[name], load_values(name)
    config = {c["metadata"]["name"]: c.get("data") or {} for c in rendered.of_kind("ConfigMap")}
    for deployment in rendered.serving_deployments():
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        grace = spec["terminationGracePeriodSeconds"]
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pause == values["serving"]["preStopSeconds"] > 0
        env: dict[str, str] = {}
        for source in container["envFrom"]:
            env |= config[source["configMapRef"]["name"]]
        drain = float(env["LLMOPS_GRACE_SECONDS"])
        assert pause + drain + 10 <= grace, "SIGKILL would cut the drain short"
        assert drain >= grace / 2, f"the drain uses {drain} s of a {grace} s grace"


def test_pdbs_only_where_they_protect_something(renders: dict[str, Rendered], helm: str) -> None:
    """Defect 12: maxUnavailable 1 on a one-replica workload allows evicting its only pod."""
    for name, rendered in renders.items():
        workloads = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
        for pdb in rendered.of_kind("PodDisruptionBudget"):
            pods = rendered.pods_selected_by(pdb["spec"]["selector"])
            [pod] = pods
            target = workloads[pod.owner_name]
            replicas = target["spec"].get("replicas")
            if replicas is None:  # the autoscaler's: it may run up to its maximum
                scalers = rendered.of_kind("HorizontalPodAutoscaler") + rendered.of_kind("ScaledObject")
                [scaler] = [s for s in scalers if s["spec"]["scaleTargetRef"]["name"] == pod.owner_name]
                replicas = scaler["spec"].get("maxReplicas", scaler["spec"].get("maxReplicaCount"))
            assert replicas > 1, f"{name}: PDB {pdb['metadata']['name']} guards a {replicas}-replica workload"
    cache = render(helm, sets=["cache.replicaCount=3"]).of_kind("PodDisruptionBudget")
    assert any("cache" in p["metadata"]["name"] for p in cache)


@pytest.mark.parametrize("name", [n for n in VALUES_SETS if load_values(n)["serving"]["enabled"]])
def test_gpu_count_reaches_vllm_tensor_parallel_size(renders: dict[str, Rendered], name: str) -> None:
    """Defect 14: a 70B model on `gpus: 2` loaded on one GPU (no tensor parallelism) and ran out of memory."""
    rendered, values = renders[name], load_values(name)
    serving = values["serving"]
    config = {c["metadata"]["name"]: c.get("data") or {} for c in rendered.of_kind("ConfigMap")}
    models = serving_pools(values)
    for deployment in rendered.serving_deployments():
        model = models[pool_key(deployment["metadata"]["labels"])]
        gpus = model.get("gpus", serving["gpu"]["count"])
        env: dict[str, str] = {}
        for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
            env |= config[source["configMapRef"]["name"]]
        options: dict[str, Any] = json.loads(env.get("LLMOPS_SERVING_ENGINE_OPTIONS", "{}"))
        engine = model.get("engine") or serving["engine"]
        if serving["gpu"]["enabled"] and gpus > 1 and engine == "vllm":
            assert options.get("tensor_parallel_size") == gpus, deployment["metadata"]["name"]
        if name == "gpu-hpa-values":  # a 70B model fits its GPUs once: replacing loads unload first
            assert env["LLMOPS_SERVING_REPLACE_UNLOADS_FIRST"] == "true"
    for service in rendered.of_kind("RayService"):
        [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        if app["args"]["num_gpus"] > 1 and app["args"]["engine"] == "vllm":
            assert app["args"]["engine_options"]["tensor_parallel_size"] == app["args"]["num_gpus"]


def test_redis_password_reaches_redis_and_every_client(helm: str) -> None:
    """Defect 15: Redis had no password."""
    rendered = render(helm, sets=["redis.auth.existingSecret=redis-auth"])
    [redis] = rendered.of_kind("StatefulSet")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" in container["args"] and "$(REDIS_PASSWORD)" in container["args"]
    names = {e["name"] for e in container["env"]}
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} <= names, "the readiness probe's redis-cli must log in too"
    common = next(c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-config"))
    assert "LLMOPS_REDIS_URL" not in common["data"], "a URL without the password would be read first"
    for deployment in rendered.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") == "mlflow":
            continue
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        order = [e["name"] for e in env]
        assert order.index("REDIS_PASSWORD") < order.index("LLMOPS_REDIS_URL"), "$(VAR) needs VAR first"
        url = next(e["value"] for e in env if e["name"] == "LLMOPS_REDIS_URL")
        assert url.startswith("redis://:$(REDIS_PASSWORD)@")


def test_redis_statefulset_has_a_headless_governing_service(renders: dict[str, Rendered]) -> None:
    """Defect 15: the StatefulSet's serviceName named a ClusterIP Service."""
    for rendered in renders.values():
        for statefulset in rendered.of_kind("StatefulSet"):
            governing = rendered.get("Service", statefulset["spec"]["serviceName"])
            assert governing["spec"].get("clusterIP") == "None"


@pytest.mark.parametrize("release", ["r" * 53, "1st-release"])
def test_release_names_that_used_to_break_the_render(helm: str, release: str) -> None:
    """Defect 15: a release name over 52 characters made a revision-hash label too long; one
    starting with a digit made an invalid RayCluster (DNS-1035) name."""
    result = helm_template(helm, release=release)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "StatefulSet":
            assert len(name) + 11 <= 63, f"controller-revision-hash of {name} exceeds 63 characters"
        if doc["kind"] in ("RayCluster", "RayService", "Service"):
            assert name[0].isalpha(), f"{doc['kind']} {name} must start with a letter"


@pytest.mark.parametrize(
    "name", [n for n in VALUES_SETS if load_values(n)["monitoring"]["serviceMonitor"]["enabled"]]
)
def test_ray_pods_and_ray_serve_replicas_are_scraped(renders: dict[str, Rendered], name: str) -> None:
    """Defects 2 and 15: nothing scraped the RayService replicas, nor any Ray node's metrics."""
    rendered = renders[name]
    monitors = [m for m in rendered.of_kind("ServiceMonitor") if m["spec"]["jobLabel"] == "llmops.io/job"]
    ray_pods = [p for p in rendered.pod_templates() if p.owner_kind in ("RayCluster", "RayService")]
    if not ray_pods:
        assert not monitors
        return
    [monitor] = monitors
    services = [
        s for s in rendered.of_kind("Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ]  # fmt: skip
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped: dict[str, set[str]] = {}
    for service in services:
        job = service["metadata"]["labels"]["llmops.io/job"]
        for port in service["spec"]["ports"]:
            assert port["name"] in endpoints
            for pod in rendered.pods_selected_by({"matchLabels": service["spec"]["selector"]}):
                assert port["targetPort"] in pod.container_ports(), (
                    f"{pod.where} has no port {port['targetPort']}"
                )
                scraped.setdefault(pod.where, set()).add(f"{job}:{port['name']}")
    for pod in ray_pods:
        assert "ray:ray-metrics" in scraped.get(pod.where, set()), f"{pod.where}: Ray metrics not scraped"
        if pod.owner_kind == "RayService" and pod.role != "head":
            assert "serving:metrics" in scraped[pod.where], f"{pod.where}: serving metrics not scraped"


@pytest.mark.parametrize(
    "name", [n for n in VALUES_SETS if load_values(n)["serving"]["autoscaling"]["mode"] == "rayservice"]
)
def test_ray_serve_replicas_reach_redis_and_mlflow(renders: dict[str, Rendered], name: str) -> None:
    """Defect 2: the Redis and MLflow NetworkPolicies left out the RayService pods."""
    rendered = renders[name]
    replica = next(p for p in rendered.pod_templates() if p.owner_kind == "RayService" and p.role != "head")
    for target in ("redis", "mlflow"):
        policies = [
            p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith(f"-{target}")
        ]
        for policy in policies:
            peers = [peer for rule in policy["spec"]["ingress"] for peer in rule.get("from", [])]
            assert any(
                rendered.pods_selected_by(peer.get("podSelector"))
                and replica in rendered.pods_selected_by(peer["podSelector"])
                for peer in peers
                if "podSelector" in peer
            ), f"{target} refuses the serving replicas"


def test_monitoring_resources_carry_the_release_label_prometheus_selects(helm: str) -> None:
    """Defect 15: kube-prometheus-stack selects ServiceMonitors and rules by `release`."""
    rendered = render(
        helm,
        sets=["monitoring.serviceMonitor.labels.release=kps", "monitoring.prometheusRule.labels.release=kps"],
    )
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert rendered.of_kind(kind)
        for doc in rendered.of_kind(kind):
            assert doc["metadata"]["labels"]["release"] == "kps", doc["metadata"]["name"]


def _mlflow_container(rendered: Rendered) -> Doc:
    return _deployment(rendered, "mlflow")["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_runs_the_llmops_image_at_its_tag(helm: str) -> None:
    """MLflow ran the llmops image at the chart's appVersion while every other pod ran `image.tag`:
    a release pinned to a tag pulled an MLflow image that may not exist (or mismatch the services)."""
    tagged = _mlflow_container(render(helm, sets=["image.tag=1.2.3"]))
    assert tagged["image"].endswith(":1.2.3"), tagged["image"]
    own = _mlflow_container(render(helm, sets=["image.tag=1.2.3", "mlflow.image.tag=9.9"]))
    assert own["image"].endswith(":9.9"), own["image"]


def test_mlflow_backend_uri_stays_out_of_the_command_line(helm: str) -> None:
    """The backend store URI (a Postgres password, from a Secret) was passed as an argument, visible
    in every process listing of the pod; `mlflow server` reads MLFLOW_BACKEND_STORE_URI itself."""
    container = _mlflow_container(render(helm, sets=["mlflow.backendStore.existingSecret=mlflow-db"]))
    assert not any("$(" in arg or "backend-store-uri" in arg for arg in container["args"]), container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"


def test_mlflow_start_up_budget_covers_a_first_migration(renders: dict[str, Rendered]) -> None:
    """MLflow had 120 s to start; a first start migrates the backend store, and a kubelet restart
    mid-migration leaves it half done."""
    probe = _mlflow_container(renders["defaults"])["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300, probe


@pytest.mark.parametrize("name", ["defaults", "local-values"])
def test_job_services_have_time_to_start_ray(renders: dict[str, Rendered], name: str) -> None:
    """Training started a Ray runtime in its pod (no RayCluster) beside four other services on a
    two-core node and missed the 120 s start-up budget: a kubelet would have restarted it forever."""
    for component in ("training", "quantization"):
        probe = _deployment(renders[name], component)["spec"]["template"]["spec"]["containers"][0][
            "startupProbe"
        ]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 300, (component, probe)
    registry = _deployment(renders[name], "registry")["spec"]["template"]["spec"]["containers"][0][
        "startupProbe"
    ]
    assert registry["periodSeconds"] * registry["failureThreshold"] == 120, "the others keep theirs"

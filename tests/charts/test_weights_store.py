"""Where serving pods read weights from, as the chart renders it (issue 18).

Invariants: with MLflow's artifacts on ``s3://`` the registry is told the destination, the
endpoint and the object store's Secret (it presigns URLs with them) and serving pods read weights
straight from the store (LLMOPS_SERVING_WEIGHTS__SOURCE=store); without it (the MLflow pod's own
volume, which no other pod can read) serving explicitly streams through the registry; the setting
can be forced; ``serving.modelCache.hostPath`` mounts one node-local cache shared by every serving
pod of the node; its byte budget ``serving.modelCache.maxBytes`` reaches the setting as an integer;
a typo in the source is refused by the schema.
"""

from __future__ import annotations

from tests.charts.conftest import Doc, Rendered, helm_template, render

S3 = [
    "mlflow.artifacts.destination=s3://weights/mlartifacts",
    "mlflow.artifacts.s3EndpointUrl=http://minio.storage:9000",
    "mlflow.artifacts.existingSecret=store-keys",
]


def _env(rendered: Rendered, deployment: Doc) -> tuple[dict[str, str], list[str]]:
    """The ConfigMap settings a Deployment's first container reads, and the Secrets it loads."""
    config = {c["metadata"]["name"]: c.get("data") or {} for c in rendered.of_kind("ConfigMap")}
    env: dict[str, str] = {}
    secrets = []
    for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
        if "configMapRef" in source:
            env |= config[source["configMapRef"]["name"]]
        else:
            secrets.append(source["secretRef"]["name"])
    return env, secrets


def _registry(rendered: Rendered) -> Doc:
    [registry] = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-registry")]
    return registry


def test_default_streams_through_the_registry_explicitly(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    for deployment in rendered.serving_deployments():
        env, _ = _env(rendered, deployment)
        assert env["LLMOPS_SERVING_WEIGHTS__SOURCE"] == "registry"
    env, secrets = _env(rendered, _registry(rendered))
    assert "LLMOPS_REGISTRY_ARTIFACTS_DESTINATION" not in env and secrets == []


def test_s3_artifacts_let_pods_read_the_store_directly(helm: str) -> None:
    rendered = render(helm, sets=S3)
    env, secrets = _env(rendered, _registry(rendered))
    assert env["LLMOPS_REGISTRY_ARTIFACTS_DESTINATION"] == "s3://weights/mlartifacts"
    assert env["LLMOPS_REGISTRY_S3_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert secrets == ["store-keys"]
    [mlflow] = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-mlflow")]
    assert "s3://weights/mlartifacts" in mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    deployments = rendered.serving_deployments()
    assert deployments
    for deployment in deployments:
        env, secrets = _env(rendered, deployment)
        assert env["LLMOPS_SERVING_WEIGHTS__SOURCE"] == "store"
        assert secrets == []  # serving pods get presigned URLs, never the store's keys
    forced = render(helm, sets=[*S3, "serving.weightsSource=registry"])
    for deployment in forced.serving_deployments():
        assert _env(forced, deployment)[0]["LLMOPS_SERVING_WEIGHTS__SOURCE"] == "registry"


def test_host_path_node_cache_is_shared_by_the_node(helm: str) -> None:
    rendered = render(helm, sets=["serving.modelCache.hostPath=/var/lib/llmops-weights"])
    deployments = rendered.serving_deployments()
    assert deployments
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        [volume] = [v for v in spec["volumes"] if v["name"] == "model-cache"]
        assert volume["hostPath"] == {"path": "/var/lib/llmops-weights", "type": "DirectoryOrCreate"}
        env, _ = _env(rendered, deployment)
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model-cache"]
        assert env["LLMOPS_MODEL_CACHE_DIR"] == mount["mountPath"]
        requests = spec["containers"][0]["resources"].get("requests", {})
        assert requests.get("ephemeral-storage") == "4Gi"  # the weights live on the node's folder


def test_schema_refuses_an_unknown_weights_source(helm: str) -> None:
    result = helm_template(helm, sets=["serving.weightsSource=s3"])
    assert result.returncode != 0 and "weightsSource" in result.stderr


def test_node_cache_budget_reaches_the_setting(renders: dict[str, Rendered], helm: str) -> None:
    from llmops.common.settings import Settings

    defaults = renders["defaults"]
    for deployment in defaults.serving_deployments():
        env, _ = _env(defaults, deployment)
        assert env["LLMOPS_SERVING_WEIGHTS__CACHE_MAX_BYTES"] == str(80 * 2**30)  # no float rendering
        budget = env["LLMOPS_SERVING_WEIGHTS__CACHE_MAX_BYTES"]
        loaded = Settings.load(env={"LLMOPS_SERVING_WEIGHTS__CACHE_MAX_BYTES": budget})
        assert loaded.serving.weights.cache_max_bytes == 80 * 2**30
    result = helm_template(helm, sets=["serving.modelCache.maxBytes=-1"])
    assert result.returncode != 0 and "maxBytes" in result.stderr

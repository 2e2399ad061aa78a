"""Serving pools per alias (issue 18): each model's pools render as their own workloads.

Every pool is a Deployment with its own Service, ConfigMap, autoscaler and (where it can have more
than one pod) PodDisruptionBudget, labelled llmops.io/model and llmops.io/pool, its pods told the
reference to serve (LLMOPS_SERVING_MODEL, ``model@alias`` or ``model:version``) and their pool
(LLMOPS_SERVING_POOL); no two pools select each other's pods; the router finds every pool.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.charts.conftest import (
    Doc,
    Rendered,
    helm_template,
    labels_match,
    load_values,
    pool_key,
    render,
    serving_pools,
)


def _pool_env(rendered: Rendered, deployment: Doc) -> dict[str, str]:
    config = {c["metadata"]["name"]: c.get("data") or {} for c in rendered.of_kind("ConfigMap")}
    env: dict[str, str] = {}
    for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
        env |= config[source["configMapRef"]["name"]]
    return env


def test_the_default_serves_a_champion_pool_that_follows_its_alias(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    [deployment] = rendered.serving_deployments()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert (labels["llmops.io/model"], labels["llmops.io/pool"]) == ("llm", "champion")
    assert deployment["spec"]["selector"]["matchLabels"]["llmops.io/pool"] == "champion"
    env = _pool_env(rendered, deployment)
    assert (env["LLMOPS_SERVING_MODEL"], env["LLMOPS_SERVING_POOL"]) == ("llm@champion", "champion")


def test_each_pool_is_its_own_deployment_service_autoscaler_and_budget(renders: dict[str, Rendered]) -> None:
    rendered, values = renders["all-on-values"], load_values("all-on-values")
    pools = serving_pools(values)
    deployments = {
        pool_key(d["spec"]["template"]["metadata"]["labels"]): d for d in rendered.serving_deployments()
    }
    assert set(deployments) == set(pools) == {"chat-champion", "chat-challenger", "chat-pinned", "code"}
    references = {key: _pool_env(rendered, d)["LLMOPS_SERVING_MODEL"] for key, d in deployments.items()}
    assert references == {
        "chat-champion": "chat-llama@champion",
        "chat-challenger": "chat-llama@challenger",
        "chat-pinned": "chat-llama:3",
        "code": "code-llama:7",
    }
    assert _pool_env(rendered, deployments["chat-pinned"])["LLMOPS_SERVING_POOL"] == "pinned"
    assert "LLMOPS_SERVING_POOL" not in _pool_env(rendered, deployments["code"]), "no pools: no pool"
    # a pool's fields override its model's: the challenger's CPU request, the rest inherited
    challenger = deployments["chat-challenger"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert challenger["requests"]["cpu"] == "2"
    hpas = {pool_key(h["metadata"]["labels"]): h for h in rendered.of_kind("HorizontalPodAutoscaler")}
    for key, deployment in deployments.items():
        assert hpas[key]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert hpas[key]["spec"]["maxReplicas"] == pools[key]["maxReplicas"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        services = [
            s for s in rendered.of_kind("Service")
            if s["spec"].get("selector") and labels_match({"matchLabels": s["spec"]["selector"]}, pod_labels)
            and s["metadata"]["labels"].get("app.kubernetes.io/component") == "serving"
        ]  # fmt: skip
        assert services and all(pool_key(s["metadata"]["labels"]) == key for s in services), key
    budgets = {
        pool_key(b["metadata"]["labels"])
        for b in rendered.of_kind("PodDisruptionBudget")
        if "llmops.io/model" in b["metadata"]["labels"]
    }
    # one pod at most (the pinned pool): a budget would protect nothing
    assert budgets == {"chat-champion", "chat-challenger", "code"}


@pytest.mark.parametrize("name", ["defaults", "all-on-values", "keda-values", "local-values"])
def test_no_pool_selects_another_pools_pods(renders: dict[str, Rendered], name: str) -> None:
    rendered = renders[name]
    for deployment in rendered.serving_deployments():
        selected = rendered.pods_selected_by(deployment["spec"]["selector"])
        owners = [(p.owner_kind, p.owner_name) for p in selected]
        assert owners == [("Deployment", deployment["metadata"]["name"])], owners


def test_the_router_discovers_every_pool(renders: dict[str, Rendered]) -> None:
    rendered = renders["keda-values"]
    [router] = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-router")]
    env = {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    selector = dict(part.split("=") for part in env["LLMOPS_ROUTER_KUBERNETES_SERVICE"].split(","))
    # EndpointSlices copy their Service's labels: the router lists the slices of every Service it selects
    found = {
        pool_key(s["metadata"]["labels"])
        for s in rendered.of_kind("Service")
        if labels_match({"matchLabels": selector}, s["metadata"]["labels"]) and "llmops.io/model" in s["metadata"]["labels"]
    }  # fmt: skip
    assert found == set(serving_pools(load_values("keda-values")))


def _llm_pools(tmp_path: Path, *pools: Doc, model: str = "llm", extra: Doc | None = None) -> Path:
    """A values file serving ``model`` in these pools (lists cannot be changed by --set, only replaced)."""
    path = tmp_path / "pools.yaml"
    path.write_text(
        yaml.safe_dump(
            {"serving": {"models": [{"name": "llm", "model": model, "pools": list(pools)}], **(extra or {})}}
        )
    )
    return path


CHAMPION: Doc = {"name": "champion", "minReplicas": 1, "maxReplicas": 2}
CHALLENGER: Doc = {"name": "challenger", "minReplicas": 1, "maxReplicas": 1}


def test_pools_of_a_model_share_its_weights_claim(helm: str, tmp_path: Path) -> None:
    values = _llm_pools(
        tmp_path, CHAMPION, CHALLENGER, extra={"modelCache": {"perModelClaim": {"enabled": True}}}
    )
    rendered = render(helm, [values])
    claims = [
        c["metadata"]["name"]
        for c in rendered.of_kind("PersistentVolumeClaim")
        if "llmops.io/model" in c["metadata"]["labels"]
    ]
    assert claims == ["prod-llmops-serving-llm-models"]
    deployments = rendered.serving_deployments()
    assert len(deployments) == 2
    for deployment in deployments:
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claims[0]


@pytest.mark.parametrize(
    ("pools", "model", "message"),
    [
        ([CHAMPION | {"alias": "champion", "version": "3"}], "llm", "an alias or pins a version, not both"),
        ([CHAMPION], "llm@champion", "registered model's name"),
        ([CHAMPION, CHALLENGER | {"name": "champion"}], "llm", "appears twice"),
        ([{"name": "champion"}], "llm", "minReplicas and maxReplicas are required"),
    ],
)
def test_pool_mistakes_fail_the_install_with_a_message(
    helm: str, tmp_path: Path, pools: list[Doc], model: str, message: str
) -> None:
    result = helm_template(helm, [_llm_pools(tmp_path, *pools, model=model)])
    assert result.returncode != 0 and message in result.stderr, result.stderr[-500:]

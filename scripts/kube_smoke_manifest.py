"""The chart's render as `make kube-smoke` plays it: what runs, what podman cannot do, and the guard.

Podman's `kube play` honours a pod's args, env, envFrom ConfigMaps, volumes, securityContext and
limits, and falls short elsewhere. Each shortfall the smoke meets is a Workaround recorded here, and
`guard` refuses any change to what a container runs or sees (command, args, env, envFrom, ports,
volume mounts, the pod's volumes): a workaround may only change what podman cannot honour anyway,
so a chart defect can never hide behind one.

Used by scripts/kube_smoke.py and tests/deploy/test_kube_smoke.py; needs PyYAML and helm.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "llmops"
LOCAL_VALUES = CHART / "ci" / "local-values.yaml"
RELEASE = "llmops"
NAMESPACE = "llmops"

WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Kinds podman plays besides workloads (ConfigMaps feed envFrom; a claim becomes a named volume).
PLAYED_KINDS = ("ConfigMap", "PersistentVolumeClaim")
# Kinds that need a Kubernetes control plane or an operator: rendered, validated by tests/charts,
# not run here.
NOT_PLAYED = {
    "Service": "no kube-proxy: each Service's name becomes a network alias of the pods it selects",
    "HorizontalPodAutoscaler": "no controller manager",
    "PodDisruptionBudget": "no eviction API",
    "NetworkPolicy": "podman enforces no NetworkPolicy",
    "ServiceAccount": "no API server",
    "Role": "no API server",
    "RoleBinding": "no API server",
    "ServiceMonitor": "needs the Prometheus Operator",
    "PrometheusRule": "needs the Prometheus Operator",
    "ScaledObject": "needs KEDA",
    "RayCluster": "needs the KubeRay operator",
    "RayService": "needs the KubeRay operator",
    "Pod": "helm test hook, run by `helm test` on a cluster",
}
# What a workaround may never change: what the container runs, sees and listens on.
GUARDED_CONTAINER_FIELDS = ("command", "args", "env", "envFrom", "ports", "volumeMounts")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Kubernetes variable references in command and args: $(NAME), and $$ for a literal $.
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass(frozen=True)
class Workaround:
    """One change the smoke makes because podman falls short, and why."""

    workload: str
    change: str
    reason: str


class GuardError(RuntimeError):
    """A workaround changed what a container runs or sees."""


def helm_binary() -> str:
    local = ROOT / "tools" / "bin" / "helm"
    return str(local) if local.exists() else "helm"


def render(values: list[Path] | None = None, helm: str | None = None) -> list[dict[str, Any]]:
    """`helm template` of the chart with the given values files (default: the local profile)."""
    files = [LOCAL_VALUES] if values is None else values
    cmd = [helm or helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in files:
        cmd += ["-f", str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def name_of(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["name"])


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def service_aliases(docs: list[dict[str, Any]], workload: dict[str, Any]) -> list[str]:
    """Names of the Services whose selector matches the workload's pod labels."""
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    names = []
    for doc in docs:
        selector = doc.get("spec", {}).get("selector") if doc["kind"] == "Service" else None
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            names.append(name_of(doc))
    return names


def skipped(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Kind -> names of what the smoke does not play (each kind's reason is NOT_PLAYED[kind])."""
    out: dict[str, list[str]] = {}
    for doc in docs:
        if doc["kind"] not in (*WORKLOAD_KINDS, *PLAYED_KINDS):
            out.setdefault(doc["kind"], []).append(name_of(doc))
    return out


def secret_refs(spec: dict[str, Any]) -> list[str]:
    """Where a pod reads a Secret: podman's handling of these is broken (the smoke refuses them)."""
    found = [f"volume {v['name']}" for v in spec.get("volumes", []) if "secret" in v]
    for container in spec.get("containers", []):
        for env in container.get("env", []):
            if "secretKeyRef" in env.get("valueFrom", {}):
                found.append(f"{container['name']} env {env['name']}")
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                found.append(f"{container['name']} envFrom {source['secretRef']['name']}")
    return found


def container_env(container: dict[str, Any], configmaps: list[dict[str, Any]]) -> dict[str, str]:
    """The variables the kubelet expands $(NAME) with: envFrom ConfigMaps in order, then env values."""
    by_name = {name_of(c): c.get("data") or {} for c in configmaps}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_name.get(source["configMapRef"]["name"], {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """A command or argument as the kubelet passes it: $(NAME) replaced when NAME is set, $$ -> $."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return VAR_REF.sub(substitute, value)


def apply_workarounds(
    doc: dict[str, Any], configmaps: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], list[Workaround]]:
    """The workload as the smoke plays it, and the workarounds that made it so."""
    played = copy.deepcopy(doc)
    name = name_of(doc)
    done: list[Workaround] = []
    spec = pod_spec(played)
    refs = secret_refs(spec)
    if refs:
        raise GuardError(
            f"{name} reads Secrets ({', '.join(refs)}): podman mishandles them; use a profile without"
        )
    if played["kind"] == "StatefulSet":
        # podman 4.3 plays Pods, Deployments and DaemonSets only; the pod template is played as is.
        played["kind"] = "Deployment"
        for key in ("serviceName", "volumeClaimTemplates", "podManagementPolicy", "updateStrategy"):
            played["spec"].pop(key, None)
        done.append(
            Workaround(
                name,
                "StatefulSet played as a Deployment (same pod template)",
                "podman 4.3 kube play has no StatefulSet",
            )
        )
    replicas = played["spec"].get("replicas", 1)
    if replicas > 1:
        done.append(
            Workaround(
                name,
                f"{replicas} replicas played as {replicas} one-replica copies ({name}-r0...), each on its own",
                "one `kube play` puts all replicas in one network namespace, where their ports clash",
            )
        )
    for container in spec.get("containers", []):
        env = container_env(container, configmaps or [])
        for field in ("command", "args"):
            values = container.get(field) or []
            expanded = [expand(v, env) for v in values]
            if expanded != values:
                container[field] = expanded
                done.append(
                    Workaround(
                        name,
                        f"{container['name']}: $(VAR) in {field} expanded by the smoke, as the kubelet does",
                        "podman passes $(VAR) references literally",
                    )
                )
        for probe in PROBES:
            if probe in container:
                kind = next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in container[probe])
                done.append(
                    Workaround(
                        name,
                        f"{container['name']}: {probe} ({kind}) run by the smoke from the host (manifest unchanged)",
                        "podman accepts probes but runs none of them without systemd",
                    )
                )
    return played, done


def replicas_of(played: dict[str, Any]) -> list[dict[str, Any]]:
    """One single-replica copy per replica (named <name>-r<i>), or the workload itself."""
    count = int(played["spec"].get("replicas", 1))
    if count <= 1:
        return [played]
    copies = []
    for index in range(count):
        one = copy.deepcopy(played)
        one["metadata"]["name"] = f"{name_of(played)}-r{index}"
        one["spec"]["replicas"] = 1
        copies.append(one)
    return copies


def guarded_view(doc: dict[str, Any], configmaps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The parts of a workload that no workaround may change, command and args as the kubelet expands them."""
    spec = pod_spec(doc)
    containers = {}
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        view = {field: c.get(field) for field in GUARDED_CONTAINER_FIELDS}
        env = container_env(c, configmaps or [])
        for field in ("command", "args"):
            if view[field] is not None:
                view[field] = [expand(v, env) for v in view[field]]
        containers[c["name"]] = view
    return {"containers": containers, "volumes": spec.get("volumes")}


def guard(
    original: dict[str, Any], played: dict[str, Any], configmaps: list[dict[str, Any]] | None = None
) -> None:
    """Raises GuardError when the played workload differs in args, env, ports or volumes."""
    before, after = guarded_view(original, configmaps), guarded_view(played, configmaps)
    if before == after:
        return
    changed = []
    for cname in sorted(set(before["containers"]) | set(after["containers"])):
        old, new = before["containers"].get(cname), after["containers"].get(cname)
        if old is None or new is None:
            changed.append(f"container {cname} added or removed")
            continue
        changed += [f"{cname}.{f}" for f in GUARDED_CONTAINER_FIELDS if old[f] != new[f]]
    if before["volumes"] != after["volumes"]:
        changed.append("volumes")
    raise GuardError(f"a workaround changed {name_of(original)}: {', '.join(changed)}")


def plan(docs: list[dict[str, Any]]) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[Workaround]]:
    """(original, played) per workload, guarded, and every workaround applied."""
    pairs = []
    all_workarounds: list[Workaround] = []
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    for doc in workloads(docs):
        played, done = apply_workarounds(doc, configmaps)
        guard(doc, played, configmaps)
        pairs.append((doc, played))
        all_workarounds += done
    return pairs, all_workarounds


def startup_budget(container: dict[str, Any]) -> float:
    """Seconds before the kubelet would restart a container that never comes up.

    The start-up probe's budget when there is one (liveness waits for it), else the liveness probe's;
    a container with neither is never restarted for being slow: 60 s is the smoke's own limit."""
    probe = container.get("startupProbe") or container.get("livenessProbe")
    if not probe:
        return 60.0
    return float(probe.get("initialDelaySeconds", 0)) + float(probe.get("periodSeconds", 10)) * float(
        probe.get("failureThreshold", 3)
    )


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def fingerprint(doc: dict[str, Any], configmaps: list[dict[str, Any]] | None = None) -> str:
    return json.dumps(guarded_view(doc, configmaps), sort_keys=True)

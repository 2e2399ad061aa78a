"""The contract between the chart and the program it runs, for the defaults and every ci/ values set.

Every rendered llmops container's command and arguments are accepted by the real ``llmops`` CLI
(``llmops serve <service> --check``, in process), with the environment the pod would get (its
``env`` and the rendered ConfigMaps of its ``envFrom``) and its mounted files written under a temp
folder at the mount path's place; the settings loader then reads exactly what the pod would. The
ports the process would bind are the container's ports. Every ConfigMap a pod reads is rendered,
and every Secret is rendered or one the values document as the user's to supply, with a key they
name. RayService's ``import_path`` imports and builds a Serve application from the chart's args.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.conftest import CHART, VALUES_SETS, Doc, PodTemplate, Rendered, load_values, render

_VALUES_TEXT = (CHART / "values.yaml").read_text()


def _llmops_containers(rendered: Rendered) -> Iterator[tuple[PodTemplate, Doc]]:
    """Containers that run the llmops CLI (the images' entrypoint is ``llmops``)."""
    for pod in rendered.pod_templates():
        if pod.owner_kind in ("RayCluster", "RayService"):
            continue  # KubeRay replaces the command with `ray start`; see the env test below
        for container in pod.spec["containers"]:
            args = container.get("args") or []
            if not container.get("command") and args[:1] == ["serve"]:
                yield pod, container


def _config_map_data(rendered: Rendered, name: str) -> dict[str, str] | None:
    for doc in rendered.of_kind("ConfigMap"):
        if doc["metadata"]["name"] == name:
            return {k: str(v) for k, v in (doc.get("data") or {}).items()}
    return None


def _secret_data(rendered: Rendered, name: str) -> dict[str, str] | None:
    for doc in rendered.of_kind("Secret"):
        if doc["metadata"]["name"] == name:
            return dict(doc.get("stringData") or {}) | dict(doc.get("data") or {})
    return None


def _user_secrets(values: Doc) -> dict[str, set[str]]:
    """Secrets the values name as the user's (``existingSecret``), with the keys they document:
    the sibling ``secretKey`` and any key the ``existingSecret`` comment names in backquotes."""
    found: dict[str, set[str]] = {}

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        name = node.get("existingSecret")
        if isinstance(name, str) and name:
            keys = {node["secretKey"]} if isinstance(node.get("secretKey"), str) else set()
            found.setdefault(name, set()).update(keys)
        for value in node.values():
            walk(value)

    walk(values)
    comments = [line for line in _VALUES_TEXT.splitlines() if "# --" in line and "Secret" in line]
    documented = {key for line in comments for key in re.findall(r"`([A-Za-z0-9_.\-]+)`", line)}
    for keys in found.values():
        keys.update(documented)
    return found


_PLACEHOLDERS = {
    "LLMOPS_API_KEY": "placeholder-service-key",
    "LLMOPS_REDIS_URL": "redis://user:secret@redis.example:6379/0",
}


def _tls_files(folder: Path) -> dict[str, bytes]:
    """A self-signed certificate as a kubernetes.io/tls Secret holds it (with ca.crt)."""
    key, crt = folder / "k.pem", folder / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes(), "ca.crt": crt.read_bytes()}


_API_KEYS = yaml.safe_dump(
    {"keys": [{"id": "svc", "tenant": "platform", "role": "admin", "sha256": hashlib.sha256(b"placeholder-service-key").hexdigest()}]}
).encode()  # fmt: skip


def pod_environment(
    rendered: Rendered, pod: PodTemplate, container: Doc, root: Path
) -> tuple[dict[str, str], list[str]]:
    """The container's environment with mounted paths moved under ``root``, and what it reads that
    neither the chart renders nor the values document."""
    problems: list[str] = []
    user_secrets = _user_secrets(load_values_for(rendered))
    volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
    mounts = sorted(container.get("volumeMounts") or [], key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's volumeClaimTemplates
        if "configMap" in volume:
            data = _config_map_data(rendered, volume["configMap"]["name"])
            if data is None and not volume["configMap"].get("optional"):
                problems.append(
                    f"volume {mount['name']}: ConfigMap {volume['configMap']['name']} is not rendered"
                )
            for key, text in (data or {}).items():
                (target / key).write_text(text)
        elif "secret" in volume:
            # the user's Secret: a TLS pair, or the API keys file under each key the values name
            keys = user_secrets.get(volume["secret"]["secretName"], set())
            files = _tls_files(root) if mount["name"] == "tls" else {}
            files |= {key: _API_KEYS for key in keys if key.endswith(".yaml")}
            for key, content in files.items():
                (target / key).write_bytes(content)

    def moved(value: str) -> str:
        for mount in mounts:
            path = mount["mountPath"]
            if value == path or value.startswith(path.rstrip("/") + "/"):
                return str(root / value.lstrip("/"))
        return value

    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = _config_map_data(rendered, ref["name"])
            if data is None and not ref.get("optional"):
                problems.append(f"envFrom ConfigMap {ref['name']} is not rendered")
            env |= data or {}
        elif "secretRef" in source:
            ref = source["secretRef"]
            if _secret_data(rendered, ref["name"]) is None and ref["name"] not in user_secrets:
                problems.append(
                    f"envFrom Secret {ref['name']} is neither rendered nor a documented existingSecret"
                )
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            rendered_secret = _secret_data(rendered, ref["name"])
            if rendered_secret is not None:
                if ref["key"] not in rendered_secret:
                    problems.append(f"env {item['name']}: Secret {ref['name']} has no key {ref['key']}")
            elif ref["key"] not in user_secrets.get(ref["name"], set()):
                problems.append(
                    f"env {item['name']}: Secret {ref['name']} key {ref['key']} is neither rendered nor documented"
                )
            env[item["name"]] = _PLACEHOLDERS.get(item["name"], "placeholder")
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            data = _config_map_data(rendered, ref["name"]) or {}
            if ref["key"] not in data:
                problems.append(
                    f"env {item['name']}: ConfigMap {ref['name']} key {ref['key']} is not rendered"
                )
            env[item["name"]] = data.get(ref["key"], "")
        else:
            env[item["name"]] = "from-the-downward-api"
    for name, volume in volumes.items():
        secret = volume.get("secret")
        if (
            secret
            and _secret_data(rendered, secret["secretName"]) is None
            and secret["secretName"] not in user_secrets
        ):
            problems.append(
                f"volume {name}: Secret {secret['secretName']} is neither rendered nor documented"
            )
    # a mounted file a setting names must be a key the Secret has or the values document
    for var, value in env.items():
        for mount in mounts:
            volume = volumes.get(mount["name"], {})
            prefix = mount["mountPath"].rstrip("/") + "/"
            if "secret" in volume and value.startswith(prefix):
                key = value[len(prefix) :]
                documented = user_secrets.get(volume["secret"]["secretName"], set())
                if key not in documented and key not in (
                    _secret_data(rendered, volume["secret"]["secretName"]) or {}
                ):
                    problems.append(
                        f"{var} reads {key} of Secret {volume['secret']['secretName']}, which nothing documents"
                    )
    return {name: moved(value) for name, value in env.items()}, problems


_VALUES_BY_RENDER: dict[int, Doc] = {}


def load_values_for(rendered: Rendered) -> Doc:
    return _VALUES_BY_RENDER[id(rendered)]


@pytest.fixture(scope="module")
def contract_renders(renders: dict[str, Rendered]) -> dict[str, Rendered]:
    for name, rendered in renders.items():
        _VALUES_BY_RENDER[id(rendered)] = load_values(name)
    return renders


_CHECKED: dict[str, tuple[int, str]] = {}


def serve_check(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``llmops <args> --check`` in process with exactly ``env`` as its LLMOPS_* environment."""
    from typer.testing import CliRunner

    from llmops.cli import app

    key = json.dumps([args, sorted(env.items())])
    if key not in _CHECKED:
        import os

        clear: dict[str, str | None] = {name: None for name in os.environ if name.startswith("LLMOPS_")}
        result = CliRunner().invoke(app, [*args, "--check"], env=clear | dict(env))
        _CHECKED[key] = (result.exit_code, result.output)
    return _CHECKED[key]


def bound_ports(args: list[str], env: dict[str, str]) -> set[int]:
    """The ports ``llmops serve`` binds with these arguments and settings."""
    from llmops.common.settings import Settings

    settings = Settings.load(env=env)
    service = args[1]
    section = settings.section(service)  # type: ignore[arg-type]
    options = dict(zip(args[2::2], args[3::2], strict=False))
    ports = {
        int(options.get("--port", section.port)),
        int(options.get("--metrics-port", section.metrics_port)),
    }
    http = {"serving": settings.serving, "router": settings.router}.get(service)
    if http is not None and http.http_enabled:
        ports.add(http.http_port)
    return ports


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_every_llmops_container_starts_with_what_the_chart_gives_it(
    contract_renders: dict[str, Rendered], name: str, tmp_path: Path
) -> None:
    rendered = contract_renders[name]
    problems: list[str] = []
    checked = 0
    for index, (pod, container) in enumerate(_llmops_containers(rendered)):
        where = f"{pod.where} container {container['name']}"
        env, missing = pod_environment(rendered, pod, container, tmp_path / str(index))
        problems += [f"{where}: {m}" for m in missing]
        code, output = serve_check(container["args"], env)
        checked += 1
        if code != 0:
            problems.append(f"{where}: llmops {' '.join(container['args'])} --check exited {code}:\n{output}")
            continue
        declared = {p["containerPort"] for p in container.get("ports") or []}
        bound = bound_ports(container["args"], env)
        if bound != declared:
            problems.append(
                f"{where}: the process binds {sorted(bound)}, the container declares {sorted(declared)}"
            )
    assert not problems, "\n".join(problems)
    if name != "minimal-values":
        assert checked >= 4, f"{name}: expected the control-plane services and serving, checked {checked}"


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_ray_pods_environment_is_accepted_by_the_settings_loader(
    contract_renders: dict[str, Rendered], name: str, tmp_path: Path
) -> None:
    from llmops.common.settings import Settings, SettingsError

    rendered = contract_renders[name]
    problems: list[str] = []
    for index, pod in enumerate(rendered.pod_templates()):
        if pod.owner_kind not in ("RayCluster", "RayService"):
            continue
        for container in pod.spec["containers"]:
            env, missing = pod_environment(rendered, pod, container, tmp_path / str(index))
            problems += [f"{pod.where}: {m}" for m in missing]
            try:
                Settings.load(env=env)
            except SettingsError as exc:
                problems.append(f"{pod.where}: {exc}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_every_probe_and_service_port_is_a_container_port(
    contract_renders: dict[str, Rendered], name: str
) -> None:
    rendered = contract_renders[name]
    problems: list[str] = []
    for pod in rendered.pod_templates():
        for container in pod.spec["containers"]:
            ports: dict[Any, int] = {}
            for port in container.get("ports") or []:
                ports[port["containerPort"]] = ports[port.get("name", "")] = port["containerPort"]
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(probe_name) or {}
                for action in ("grpc", "httpGet", "tcpSocket"):
                    if action in probe and probe[action]["port"] not in ports:
                        problems.append(
                            f"{pod.where} {container['name']} {probe_name}: port {probe[action]['port']}"
                        )
    for service in rendered.of_kind("Service"):
        selector = service["spec"].get("selector")
        pods = rendered.pods_selected_by({"matchLabels": selector}) if selector else []
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in pods:
                if target not in pod.container_ports():
                    problems.append(
                        f"Service/{service['metadata']['name']} targets {target}, not open in {pod.where}"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", [n for n in VALUES_SETS if "rayservice" in n])
def test_ray_service_import_path_builds_an_application_from_the_charts_args(
    contract_renders: dict[str, Rendered], name: str
) -> None:
    from ray import serve

    for service in contract_renders[name].of_kind("RayService"):
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        for application in config["applications"]:
            module_name, _, attribute = application["import_path"].partition(":")
            builder = getattr(importlib.import_module(module_name), attribute)
            built = builder(application["args"])
            assert isinstance(built, serve.Application), f"{application['import_path']} built {built!r}"
            with pytest.raises(ValueError, match="no_such_arg"):
                builder(application["args"] | {"no_such_arg": 1})


def test_the_contract_catches_an_argument_llmops_does_not_take(helm: str, tmp_path: Path) -> None:
    """The defect this test exists for: a serving pod passed ``--http-port`` and crash-looped."""
    rendered = render(helm)
    _VALUES_BY_RENDER[id(rendered)] = load_values("defaults")
    pod, container = next((p, c) for p, c in _llmops_containers(rendered) if c["args"][1] == "serving")
    env, _ = pod_environment(rendered, pod, container, tmp_path)
    assert serve_check(container["args"], env)[0] == 0
    code, output = serve_check([*container["args"], "--http-port", "8000"], env)
    assert code == 2 and "--http-port" in output
    code, output = serve_check(container["args"], env | {"LLMOPS_SERVING_HTTP_PROT": "8000"})
    assert code == 2 and "LLMOPS_SERVING_HTTP_PROT" in output


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_every_config_map_and_secret_any_pod_reads_is_rendered_or_documented(
    contract_renders: dict[str, Rendered], name: str, tmp_path: Path
) -> None:
    """All pods, not only llmops ones (MLflow's backend-store and S3 Secrets, Redis's password)."""
    rendered = contract_renders[name]
    problems: list[str] = []
    for index, pod in enumerate(rendered.pod_templates()):
        for container in pod.containers:
            _, missing = pod_environment(rendered, pod, container, tmp_path / str(index))
            problems += [f"{pod.where} {container['name']}: {m}" for m in missing]
    assert not problems, "\n".join(problems)

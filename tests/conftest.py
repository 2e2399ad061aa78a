"""Shared test configuration: markers, and skipping what needs a GPU on machines without one."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _no_gpu_reason() -> str | None:
    """Why GPU tests cannot run here (``None`` when they can)."""
    if shutil.which("nvidia-smi") is None:
        return "needs an NVIDIA GPU (no nvidia-smi here)"
    try:
        import torch
    except ImportError:
        return "needs an NVIDIA GPU and torch (torch is not installed)"
    if not torch.cuda.is_available():
        build = (
            torch.__version__
            if torch.version.cuda is None
            else f"{torch.__version__}, CUDA {torch.version.cuda}"
        )
        return f"needs an NVIDIA GPU that torch can use (torch {build} sees none)"
    return None


def _has_gpu() -> bool:
    return _no_gpu_reason() is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no GPU can run them. The marker decides, not keywords: a
    parameter id ``gpu`` (or a test named after GPUs) is a keyword too, and runs everywhere."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = _no_gpu_reason() if marked else None
    if reason is None:
        return
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


def require_tool(name: str) -> str:
    """Path of an external binary; missing in CI is a failure, elsewhere a skip with the reason."""
    path = shutil.which(name)
    if path is None:
        repo_tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "bin", name)
        path = repo_tool if os.access(repo_tool, os.X_OK) else None
    if path is None:
        message = f"{name} is not installed (run `make setup`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _start_ray(ray: Any, attempts: int = 3, **options: Any) -> None:
    """``ray.init``, started again when its node did not register in time: Ray waits a fixed 30 s
    for its raylet, which a busy 2-core machine can miss; any other failure is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**options)
            return
        except Exception as exc:
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            _kill_children_mentioning(str(options["_temp_dir"]))  # what the failed start left running


def _kill_children_mentioning(text: str) -> None:
    """SIGKILL this process's children whose command line holds ``text`` (a failed Ray start's
    GCS and raylet: the runtime never knew it had them, so ``ray.shutdown`` does not stop them)."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if (
                entry.name.isdigit()
                and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me
                and text in (entry / "cmdline").read_bytes().decode(errors="replace")
            ):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[Path]:
    """One local Ray runtime for the whole test session (its temp folder): training's Ray runner
    and Ray Serve share it instead of each starting their own."""
    ray = pytest.importorskip("ray")
    with tempfile.TemporaryDirectory(prefix="llmops-ray-", dir="/tmp") as temp:
        _start_ray(
            ray,
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=temp,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=256 * 1024 * 1024,
            namespace="llmops-tests",
            _system_config={"worker_niceness": 0},  # as the training runner starts its own runtime
        )
        try:
            yield Path(temp)
        finally:
            ray.shutdown()

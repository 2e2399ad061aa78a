"""Shared test configuration: markers, and skipping what needs a GPU on machines without one."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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

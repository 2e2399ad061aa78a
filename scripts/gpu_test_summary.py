"""What `make test-gpu` ran and skipped, and why: the GPU environment, then each test's outcome.

Reads the JUnit XML pytest wrote; prints the GPU (nvidia-smi), torch and its CUDA, vLLM and the
device it runs on, bitsandbytes and TensorRT-LLM (or why each is missing), every test that ran
with its outcome, and the skipped ones grouped by reason.

Usage: python scripts/gpu_test_summary.py build/test-gpu/junit.xml
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def _gpu() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none (no nvidia-smi)"
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip().replace("\n", "; ") or f"nvidia-smi failed: {done.stderr.strip()[:200]}"


def _package(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # not installed, or it fails to import: say which
        return f"not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return str(getattr(module, "__version__", "installed"))


def environment() -> list[str]:
    lines = [f"GPU: {_gpu()}"]
    try:
        import torch

        cuda = torch.version.cuda or "none (CPU build)"
        lines.append(f"torch {torch.__version__}, CUDA {cuda}, sees a GPU: {torch.cuda.is_available()}")
    except ImportError:
        lines.append("torch: not installed")
    vllm = _package("vllm")
    if not vllm.startswith("not usable"):
        try:
            from vllm.platforms import current_platform

            vllm += f" on {current_platform.device_type}"
        except Exception as exc:  # an old or broken vLLM: report, do not fail the summary
            vllm += f" (platform unknown: {type(exc).__name__})"
    lines.append(f"vLLM: {vllm}")
    lines.append(f"bitsandbytes: {_package('bitsandbytes')}")
    lines.append(f"TensorRT-LLM: {_package('tensorrt_llm')}")
    return lines


def outcomes(path: str) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    ran: list[tuple[str, str]] = []
    skipped: dict[str, list[str]] = defaultdict(list)
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if (skip := case.find("skipped")) is not None:
            reason = skip.get("message", "").removeprefix("Skipped: ")
            skipped[reason].append(name)
        elif case.find("failure") is not None:
            ran.append((name, "FAILED"))
        elif case.find("error") is not None:
            ran.append((name, "ERROR"))
        else:
            ran.append((name, "passed"))
    return ran, skipped


def main(path: str) -> int:
    print("\n== make test-gpu: summary ==")
    for line in environment():
        print(f"  {line}")
    ran, skipped = outcomes(path)
    print(f"ran {len(ran)}:")
    for name, outcome in ran:
        print(f"  {outcome:7} {name}")
    print(f"skipped {sum(len(v) for v in skipped.values())}:")
    for reason, names in sorted(skipped.items()):
        print(f"  {len(names)} x {reason}")
        for name in names:
            print(f"      {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

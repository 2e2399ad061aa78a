"""Run every benchmark, one after another (`make bench`); exit non-zero when any goal is missed.

Each benchmark measures its own baseline in the same run and ends with RESULT lines (see
``benchmarks/gate.py``). This prints each benchmark's output as it comes, then a summary of every
RESULT line (each benchmark's stderr goes to ``benchmarks/results/<name>.stderr.log``, shown when
it breaks). By default every benchmark runs its quick workload (still at least 3 alternating
rounds, medians); ``--full`` runs the full ones. ``--only cache,training`` picks some.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gate import QUICK_ENV

ROOT = Path(__file__).resolve().parents[1]
#: Every benchmark, as a module run with ``python -m`` from the repository root.
BENCHMARKS = {
    "grpc_runtime": "benchmarks.grpc_runtime",
    "registry": "benchmarks.registry.run",
    "cache": "benchmarks.cache.run",
    "serving": "benchmarks.serving.run",
    "ray_overhead": "benchmarks.serving.ray_overhead",
    "structured": "benchmarks.serving.structured",
    "quantization": "benchmarks.quantization.run",
    "training": "benchmarks.training.run",
    "training_ddp": "benchmarks.training.ddp",
    "fleet_warm_start": "benchmarks.fleet.warm_start",
}


def run_one(module: str, env: dict[str, str], timeout: float, log: Path) -> tuple[int, list[str], float]:
    """Run one benchmark, echoing its output (its stderr, the libraries' chatter, goes to ``log``);
    its exit code, RESULT lines and seconds."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors,
            text=True, start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        results: list[str] = []
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("RESULT "):
                    results.append(line.strip())
            code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = 124
    if code not in (0, 1) or not results:  # it broke: show why
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]), flush=True)
    return code, results, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full workloads (slower)")
    parser.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHMARKS))
    parser.add_argument("--timeout", type=float, default=900, help="longest run of one benchmark (s)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    env = {**os.environ, QUICK_ENV: "0" if args.full else "1"}
    summary: list[tuple[str, int, list[str], float]] = []
    for name in names:
        print(f"== {name} ({BENCHMARKS[name]})", flush=True)
        log = ROOT / "benchmarks" / "results" / f"{name}.stderr.log"
        code, results, seconds = run_one(BENCHMARKS[name], env, args.timeout, log)
        summary.append((name, code, results, seconds))
    print("\n== summary")
    failed = 0
    for name, code, results, seconds in summary:
        ok = code == 0 and bool(results) and not any(r.endswith("MISSED") for r in results)
        failed += not ok
        status = "ok" if ok else ("MISSED" if results and code in (0, 1) else f"FAILED (exit {code})")
        print(f"{name:<14}{status:<20}{seconds:>7.0f} s")
        for line in results:
            print(f"  {line}")
    print(f"{len(summary) - failed} of {len(summary)} benchmarks met every goal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

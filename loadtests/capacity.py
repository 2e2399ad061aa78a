"""The highest load a deployment sustains with zero errors: a sweep of Locust runs at rising user counts.

    .venv/bin/python -m loadtests.capacity --scenario cache --users 1,2,4,8,16,32 --seconds 20 \\
        --serving 127.0.0.1:50054 --out build/loadtest/capacity-cache --cache-repeat 1

Options it does not know go to every Locust run (``--cache-repeat 1``: only pooled prompts, so
after each prompt's first answer every call is a hit).

Each step is one headless Locust run (``loadtests/locustfile.py``) of ``--seconds`` at a fixed user
count (all users start at once); the sweep stops at the first step with a failed call or a p95 over
``--max-p95-ms``. Per step it records the calls per second, the failures and the p50 / p95 / p99 of
the calls that matter for the scenario: ``serving.Generate`` for ``generate``, the cache hits
(``serving.Generate (cached)``) for ``cache``. It prints a table, writes ``capacity.json`` and draws
``capacity.png`` (calls/s and latency percentiles against users) in ``--out``. Users without think
time are closed-loop clients: each sends its next call when the last one answers, so calls/s at
the highest clean step is what the deployment sustained.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
#: The entry whose numbers a scenario's capacity is read from.
ENTRIES = {
    "generate": "serving.Generate",
    "cache": "serving.Generate (cached)",
    "stream": "serving.GenerateStream",
}


@dataclasses.dataclass(frozen=True)
class Step:
    users: int
    calls: int
    failures: int
    calls_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    exit_code: int

    @property
    def clean(self) -> bool:
        return self.failures == 0 and self.exit_code == 0 and self.calls > 0


def read_entry(stats_csv: Path, name: str) -> dict[str, str] | None:
    """The row of Locust's ``*_stats.csv`` for ``name`` (``None`` when the run made no such call)."""
    with stats_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == name:
                return row
    return None


def failures_in(stats_csv: Path) -> int:
    """Failed calls over every entry of the run (a failed control-plane call counts too)."""
    with stats_csv.open(newline="") as handle:
        return sum(int(row["Failure Count"]) for row in csv.DictReader(handle) if row["Name"] != "Aggregated")


def step_from(users: int, prefix: Path, entry: str, exit_code: int) -> Step:
    stats = Path(f"{prefix}_stats.csv")
    row = read_entry(stats, entry) if stats.is_file() else None
    if row is None:
        return Step(users, 0, failures_in(stats) if stats.is_file() else 0, 0.0, 0.0, 0.0, 0.0, exit_code)
    return Step(
        users=users,
        calls=int(row["Request Count"]),
        failures=failures_in(stats),
        calls_per_second=float(row["Requests/s"]),
        p50_ms=float(row["50%"]),
        p95_ms=float(row["95%"]),
        p99_ms=float(row["99%"]),
        exit_code=exit_code,
    )


def run_step(users: int, seconds: float, scenario: str, out: Path, target: Sequence[str]) -> Step:
    prefix = out / f"users-{users}"
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--only-summary", "--scenario", scenario,
        "--max-error-ratio", "0", "--csv", str(prefix), *target,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    (out / f"users-{users}.log").write_text(done.stdout + done.stderr)
    return step_from(users, prefix, ENTRIES[scenario], done.returncode)


def plot(steps: Sequence[Step], scenario: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s.users for s in steps]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(users, [s.calls_per_second for s in steps], marker="o")
    left.set(xlabel="users", ylabel="calls/s", title=f"{scenario}: throughput", xscale="log", xticks=users)
    left.set_xticklabels([str(u) for u in users])
    for label, values in (("p50", [s.p50_ms for s in steps]), ("p95", [s.p95_ms for s in steps]),
                          ("p99", [s.p99_ms for s in steps])):  # fmt: skip
        right.plot(users, values, marker="o", label=label)
    right.set(xlabel="users", ylabel="ms", title=f"{scenario}: latency", xscale="log", xticks=users)
    right.set_xticklabels([str(u) for u in users])
    right.legend()
    for step in steps:
        if not step.clean:
            for axis in (left, right):
                axis.axvline(step.users, color="red", linestyle=":", label="errors")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _stack_serving() -> str:
    """The running local stack's serving address, or ``""``."""
    from loadtests.run import _data_dir
    from loadtests.targets import stack_addresses

    try:
        return stack_addresses(_data_dir("")).get("serving", "")
    except Exception:  # no settings, no stack: the caller says what to pass
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(ENTRIES), default="generate")
    parser.add_argument("--users", default="1,2,4,8,16,32", help="Comma-separated user counts, rising")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each step")
    parser.add_argument("--max-p95-ms", type=float, default=None, help="Stop once a step's p95 exceeds this")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "loadtest" / "capacity")
    parser.add_argument("--serving", default="", help="Serving gRPC HOST:PORT (default: the local stack's)")
    parser.add_argument("--model", default="", help="Served model name (default: the first READY one)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args, extra = parser.parse_known_args(argv)  # the rest goes to every Locust run (e.g. --cache-repeat 1)
    users = sorted({int(u) for u in args.users.split(",") if u.strip()})
    args.out.mkdir(parents=True, exist_ok=True)
    serving = args.serving or _stack_serving()
    if not serving:
        print(
            "error: no local stack runs (`llmops up`, `make demo`); give --serving HOST:PORT", file=sys.stderr
        )
        return 2
    target = ["--max-tokens", str(args.max_tokens), "--serving", serving, *extra]
    target += ["--model", args.model] if args.model else []
    console = Console()
    steps: list[Step] = []
    with console.status("") as status:
        for count in users:
            status.update(f"{args.scenario}: {count} users for {args.seconds:g} s")
            step = run_step(count, args.seconds, args.scenario, args.out, target)
            steps.append(step)
            console.print(
                f"{count:4d} users: {step.calls_per_second:8.1f} calls/s, p95 {step.p95_ms:.0f} ms, "
                f"{step.failures} failed" + ("" if step.exit_code == 0 else f" (exit {step.exit_code})")
            )
            if not step.clean or (args.max_p95_ms is not None and step.p95_ms > args.max_p95_ms):
                break
    table = Table(title=f"capacity: {args.scenario} ({ENTRIES[args.scenario]})")
    for column in ("users", "calls", "failed", "calls/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for step in steps:
        style = "" if step.clean else "red"
        table.add_row(
            str(step.users), str(step.calls), str(step.failures), f"{step.calls_per_second:.1f}",
            f"{step.p50_ms:.0f}", f"{step.p95_ms:.0f}", f"{step.p99_ms:.0f}", style=style,
        )  # fmt: skip
    console.print(table)
    clean = [s for s in steps if s.clean]
    best = max(clean, key=lambda s: s.calls_per_second) if clean else None
    if best is not None:
        console.print(
            f"highest load with zero errors: {best.calls_per_second:.1f} calls/s at {best.users} users "
            f"(p50 {best.p50_ms:.0f} / p95 {best.p95_ms:.0f} / p99 {best.p99_ms:.0f} ms)"
        )
    summary = {
        "scenario": args.scenario,
        "entry": ENTRIES[args.scenario],
        "seconds_per_step": args.seconds,
        "steps": [dataclasses.asdict(s) | {"clean": s.clean} for s in steps],
        "best": dataclasses.asdict(best) if best else None,
    }
    (args.out / "capacity.json").write_text(json.dumps(summary, indent=2) + "\n")
    if steps:
        plot(steps, args.scenario, args.out / "capacity.png")
        console.print(f"plot: {args.out / 'capacity.png'}")
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())

"""The capacity sweep reads Locust's stats CSV: the scenario's entry, failures over every entry.

Invariants: a step's calls/s and percentiles are the scenario's own entry (cache hits for
``cache``), failures count every entry (a failed control call makes the step unclean), a run that
made no such call or exited non-zero is not clean.
"""

from __future__ import annotations

from pathlib import Path

from loadtests.capacity import ENTRIES, step_from

HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def _write(prefix: Path, rows: list[str]) -> None:
    Path(f"{prefix}_stats.csv").write_text("\n".join([HEADER, *rows]) + "\n")


def _row(kind: str, name: str, count: int, failures: int, rps: float, p50: int, p95: int, p99: int) -> str:
    return f"{kind},{name},{count},{failures},{p50},{p50},1,{p99},8,{rps},0,{p50},{p50},{p50},{p95},{p95},{p95},{p99},{p99},{p99},{p99},{p99}"


def test_a_step_is_read_from_the_scenarios_entry(tmp_path: Path) -> None:
    prefix = tmp_path / "users-4"
    _write(prefix, [
        _row("grpc", "serving.Generate", 10, 0, 2.0, 400, 900, 950),
        _row("grpc", "serving.Generate (cached)", 300, 0, 60.0, 3, 8, 12),
        _row("token", "TTFT", 5, 0, 1.0, 50, 90, 99),
        _row(" ", "Aggregated", 315, 0, 63.0, 3, 800, 900),
    ])  # fmt: skip
    step = step_from(4, prefix, ENTRIES["cache"], 0)
    assert (step.calls, step.calls_per_second, step.p50_ms, step.p95_ms, step.p99_ms) == (300, 60.0, 3, 8, 12)
    assert step.clean
    generate = step_from(4, prefix, ENTRIES["generate"], 0)
    assert generate.calls == 10 and generate.p95_ms == 900


def test_failures_anywhere_or_a_failed_run_make_a_step_unclean(tmp_path: Path) -> None:
    prefix = tmp_path / "users-8"
    _write(prefix, [
        _row("grpc", "serving.Generate", 10, 0, 2.0, 400, 900, 950),
        _row("grpc", "registry.ListModels", 4, 1, 1.0, 2, 3, 4),
        _row(" ", "Aggregated", 14, 1, 3.0, 300, 900, 950),
    ])  # fmt: skip
    step = step_from(8, prefix, ENTRIES["generate"], 0)
    assert step.failures == 1 and not step.clean
    assert not step_from(8, prefix, ENTRIES["generate"], 3).clean  # a threshold failed
    missing = step_from(8, prefix, ENTRIES["cache"], 0)
    assert missing.calls == 0 and not missing.clean
    assert not step_from(16, tmp_path / "never-ran", ENTRIES["generate"], 2).clean

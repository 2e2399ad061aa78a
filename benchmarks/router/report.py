"""The router benchmark's report: tables on stdout, a JSON record and the TTFT-vs-load plot."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.router.measure import RunResult, medians_by


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.0f}"


def table(results: Sequence[RunResult]) -> str:
    """One row per workload, rate and arm: medians over repeats."""
    fields = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_p90_all_s", "success_rate", "throughput_rps",
              "tokens_per_s", "prefix_hit_rate", "ideal_hit_rate", "balance", "spills", "decision_p99_s")  # fmt: skip
    med = {f: medians_by(results, f) for f in fields}
    lines = [
        f"{'wl':<3}{'rate/s':>7} {'arm':<14}{'p50':>7}{'p90':>7}{'p99':>7}{'p90all':>7}{'ok%':>6}"
        f"{'req/s':>7}{'tok/s':>7}{'hit%':>6}{'ideal%':>7}{'bal':>6}{'spill':>6}{'dec99us':>8}  (TTFT ms)"
    ]
    for key in sorted(med["ttft_p90_s"], key=lambda k: (k[0], k[2], k[1])):
        workload, arm, rate = key
        m = {f: med[f][key] for f in fields}
        lines.append(
            f"{workload:<3}{rate:>7.2f} {arm:<14}{_ms(m['ttft_p50_s']):>7}{_ms(m['ttft_p90_s']):>7}"
            f"{_ms(m['ttft_p99_s']):>7}{_ms(m['ttft_p90_all_s']):>7}{100 * m['success_rate']:>6.0f}"
            f"{m['throughput_rps']:>7.2f}{m['tokens_per_s']:>7.1f}{100 * m['prefix_hit_rate']:>6.0f}"
            f"{100 * m['ideal_hit_rate']:>7.0f}{m['balance']:>6.2f}{m['spills']:>6.0f}"
            f"{m['decision_p99_s'] * 1e6:>8.0f}"
        )
    return "\n".join(lines)


def write_json(path: Path, record: dict[str, Any], results: Sequence[RunResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "runs": [r.as_dict() for r in results]}, indent=2, default=str))


def plot(path: Path, results: Sequence[RunResult], title: str) -> Path | None:
    """TTFT p90 (solid) and p50 (dashed) against offered load, one panel per workload, a line per arm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    workloads = sorted({r.workload for r in results})
    p90, p50 = medians_by(results, "ttft_p90_s"), medians_by(results, "ttft_p50_s")
    width = max(7.0, 4.2 * len(workloads))
    fig, axes = plt.subplots(1, len(workloads), figsize=(width, 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        arms = sorted({k[1] for k in p90 if k[0] == workload})
        for i, arm in enumerate(arms):
            rates = sorted(k[2] for k in p90 if k[0] == workload and k[1] == arm)
            color = f"C{i}"
            ax.plot(rates, [p90[(workload, arm, r)] for r in rates], "o-", color=color, label=f"{arm} p90")
            ax.plot(rates, [p50[(workload, arm, r)] for r in rates], "x--", color=color, alpha=0.6)
        ax.set_title(f"workload {workload}")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("TTFT (s), p90 solid, p50 dashed")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, int(width * 14))), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Plots of a finished load test from Prometheus, and the report page that gathers a run's files.

    .venv/bin/python -m loadtests.plots --prometheus http://127.0.0.1:9090 \\
        --run build/loadtest/20261201-090000/locust --out build/loadtest/20261201-090000

draws ``ttft.png`` (p50/p95), ``itl.png`` (p50/p95), ``tokens_per_second.png`` and
``cache_hit_ratio.png`` over the run's window, then writes ``index.html`` embedding them with the
threshold checks, the Locust statistics table and links to Locust's HTML report and CSV files.

The window is ``--start``/``--end`` (Unix seconds), or read from the run's files: ``--run PREFIX``
(Locust's ``--csv`` prefix) takes ``PREFIX_summary.json`` (written by the locustfile) or else the
first and last rows of ``PREFIX_stats_history.csv``. The queries are raw PromQL over the services'
own series (``histogram_quantile`` over ``rate`` of the ``_bucket`` series), so they do not depend
on the recording rules being loaded. A panel whose query returns nothing says "no data"; one that
fails says why; neither stops the others. Exit code 2 when Prometheus could not be reached at all
(the page is still written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import html
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmops.common import metric_names as names

EXIT_UNREACHABLE = 2


@dataclass(frozen=True)
class Panel:
    """One PNG: a title, a y-axis unit, and a PromQL expression per line (``{w}`` is the rate window)."""

    slug: str
    title: str
    unit: str
    lines: tuple[tuple[str, str], ...]


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{{w}}])))"


_TTFT = names.SERVING_TIME_TO_FIRST_TOKEN_SECONDS
_ITL = names.SERVING_INTER_TOKEN_LATENCY_SECONDS
_CACHE = names.CACHE_REQUESTS_TOTAL
PANELS: tuple[Panel, ...] = (
    Panel(
        "ttft",
        "Time to first token",
        "seconds",
        (("p50", _quantile(0.5, _TTFT)), ("p95", _quantile(0.95, _TTFT))),
    ),
    Panel(
        "itl",
        "Inter-token latency",
        "seconds",
        (("p50", _quantile(0.5, _ITL)), ("p95", _quantile(0.95, _ITL))),
    ),
    Panel(
        "tokens_per_second",
        "Generated tokens per second",
        "tokens/s",
        (("tokens/s", f"sum(rate({names.SERVING_GENERATED_TOKENS_TOTAL}[{{w}}]))"),),
    ),
    Panel(
        "cache_hit_ratio",
        "Cache hit ratio (hits / lookups)",
        "ratio",
        (
            (
                "hit ratio",
                f'sum(rate({_CACHE}{{{{result="hit"}}}}[{{w}}])) / sum(rate({_CACHE}{{{{result=~"hit|miss|error"}}}}[{{w}}]))',
            ),
        ),
    ),
)


class PrometheusError(RuntimeError):
    """A query failed; ``unreachable`` when nothing answered at the URL."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


Series = list[tuple[float, float]]


def query_range(
    url: str, expr: str, start: float, end: float, step: float, timeout: float = 10.0
) -> list[tuple[dict[str, str], Series]]:
    """``/api/v1/query_range``: each series' labels and its finite ``(time, value)`` points."""
    params = urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    address = f"{url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(address, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise PrometheusError(f"HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrometheusError(f"Prometheus at {url} unreachable: {reason}", unreachable=True) from None
    except ValueError as exc:
        raise PrometheusError(f"not a Prometheus answer: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(str(body.get("error", "query failed")))
    out = []
    for result in body.get("data", {}).get("result", []):
        points = []
        for stamp, value in result.get("values", []):
            number = float(value)
            if math.isfinite(number):
                points.append((float(stamp), number))
        out.append((dict(result.get("metric", {})), points))
    return out


@dataclass
class PanelResult:
    panel: Panel
    path: Path
    lines: dict[str, list[tuple[dict[str, str], Series]]] = field(default_factory=dict)
    error: str = ""

    @property
    def has_data(self) -> bool:
        return any(points for series in self.lines.values() for _, points in series)


def draw(result: PanelResult, start: float, end: float) -> None:
    """Write the panel's PNG: one line per series, or a "no data" (or error) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3.2), dpi=100)
    try:
        axes.set_title(result.panel.title)
        axes.set_xlabel("seconds since the run started")
        axes.set_ylabel(result.panel.unit)
        axes.set_xlim(0, max(end - start, 1.0))
        if result.has_data:
            for name, series in result.lines.items():
                for labels, points in series:
                    if not points:
                        continue
                    extra = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                    label = f"{name} {{{extra}}}" if extra and len(series) > 1 else name
                    axes.plot([t - start for t, _ in points], [v for _, v in points], label=label, marker=".")
            axes.legend(loc="upper right", fontsize="small")
            axes.grid(True, alpha=0.3)
        else:
            axes.set_yticks([])
            message = result.error or "no data"
            axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, wrap=True)
        figure.tight_layout()
        result.path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(result.path)
    finally:
        plt.close(figure)


def plot_run(
    prometheus: str,
    start: float,
    end: float,
    out: Path,
    *,
    step: float | None = None,
    window: str = "30s",
    timeout: float = 10.0,
) -> tuple[list[PanelResult], str]:
    """Query and draw every panel into ``out``; returns the panels and why Prometheus was
    unreachable (empty when it answered)."""
    step = step or max(1.0, math.ceil((end - start) / 250))
    unreachable = ""
    results = []
    for panel in PANELS:
        result = PanelResult(panel, out / f"{panel.slug}.png")
        for name, template in panel.lines:
            if unreachable:
                result.error = unreachable
                break
            try:
                result.lines[name] = query_range(
                    prometheus, template.format(w=window), start, end, step, timeout
                )
            except PrometheusError as exc:
                result.error = f"query failed: {exc}"
                if exc.unreachable:
                    unreachable = result.error = str(exc)
        draw(result, start, end)
        results.append(result)
    return results, unreachable


# --- the run's files ---------------------------------------------------------------------------------


def run_window(prefix: str) -> tuple[float, float]:
    """The run's start and end (Unix seconds) from its summary, else its stats history."""
    summary = Path(f"{prefix}_summary.json")
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("start") and data.get("end"):
            return float(data["start"]), float(data["end"])
    history = Path(f"{prefix}_stats_history.csv")
    if not history.is_file():
        raise FileNotFoundError(f"neither {summary} nor {history} exists: pass --start and --end")
    with history.open(newline="") as handle:
        stamps = [float(row["Timestamp"]) for row in csv.DictReader(handle) if row.get("Timestamp")]
    if not stamps:
        raise ValueError(f"{history} has no rows: pass --start and --end")
    return min(stamps), max(stamps)


def _stats_table(prefix: str) -> str:
    path = Path(f"{prefix}_stats.csv")
    if not path.is_file():
        return ""
    columns = (
        "Type",
        "Name",
        "Request Count",
        "Failure Count",
        "Median Response Time",
        "95%",
        "99%",
        "Requests/s",
    )
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))

    def cell(value: str) -> str:
        if "." in value:  # Locust writes rates and means with every digit
            with contextlib.suppress(ValueError):
                value = f"{float(value):.2f}"
        return f"<td>{html.escape(value)}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(str(row.get(c, ""))) for c in columns) + "</tr>" for row in rows)
    return f"<h2>Locust statistics (ms)</h2><table><tr>{head}</tr>{body}</table>"


def _checks(prefix: str) -> str:
    path = Path(f"{prefix}_summary.json")
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    items = "".join(
        f'<li class="{"bad" if c.get("failed") else "ok"}">{html.escape(str(c.get("text", "")))}</li>'
        for c in data.get("checks", [])
    )
    return f"<h2>Thresholds (exit code {html.escape(str(data.get('exit_code')))})</h2><ul>{items}</ul>"


def write_index(
    out: Path,
    *,
    start: float,
    end: float,
    panels: Sequence[PanelResult] = (),
    note: str = "",
    run_prefix: str = "",
    locust_html: str = "",
) -> Path:
    """``out/index.html``: the window, checks, links, the statistics table and the plots."""
    out.mkdir(parents=True, exist_ok=True)

    def link(path: str, text: str) -> str:
        href = os.path.relpath(Path(path).resolve(), out.resolve())  # the folder moves as a whole
        return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'

    links = []
    if locust_html and Path(locust_html).is_file():
        links.append(link(locust_html, "Locust HTML report"))
    if run_prefix:
        for suffix in (
            "_stats.csv",
            "_stats_history.csv",
            "_failures.csv",
            "_exceptions.csv",
            "_summary.json",
        ):
            if Path(run_prefix + suffix).is_file():
                links.append(link(run_prefix + suffix, Path(run_prefix + suffix).name))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start))
    images = "".join(
        f'<figure><img src="{html.escape(p.path.name)}" alt="{html.escape(p.panel.title)}"></figure>'
        for p in panels
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llmops load test {html.escape(stamp)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} .bad{{color:#b00}} .ok{{color:#070}}
img{{max-width:100%}}</style></head><body>
<h1>llmops load test</h1>
<p>Window: {html.escape(stamp)}, {end - start:.0f} s.</p>
{f"<p>{html.escape(note)}</p>" if note else ""}
<p>{" | ".join(links)}</p>
{_checks(run_prefix) if run_prefix else ""}
{_stats_table(run_prefix) if run_prefix else ""}
{"<h2>From Prometheus</h2>" + images if panels else ""}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--out", required=True, type=Path, help="Report folder (PNGs and index.html)")
    parser.add_argument("--run", default="", help="Locust --csv prefix of the run (window, table, links)")
    parser.add_argument("--locust-html", default="", help="Locust's HTML report, linked from index.html")
    parser.add_argument("--start", type=float, help="Window start, Unix seconds (default: from --run)")
    parser.add_argument("--end", type=float, help="Window end, Unix seconds (default: from --run)")
    parser.add_argument("--pad", type=float, default=10.0, help="Seconds added after the end (last scrape)")
    parser.add_argument("--step", type=float, help="Query resolution in seconds (default: window / 250)")
    parser.add_argument("--rate-window", default="30s", help="Range of rate() in the queries")
    args = parser.parse_args(argv)
    start, end = args.start, args.end
    if start is None or end is None:
        if not args.run:
            parser.error("give --start and --end, or --run PREFIX")
        try:
            found = run_window(args.run)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        start = found[0] if start is None else start
        end = found[1] if end is None else end
    if end <= start:
        parser.error(f"the window is empty: end {end} <= start {start}")
    end += args.pad
    panels, unreachable = plot_run(
        args.prometheus, start, end, args.out, step=args.step, window=args.rate_window
    )
    index = write_index(
        args.out,
        start=start,
        end=end,
        panels=panels,
        note=unreachable,
        run_prefix=args.run,
        locust_html=args.locust_html,
    )
    for panel in panels:
        print(f"{panel.path}: {'data' if panel.has_data else panel.error or 'no data'}")
    print(f"report: {index}")
    if unreachable:
        print(f"error: {unreachable}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())

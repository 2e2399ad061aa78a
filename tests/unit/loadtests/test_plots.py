"""The load test report from Prometheus: PNG panels and the index page, against canned answers.

A stub Prometheus (``http.server`` on 127.0.0.1 port 0, in this process) answers
``/api/v1/query_range`` from canned JSON. Invariant: every panel becomes a PNG whatever its query
returns — lines for data (NaN points skipped), "no data" for an empty result, the reason for a
failed query — and the page embeds them with the run's checks, table and links; the window comes
from the run's files; an unreachable Prometheus still yields the page and exit code 2.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from loadtests import plots

START = 1_700_000_000.0


def matrix(*values: str) -> dict[str, Any]:
    points = [[START + 5 * i, v] for i, v in enumerate(values)]
    return {
        "status": "success",
        "data": {"resultType": "matrix", "result": [{"metric": {}, "values": points}]},
    }


EMPTY = {"status": "success", "data": {"resultType": "matrix", "result": []}}


def answer(query: str) -> tuple[int, dict[str, Any]]:
    if "time_to_first_token" in query:
        return 200, matrix("0.010", "NaN", "0.030", "0.020")
    if "inter_token" in query:
        return 400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 7"}
    if "generated_tokens" in query:
        return 200, matrix("120", "180", "150")
    return 200, EMPTY  # the cache hit ratio: no cache traffic


class StubPrometheus(BaseHTTPRequestHandler):
    queries: list[dict[str, str]] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        StubPrometheus.queries.append(params)
        code, body = answer(params.get("query", "")) if url.path == "/api/v1/query_range" else (404, {})
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), StubPrometheus)
    StubPrometheus.queries = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_panel_is_drawn_whatever_its_query_returns(prometheus: str, tmp_path: Path) -> None:
    panels, unreachable = plots.plot_run(prometheus, START, START + 20, tmp_path, step=5)
    assert unreachable == ""
    by_slug = {p.panel.slug: p for p in panels}
    assert sorted(by_slug) == ["cache_hit_ratio", "itl", "tokens_per_second", "ttft"]
    for panel in panels:
        assert is_png(panel.path), panel.path
    ttft = by_slug["ttft"]
    assert ttft.has_data
    assert [v for _, v in ttft.lines["p95"][0][1]] == [0.010, 0.030, 0.020]  # NaN skipped
    assert by_slug["tokens_per_second"].has_data
    assert not by_slug["cache_hit_ratio"].has_data and by_slug["cache_hit_ratio"].error == ""
    assert "parse error at char 7" in by_slug["itl"].error
    first = StubPrometheus.queries[0]
    assert (first["start"], first["end"], first["step"]) == (f"{START:.3f}", f"{START + 20:.3f}", "5")
    assert first["query"].startswith("histogram_quantile(0.5, sum by (le) (rate(llmops_serving_time_to_first")


def write_run(prefix: Path) -> None:
    summary = {
        "start": START,
        "end": START + 30,
        "checks": [{"name": "p95 TTFT", "failed": True, "text": "p95 TTFT: 60 ms (limit <= 1 ms) FAILED"}],
        "exit_code": 3,
    }
    Path(f"{prefix}_summary.json").write_text(json.dumps(summary))
    Path(f"{prefix}_stats.csv").write_text(
        "Type,Name,Request Count,Failure Count,Median Response Time,95%,99%,Requests/s\n"
        "grpc,serving.Generate,10,0,120,300,310,1.0\ntoken,TTFT,10,0,40,60,61,1.0\n"
    )
    prefix.with_name("report.html").write_text("<html>locust</html>")


def test_the_cli_writes_the_page_for_a_run(prometheus: str, tmp_path: Path, capsys: Any) -> None:
    prefix = tmp_path / "locust"
    write_run(prefix)
    out = tmp_path / "report"
    code = plots.main(
        [
            "--prometheus",
            prometheus,
            "--run",
            str(prefix),
            "--out",
            str(out),
            "--locust-html",
            str(tmp_path / "report.html"),
        ]
    )
    assert code == 0
    assert StubPrometheus.queries[0]["start"] == f"{START:.3f}"  # the run's window, from its summary
    assert StubPrometheus.queries[0]["end"] == f"{START + 40:.3f}"  # plus 10 s for the last scrape
    page = (out / "index.html").read_text()
    for name in ("ttft.png", "itl.png", "tokens_per_second.png", "cache_hit_ratio.png"):
        assert f'src="{name}"' in page and is_png(out / name)
    assert "../report.html" in page and "locust_stats.csv" in page
    assert "p95 TTFT: 60 ms (limit &lt;= 1 ms) FAILED" in page and "exit code 3" in page
    assert "<td>serving.Generate</td>" in page
    assert "report:" in capsys.readouterr().out


def test_the_window_falls_back_to_the_stats_history(tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    Path(f"{prefix}_stats_history.csv").write_text(
        "Timestamp,User Count,Type,Name\n1700000010,1,,Aggregated\n1700000070,2,,Aggregated\n"
    )
    assert plots.run_window(str(prefix)) == (1700000010.0, 1700000070.0)
    with pytest.raises(FileNotFoundError, match="pass --start and --end"):
        plots.run_window(str(tmp_path / "missing"))


def test_an_unreachable_prometheus_still_writes_the_page(tmp_path: Path, capsys: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    code = plots.main(
        ["--prometheus", dead, "--start", str(START), "--end", str(START + 10), "--out", str(tmp_path)]
    )
    assert code == plots.EXIT_UNREACHABLE
    assert "unreachable" in (tmp_path / "index.html").read_text()
    assert all(is_png(tmp_path / f"{p.slug}.png") for p in plots.PANELS)
    assert f"Prometheus at {dead} unreachable" in capsys.readouterr().err

"""Whether the Grafana dashboards and the recording rules show data on a given Prometheus.

Every PromQL expression of every dashboard panel, every dashboard variable (the ``label_values``
query behind each drop-down) and every recording rule is evaluated as a range query over the time
a dashboard shows (a panel draws a range; a stat panel reduces it to its last value); one that
returns no series is a panel that reads "No data". Dashboard variables are substituted the way
Grafana would with "All" selected (``.*`` for multi-value regex matches) or with the given
namespace, and ``$__rate_interval`` / ``$__interval`` / ``$__range`` with a window that fits the
scrape interval.

Panels that read only metrics a Kubernetes cluster exports (kube-state-metrics) are reported as
``cluster`` and are not expected to show data on the embedded stack.

``llmops dashboards check`` runs this against the stack's Prometheus (or any ``--prometheus`` URL).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
DASHBOARDS = REPO / "charts" / "llmops" / "files" / "dashboards"
RULES = REPO / "charts" / "llmops" / "files" / "prometheus" / "rules.yaml"
#: Metrics only a Kubernetes cluster has (kube-state-metrics); panels reading just these are "cluster".
CLUSTER_METRICS = frozenset({
    "kube_deployment_spec_replicas", "kube_deployment_status_replicas", "kube_deployment_status_replicas_available",
})  # fmt: skip
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")  # a metric name with its label matchers


@dataclasses.dataclass(frozen=True)
class Query:
    """One expression a dashboard or the rules evaluate."""

    where: str  # "serving.json panel 'Time to first token' A", "rules.yaml llmops:cache_hit_ratio:rate5m"
    expr: str  # as written
    cluster: bool = False  # reads only kube-state-metrics


@dataclasses.dataclass(frozen=True)
class Outcome:
    query: Query
    promql: str  # what was sent, variables substituted
    series: int
    error: str = ""

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.series:
            return "data"
        return "cluster" if self.query.cluster else "empty"


def panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def dashboards(folder: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def queries(folder: Path = DASHBOARDS, rules: Path = RULES) -> list[Query]:
    """Every panel target, dashboard variable query and recording rule."""
    found: list[Query] = []
    for file, dashboard in dashboards(folder).items():
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = _LABEL_VALUES.fullmatch(query)
            found.append(Query(f"{file} variable {variable['name']}", inner.group(1) if inner else query))
        for panel in panels(dashboard):
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if expr:
                    where = f"{file} panel {panel.get('title')!r} {target.get('refId', '')}".rstrip()
                    found.append(Query(where, expr, _cluster_only(expr)))
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                found.append(Query(f"rules.yaml {rule['record']}", rule["expr"]))
    return found


def _cluster_only(expr: str) -> bool:
    names = set(_SELECTOR.findall(expr))
    return bool(names) and names <= CLUSTER_METRICS


def substitute(expr: str, variables: Mapping[str, str], window: str) -> str:
    """The expression as Grafana sends it: variables and interval macros replaced."""
    macros = {"__rate_interval": window, "__interval": window, "__range": window}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in macros:
            return macros[name]
        return variables.get(name, ".*")  # "All" on a multi-value variable

    return _VARIABLE.sub(replace, expr)


def evaluate(
    prometheus: str,
    found: list[Query],
    variables: Mapping[str, str],
    *,
    seconds: float = 3600.0,
    window: str = "1m",
    timeout: float = 10.0,
) -> list[Outcome]:
    """Each query over the last ``seconds`` against ``prometheus`` (its base URL)."""
    end = time.time()
    start = end - seconds
    step = max(1.0, seconds / 240)  # about what Grafana asks for on a wide panel
    outcomes = []
    for query in found:
        promql = substitute(query.expr, variables, window)
        try:
            result = query_range(prometheus, promql, start, end, step, timeout=timeout)
        except PrometheusError as exc:
            outcomes.append(Outcome(query, promql, 0, str(exc)))
            continue
        outcomes.append(Outcome(query, promql, len(result)))
    return outcomes


class PrometheusError(RuntimeError):
    """Prometheus refused a query or could not be reached."""


def query_range(
    prometheus: str, promql: str, start: float, end: float, step: float, *, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The series of a range query (``/api/v1/query_range``)."""
    return _api(
        prometheus, "query_range", {"query": promql, "start": start, "end": end, "step": step}, timeout
    )


def instant(prometheus: str, promql: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The result vector of an instant query (``/api/v1/query``)."""
    return _api(prometheus, "query", {"query": promql}, timeout)


def _api(prometheus: str, path: str, params: Mapping[str, object], timeout: float) -> list[dict[str, Any]]:
    url = f"{prometheus.rstrip('/')}/api/v1/{path}?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with_error = json.loads(detail).get("error", detail) if detail.startswith("{") else detail
        raise PrometheusError(f"HTTP {exc.code}: {with_error}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PrometheusError(f"cannot reach Prometheus at {prometheus}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(str(body.get("error", body)))
    data = body["data"]
    return list(data["result"]) if data.get("resultType") in ("vector", "matrix") else [data["result"]]


def local_rules(rules: Path, interval: str) -> str:
    """The rules file with every group evaluated every ``interval`` (the embedded stack's cadence)."""
    document = yaml.safe_load(rules.read_text())
    for group in document["groups"]:
        group["interval"] = interval
    return yaml.safe_dump(document, sort_keys=False)

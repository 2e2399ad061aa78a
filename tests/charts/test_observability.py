"""Dashboards, alerts, recording rules and autoscaler queries read metrics the services really export.

Invariants: the Prometheus rules and Grafana dashboards have one source (charts/llmops/files/, which
infra/ links to and the chart ships verbatim); promtool accepts the rules and their unit tests pass,
and every alert has a unit test in which it fires; every dashboard is valid JSON that takes its data
source from a `${datasource}` variable; every PromQL expression (dashboards, their variables, rules,
the Prometheus Adapter rules, the KEDA query) parses with promtool; every metric name those
expressions read is exported by the services (`llmops.common.metric_names.ALL_METRICS`), passed
through from vLLM (`ENGINE_PASSTHROUGH`), recorded by a rule, or on a short list of external
metrics; every exported metric is shown somewhere; and the metric definitions follow the naming
guide (base units, `_total` counters, explicit buckets, bounded labels).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.stack.dashboards import dashboards, panels
from tests.charts.conftest import (
    CHART,
    INFRA,
    Rendered,
    metric_names,
    render,
    require_module,
    values_file,
)
from tests.conftest import require_tool

RULES = CHART / "files" / "prometheus" / "rules.yaml"
DASHBOARDS = CHART / "files" / "dashboards"
ADAPTER = INFRA / "prometheus-adapter" / "values.yaml"
#: Metrics the dashboards and rules may read that no llmops service exports.
EXTERNAL_METRICS = frozenset({
    "up",  # Prometheus, per scrape target
    "kube_deployment_spec_replicas",  # kube-state-metrics
    "kube_deployment_status_replicas",
    "kube_deployment_status_replicas_available",
})  # fmt: skip
#: What each dashboard must show (the issue's list), as metric or recording-rule names it reads.
DASHBOARD_MUST_SHOW = {
    "serving.json": {
        "llmops:serving_ttft_seconds:p95", "llmops:serving_itl_seconds:p95", "llmops:serving_generated_tokens:rate5m",
        "llmops:serving_queue_waiting:sum", "llmops:serving_requests_running:sum",
        "llmops:serving_kv_cache_usage_ratio:pod", "kube_deployment_status_replicas",
    },
    "cache.json": {
        "llmops:cache_hit_ratio:rate5m", "llmops:cache_lookup_seconds:p95", "llmops_cache_entries", "llmops_cache_bytes",
    },
    "jobs.json": {
        "llmops_training_jobs", "llmops:training_jobs_failed:increase1h", "llmops_training_last_loss",
        "llmops_training_tokens_per_second", "llmops_quantization_jobs",
    },
    "platform.json": {
        "llmops:grpc_requests:rate5m", "llmops:grpc_error_ratio:rate5m", "llmops:grpc_latency_seconds:p95",
    },
    "router.json": {
        "llmops_router_endpoint_load", "llmops_router_decisions_total", "llmops_router_requests_total",
        "llmops_router_pending_requests",
    },
}  # fmt: skip
_GRAFANA_INTERVALS = re.compile(
    r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}"
)


def _rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return rules


def _recorded() -> set[str]:
    return {rule["record"] for group in _rules()["groups"] for rule in group["rules"] if "record" in rule}


def _dashboards() -> dict[str, dict[str, Any]]:
    return dashboards(DASHBOARDS)


def _expressions(keda: Rendered) -> list[tuple[str, str]]:
    """Every PromQL expression of the platform, as (where, expression)."""
    found: list[tuple[str, str]] = []
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            found.append((f"rules.yaml {rule.get('record') or rule.get('alert')}", rule["expr"]))
    for file, dashboard in _dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets") or []:
                found.append((f"{file} panel {panel['title']!r} {target['refId']}", target["expr"]))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = (
                    variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
                )
                inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)  # Grafana syntax, not PromQL
                assert inner, f"{file} variable {variable['name']}: expected label_values(<expr>, <label>)"
                found.append((f"{file} variable {variable['name']}", inner.group(1)))
    for scaled in keda.of_kind("ScaledObject"):
        found.append(
            (f"ScaledObject {scaled['metadata']['name']}", scaled["spec"]["triggers"][0]["metadata"]["query"])
        )
    for index, rule in enumerate(yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]):
        series = rule["seriesQuery"]
        found.append((f"prometheus-adapter rule {index} seriesQuery", series))
        metrics_query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series.split("{")[0])
            .replace("<<.LabelMatchers>>", 'namespace="llmops",pod=~"a|b"')
            .replace("<<.GroupBy>>", "pod")
        )
        found.append((f"prometheus-adapter rule {index} metricsQuery", metrics_query))
    return [(where, _GRAFANA_INTERVALS.sub("5m", expr)) for where, expr in found]


def _selected_names(expression: str) -> set[str]:
    """Metric names an expression selects, from promql-parser's syntax tree."""
    promql_parser = require_module("promql_parser")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    assert matcher.op == promql_parser.MatchOp.Equal, f"regex over metric names: {expression}"
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expression), pre_visit=visit)
    return names


@pytest.fixture(scope="module")
def keda(helm: str) -> Rendered:
    return render(helm, [values_file("keda-values")])


# --- one source -----------------------------------------------------------------------------------


def test_infra_rules_and_dashboards_are_the_charts() -> None:
    assert (INFRA / "prometheus" / "rules.yaml").read_bytes() == RULES.read_bytes()
    infra = {p.name: p.read_bytes() for p in (INFRA / "grafana" / "dashboards").glob("*.json")}
    assert infra == {p.name: p.read_bytes() for p in DASHBOARDS.glob("*.json")}
    assert set(infra) == set(DASHBOARD_MUST_SHOW)


def test_chart_ships_the_rules_and_dashboards_verbatim(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    [rule] = rendered.of_kind("PrometheusRule")
    assert rule["spec"] == _rules()
    shipped = {}
    for config_map in rendered.of_kind("ConfigMap"):
        if config_map["metadata"]["labels"].get("grafana_dashboard") == "1":
            [(file, text)] = config_map["data"].items()
            shipped[file] = json.loads(text)
    assert shipped == _dashboards()


# --- rules ----------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    for command in (["check", "rules", str(INFRA / "prometheus" / "rules.yaml")],
                    ["test", "rules", str(INFRA / "prometheus" / "rules_test.yaml")]):  # fmt: skip
        result = subprocess.run(
            [promtool, *command], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_a_unit_test() -> None:
    alerts = {rule["alert"] for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((INFRA / "prometheus" / "rules_test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test") or []
        if case.get("exp_alerts")
    }
    assert alerts <= fired, f"alerts no unit test makes fire: {sorted(alerts - fired)}"


def test_rules_are_named_and_labelled_for_people() -> None:
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                assert re.fullmatch(r"llmops:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
            else:
                assert re.fullmatch(r"Llmops[A-Za-z0-9]+", rule["alert"]), rule["alert"]
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


# --- dashboards -----------------------------------------------------------------------------------


def test_dashboards_take_their_data_source_from_a_variable() -> None:
    dashboards = _dashboards()
    assert len({d["uid"] for d in dashboards.values()}) == len(dashboards)
    for file, dashboard in dashboards.items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{file}: panel ids repeat"
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                file,
                panel["title"],
            )
            assert panel["targets"], (file, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (file, panel["title"])
        for variable in variables.values():
            if variable["type"] == "query":
                assert variable["datasource"]["uid"] == "${datasource}", (file, variable["name"])


def test_dashboards_show_what_operators_need(keda: Rendered) -> None:
    by_file: dict[str, set[str]] = {}
    for where, expression in _expressions(keda):
        file = where.split(" ")[0]
        by_file.setdefault(file, set()).update(_selected_names(expression))
    for file, needed in DASHBOARD_MUST_SHOW.items():
        assert needed <= by_file[file], f"{file} lacks {sorted(needed - by_file[file])}"


# --- PromQL ---------------------------------------------------------------------------------------


def test_every_promql_expression_parses(keda: Rendered, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    expressions = _expressions(keda)
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"parse_check_{index}", "expr": expr} for index, (_, expr) in enumerate(expressions)
    ]}]}  # fmt: skip
    path = tmp_path / "expressions.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                            check=False)  # fmt: skip
    if result.returncode != 0:
        wrong = [f"{where}: {expr}" for index, (where, expr) in enumerate(expressions)
                 if f"parse_check_{index}\"" in result.stdout + result.stderr]  # fmt: skip
        pytest.fail("promtool rejects:\n" + "\n".join(wrong) + "\n" + result.stdout + result.stderr)
    assert len(expressions) > 60


def test_promtool_parse_check_can_fail(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x", "expr": "sum(rate(a[5m])"}]}]})
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0


def test_every_metric_read_is_exported_recorded_or_external(keda: Rendered) -> None:
    names = metric_names()
    exported = names.exposed_series(names.ALL_METRICS) | names.exposed_series(names.ENGINE_PASSTHROUGH)
    known = exported | _recorded() | EXTERNAL_METRICS
    unknown = {}
    for where, expression in _expressions(keda):
        missing = _selected_names(expression) - known
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"metrics nothing exports: {json.dumps(unknown, indent=1)}"


def test_every_exported_metric_and_recording_rule_is_used(keda: Rendered) -> None:
    names = metric_names()
    used: set[str] = set()
    for _, expression in _expressions(keda):
        used |= _selected_names(expression)
    for name, kind in (names.ALL_METRICS | names.ENGINE_PASSTHROUGH).items():
        series = names.exposed_series({name: kind})
        assert series & used, f"{name} is exported but no dashboard, rule or alert reads it"
    unused = _recorded() - used
    assert not unused, f"recording rules nothing reads: {sorted(unused)}"


def test_hpa_metric_is_what_prometheus_adapter_serves() -> None:
    adapter = yaml.safe_load(ADAPTER.read_text())
    assert adapter["rules"]["default"] is False
    served = {}
    for rule in adapter["rules"]["custom"]:
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}, "must be a Pods metric"
        series = rule["seriesQuery"].split("{")[0]
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = series
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    default = values["serving"]["autoscaling"]["hpa"]["metricName"]
    # The HPA reads requests in the pod: the service's own admission queue (which answers
    # RESOURCE_EXHAUSTED when full, and which vLLM's queue gauge never counts) plus running ones.
    assert served[default] == "llmops:serving_requests_in_flight:pod"
    assert served[default] in _recorded()
    rules = yaml.safe_load(RULES.read_text())
    [expr] = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("record") == served[default]]
    assert "llmops_serving_requests_waiting" in expr and "llmops_serving_requests_running" in expr
    assert "vllm:" not in expr, "vLLM's gauges count only admitted requests"
    names = metric_names()
    assert set(served.values()) <= _recorded() | set(names.ENGINE_PASSTHROUGH)


# --- metric definitions ---------------------------------------------------------------------------


def test_metric_definitions_follow_the_naming_guide() -> None:
    names = metric_names()
    kinds = {"counter", "gauge", "histogram"}
    assert set(names.ALL_METRICS.values()) <= kinds
    assert set(names.ENGINE_PASSTHROUGH.values()) <= kinds
    assert set(names.METRIC_LABELS) == set(names.ALL_METRICS)
    histograms = {name for name, kind in names.ALL_METRICS.items() if kind == "histogram"}
    assert set(names.HISTOGRAM_BUCKETS) == histograms
    for name, kind in names.ALL_METRICS.items():
        assert re.fullmatch(r"llmops_[a-z][a-z0-9_]*", name), name
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: histograms observe base units"
            buckets = names.HISTOGRAM_BUCKETS[name]
            assert all(0 < a < b for a, b in itertools.pairwise(buckets)), f"{name}: buckets must rise"
        for label in names.METRIC_LABELS[name]:
            assert label not in {"id", "job_id", "request_id", "user", "user_id", "prompt", "le"}, (
                name,
                label,
            )
    for name in names.ENGINE_PASSTHROUGH:
        assert name.startswith("vllm:"), name


def test_vllm_exports_the_pass_through_names_the_rules_read() -> None:
    """Read the installed vLLM's metric definitions (without importing vLLM, which takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        require_module("vllm")  # fails in CI, skips elsewhere
        return
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    declared = set(re.findall(r'name\s*=\s*"(vllm:[a-z0-9_]+)"', source))
    assert declared, "vLLM's metric definitions moved: update this test and metric_names.ENGINE_PASSTHROUGH"
    names = metric_names()
    for name, kind in names.ENGINE_PASSTHROUGH.items():
        # prometheus_client appends _total to a counter's declared name.
        base = name.removesuffix("_total") if kind == "counter" else name
        assert base in declared, f"the installed vLLM no longer exports {name}"
    assert '"model_name"' in source, "the recording rules rename vLLM's model_name label to model"

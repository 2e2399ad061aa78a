"""The rollout controller's Prometheus SLI source (router.rollout_prometheus_url).

Invariants: every query is valid PromQL over the router's exported series (the names in
llmops.common.metric_names), scoped to the model and version; answers become the windows a step is
judged on; an empty answer is 0 (no traffic), never an error. Served by httpx's mock transport.
"""

from __future__ import annotations

import httpx
import promql_parser
import pytest

from llmops.common import metric_names as names
from llmops.common.rollouts import Window
from llmops.router.rollout import PrometheusSlis


def _selected(expression: str) -> set[str]:
    found: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expression), pre_visit=visit)
    return found


async def test_queries_and_windows() -> None:
    queries: list[str] = []
    exported = names.exposed_series(names.ALL_METRICS)

    def answer(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        queries.append(query)
        assert _selected(query) <= exported, query
        version = "2" if 'version="2"' in query or 'version="m:2"' in query else "1"
        value = {
            "requests_total{": "100",
            "code=~": "3",
            "ttft_seconds_bucket": "0.25",
            "inter_token_seconds_bucket": "0.02",
            "ttft_seconds_count": "90",
            "inter_token_seconds_count": "900",
        }
        for key, number in reversed(value.items()):
            if key in query:
                result = [] if version == "1" and key == "code=~" else [{"metric": {}, "value": [0, number]}]
                return httpx.Response(
                    200, json={"status": "success", "data": {"resultType": "vector", "result": result}}
                )
        raise AssertionError(query)

    source = PrometheusSlis("http://prometheus:9090/")
    await source._http.aclose()
    source._http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    champion, challenger = await source.windows("m", (1, 2), 12.4)
    await source.close()
    assert champion == Window(1, 100, 0, 0.25, 0.02, 90, 900)
    assert challenger == Window(2, 100, 3, 0.25, 0.02, 90, 900)
    assert len(queries) == 12 and all("[13s]" in q for q in queries)
    assert any(
        'code=~"DATA_LOSS|DEADLINE_EXCEEDED|INTERNAL|RESOURCE_EXHAUSTED|UNAVAILABLE|UNKNOWN"' in q
        for q in queries
    )


async def test_prometheus_down_is_an_error_not_a_verdict() -> None:
    source = PrometheusSlis("http://prometheus:9090")
    await source._http.aclose()
    source._http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(503)))
    with pytest.raises(httpx.HTTPStatusError):
        await source.windows("m", (1, 2), 5)
    await source.close()

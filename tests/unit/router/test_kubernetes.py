"""EndpointSlices of a Service become replica addresses, on the kubernetes client's own model objects.

Invariants: ready endpoints (condition true or unset) count and not-ready ones do not; the port is
the one named ``grpc``, else the only one, else the configured port; watch events add, replace and
remove a slice's addresses.
"""

from __future__ import annotations

import pytest

client = pytest.importorskip("kubernetes.client")

from llmops.router.kubernetes import SliceTable, slice_addresses  # noqa: E402


def endpoint_slice(
    name: str, endpoints: list[tuple[str, bool | None]], ports: list[tuple[str, int]]
) -> object:
    return client.V1EndpointSlice(
        address_type="IPv4",
        metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/service-name": "serving"}),
        endpoints=[
            client.V1Endpoint(addresses=[address], conditions=client.V1EndpointConditions(ready=ready))
            for address, ready in endpoints
        ],
        ports=[client.DiscoveryV1EndpointPort(name=port_name, port=port) for port_name, port in ports],
    )


def test_ready_endpoints_on_the_grpc_port() -> None:
    s = endpoint_slice(
        "serving-abc",
        [("10.0.0.1", True), ("10.0.0.2", None), ("10.0.0.3", False)],
        [("http", 8000), ("grpc", 50054), ("metrics", 9104)],
    )
    assert slice_addresses(s, 1) == {"10.0.0.1:50054", "10.0.0.2:50054"}
    assert slice_addresses(endpoint_slice("x", [("fd00::1", True)], [("other", 7000)]), 1) == {
        "[fd00::1]:7000"
    }
    assert slice_addresses(endpoint_slice("x", [("10.0.0.9", True)], []), 50054) == {"10.0.0.9:50054"}


def test_watch_events_fold_into_one_address_set() -> None:
    table = SliceTable(50054)
    assert table.apply("ADDED", endpoint_slice("a", [("10.0.0.1", True)], [("grpc", 50054)])) == {
        "10.0.0.1:50054"
    }
    both = table.apply("ADDED", endpoint_slice("b", [("10.0.1.1", True)], [("grpc", 50054)]))
    assert both == {"10.0.0.1:50054", "10.0.1.1:50054"}
    modified = table.apply("MODIFIED", endpoint_slice("a", [("10.0.0.1", False)], [("grpc", 50054)]))
    assert modified == {"10.0.1.1:50054"}
    assert table.apply("DELETED", endpoint_slice("b", [], [])) == set()

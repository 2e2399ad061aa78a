"""A ``name@alias`` request goes to every replica serving the version the alias points at now,
whatever alias or pool loaded it (while the champion pool rolls, the challenger pool already on the
new version takes champion traffic); with that version unknown, or served nowhere, it goes to the
replicas that loaded the alias (a pool replica not yet rolled keeps answering for its alias)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from llmops.common.domain import ResolvedModel
from llmops.common.settings import Settings
from llmops.proto.common.v1 import model_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.router.endpoints import Endpoint, EndpointPool, ModelSlot
from llmops.router.metrics import RouterMetrics
from llmops.router.service import Router


def replica(address: str, version: int, alias: str) -> Endpoint:
    endpoint = Endpoint(address, "static", 20)
    slot = ModelSlot("llm", ResolvedModel("llm", version, alias), True, 0, 0, 4, 0.0)
    endpoint.models = {"llm": slot}
    endpoint.by_name = {"llm": [slot]}
    endpoint.ready = True
    return endpoint


def router() -> Router:
    pool = EndpointPool()
    pool.ready = [replica("a", 1, "champion"), replica("b", 2, "challenger"), replica("c", 2, "champion")]
    return Router(pool, Settings.load(env={}).router, RouterMetrics(CollectorRegistry()))


CHAMPION = pb.ModelSelector(model_ref=model_pb2.ModelRef(name="llm", alias="champion"))


def addresses(found: list) -> list[str]:  # type: ignore[type-arg]
    return [endpoint.address for endpoint, _ in found]


def test_the_aliases_version_wherever_it_is_served() -> None:
    assert addresses(router().candidates(CHAMPION, set(), version=2)) == ["b", "c"]
    assert addresses(router().candidates(CHAMPION, {"c"}, version=2)) == ["b"]


def test_unknown_or_unserved_version_falls_back_to_the_alias() -> None:
    assert addresses(router().candidates(CHAMPION, set())) == ["a", "c"]
    assert addresses(router().candidates(CHAMPION, set(), version=3)) == ["a", "c"]


def test_pinned_versions_and_served_names_are_unchanged() -> None:
    pinned = pb.ModelSelector(model_ref=model_pb2.ModelRef(name="llm", version=1))
    assert addresses(router().candidates(pinned, set(), version=2)) == ["a"]
    assert addresses(router().candidates(pb.ModelSelector(served_name="llm"), set(), version=2)) == [
        "a",
        "b",
        "c",
    ]

"""Pool records and the reload lease: at most one holder at a time, renewable by its holder, taken
over only once lapsed, released only by its holder; generations only grow; records survive a new
store on the same database (a registry restart). SQLite in a temporary folder, no sockets."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound
from llmops.registry.fleet import FleetStore, Member, ReloadPhase, check_pool_name, check_target


class Clock:
    """A settable clock standing in for ``datetime`` in the store."""

    at = datetime(2026, 1, 1, tzinfo=UTC)

    @classmethod
    def now(cls, tz: object = None) -> datetime:
        return cls.at


@pytest.fixture
def store(tmp_path: Path) -> FleetStore:
    Clock.at = datetime(2026, 1, 1, tzinfo=UTC)
    s = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}", clock=Clock)  # type: ignore[arg-type]
    s.create_tables()
    s.sync("llm", "champion", "champion", 0, Member("pod-a"))
    return s


def test_one_holder_at_a_time(store: FleetStore) -> None:
    granted, lease = store.acquire("llm", "champion", "pod-a", 30)
    assert granted and lease.holder == "pod-a"
    granted, lease = store.acquire("llm", "champion", "pod-b", 30)
    assert not granted and lease.holder == "pod-a"


def test_holder_renews(store: FleetStore) -> None:
    store.acquire("llm", "champion", "pod-a", 30)
    Clock.at += timedelta(seconds=20)
    granted, lease = store.acquire("llm", "champion", "pod-a", 30)
    assert granted and lease.expires_at == Clock.at + timedelta(seconds=30)
    Clock.at += timedelta(seconds=20)  # 40 s after the first grant: the renewal keeps it
    assert not store.acquire("llm", "champion", "pod-b", 30)[0]


def test_lapsed_lease_is_taken_over(store: FleetStore) -> None:
    store.acquire("llm", "champion", "pod-a", 30)
    Clock.at += timedelta(seconds=30)
    granted, lease = store.acquire("llm", "champion", "pod-b", 30)
    assert granted and lease.holder == "pod-b"
    with pytest.raises(FailedPrecondition):
        store.release("llm", "champion", "pod-a")  # it lost the lease; it cannot free pod-b's


def test_only_the_holder_releases(store: FleetStore) -> None:
    store.acquire("llm", "champion", "pod-a", 30)
    with pytest.raises(FailedPrecondition):
        store.release("llm", "champion", "pod-b")
    store.release("llm", "champion", "pod-a")
    assert store.acquire("llm", "champion", "pod-b", 30)[0]


def test_unknown_pool(store: FleetStore) -> None:
    with pytest.raises(NotFound):
        store.acquire("llm", "nope", "pod-a", 30)
    with pytest.raises(NotFound):
        store.release("llm", "nope", "pod-a")
    with pytest.raises(NotFound):
        store.bump("llm", "nope")
    with pytest.raises(NotFound):
        store.get("other", "champion")


def test_generation_grows_and_survives_a_new_store(store: FleetStore, tmp_path: Path) -> None:
    assert store.bump("llm", "champion").generation == 1
    assert store.bump("llm", "champion").generation == 2
    store.acquire("llm", "champion", "pod-a", 600)
    store.dispose()
    again = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}", clock=Clock)  # type: ignore[arg-type]
    again.create_tables()
    pool = again.get("llm", "champion")
    assert (pool.alias, pool.generation, pool.lease.holder) == ("champion", 2, "pod-a")


def test_members_live_for_their_ttl(store: FleetStore) -> None:
    store.sync(
        "llm", "champion", "champion", 0, Member("pod-b", version=3, phase=ReloadPhase.READY, ttl_seconds=5)
    )
    assert [m.replica_id for m in store.get("llm", "champion").members] == ["pod-a", "pod-b"]
    Clock.at += timedelta(seconds=10)  # pod-a's default ttl is 15 s, pod-b's 5 s
    members = store.get("llm", "champion").members
    assert [m.replica_id for m in members] == ["pod-a"]


def test_a_new_target_replaces_the_old(store: FleetStore) -> None:
    pool = store.sync("llm", "champion", "", 4, Member("pod-a"))
    assert (pool.alias, pool.version) == ("", 4)
    assert [p.pool for p in store.list("llm")] == ["champion"]


@pytest.mark.parametrize("name", ["", "Champion", "-x", "x-", "a" * 64, "a_b"])
def test_bad_pool_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_pool_name(name)


@pytest.mark.parametrize(("alias", "version"), [("", 0), ("champion", 3), ("", -1), ("Bad!", 0)])
def test_bad_targets(alias: str, version: int) -> None:
    with pytest.raises(InvalidArgument):
        check_target(alias, version)


def test_racing_replicas_get_one_lease(tmp_path: Path) -> None:
    """Eight stores on one database (eight registry replicas) ask at once: exactly one is granted."""
    first = FleetStore(f"sqlite:///{tmp_path / 'race.db'}")
    first.create_tables()
    first.sync("llm", "champion", "champion", 0, Member("pod-0"))
    stores = [FleetStore(f"sqlite:///{tmp_path / 'race.db'}") for _ in range(8)]
    barrier = threading.Barrier(len(stores))

    def ask(i: int) -> bool:
        barrier.wait()
        return stores[i].acquire("llm", "champion", f"pod-{i}", 30)[0]

    with ThreadPoolExecutor(len(stores)) as pool:
        granted = list(pool.map(ask, range(len(stores))))
    assert sum(granted) == 1
    holder = first.get("llm", "champion").lease.holder
    assert holder == f"pod-{granted.index(True)}"


async def test_pools_list_in_pages(store: FleetStore, tmp_path: Path) -> None:
    from llmops.registry.fleet_service import FleetService
    from llmops.registry.stores.fake import FakeRegistryStore

    registry = FakeRegistryStore(tmp_path / "artifacts")
    await registry.create_model("llm", "", {}, "test")
    service = FleetService(registry, store)
    for name in ("pool-b", "pool-c", "pool-d"):
        store.sync("llm", name, "champion", 0, Member(f"pod-{name}"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await service.list("llm", page_size=2, page_token=token)
        seen.extend(p.pool for p in page.items)
        pages += 1
        token = page.next_token
        if not token:
            break
    assert seen == ["champion", "pool-b", "pool-c", "pool-d"]
    assert pages == 2
    with pytest.raises(InvalidArgument):
        await service.list("llm", page_size=5000)
    with pytest.raises(InvalidArgument):
        await service.list("llm", page_token="garbage")

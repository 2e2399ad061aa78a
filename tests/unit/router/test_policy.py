"""Routing policies choose as documented, on replicas described by their load reports alone.

Invariants: block hashes chain (equal leading characters give equal leading hashes, one changed
character changes every later hash); round robin visits each candidate in turn; least loaded never
picks the busier of two; session affinity is stable and moves only the sessions of a replica that
leaves; prefix affinity sticks to the holder of the longest known prefix until it saturates, then
spills to a less loaded replica and says so; an unknown policy name is INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections import Counter

import pytest

from llmops.common.domain import ResolvedModel
from llmops.common.errors import InvalidArgument
from llmops.router.endpoints import Endpoint, ModelSlot
from llmops.router.policy import Candidate, Policies, Policy, prompt_blocks, token_blocks


def candidate(address: str, waiting: int = 0, running: int = 0, capacity: int = 4) -> Candidate:
    endpoint = Endpoint(address, "static", 20)
    slot = ModelSlot("tiny", ResolvedModel("tiny", 1, "champion"), True, waiting, running, capacity, 0.0)
    endpoint.models = {"tiny": slot}
    return endpoint, slot


def test_block_hashes_chain() -> None:
    a = prompt_blocks("x" * 100 + "tail one", 32, 8)
    b = prompt_blocks("x" * 100 + "tail two", 32, 8)
    c = prompt_blocks("y" + "x" * 99 + "tail one", 32, 8)
    assert len(a) == 4 and a[:3] == b[:3] and a[3] != b[3]
    assert not set(a) & set(c)  # a different first block changes every later hash
    assert len(prompt_blocks("z" * 1000, 32, 8)) == 8  # only the leading blocks count
    assert token_blocks([1, 2, 3, 4, 5], 2, 8)[:2] == token_blocks([1, 2, 3, 4, 9], 2, 8)[:2]


def test_round_robin_and_least_loaded() -> None:
    policies = Policies(saturation_waiting=2, table_size=100, seed=1)
    cands = [candidate("a:1"), candidate("b:1"), candidate("c:1")]
    picked = Counter(policies.choose(Policy.ROUND_ROBIN, cands, [], "").endpoint.address for _ in range(30))
    assert set(picked.values()) == {10}
    busy = [candidate("a:1", running=4), candidate("b:1", running=1)]
    for _ in range(50):
        assert policies.choose(Policy.LEAST_LOADED, busy, [], "").endpoint.address == "b:1"
    # the router's own in-flight count counts when it is fresher than the report
    busy[1][0].in_flight = 9
    assert policies.choose(Policy.LEAST_LOADED, busy, [], "").endpoint.address == "a:1"


def test_session_affinity_is_stable_and_moves_only_the_leavers_sessions() -> None:
    policies = Policies(saturation_waiting=2, table_size=100, seed=1)
    cands = [candidate(f"r{i}:1") for i in range(4)]
    home = {
        s: policies.choose(Policy.SESSION_AFFINITY, cands, [], s).endpoint.address
        for s in map(str, range(200))
    }
    assert len(set(home.values())) == 4
    remaining = [c for c in cands if c[0].address != "r0:1"]
    for session, address in home.items():
        now = policies.choose(Policy.SESSION_AFFINITY, remaining, [], session).endpoint.address
        assert now == address or address == "r0:1"


def test_prefix_affinity_sticks_then_spills_when_saturated() -> None:
    policies = Policies(saturation_waiting=1, table_size=1000, seed=3)
    cands = [candidate("a:1"), candidate("b:1")]
    shared = "system prompt " * 20
    first = policies.choose(Policy.PREFIX_AFFINITY, cands, prompt_blocks(shared + "q1", 32, 16), "")
    assert first.outcome == "prefix_miss"
    for i in range(10):
        again = policies.choose(Policy.PREFIX_AFFINITY, cands, prompt_blocks(shared + f"q{i}", 32, 16), "")
        assert (again.endpoint.address, again.outcome) == (first.endpoint.address, "prefix_hit")
    holder = next(c for c in cands if c[0].address == first.endpoint.address)
    holder[0].in_flight = holder[1].capacity + 1  # slots full and one queued: saturated
    spilled = policies.choose(Policy.PREFIX_AFFINITY, cands, prompt_blocks(shared + "q", 32, 16), "")
    assert spilled.outcome == "spill" and spilled.endpoint.address != first.endpoint.address


def test_prefix_table_forgets_the_least_recent() -> None:
    policies = Policies(saturation_waiting=1, table_size=100, seed=3)
    cands = [candidate("a:1"), candidate("b:1")]
    for i in range(60):
        policies.choose(Policy.PREFIX_AFFINITY, cands, prompt_blocks(f"{i:04d}" * 16, 32, 2), "")
    assert policies.table_entries == 100


@pytest.mark.parametrize("text", ["fastest", "", "round robin!"])
def test_unknown_policy_names_are_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument, match="x-policy"):
        Policy.parse(text, "x-policy")
    assert Policy.parse("Least-Loaded", "x") is Policy.LEAST_LOADED

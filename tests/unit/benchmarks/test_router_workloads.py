"""The router benchmark's workloads: seeded, the same schedule for every arm, shaped as documented.

Invariants: a seed fixes arrival times, groups and order exactly (two builds are equal); a salt
changes the prompts' words but not the schedule; Poisson gaps average 1/rate; A and D share
prefixes inside a group only, C shares none, B's prompts grow turn by turn with each user's turns in
order; the ideal prefix-cache hits count whole shared blocks only; the histogram quantile and the
steady-state selection read what they are given.
"""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.router.fleet import histogram_quantile
from benchmarks.router.measure import steady_state
from benchmarks.router.workloads import Shape, build, ideal_hit_tokens, poisson_times, text_of

SHAPE = Shape(groups=6, per_group=4, prefix_tokens=64, turns=3, turn_tokens=16)


def _first_words(prompt: str, n: int = 14) -> str:
    return " ".join(prompt.split()[:n])


@pytest.mark.parametrize("workload", ["A", "B", "C", "D"])
def test_a_seed_fixes_the_schedule_and_a_salt_only_the_words(workload: str) -> None:
    one = build(workload, 2.0, shape=SHAPE, seed=3, salt="round-robin")
    again = build(workload, 2.0, shape=SHAPE, seed=3, salt="round-robin")
    other_arm = build(workload, 2.0, shape=SHAPE, seed=3, salt="prefix")
    other_seed = build(workload, 2.0, shape=SHAPE, seed=4, salt="round-robin")
    assert one == again
    assert len(one.requests) == (
        SHAPE.groups * SHAPE.turns if workload == "B" else SHAPE.groups * SHAPE.per_group
    )
    shape_of = [(r.index, r.at, r.group, r.turn) for r in one.requests]
    assert shape_of == [(r.index, r.at, r.group, r.turn) for r in other_arm.requests]
    assert all(a.prompt != b.prompt for a, b in zip(one.requests, other_arm.requests, strict=True))
    words = [len(r.prompt.split()) for r in one.requests]
    assert words == [len(r.prompt.split()) for r in other_arm.requests]  # same lengths, other words
    assert [(r.at, r.group) for r in one.requests] != [(r.at, r.group) for r in other_seed.requests]


def test_poisson_gaps_average_one_over_the_rate() -> None:
    times = poisson_times(4.0, 4001, random.Random(0))
    assert times[0] == 0 and times == sorted(times)
    assert math.isclose(times[-1] / 4000, 0.25, rel_tol=0.08)
    with pytest.raises(ValueError):
        poisson_times(0, 3, random.Random(0))


def test_shared_prefix_groups_share_inside_a_group_only_and_zero_reuse_shares_nothing() -> None:
    a = build("A", 1.0, shape=SHAPE, seed=1)
    by_group: dict[int, set[str]] = {}
    for r in a.requests:
        by_group.setdefault(r.group, set()).add(_first_words(r.prompt, 40))
    assert all(len(prefixes) == 1 for prefixes in by_group.values())  # one system prompt per tenant
    assert len({next(iter(p)) for p in by_group.values()}) == SHAPE.groups
    c = build("C", 1.0, shape=SHAPE, seed=1)
    assert len({_first_words(r.prompt, 8) for r in c.requests}) == len(c.requests)
    d = build("D", 1.0, shape=SHAPE, seed=1)
    hot = sum(1 for r in d.requests if r.group == 0)
    assert hot == len(d.requests) // 2 and {r.group for r in d.requests} == set(range(SHAPE.groups))


def test_multi_turn_prompts_grow_and_keep_each_users_order() -> None:
    b = build("B", 1.0, shape=SHAPE, seed=2)
    last: dict[int, tuple[int, str]] = {}
    for r in b.requests:
        if r.group in last:
            turn, prompt = last[r.group]
            assert r.turn == turn + 1
            body = prompt.rsplit("\nAssistant:", 1)[0]
            assert r.prompt.startswith(body) and len(r.prompt) > len(prompt)
        else:
            assert r.turn == 0
        last[r.group] = (r.turn, r.prompt)
    assert {t for t, _ in last.values()} == {SHAPE.turns - 1}


def test_text_reaches_the_token_count_it_is_asked_for() -> None:
    def count(text: str) -> int:
        return len(text)  # a "tokenizer" of one token per character

    text = text_of(200, random.Random(5), count)
    assert 200 <= len(text) < 200 + 12  # never shorter, at most one word longer


def test_ideal_hits_count_whole_shared_blocks_from_the_start() -> None:
    block = 4
    first = list(range(10))  # blocks [0..3], [4..7]; the last token is always computed
    same_start = [*range(8), 99, 98, 97]  # shares both full blocks
    half = [0, 1, 2, 3, 50, 51, 52, 53, 54]  # shares the first block only
    other = [7, 1, 2, 3, 4, 5, 6, 7, 8]  # shares nothing from the start
    hits, queried = ideal_hit_tokens([first, same_start, half, other], block)
    assert queried == len(first) + len(same_start) + len(half) + len(other)
    assert hits == 8 + 4 + 0


def test_steady_state_leaves_out_each_groups_first_request() -> None:
    a = build("A", 1.0, shape=SHAPE, seed=1)
    steady = steady_state(a)
    firsts = {min(r.index for r in a.requests if r.group == g) for g in range(SHAPE.groups)}
    assert steady == {r.index for r in a.requests} - firsts
    c = build("C", 1.0, shape=SHAPE, seed=1)
    assert steady_state(c) == {r.index for r in c.requests}


def test_histogram_quantile_interpolates_between_two_scrapes() -> None:
    name = "x_seconds"
    before = {
        f'{name}_bucket{{le="0.001"}}': 5.0,
        f'{name}_bucket{{le="0.002"}}': 5.0,
        f'{name}_bucket{{le="+Inf"}}': 5.0,
    }
    after = {
        f'{name}_bucket{{le="0.001"}}': 55.0,
        f'{name}_bucket{{le="0.002"}}': 105.0,
        f'{name}_bucket{{le="+Inf"}}': 105.0,
    }
    # 100 new observations: 50 at or under 1 ms, 50 in (1, 2] ms.
    assert math.isclose(histogram_quantile(before, after, name, 0.5), 0.001)
    assert math.isclose(histogram_quantile(before, after, name, 0.99), 0.00198)
    assert math.isnan(histogram_quantile(after, after, name, 0.99))

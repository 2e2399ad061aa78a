"""Load shapes: the users and spawn rate Locust's shape class asks for at a given time.

Invariant: every shape stays within 1..peak users while the run lasts and stops (``None``) when it
ends; a ramp rises to the peak and holds, steps climb in equal steps, a spike jumps to the peak for
its window and lands within a second; the options Locust parses build the same profiles.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtests.shapes import DEFAULT_SHAPED_SECONDS, SHAPES, LoadProfile, profile_from_options


def test_constant_is_plain_locust() -> None:
    shape = LoadProfile("constant", users=4, spawn_rate=2, duration=30)
    assert shape.at(0) == (4, 2)
    assert shape.at(29.9) == (4, 2)
    assert shape.at(30) is None
    assert LoadProfile("constant", users=4, spawn_rate=2).at(1e6) == (4, 2)  # no -t: until stopped


def test_ramp_rises_linearly_then_holds() -> None:
    shape = LoadProfile("ramp", users=10, spawn_rate=1, duration=60, ramp_up=20)
    assert [shape.at(t) for t in (0, 5, 10, 19, 20, 59)] == [
        (1, 1),
        (3, 1),
        (5, 1),
        (10, 1),
        (10, 1),
        (10, 1),
    ]
    assert shape.at(60) is None
    assert LoadProfile("ramp", users=10, duration=60).at(15) == (5, 1)  # ramp-up: half the run


def test_ramp_raises_a_spawn_rate_too_slow_for_its_slope() -> None:
    assert LoadProfile("ramp", users=100, spawn_rate=1, duration=20, ramp_up=10).at(5) == (50, 10)


def test_steps_climb_in_equal_steps() -> None:
    shape = LoadProfile("step", users=8, spawn_rate=1, duration=40, steps=4)
    assert [shape.at(t) for t in (0, 9.9, 10, 25, 39.9)] == [(2, 2), (2, 2), (4, 2), (6, 2), (8, 2)]
    assert shape.at(40) is None


def test_spike_jumps_to_the_peak_for_its_window() -> None:
    shape = LoadProfile("spike", users=20, spawn_rate=1, duration=100, spike_start=0.4, spike_length=0.2)
    assert shape.at(0) == (5, 15)
    assert shape.at(39.9) == (5, 15)
    assert shape.at(40) == (20, 15)  # the 15 extra users start within one second
    assert shape.at(59.9) == (20, 15)
    assert shape.at(60) == (5, 15)
    assert shape.at(100) is None
    assert LoadProfile("spike", users=2, duration=10).at(0)[0] == 1  # at least one user outside the spike


@given(
    st.sampled_from(SHAPES),
    st.integers(1, 500),
    st.floats(0.1, 100),
    st.floats(1, 3600),
    st.floats(0, 1),
)
def test_every_shape_stays_within_its_users_for_the_run(
    kind: str, users: int, rate: float, duration: float, at: float
) -> None:
    shape = LoadProfile(kind, users=users, spawn_rate=rate, duration=duration)
    tick = shape.at(at * duration * 0.999)
    assert tick is not None
    assert 1 <= tick[0] <= users
    assert tick[1] >= rate
    assert shape.at(duration) is None


@given(st.integers(1, 200), st.floats(1, 600))
def test_a_ramp_never_goes_down(users: int, duration: float) -> None:
    shape = LoadProfile("ramp", users=users, duration=duration)
    counts = [tick[0] for i in range(100) if (tick := shape.at(duration * i / 100)) is not None]
    assert counts == sorted(counts)
    assert counts[-1] == users


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "zigzag"}, "unknown shape"),
        ({"users": 0}, "users"),
        ({"spawn_rate": 0}, "spawn rate"),
        ({"kind": "ramp"}, "needs a duration"),
        ({"kind": "spike", "duration": 10, "spike_start": 0.9, "spike_length": 0.2}, "spike"),
        ({"kind": "step", "duration": 10, "steps": 0}, "steps"),
    ],
)
def test_bad_parameters_are_refused_with_their_name(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadProfile(**fields)  # type: ignore[arg-type]


def test_profiles_come_from_locusts_options() -> None:
    options = Namespace(shape="step", num_users=6, spawn_rate=3, run_time=30, steps=3, ramp_up=None)
    assert profile_from_options(options) == LoadProfile(
        "step", users=6, spawn_rate=3.0, duration=30.0, steps=3
    )
    bare = Namespace(shape="spike", num_users=None, spawn_rate=None, run_time=None)
    assert profile_from_options(bare).duration == DEFAULT_SHAPED_SECONDS
    assert profile_from_options(Namespace()) == LoadProfile()

"""``llmops up --pool``: pool specs parse strictly, each pool's replicas get their pool and alias, and
without pools the serving parts are named and configured as before (``serving``, ``serving-2``...)."""

from __future__ import annotations

import itertools

import pytest

from llmops.common.errors import InvalidArgument
from llmops.stack.fleet import parse_pools, pool_model_name, serving_parts


def test_pools_parse() -> None:
    assert parse_pools(["champion=2", "challenger=1"]) == {"champion": 2, "challenger": 1}


@pytest.mark.parametrize(
    "specs", [["champion"], ["champion=0"], ["Champion=1"], ["champion=x"], ["a=1", "a=2"], ["-a=1"]]
)
def test_bad_pool_specs(specs: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        parse_pools(specs)


def test_pool_model_name() -> None:
    assert pool_model_name("llm@champion") == "llm"
    assert pool_model_name("llm:3") == "llm"
    assert pool_model_name(None, "tiny") == "tiny"
    for bad in (None, "", "/models/folder", "./folder"):
        with pytest.raises(InvalidArgument):
            pool_model_name(bad)


def test_each_pool_replica_serves_its_alias() -> None:
    ports = itertools.count(9000)
    parts = serving_parts(1, {"champion": 2, "challenger": 1}, "llm", lambda: next(ports))
    assert [name for name, _ in parts] == ["serving-champion-1", "serving-champion-2", "serving-challenger-1"]
    assert [(env["LLMOPS_SERVING_POOL"], env["LLMOPS_SERVING_MODEL"]) for _, env in parts] == [
        ("champion", "llm@champion"),
        ("champion", "llm@champion"),
        ("challenger", "llm@challenger"),
    ]
    assert len({env["LLMOPS_SERVING_HTTP_PORT"] for _, env in parts}) == 3


def test_without_pools_the_replicas_are_as_before() -> None:
    parts = serving_parts(3, {}, "", lambda: 9001)
    assert parts == [
        ("serving", {}),
        ("serving-2", {"LLMOPS_SERVING_HTTP_PORT": "9001"}),
        ("serving-3", {"LLMOPS_SERVING_HTTP_PORT": "9001"}),
    ]

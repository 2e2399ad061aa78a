"""Traffic-split weights through a real registry server on MLflow: what a router and a rollout rely on.

Invariants: weights are set as numbered revisions by compare-and-set (a stale revision gets ABORTED,
and of racers holding one revision exactly one wins); bad weights get INVALID_ARGUMENT, a missing
model NOT_FOUND, a missing alias FAILED_PRECONDITION; an alias carrying weight cannot be deleted;
the typed client and the CLI see what the server holds; weights and their history survive a
registry restart.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner, Result

from llmops.cli import app as cli_app
from llmops.common.app import start_app
from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import RegistryClient
from llmops.common.errors import Aborted, FailedPrecondition
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.registry.app import RegistryApp, build_app
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry

FP32 = model_pb2.MODEL_FORMAT_FP32


async def _model_with_two_aliases(client: RegistryClient, name: str, folder: Path) -> tuple[int, int]:
    meta = pb.VersionMetadata(model_name=name, create_model=True, format=FP32)
    v1 = (await upload_directory(client, meta, folder)).version
    v2 = (await upload_directory(client, meta, folder)).version
    for alias, version in (("champion", v1), ("challenger", v2)):
        await client.unary(
            client.stub.SetAlias, pb.SetAliasRequest(model_name=name, alias=alias, version=version)
        )
    return v1, v2


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_typed_client_compare_and_set_and_history(registry: RunningRegistry, llama_dir: Path) -> None:
    client = registry.client
    v1, v2 = await _model_with_two_aliases(client, "split", llama_dir)
    never = await client.get_alias_weights("split")
    assert (never.revision, dict(never.weights), dict(never.versions)) == (
        0,
        {},
        {"champion": v1, "challenger": v2},
    )
    assert never.routable() == {}

    first = await client.set_alias_weights(
        "split", {"champion": 90, "challenger": 10}, expected_revision=0, reason="canary 10%"
    )
    assert (first.revision, dict(first.weights), first.reason) == (
        1,
        {"champion": 90, "challenger": 10},
        "canary 10%",
    )
    assert first.routable() == {"champion": 90, "challenger": 10}
    with pytest.raises(Aborted, match="revision 1"):
        await client.set_alias_weights("split", {"champion": 50, "challenger": 50}, expected_revision=0)

    # Racers that all read revision 1: exactly one moves the weights, the others are told to re-read.
    racers = [
        client.set_alias_weights("split", {"champion": 100 - i, "challenger": i}, expected_revision=1)
        for i in range(20, 28)
    ]
    results = await asyncio.gather(*racers, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, Aborted) for r in results if r not in winners)
    now = await client.get_alias_weights("split")
    assert now.revision == 2 and now.weights == winners[0].weights

    history = await client.unary(
        client.stub.ListAliasWeightsHistory,
        pb.ListAliasWeightsHistoryRequest(model_name="split", page_size=1),
    )
    assert [e.revision for e in history.entries] == [2] and history.next_page_token
    assert dict(history.entries[0].previous_weights) == {"champion": 90, "challenger": 10}
    older = await client.unary(
        client.stub.ListAliasWeightsHistory,
        pb.ListAliasWeightsHistoryRequest(
            model_name="split", page_size=1, page_token=history.next_page_token
        ),
    )
    assert [e.revision for e in older.entries] == [1] and older.entries[0].reason == "canary 10%"
    assert older.entries[0].set_by  # the caller's identity, filled by the server

    # Weight 0 keeps an alias in the split but routes nothing to it; only then may it be deleted.
    with pytest.raises(FailedPrecondition, match="set its weight to 0"):
        await client.unary(
            client.stub.DeleteAlias, pb.DeleteAliasRequest(model_name="split", alias="challenger")
        )
    zeroed = await client.set_alias_weights("split", {"champion": 1, "challenger": 0}, expected_revision=2)
    assert zeroed.routable() == {"champion": 1}
    await client.unary(client.stub.DeleteAlias, pb.DeleteAliasRequest(model_name="split", alias="challenger"))
    assert (await client.get_alias_weights("split")).routable() == {"champion": 1}


BAD_SETS = [
    ({"weights": {}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": -1, "challenger": 5}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": 0, "challenger": 0}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": 1_000_001}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"Champion!": 1}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"latest": 1}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {f"a{i}": 1 for i in range(17)}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": 1}, "reason": "x" * 1025}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": 1}, "expected_revision": -1}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": 1}, "model_name": "Bad Name"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"weights": {"champion": 1}, "model_name": "no-such-model"}, grpc.StatusCode.NOT_FOUND),
    ({"weights": {"champion": 1, "ghost": 1}}, grpc.StatusCode.FAILED_PRECONDITION),
    ({"weights": {"champion": 1}, "expected_revision": 7}, grpc.StatusCode.ABORTED),
]


@pytest.mark.parametrize(
    ("fields", "code"), BAD_SETS, ids=[f"{c.name}-{i}" for i, (_, c) in enumerate(BAD_SETS)]
)
async def test_bad_weight_changes_get_their_status_and_change_nothing(
    registry: RunningRegistry, llama_dir: Path, fields: dict[str, object], code: grpc.StatusCode
) -> None:
    client = registry.client
    try:
        await client.get_alias_weights("badweights")
    except Exception:
        await _model_with_two_aliases(client, "badweights", llama_dir)
    before = await client.get_alias_weights("badweights")
    request = pb.SetAliasWeightsRequest(**{"model_name": "badweights", **fields})  # type: ignore[arg-type]
    assert await _code(client.stub.SetAliasWeights(request, timeout=60)) == code
    assert await client.get_alias_weights("badweights") == before


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.GetAliasWeightsRequest(model_name="no-such-model"), grpc.StatusCode.NOT_FOUND),
        (pb.GetAliasWeightsRequest(model_name=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListAliasWeightsHistoryRequest(model_name="no-such-model"), grpc.StatusCode.NOT_FOUND),
        (pb.ListAliasWeightsHistoryRequest(model_name="x", page_size=5000), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.ListAliasWeightsHistoryRequest(model_name="x", page_token="garbage"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
async def test_bad_weight_reads_get_their_status(
    registry: RunningRegistry, request_: object, code: grpc.StatusCode
) -> None:
    stub = registry.client.stub
    method = (
        stub.GetAliasWeights
        if isinstance(request_, pb.GetAliasWeightsRequest)
        else stub.ListAliasWeightsHistory
    )
    assert await _code(method(request_, timeout=60)) == code


async def _cli(registry: RunningRegistry, *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke,
        cli_app,
        ["models", "weights", *args, "--address", registry.address],
        env={"COLUMNS": "200"},
    )


async def test_weights_cli(registry: RunningRegistry, llama_dir: Path) -> None:
    v1, v2 = await _model_with_two_aliases(registry.client, "cliweights", llama_dir)
    done = await _cli(
        registry,
        "set",
        "cliweights",
        "champion=90",
        "challenger=10",
        "--expect-revision",
        "0",
        "--reason",
        "try",
    )
    assert done.exit_code == 0, done.output
    assert "revision 1" in done.output and "champion=90 (90.0%)" in done.output
    stale = await _cli(
        registry, "set", "cliweights", "champion=80", "challenger=20", "--expect-revision", "0"
    )
    assert stale.exit_code == 1 and "ABORTED" in stale.output
    malformed = await _cli(registry, "set", "cliweights", "champion=ninety")
    assert malformed.exit_code == 2 and "must be an integer" in malformed.output
    shown = await _cli(registry, "get", "cliweights", "--history")
    assert shown.exit_code == 0, shown.output
    assert "10.0%" in shown.output and "try" in shown.output
    as_json = await _cli(registry, "get", "cliweights", "--json")
    data = json.loads(as_json.output)
    assert data["weights"]["weights"] == {"champion": "90", "challenger": "10"}
    assert data["alias_versions"] == {"champion": str(v1), "challenger": str(v2)}


async def test_weights_survive_a_registry_restart(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, llama_dir: Path
) -> None:
    running = await start_registry(tmp_path / "reg", tmp_path_factory.getbasetemp())
    try:
        await _model_with_two_aliases(running.client, "durable", llama_dir)
        await running.client.set_alias_weights("durable", {"champion": 90, "challenger": 10}, reason="a")
        await running.client.set_alias_weights(
            "durable", {"champion": 75, "challenger": 25}, expected_revision=1
        )
    finally:
        await stop_registry(running)
    server, app = await start_app(build_app, running.settings, host="127.0.0.1", port=0, metrics_port=0)
    assert isinstance(app, RegistryApp)
    client = RegistryClient.connect(f"127.0.0.1:{server.port}", timeout=60)
    restarted = RunningRegistry(server, app, client, running.settings, running.root)
    try:
        await client.wait_ready(timeout=60)
        split = await client.get_alias_weights("durable")
        assert (split.revision, dict(split.weights)) == (2, {"champion": 75, "challenger": 25})
        history = await client.unary(
            client.stub.ListAliasWeightsHistory, pb.ListAliasWeightsHistoryRequest(model_name="durable")
        )
        assert [(e.revision, e.reason) for e in history.entries] == [(2, ""), (1, "a")]
        with pytest.raises(Aborted):  # the revision counter carried over too
            await client.set_alias_weights("durable", {"champion": 1}, expected_revision=0)
    finally:
        await stop_registry(restarted)

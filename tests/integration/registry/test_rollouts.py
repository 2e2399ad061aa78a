"""Rollout records through a real registry server on MLflow (no serving: decisions are sent by hand).

Invariants: a bad spec gets INVALID_ARGUMENT naming its field (steps not rising or not ending at 100,
an unknown version, the champion itself, SLO bounds that cannot hold), a missing model NOT_FOUND, a
second active rollout of a model FAILED_PRECONDITION; every transition is a compare-and-set on the
rollout's revision (stale: ABORTED) and moves the weights or `champion` in the same call, with the
rollout's id and evidence in the weights and alias histories; a STEP after someone else moved
`champion` moves nothing (FAILED_PRECONDITION); rollouts survive a registry restart.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner, Result

from llmops.cli import app as cli_app
from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import RegistryClient
from llmops.common.errors import Aborted, FailedPrecondition, InvalidArgument, LLMOpsError, NotFound
from llmops.common.rollout_client import RolloutClient
from llmops.common.rollouts import Decision, Evidence, RolloutSpec, RolloutState, SloBound, Slos, Window
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry

FP32 = model_pb2.MODEL_FORMAT_FP32


async def _model(client: RegistryClient, name: str, folder: Path, versions: int = 2) -> list[int]:
    meta = pb.VersionMetadata(model_name=name, create_model=True, format=FP32)
    numbers = [(await upload_directory(client, meta, folder)).version for _ in range(versions)]
    await client.unary(
        client.stub.SetAlias, pb.SetAliasRequest(model_name=name, alias="champion", version=numbers[0])
    )
    return numbers


def _evidence(champion: int, challenger: int) -> Evidence:
    return Evidence("router", 5.0, Window(champion, requests=40), Window(challenger, requests=20))


BAD_SPECS = [
    ({"steps": (50, 25, 100)}, "spec.steps[1]"),
    ({"steps": (10, 50)}, "spec.steps"),
    ({"steps": (0, 100)}, "spec.steps[0]"),
    ({"steps": (50, 150)}, "spec.steps[1]"),
    ({"to_version": 99}, "spec.to_version"),
    ({"to_version": 1}, "spec.to_version"),  # the champion itself
    ({"step_min_seconds": -1.0}, "spec.step_min_seconds"),
    ({"slos": Slos(ttft_p95_seconds=SloBound(max_value=-0.1))}, "ttft_p95_seconds.max_value"),
    ({"slos": Slos(ttft_p95_seconds=SloBound(max_ratio=0.8))}, "ttft_p95_seconds.max_ratio"),
    ({"slos": Slos(error_ratio=SloBound(max_value=1.5))}, "error_ratio.max_value"),
    ({"slos": Slos(error_ratio=SloBound(max_value=float("nan")))}, "error_ratio.max_value"),
    ({"slos": Slos()}, "spec.slos"),  # no bound at all
]


async def test_bad_specs_are_invalid_argument(registry: RunningRegistry, llama_dir: Path) -> None:
    v1, v2 = await _model(registry.client, "ro-bad", llama_dir)
    async with RolloutClient.connect(registry.address, timeout=30) as rollouts:
        for change, field in BAD_SPECS:
            spec = RolloutSpec(**{"model_name": "ro-bad", "to_version": v2, **change})  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument) as caught:
                await rollouts.start(spec)
            assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert field in (caught.value.field or "") + caught.value.message, (change, caught.value)
        with pytest.raises(NotFound):
            await rollouts.start(RolloutSpec("ro-no-such-model", to_version=1))
        first = await rollouts.start(RolloutSpec("ro-bad", to_version=v2))
        with pytest.raises(FailedPrecondition, match="active rollout"):
            await rollouts.start(RolloutSpec("ro-bad", to_version=v2))
        await rollouts.abort(first.id, reason="test over")
        with pytest.raises(FailedPrecondition):
            await rollouts.abort(first.id)
    assert v1 == 1


async def test_transitions_move_weights_and_promote_by_compare_and_set(
    registry: RunningRegistry, llama_dir: Path
) -> None:
    client = registry.client
    v1, v2 = await _model(client, "ro-flow", llama_dir)
    async with RolloutClient.connect(registry.address, timeout=30) as rollouts:
        r = await rollouts.start(RolloutSpec("ro-flow", to_version=v2, steps=(10, 100), reason="canary"))
        assert (r.state, r.from_version, r.spec.steps, r.challenger_percent) == (
            RolloutState.PENDING,
            v1,
            (10, 100),
            0,
        )
        split = await client.get_alias_weights("ro-flow")
        assert split.versions == {"champion": v1, "challenger": v2}

        with pytest.raises(FailedPrecondition, match="last step"):
            await rollouts.advance(
                r.id, expected_revision=r.revision, decision=Decision.PROMOTE, reason="early"
            )
        r = await rollouts.advance(
            r.id, expected_revision=r.revision, decision=Decision.STEP, reason="start", evidence=None
        )
        assert (r.state, r.step_index, r.challenger_percent) == (RolloutState.PROGRESSING, 0, 10)
        assert dict((await client.get_alias_weights("ro-flow")).weights) == {"champion": 90, "challenger": 10}
        with pytest.raises(Aborted):
            await rollouts.advance(
                r.id, expected_revision=r.revision - 1, decision=Decision.STEP, reason="stale"
            )

        paused = await rollouts.pause(r.id, reason="look")
        with pytest.raises(FailedPrecondition, match="paused"):
            await rollouts.advance(
                r.id, expected_revision=paused.revision, decision=Decision.STEP, reason="x"
            )
        r = await rollouts.resume(r.id)
        assert r.state is RolloutState.PROGRESSING and r.step_started_at > paused.step_started_at

        r = await rollouts.advance(
            r.id,
            expected_revision=r.revision,
            decision=Decision.STEP,
            reason="SLOs met",
            evidence=_evidence(v1, v2),
        )
        assert (r.step_index, r.challenger_percent) == (1, 100)
        assert dict((await client.get_alias_weights("ro-flow")).weights) == {"champion": 0, "challenger": 100}
        r = await rollouts.advance(
            r.id,
            expected_revision=r.revision,
            decision=Decision.PROMOTE,
            reason="SLOs met",
            evidence=_evidence(v1, v2),
        )
        assert r.state is RolloutState.PROMOTED
        split = await client.get_alias_weights("ro-flow")
        assert split.versions["champion"] == v2 and split.routable() == {"champion": 100}
        assert [t.to_state for t in r.transitions] == [
            RolloutState.PENDING,
            RolloutState.PROGRESSING,
            RolloutState.PAUSED,
            RolloutState.PROGRESSING,
            RolloutState.PROGRESSING,
            RolloutState.PROMOTED,
        ]
        assert r.transitions[-1].evidence == _evidence(v1, v2)
        history = await client.unary(
            client.stub.ListAliasHistory, pb.ListAliasHistoryRequest(model_name="ro-flow", alias="champion")
        )
        top = history.entries[0]
        assert (top.from_version, top.to_version) == (v1, v2)
        assert f"rollout {r.id}" in top.reason and "requests 20 vs 40" in top.reason
        weights = await client.unary(
            client.stub.ListAliasWeightsHistory, pb.ListAliasWeightsHistoryRequest(model_name="ro-flow")
        )
        assert all(f"rollout {r.id}" in e.reason for e in weights.entries)
        assert [dict(e.weights)["challenger"] for e in weights.entries] == [0, 100, 10]  # newest first
        assert (await rollouts.get(model_name="ro-flow")).id == r.id
        assert [x.id for x in await rollouts.list(model_name="ro-flow", active_only=True)] == []


async def test_moved_champion_blocks_steps_and_rollback_zeroes_challenger(
    registry: RunningRegistry, llama_dir: Path
) -> None:
    client = registry.client
    v1, v2, v3 = await _model(client, "ro-moved", llama_dir, versions=3)
    async with RolloutClient.connect(registry.address, timeout=30) as rollouts:
        r = await rollouts.start(RolloutSpec("ro-moved", to_version=v2, steps=(50, 100)))
        r = await rollouts.advance(r.id, expected_revision=r.revision, decision=Decision.STEP, reason="go")
        await client.unary(
            client.stub.SetAlias, pb.SetAliasRequest(model_name="ro-moved", alias="champion", version=v3)
        )
        with pytest.raises(FailedPrecondition, match="someone moved it"):
            await rollouts.advance(r.id, expected_revision=r.revision, decision=Decision.STEP, reason="next")
        r = await rollouts.advance(
            r.id, expected_revision=r.revision, decision=Decision.ABORT, reason="champion moved"
        )
        assert r.state is RolloutState.ABORTED
        split = await client.get_alias_weights("ro-moved")
        assert split.versions["champion"] == v3 and split.routable() == {"champion": 100}

        await client.unary(
            client.stub.SetAlias, pb.SetAliasRequest(model_name="ro-moved", alias="champion", version=v1)
        )
        r = await rollouts.start(RolloutSpec("ro-moved", to_version=v2, steps=(50, 100)))
        r = await rollouts.advance(r.id, expected_revision=r.revision, decision=Decision.STEP, reason="go")
        r = await rollouts.advance(
            r.id, expected_revision=r.revision, decision=Decision.ROLL_BACK, reason="TTFT breach"
        )
        assert r.state is RolloutState.ROLLED_BACK and r.challenger_percent == 0
        assert (await client.get_alias_weights("ro-moved")).routable() == {"champion": 100}
        assert (await client.get_alias_weights("ro-moved")).versions["champion"] == v1


async def test_rollouts_survive_a_registry_restart(tmp_path: Path, llama_dir: Path) -> None:
    root = tmp_path / "reg"
    running = await start_registry(root, tmp_path)
    try:
        v1, v2 = await _model(running.client, "ro-restart", llama_dir)
        async with RolloutClient.connect(running.address, timeout=30) as rollouts:
            r = await rollouts.start(RolloutSpec("ro-restart", to_version=v2))
            r = await rollouts.advance(
                r.id, expected_revision=r.revision, decision=Decision.STEP, reason="go"
            )
    finally:
        await stop_registry(running)
    running = await start_registry(root, tmp_path)
    try:
        async with RolloutClient.connect(running.address, timeout=30) as rollouts:
            again = await rollouts.get(r.id)
            assert again == r
            assert [x.id for x in await rollouts.list(active_only=True)] == [r.id]
            with pytest.raises(LLMOpsError):
                await rollouts.start(RolloutSpec("ro-restart", to_version=v2))
    finally:
        await stop_registry(running)
    assert v1 == 1


async def test_cli_start_status_pause_resume_abort(registry: RunningRegistry, llama_dir: Path) -> None:
    v1, v2 = await _model(registry.client, "ro-cli", llama_dir)
    runner = CliRunner()

    async def cli(*args: str) -> Result:
        return await asyncio.to_thread(
            runner.invoke, cli_app, [*args, "--address", registry.address], env={"COLUMNS": "200"}
        )

    started = await cli(
        "rollout", "start", "ro-cli", str(v2), "--steps", "20,100", "--ttft-p95-ratio", "1.2",
        "--error-ratio-max", "0.02", "--json",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    record = json.loads(started.output)
    assert (record["state"], record["from_version"], record["spec"]["steps"]) == ("pending", v1, [20, 100])
    assert record["spec"]["slos"]["ttft_p95_seconds"] == {"max_value": 0.0, "max_ratio": 1.2}
    shown = await cli("rollout", "status", "ro-cli")
    assert shown.exit_code == 0 and "pending" in shown.output and "<= 1.2x champion" in shown.output, (
        shown.output
    )
    assert "<= 2.00%" in shown.output
    paused = await cli("rollout", "pause", str(record["id"]), "--reason", "look")
    assert paused.exit_code == 0 and "paused" in paused.output
    assert (await cli("rollout", "resume", str(record["id"]))).exit_code == 0
    aborted = await cli("rollout", "abort", str(record["id"]), "--json")
    assert json.loads(aborted.output)["state"] == "aborted"
    again = await cli("rollout", "abort", str(record["id"]))
    assert again.exit_code == 1 and "FAILED_PRECONDITION" in again.output
    bad = await cli("rollout", "start", "ro-cli", str(v2), "--steps", "50,20,100")
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output and "spec.steps[1]" in bad.output

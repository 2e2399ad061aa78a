"""Clients of rollouts: the registry's ``RolloutService`` and the router's per-version SLIs,
with the proto <-> :mod:`llmops.common.rollouts` conversions both sides share::

    async with RolloutClient.connect(settings.registry.address) as rollouts:
        rollout = await rollouts.start(RolloutSpec("llm", to_version=3, steps=(10, 50, 100)))
        rollout = await rollouts.get(rollout.id)          # or rollouts.get(model_name="llm")
        await rollouts.pause(rollout.id, reason="looking")  # resume(), abort() alike

    async with RouterAdminClient.connect(router_address) as router:
        windows = await router.version_stats("llm", window_seconds=60)  # {version: Window}
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from llmops.common.clients import ServiceClient
from llmops.common.rollouts import (
    Decision,
    Evidence,
    Rollout,
    RolloutSpec,
    RolloutState,
    SloBound,
    SloCheck,
    Slos,
    Transition,
    Window,
)
from llmops.proto.registry.v1 import rollout_service_pb2 as pb
from llmops.proto.registry.v1 import rollout_service_pb2_grpc as pb_grpc
from llmops.proto.router.v1 import router_service_pb2 as rpb
from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc

ROLLOUT_SERVICE_NAME = "llmops.registry.v1.RolloutService"

_STATES = {
    RolloutState.PENDING: pb.ROLLOUT_STATE_PENDING,
    RolloutState.PROGRESSING: pb.ROLLOUT_STATE_PROGRESSING,
    RolloutState.PAUSED: pb.ROLLOUT_STATE_PAUSED,
    RolloutState.PROMOTED: pb.ROLLOUT_STATE_PROMOTED,
    RolloutState.ROLLED_BACK: pb.ROLLOUT_STATE_ROLLED_BACK,
    RolloutState.ABORTED: pb.ROLLOUT_STATE_ABORTED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_DECISIONS = {
    Decision.STEP: pb.ROLLOUT_DECISION_STEP,
    Decision.PROMOTE: pb.ROLLOUT_DECISION_PROMOTE,
    Decision.ROLL_BACK: pb.ROLLOUT_DECISION_ROLL_BACK,
    Decision.ABORT: pb.ROLLOUT_DECISION_ABORT,
}
_DECISIONS_BACK = {v: k for k, v in _DECISIONS.items()}


# --- conversions -----------------------------------------------------------------------------------


def _ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _dt(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def state_to_proto(state: RolloutState) -> Any:
    return _STATES[state]


def state_from_proto(value: int) -> RolloutState:
    return _STATES_BACK[value]  # type: ignore[index]


def decision_to_proto(decision: Decision) -> Any:
    return _DECISIONS[decision]


def decision_from_proto(value: int) -> Decision | None:
    """None for UNSPECIFIED or an unknown value (the server answers INVALID_ARGUMENT)."""
    return _DECISIONS_BACK.get(value)  # type: ignore[call-overload,no-any-return]


def slos_to_proto(slos: Slos) -> pb.RolloutSlos:
    def bound(b: SloBound) -> pb.SloBound:
        return pb.SloBound(max_value=b.max_value, max_ratio=b.max_ratio)

    return pb.RolloutSlos(
        ttft_p95_seconds=bound(slos.ttft_p95_seconds),
        inter_token_p95_seconds=bound(slos.inter_token_p95_seconds),
        error_ratio=bound(slos.error_ratio),
    )


def slos_from_proto(message: pb.RolloutSlos) -> Slos:
    def bound(b: pb.SloBound) -> SloBound:
        return SloBound(b.max_value, b.max_ratio)

    return Slos(
        bound(message.ttft_p95_seconds), bound(message.inter_token_p95_seconds), bound(message.error_ratio)
    )


def spec_to_proto(spec: RolloutSpec) -> pb.RolloutSpec:
    message = pb.RolloutSpec(
        model_name=spec.model_name,
        to_version=spec.to_version,
        steps=list(spec.steps),
        step_min_seconds=spec.step_min_seconds,
        step_min_requests=spec.step_min_requests,
        reason=spec.reason,
    )
    if spec.slos is not None:
        message.slos.CopyFrom(slos_to_proto(spec.slos))
    return message


def spec_from_proto(message: pb.RolloutSpec) -> RolloutSpec:
    return RolloutSpec(
        model_name=message.model_name,
        to_version=message.to_version,
        steps=tuple(message.steps),
        step_min_seconds=message.step_min_seconds,
        step_min_requests=message.step_min_requests,
        slos=slos_from_proto(message.slos) if message.HasField("slos") else None,
        reason=message.reason,
    )


def window_to_proto(window: Window) -> pb.RolloutWindow:
    return pb.RolloutWindow(
        version=window.version,
        requests=window.requests,
        errors=window.errors,
        error_ratio=window.error_ratio,
        ttft_p95_seconds=window.ttft_p95_seconds,
        inter_token_p95_seconds=window.inter_token_p95_seconds,
        ttft_samples=window.ttft_samples,
        inter_token_samples=window.inter_token_samples,
    )


def window_from_proto(message: pb.RolloutWindow) -> Window:
    return Window(
        version=message.version,
        requests=message.requests,
        errors=message.errors,
        ttft_p95_seconds=message.ttft_p95_seconds,
        inter_token_p95_seconds=message.inter_token_p95_seconds,
        ttft_samples=message.ttft_samples,
        inter_token_samples=message.inter_token_samples,
    )


def evidence_to_proto(evidence: Evidence) -> pb.RolloutEvidence:
    return pb.RolloutEvidence(
        source=evidence.source,
        window_seconds=evidence.window_seconds,
        champion=window_to_proto(evidence.champion),
        challenger=window_to_proto(evidence.challenger),
        checks=[
            pb.SloCheck(
                sli=c.sli,
                champion_value=c.champion_value,
                challenger_value=c.challenger_value,
                max_value=c.max_value,
                max_ratio=c.max_ratio,
                met=c.met,
                detail=c.detail,
            )
            for c in evidence.checks
        ],
    )


def evidence_from_proto(message: pb.RolloutEvidence) -> Evidence:
    return Evidence(
        source=message.source,
        window_seconds=message.window_seconds,
        champion=window_from_proto(message.champion),
        challenger=window_from_proto(message.challenger),
        checks=tuple(
            SloCheck(c.sli, c.champion_value, c.challenger_value, c.max_value, c.max_ratio, c.met, c.detail)
            for c in message.checks
        ),
    )


def rollout_to_proto(rollout: Rollout) -> pb.Rollout:
    return pb.Rollout(
        id=rollout.id,
        spec=spec_to_proto(rollout.spec),
        from_version=rollout.from_version,
        state=state_to_proto(rollout.state),
        step_index=rollout.step_index,
        challenger_percent=rollout.challenger_percent,
        revision=rollout.revision,
        step_started_at=_ts(rollout.step_started_at),
        created_at=_ts(rollout.created_at),
        updated_at=_ts(rollout.updated_at),
        created_by=rollout.created_by,
        transitions=[
            pb.RolloutTransition(
                from_state=state_to_proto(t.from_state),
                to_state=state_to_proto(t.to_state),
                step_index=t.step_index,
                challenger_percent=t.challenger_percent,
                at=_ts(t.at),
                by=t.by,
                reason=t.reason,
                evidence=evidence_to_proto(t.evidence) if t.evidence is not None else None,
                revision=t.revision,
            )
            for t in rollout.transitions
        ],
    )


def rollout_from_proto(message: pb.Rollout) -> Rollout:
    return Rollout(
        id=message.id,
        spec=spec_from_proto(message.spec),
        from_version=message.from_version,
        state=state_from_proto(message.state),
        step_index=message.step_index,
        challenger_percent=message.challenger_percent,
        revision=message.revision,
        step_started_at=_dt(message.step_started_at),
        created_at=_dt(message.created_at),
        updated_at=_dt(message.updated_at),
        created_by=message.created_by,
        transitions=tuple(
            Transition(
                from_state=state_from_proto(t.from_state),
                to_state=state_from_proto(t.to_state),
                step_index=t.step_index,
                challenger_percent=t.challenger_percent,
                at=_dt(t.at),
                by=t.by,
                reason=t.reason,
                evidence=evidence_from_proto(t.evidence) if t.HasField("evidence") else None,
                revision=t.revision,
            )
            for t in message.transitions
        ),
    )


def version_stats_to_window(stats: rpb.VersionStats) -> Window:
    return Window(
        version=stats.model.version,
        requests=stats.requests,
        errors=stats.errors,
        ttft_p95_seconds=stats.ttft_p95_seconds,
        inter_token_p95_seconds=stats.inter_token_p95_seconds,
        ttft_samples=stats.ttft_samples,
        inter_token_samples=stats.inter_token_samples,
    )


# --- clients ---------------------------------------------------------------------------------------


class RolloutClient(ServiceClient["pb_grpc.RolloutServiceAsyncStub"]):
    """Client of ``llmops.registry.v1.RolloutService`` (served at the registry's address).

    Errors come back as :mod:`llmops.common.errors` classes: ``InvalidArgument`` (bad spec),
    ``NotFound``, ``FailedPrecondition`` (an active rollout already, not READY, wrong state),
    ``Aborted`` (a stale ``expected_revision`` in :meth:`advance`).
    """

    service_name = ROLLOUT_SERVICE_NAME
    stub_factory = pb_grpc.RolloutServiceStub

    async def start(self, spec: RolloutSpec, *, timeout: float | None = None) -> Rollout:
        """Start a rollout (PENDING) from the model's champion to ``spec.to_version``."""
        request = pb.StartRolloutRequest(spec=spec_to_proto(spec))
        response = await self.unary(self.stub.StartRollout, request, timeout=timeout)
        return rollout_from_proto(response.rollout)

    async def get(
        self, rollout_id: int = 0, *, model_name: str = "", timeout: float | None = None
    ) -> Rollout:
        """A rollout by id, or (``rollout_id`` 0) ``model_name``'s newest."""
        request = pb.GetRolloutRequest(id=rollout_id, model_name=model_name)
        response = await self.unary(self.stub.GetRollout, request, timeout=timeout)
        return rollout_from_proto(response.rollout)

    async def list(
        self,
        *,
        model_name: str = "",
        active_only: bool = False,
        limit: int = 500,
        timeout: float | None = None,
    ) -> list[Rollout]:
        """Rollouts newest first (every page, up to ``limit``)."""
        found: list[Rollout] = []
        token = ""
        while len(found) < limit:
            request = pb.ListRolloutsRequest(
                model_name=model_name, active_only=active_only, page_size=min(500, limit), page_token=token
            )
            response = await self.unary(self.stub.ListRollouts, request, timeout=timeout)
            found.extend(rollout_from_proto(r) for r in response.rollouts)
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    async def pause(self, rollout_id: int, *, reason: str = "", timeout: float | None = None) -> Rollout:
        request = pb.PauseRolloutRequest(id=rollout_id, reason=reason)
        return rollout_from_proto(
            (await self.unary(self.stub.PauseRollout, request, timeout=timeout)).rollout
        )

    async def resume(self, rollout_id: int, *, reason: str = "", timeout: float | None = None) -> Rollout:
        request = pb.ResumeRolloutRequest(id=rollout_id, reason=reason)
        return rollout_from_proto(
            (await self.unary(self.stub.ResumeRollout, request, timeout=timeout)).rollout
        )

    async def abort(self, rollout_id: int, *, reason: str = "", timeout: float | None = None) -> Rollout:
        request = pb.AbortRolloutRequest(id=rollout_id, reason=reason)
        return rollout_from_proto(
            (await self.unary(self.stub.AbortRollout, request, timeout=timeout)).rollout
        )

    async def advance(
        self,
        rollout_id: int,
        *,
        expected_revision: int,
        decision: Decision,
        reason: str,
        evidence: Evidence | None = None,
        timeout: float | None = None,
    ) -> Rollout:
        """Record a controller's decision (compare-and-set on ``expected_revision``) and apply it."""
        request = pb.AdvanceRolloutRequest(
            id=rollout_id,
            expected_revision=expected_revision,
            decision=decision_to_proto(decision),
            reason=reason,
        )
        if evidence is not None:
            request.evidence.CopyFrom(evidence_to_proto(evidence))
        response = await self.unary(self.stub.AdvanceRollout, request, timeout=timeout)
        return rollout_from_proto(response.rollout)


class RouterAdminClient(ServiceClient["rpb_grpc.RouterServiceAsyncStub"]):
    """Client of the router's admin API ``llmops.router.v1.RouterService``."""

    service_name = "llmops.router.v1.RouterService"
    stub_factory = rpb_grpc.RouterServiceStub

    async def version_stats(
        self, model_name: str, *, window_seconds: float = 0.0, timeout: float | None = None
    ) -> dict[int, Window]:
        """The router's SLIs of each version of ``model_name`` over the last ``window_seconds``."""
        request = rpb.GetVersionStatsRequest(model_name=model_name, window_seconds=window_seconds)
        response = await self.unary(self.stub.GetVersionStats, request, timeout=timeout)
        return {
            s.model.version: version_stats_to_window(s)
            for s in response.versions
            if s.model.name == model_name
        }

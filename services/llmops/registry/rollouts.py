"""The rollout RPCs' logic: validate a spec against the registry, keep the record, and apply each
transition to the model's aliases and weights in the same call.

Transitions and what they move (``w`` is the step's challenger percent):

=============  =====================  ==========================================================
start          -> PENDING             challenger weight 0, then `challenger` -> to_version
STEP           PENDING/PROGRESSING    weights champion 100-w / challenger w (next step)
PROMOTE        last step              `champion` -> to_version, compare-and-set on from_version;
                                      then weights champion 100 / challenger 0
ROLL_BACK      PROGRESSING            weights champion 100 / challenger 0
ABORT, abort   any active             weights champion 100 / challenger 0 (champion untouched)
pause, resume  PAUSED <-> active      nothing moves; resume restarts the step's window
=============  =====================  ==========================================================

Each weight change and alias move carries ``rollout <id>: <what> <evidence>`` as its reason, so
the registry's weights and alias histories show every step with the numbers that decided it. A
STEP or PROMOTE checks first that `champion` still points at from_version: when someone moved it,
nothing moves (FAILED_PRECONDITION) and the controller aborts the rollout.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from llmops.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from llmops.common.rollouts import (
    CHALLENGER,
    CHAMPION,
    Decision,
    Evidence,
    Rollout,
    RolloutSpec,
    RolloutState,
    Transition,
    check_spec,
)
from llmops.registry.domain import Page, VersionStatus, check_model_name
from llmops.registry.requests import (
    MAX_REASON_BYTES,
    check_text,
    decode_token,
    encode_token,
    page_size_or_default,
)
from llmops.registry.rollouts_store import RolloutStore, now
from llmops.registry.stores.base import RegistryStore

MAX_ROLLOUT_PAGE = 500


class RolloutService:
    """Rollout records over a :class:`RolloutStore`, moving aliases and weights through a registry store."""

    def __init__(self, store: RegistryStore, rollouts: RolloutStore) -> None:
        self.store = store
        self.rollouts = rollouts
        self._locks: dict[int, asyncio.Lock] = {}

    # --- reads -------------------------------------------------------------------------------------

    async def get(self, rollout_id: int, model_name: str) -> Rollout:
        if rollout_id < 0:
            raise InvalidArgument("must be >= 0", field="id")
        if rollout_id:
            return await self.rollouts.get(rollout_id)
        check_model_name(model_name, "model_name")
        found = await self.rollouts.list(model_name=model_name, active_only=False, offset=0, limit=1)
        if not found:
            raise NotFound(f"model {model_name!r} has no rollout")
        return found[0]

    async def list(
        self, model_name: str, active_only: bool, page_size: int, page_token: str
    ) -> Page[Rollout]:
        if model_name:
            check_model_name(model_name, "model_name")
        limit = min(page_size_or_default(page_size), MAX_ROLLOUT_PAGE)
        offset = int(decode_token(page_token, int) or 0)
        if offset < 0:
            raise InvalidArgument("not a token this service issued", field="page_token")
        found = await self.rollouts.list(
            model_name=model_name, active_only=active_only, offset=offset, limit=limit + 1
        )
        more = len(found) > limit
        return Page(tuple(found[:limit]), encode_token(offset + limit) if more else "")

    # --- start -------------------------------------------------------------------------------------

    async def start(self, spec: RolloutSpec, caller: str) -> Rollout:
        check_model_name(spec.model_name, "spec.model_name")
        check_text(spec.reason, MAX_REASON_BYTES, "spec.reason")
        spec = check_spec(spec)
        model = await self.store.get_model(spec.model_name)  # NotFound
        try:
            version = await self.store.get_version(spec.model_name, spec.to_version)
        except NotFound:
            raise InvalidArgument(
                f"model {spec.model_name!r} has no version {spec.to_version}", field="spec.to_version"
            ) from None
        if version.status is not VersionStatus.READY:
            raise FailedPrecondition(f"version {spec.to_version} is {version.status.value}, not READY")
        champion = model.aliases.get(CHAMPION)
        if champion is None:
            raise FailedPrecondition(
                f"model {spec.model_name!r} has no champion alias: point it at a version first"
            )
        if champion == spec.to_version:
            raise InvalidArgument(
                f"version {spec.to_version} is the champion already: nothing to roll out",
                field="spec.to_version",
            )
        moment = now()

        def build(rollout_id: int) -> Rollout:
            return Rollout(
                id=rollout_id,
                spec=spec,
                from_version=champion,
                state=RolloutState.PENDING,
                step_index=0,
                challenger_percent=0,
                revision=1,
                step_started_at=moment,
                created_at=moment,
                updated_at=moment,
                created_by=caller,
                transitions=(
                    Transition(
                        RolloutState.PENDING,
                        RolloutState.PENDING,
                        0,
                        0,
                        moment,
                        caller,
                        spec.reason or "started",
                        None,
                        1,
                    ),
                ),
            )

        rollout = await self.rollouts.create(build)  # FailedPrecondition: one active per model
        try:
            why = f"rollout {rollout.id}: start {spec.model_name} {champion} -> {spec.to_version}"
            if CHALLENGER in model.aliases:  # no traffic may follow the alias as it moves
                await self._weights(rollout, 0, why)
            await self.store.move_alias(
                spec.model_name, CHALLENGER, spec.to_version, expected=None, moved_by=caller, reason=why
            )
        except Exception:
            failed = self._next(
                rollout, RolloutState.ABORTED, 0, caller, "could not set up the aliases", None
            )
            await self.rollouts.replace(failed, rollout.revision)
            raise
        return rollout

    # --- transitions -------------------------------------------------------------------------------

    def _lock(self, rollout_id: int) -> asyncio.Lock:
        return self._locks.setdefault(rollout_id, asyncio.Lock())

    @staticmethod
    def _next(
        rollout: Rollout,
        state: RolloutState,
        step_index: int,
        caller: str,
        reason: str,
        evidence: Evidence | None,
        *,
        percent: int | None = None,
        restart_window: bool = False,
    ) -> Rollout:
        moment = now()
        share = rollout.challenger_percent if percent is None else percent
        revision = rollout.revision + 1
        transition = Transition(
            rollout.state, state, step_index, share, moment, caller, reason, evidence, revision
        )
        return replace(
            rollout,
            state=state,
            step_index=step_index,
            challenger_percent=share,
            revision=revision,
            updated_at=moment,
            step_started_at=moment if restart_window else rollout.step_started_at,
            transitions=(*rollout.transitions, transition),
        )

    async def _weights(self, rollout: Rollout, percent: int, reason: str) -> None:
        weights = rollout.weights(percent) if percent else {CHAMPION: 100, CHALLENGER: 0}
        await self.store.set_alias_weights(
            rollout.spec.model_name,
            weights,
            expected=None,
            set_by=f"rollout-{rollout.id}",
            reason=reason[:1024],
        )

    async def _champion_unmoved(self, rollout: Rollout) -> None:
        current = await self.store.resolve_alias(rollout.spec.model_name, CHAMPION)
        if current.version != rollout.from_version:
            raise FailedPrecondition(
                f"champion of {rollout.spec.model_name!r} points at version {current.version}, not "
                f"{rollout.from_version} as when rollout {rollout.id} started: someone moved it; abort the rollout"
            )

    async def advance(
        self,
        rollout_id: int,
        expected_revision: int,
        decision: Decision | None,
        reason: str,
        evidence: Evidence | None,
        caller: str,
    ) -> Rollout:
        if decision is None:
            raise InvalidArgument(
                "a decision (STEP, PROMOTE, ROLL_BACK, ABORT) is required", field="decision"
            )
        check_text(reason, MAX_REASON_BYTES, "reason")
        async with self._lock(rollout_id):
            rollout = await self.rollouts.get(rollout_id)
            if rollout.revision != expected_revision:
                raise Aborted(
                    f"rollout {rollout_id} is at revision {rollout.revision}, not {expected_revision}: read it again"
                )
            if not rollout.state.active:
                raise FailedPrecondition(f"rollout {rollout_id} has ended ({rollout.state.value})")
            said = f"rollout {rollout.id}: {reason}" + (f" {evidence.summary()}" if evidence else "")
            name = rollout.spec.model_name
            if decision is Decision.ABORT:
                await self._weights(rollout, 0, said)
                after = self._next(
                    rollout, RolloutState.ABORTED, rollout.step_index, caller, reason, evidence, percent=0
                )
            elif rollout.state is RolloutState.PAUSED:
                raise FailedPrecondition(f"rollout {rollout_id} is paused: resume it first")
            elif decision is Decision.STEP:
                step = 0 if rollout.state is RolloutState.PENDING else rollout.step_index + 1
                if step >= len(rollout.spec.steps):
                    raise FailedPrecondition(
                        f"rollout {rollout_id} is on its last step: PROMOTE or ROLL_BACK"
                    )
                await self._champion_unmoved(rollout)
                percent = rollout.spec.steps[step]
                await self._weights(rollout, percent, f"{said} -> step {step} ({percent}%)")
                after = self._next(
                    rollout,
                    RolloutState.PROGRESSING,
                    step,
                    caller,
                    reason,
                    evidence,
                    percent=percent,
                    restart_window=True,
                )
            elif decision is Decision.PROMOTE:
                if not rollout.on_last_step:
                    raise FailedPrecondition(
                        f"rollout {rollout_id} is not on its last step ({rollout.state.value}, step {rollout.step_index})"
                    )
                await self._champion_unmoved(rollout)
                await self.store.move_alias(
                    name,
                    CHAMPION,
                    rollout.spec.to_version,
                    expected=rollout.from_version,
                    moved_by=f"rollout-{rollout.id}",
                    reason=f"{said} -> promoted",
                )
                await self._weights(rollout, 0, f"{said} -> promoted: champion is {rollout.spec.to_version}")
                after = self._next(
                    rollout, RolloutState.PROMOTED, rollout.step_index, caller, reason, evidence, percent=0
                )
            else:  # ROLL_BACK
                if rollout.state is not RolloutState.PROGRESSING:
                    raise FailedPrecondition(
                        f"rollout {rollout_id} is {rollout.state.value}: nothing to roll back"
                    )
                await self._weights(rollout, 0, f"{said} -> rolled back")
                after = self._next(
                    rollout, RolloutState.ROLLED_BACK, rollout.step_index, caller, reason, evidence, percent=0
                )
            return await self.rollouts.replace(after, rollout.revision)

    async def pause(self, rollout_id: int, reason: str, caller: str) -> Rollout:
        check_text(reason, MAX_REASON_BYTES, "reason")
        async with self._lock(rollout_id):
            rollout = await self.rollouts.get(rollout_id)
            if rollout.state not in (RolloutState.PENDING, RolloutState.PROGRESSING):
                raise FailedPrecondition(
                    f"rollout {rollout_id} is {rollout.state.value}: only an active one pauses"
                )
            after = self._next(
                rollout, RolloutState.PAUSED, rollout.step_index, caller, reason or "paused", None
            )
            return await self.rollouts.replace(after, rollout.revision)

    async def resume(self, rollout_id: int, reason: str, caller: str) -> Rollout:
        check_text(reason, MAX_REASON_BYTES, "reason")
        async with self._lock(rollout_id):
            rollout = await self.rollouts.get(rollout_id)
            if rollout.state is not RolloutState.PAUSED:
                raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state.value}, not paused")
            state = RolloutState.PROGRESSING if rollout.challenger_percent else RolloutState.PENDING
            after = self._next(
                rollout, state, rollout.step_index, caller, reason or "resumed", None, restart_window=True
            )
            return await self.rollouts.replace(after, rollout.revision)

    async def abort(self, rollout_id: int, reason: str, caller: str) -> Rollout:
        check_text(reason, MAX_REASON_BYTES, "reason")
        async with self._lock(rollout_id):
            rollout = await self.rollouts.get(rollout_id)
            if not rollout.state.active:
                raise FailedPrecondition(f"rollout {rollout_id} has ended ({rollout.state.value})")
            why = reason or "aborted"
            await self._weights(rollout, 0, f"rollout {rollout.id}: {why}")
            after = self._next(
                rollout, RolloutState.ABORTED, rollout.step_index, caller, why, None, percent=0
            )
            return await self.rollouts.replace(after, rollout.revision)

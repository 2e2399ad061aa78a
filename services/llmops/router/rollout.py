"""The rollout controller: steps the registry's active rollouts on per-version SLIs.

Each tick it lists the active rollouts (``RolloutService.ListRollouts``) and, for each, decides:

- PAUSED: nothing;
- `champion` no longer points at the rollout's from-version (someone moved it): ABORT, so a
  rollout never moves an alias someone else moved;
- PENDING: STEP to the first step (the registry sets champion 100-w / challenger w);
- PROGRESSING: once the step has lasted ``step_min_seconds`` and the challenger has answered
  ``step_min_requests`` in it, judge both versions' SLIs over the step's window
  (:func:`~llmops.common.rollouts.evaluate`): a breach ROLLS BACK (challenger weight 0, with the
  numbers), else STEP, or PROMOTE on the last step (the registry moves `champion` by
  compare-and-set on from-version).

Every decision goes through ``AdvanceRollout`` with the revision it was made on, and the registry
applies its weights or alias move in the same call: the controller keeps no state of its own, so a
controller killed at any point resumes where the record says (the step's window restarts only when
the record says the step started), and two controllers cannot both apply one decision (the loser
gets ABORTED and re-reads).

Where the SLIs come from (:class:`SliSource`): by default this router's own windows
(:class:`RouterSlis`): it sees every request and the version that answered it as it ends, with no
scrape interval or histogram buckets between the measurement and the decision, and both versions in
the same span. With several router replicas each sees only its share, so in a cluster
``router.rollout_prometheus_url`` judges on Prometheus instead (:class:`PrometheusSlis`: PromQL over
every router's ``llmops_router_ttft_seconds`` / ``llmops_router_inter_token_seconds`` histograms and
``llmops_router_requests_total``), at the cost of the scrape lag and bucket resolution.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from llmops.common.clients import RegistryClient
from llmops.common.errors import Aborted, FailedPrecondition, LLMOpsError
from llmops.common.rollout_client import RolloutClient
from llmops.common.rollouts import CHAMPION, Decision, Evidence, Rollout, RolloutState, Window, evaluate
from llmops.router.slis import ERROR_CODES, VersionSlis

log = logging.getLogger(__name__)


class SliSource(abc.ABC):
    """Per-version SLIs of a model over the last ``seconds``."""

    name: str

    @abc.abstractmethod
    async def windows(
        self, model_name: str, versions: tuple[int, int], seconds: float
    ) -> tuple[Window, Window]:
        """(champion's window, challenger's window) for ``versions`` = (from, to)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class RouterSlis(SliSource):
    """This router's sliding windows (:class:`~llmops.router.slis.VersionSlis`)."""

    name = "router"

    def __init__(self, slis: VersionSlis) -> None:
        self.slis = slis

    async def windows(
        self, model_name: str, versions: tuple[int, int], seconds: float
    ) -> tuple[Window, Window]:
        stats, _ = self.slis.window(model_name, seconds)
        found = {s.version: s for s in stats}

        def window(version: int) -> Window:
            s = found.get(version)
            if s is None:
                return Window(version)
            return Window(
                version,
                requests=s.requests,
                errors=s.errors,
                ttft_p95_seconds=s.ttft_p95_seconds,
                inter_token_p95_seconds=s.inter_token_p95_seconds,
                ttft_samples=s.ttft_samples,
                inter_token_samples=s.inter_token_samples,
                ttft_values=s.ttft_values,
                inter_token_values=s.inter_token_values,
            )

        return window(versions[0]), window(versions[1])


class PrometheusSlis(SliSource):
    """PromQL over the routers' histograms and request counters (every router replica summed)."""

    name = "prometheus"

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(timeout=timeout)

    async def _scalar(self, query: str) -> float:
        response = await self._http.get(f"{self.url}/api/v1/query", params={"query": query})
        response.raise_for_status()
        result = response.json()["data"]["result"]
        if not result:
            return 0.0
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else 0.0

    async def _window(self, model_name: str, version: int, seconds: int) -> Window:
        sel = f'model="{model_name}",version="{version}"'
        requests_sel = f'version="{model_name}:{version}"'
        codes = "|".join(sorted(ERROR_CODES))
        queries = (
            f"sum(increase(llmops_router_requests_total{{{requests_sel}}}[{seconds}s]))",
            f'sum(increase(llmops_router_requests_total{{{requests_sel},code=~"{codes}"}}[{seconds}s]))',
            f"histogram_quantile(0.95, sum by (le) (increase(llmops_router_ttft_seconds_bucket{{{sel}}}[{seconds}s])))",
            f"histogram_quantile(0.95, sum by (le) "
            f"(increase(llmops_router_inter_token_seconds_bucket{{{sel}}}[{seconds}s])))",
            f"sum(increase(llmops_router_ttft_seconds_count{{{sel}}}[{seconds}s]))",
            f"sum(increase(llmops_router_inter_token_seconds_count{{{sel}}}[{seconds}s]))",
        )
        requests, errors, ttft, itl, ttft_n, itl_n = await asyncio.gather(*(self._scalar(q) for q in queries))
        return Window(
            version,
            requests=round(requests),
            errors=round(errors),
            ttft_p95_seconds=ttft,
            inter_token_p95_seconds=itl,
            ttft_samples=round(ttft_n),
            inter_token_samples=round(itl_n),
        )

    async def windows(
        self, model_name: str, versions: tuple[int, int], seconds: float
    ) -> tuple[Window, Window]:
        span = max(1, math.ceil(seconds))
        champion, challenger = await asyncio.gather(
            self._window(model_name, versions[0], span), self._window(model_name, versions[1], span)
        )
        return champion, challenger

    async def close(self) -> None:
        await self._http.aclose()


class RolloutController:
    """Moves active rollouts one decision at a time (see the module docstring)."""

    def __init__(
        self,
        rollouts: RolloutClient,
        registry: RegistryClient,
        source: SliSource,
        *,
        poll_seconds: float = 1.0,
        identity: str = "rollout-controller",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.rollouts = rollouts
        self.registry = registry
        self.source = source
        self.poll_seconds = poll_seconds
        self.identity = identity
        self.clock = clock  # wall time; steps are timed against the registry's step_started_at
        self._task: asyncio.Task[None] | None = None
        self.owned: list[RolloutClient] = []  # clients closed with the controller

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="rollout-controller")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.source.close()
        for client in self.owned:
            await client.close()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except LLMOpsError as exc:  # registry away: try again next tick
                log.warning("rollout controller: %s", exc.message)
            except Exception:  # never let one bad tick end the loop
                log.exception("rollout controller tick failed")
            await asyncio.sleep(self.poll_seconds)

    async def tick(self) -> list[Rollout]:
        """One look at every active rollout; returns those it changed."""
        changed = []
        for rollout in await self.rollouts.list(active_only=True):
            try:
                after = await self.decide(rollout)
            except Aborted:
                continue  # someone changed it meanwhile: the next tick reads it again
            except LLMOpsError as exc:
                log.warning("rollout %d: %s", rollout.id, exc.message)
                continue
            if after is not None:
                changed.append(after)
        return changed

    async def _advance(
        self, rollout: Rollout, decision: Decision, reason: str, evidence: Evidence | None = None
    ) -> Rollout:
        log.info("rollout %d (%s): %s: %s", rollout.id, rollout.spec.model_name, decision.value, reason)
        return await self.rollouts.advance(
            rollout.id,
            expected_revision=rollout.revision,
            decision=decision,
            reason=reason,
            evidence=evidence,
        )

    async def decide(self, rollout: Rollout) -> Rollout | None:
        """Apply the decision ``rollout`` calls for now, if any; None while its step runs."""
        if rollout.state is RolloutState.PAUSED:
            return None
        split = await self.registry.get_alias_weights(rollout.spec.model_name)
        champion = split.versions.get(CHAMPION)
        if champion != rollout.from_version:
            return await self._advance(
                rollout,
                Decision.ABORT,
                f"champion was moved to version {champion} by someone else (the rollout started from "
                f"{rollout.from_version}): aborted, no alias moved",
            )
        if rollout.state is RolloutState.PENDING:
            return await self._guarded(rollout, Decision.STEP, "first step", None)
        elapsed = (self.clock() - rollout.step_started_at).total_seconds()
        if elapsed < rollout.spec.step_min_seconds:
            return None
        versions = (rollout.from_version, rollout.spec.to_version)
        champ, chall = await self.source.windows(rollout.spec.model_name, versions, elapsed)
        if chall.requests < rollout.spec.step_min_requests:
            return None
        # At 100% the champion has no traffic in the window: its ratio bounds are not judged then
        # (a window from another time would compare the machine's load, not the versions).
        evidence = Evidence(self.source.name, elapsed, champ, chall, evaluate(rollout.slos, champ, chall))
        step = f"step {rollout.step_index} ({rollout.challenger_percent}%)"
        if not evidence.met:
            breaches = "; ".join(c.detail for c in evidence.checks if not c.met)
            return await self._advance(
                rollout, Decision.ROLL_BACK, f"{step}: SLO breached: {breaches}", evidence
            )
        if rollout.on_last_step:
            return await self._guarded(rollout, Decision.PROMOTE, f"{step}: every SLO met", evidence)
        return await self._guarded(rollout, Decision.STEP, f"{step}: every SLO met", evidence)

    async def _guarded(
        self, rollout: Rollout, decision: Decision, reason: str, evidence: Evidence | None
    ) -> Rollout:
        """STEP or PROMOTE; when the registry says the champion moved meanwhile, ABORT instead."""
        try:
            return await self._advance(rollout, decision, reason, evidence)
        except FailedPrecondition as exc:
            if "someone moved it" not in exc.message:
                raise
            fresh = await self.rollouts.get(rollout.id)
            return await self._advance(fresh, Decision.ABORT, f"{exc.message}: aborted, no alias moved")


def build_controller(settings: Any, registry: RegistryClient, slis: VersionSlis) -> RolloutController:
    """The controller ``settings.router`` asks for, on ``registry`` (rollouts live at the same address)."""
    s = settings.router
    source: SliSource = (
        PrometheusSlis(s.rollout_prometheus_url) if s.rollout_prometheus_url else RouterSlis(slis)
    )
    rollouts = RolloutClient.connect(settings.registry.address, timeout=10)
    controller = RolloutController(rollouts, registry, source, poll_seconds=s.rollout_poll_seconds)
    controller.owned.append(rollouts)
    return controller

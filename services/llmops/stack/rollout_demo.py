"""The demo's two rollouts: one that promotes, one that rolls back, each step's evidence printed.

Each case starts a rollout (the registry's RolloutService, :class:`~llmops.common.rollout_client.
RolloutClient`) from the champion to a version, with short steps (a few seconds and a few requests
each), and sends requests through the router while the rollout controller judges each step's window
on both versions' SLIs; every transition is printed with its evidence (TTFT p95, inter-token p95 and
error ratio of champion and challenger against the bounds), then the final state.

* promote: the challenger is served by a healthy replica: every step meets the SLOs and
  ``champion`` moves to it;
* roll back: the challenger is served by a replica with ``serving.faults`` on (added TTFT and
  errors, :mod:`llmops.serving.faults`): the first step's window breaches and the weight goes back
  to 0, ``champion`` untouched.

:func:`follow` drives one case against anything with ``start``/``get`` (the real client, or a fake
in unit tests); the traffic is a callable, so the demo decides how requests reach the router.

Not yet wired into :mod:`llmops.stack.demo`: the case needs the rollout controller running in the
stack and a serving replica started with faults (a stack option), which land separately.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmops.common.rollouts import (
    SLIS,
    Evidence,
    Rollout,
    RolloutSpec,
    RolloutState,
    SloBound,
    Slos,
    Transition,
)

Say = Callable[[str], None]
#: Sends requests through the router for about the given seconds; returns how many it sent.
Traffic = Callable[[float], Awaitable[int]]
#: The demo's steps: short, so both cases fit in about a minute and a half.
DEMO_STEPS = (25, 50, 100)
DEMO_STEP_SECONDS = 3.0
DEMO_STEP_REQUESTS = 5
#: What the demo's rollouts must meet: TTFT and inter-token p95 at most 3x the champion's over the
#: same window, errors at most 5%. Ratios only for latency: on a shared CPU a serial replica's
#: queue sets absolute latencies (at 100% the challenger has all of it), and p95 over a few
#: seconds is noisy; the worse replica misses the TTFT ratio and the error bound by far.
DEMO_SLOS = Slos(SloBound(0.0, 3.0), SloBound(0.0, 3.0), SloBound(0.05, 0.0))
_LABELS = {"ttft_p95_seconds": "TTFT p95", "inter_token_p95_seconds": "ITL p95", "error_ratio": "error ratio"}


class Rollouts(Protocol):
    """What :func:`follow` needs of the rollout API (:class:`RolloutClient` has it)."""

    async def start(self, spec: RolloutSpec, *, timeout: float | None = None) -> Rollout: ...

    async def get(
        self, rollout_id: int = 0, *, model_name: str = "", timeout: float | None = None
    ) -> Rollout: ...

    async def abort(self, rollout_id: int, *, reason: str = "", timeout: float | None = None) -> Rollout: ...


@dataclass(frozen=True)
class RolloutCase:
    """One demo rollout: what it rolls out and the end it should reach."""

    label: str
    model: str
    to_version: int
    expect: RolloutState


def demo_spec(case: RolloutCase) -> RolloutSpec:
    return RolloutSpec(
        model_name=case.model,
        to_version=case.to_version,
        steps=DEMO_STEPS,
        step_min_seconds=DEMO_STEP_SECONDS,
        step_min_requests=DEMO_STEP_REQUESTS,
        slos=DEMO_SLOS,
        reason=f"demo: {case.label}",
    )


def _shown(sli: str, value: float) -> str:
    return f"{value:.1%}" if sli == "error_ratio" else f"{value * 1000:.0f} ms"


def _bound(sli: str, bound: SloBound) -> str:
    parts = []
    if bound.max_value > 0:
        parts.append(f"<= {_shown(sli, bound.max_value)}")
    if bound.max_ratio > 0:
        parts.append(f"<= {bound.max_ratio:g}x champion")
    return " and ".join(parts) or "unchecked"


def evidence_table(evidence: Evidence, slos: Slos) -> str:
    """A step's evidence: each SLI of champion and challenger, its bound, met or BREACH."""
    champion, challenger = evidence.champion, evidence.challenger
    lines = [
        f"    {'SLI':<12} {'champion v' + str(champion.version):>14} {'challenger v' + str(challenger.version):>16}"
        f"  {'bound':<28} verdict",
        f"    {'requests':<12} {champion.requests:>14} {challenger.requests:>16}",
    ]
    checks = {check.sli: check for check in evidence.checks}
    for sli in SLIS:
        check = checks.get(sli)
        met = "" if check is None else ("met" if check.met else "BREACH " + check.detail)
        lines.append(
            f"    {_LABELS[sli]:<12} {_shown(sli, champion.value(sli)):>14} {_shown(sli, challenger.value(sli)):>16}"
            f"  {_bound(sli, slos.bound(sli)):<28} {met}".rstrip()
        )
    return "\n".join(lines)


def transition_text(transition: Transition, slos: Slos) -> str:
    """One transition: the state move, the challenger's weight after, why, and its evidence."""
    moved = transition.from_state.value
    if transition.to_state is not transition.from_state or transition.evidence is not None:
        moved += f" -> {transition.to_state.value}"
    head = f"  {moved} (challenger {transition.challenger_percent}%): {transition.reason}"
    if transition.evidence is None:
        return head
    window = f"    window {transition.evidence.window_seconds:.1f} s from {transition.evidence.source}"
    return "\n".join([head, window, evidence_table(transition.evidence, slos)])


def record(rollout: Rollout) -> dict[str, Any]:
    """The rollout as the demo returns it (for the e2e test and the closing summary)."""
    return {
        "id": rollout.id,
        "model": rollout.spec.model_name,
        "from_version": rollout.from_version,
        "to_version": rollout.spec.to_version,
        "state": rollout.state.value,
        "challenger_percent": rollout.challenger_percent,
        "transitions": [
            {
                "to_state": t.to_state.value,
                "percent": t.challenger_percent,
                "reason": t.reason,
                "evidence": None
                if t.evidence is None
                else {
                    "champion": {sli: t.evidence.champion.value(sli) for sli in SLIS}
                    | {"requests": t.evidence.champion.requests},
                    "challenger": {sli: t.evidence.challenger.value(sli) for sli in SLIS}
                    | {
                        "requests": t.evidence.challenger.requests,
                        "ttft_samples": t.evidence.challenger.ttft_samples,
                    },
                    "checks": {c.sli: c.met for c in t.evidence.checks},
                },
            }
            for t in rollout.transitions
        ],
    }


async def follow(
    rollouts: Rollouts,
    case: RolloutCase,
    traffic: Traffic,
    say: Say,
    *,
    timeout: float = 60.0,
    burst_seconds: float = 1.0,
) -> dict[str, Any]:
    """Start ``case``'s rollout, send traffic while it is active, print each transition as it
    happens; aborted (and said so) if it is still active after ``timeout`` seconds."""
    spec = demo_spec(case)
    rollout = await rollouts.start(spec)
    slos = rollout.slos
    steps = ", ".join(f"{step}%" for step in rollout.spec.steps)
    say(
        f"rollout {rollout.id} ({case.label}): {case.model}:{rollout.from_version} -> "
        f"{case.model}:{case.to_version}, steps {steps}, each >= {rollout.spec.step_min_seconds:g} s "
        f"and {rollout.spec.step_min_requests} challenger requests"
    )
    shown, sent = 0, 0
    deadline = time.monotonic() + timeout
    while True:
        for transition in rollout.transitions[shown:]:
            say(transition_text(transition, slos))
        shown = len(rollout.transitions)
        if not rollout.state.active:
            break
        if time.monotonic() > deadline:
            rollout = await rollouts.abort(
                rollout.id, reason=f"demo: still {rollout.state.value} after {timeout:.0f} s"
            )
            say(f"  aborted: still active after {timeout:.0f} s (is the rollout controller running?)")
            break
        sent += await traffic(burst_seconds)
        rollout = await rollouts.get(rollout.id)
    where = (
        f"champion is now {case.model}:{case.to_version}"
        if rollout.state is RolloutState.PROMOTED
        else f"challenger weight {rollout.challenger_percent}%, champion {case.model}:{rollout.from_version}"
    )
    say(
        f"rollout {rollout.id} ended {rollout.state.value.upper()} after {sent} requests: {where} "
        f"(expected {case.expect.value})"
    )
    return record(rollout) | {"label": case.label, "expected": case.expect.value, "requests": sent}


def router_traffic(router: str, model: str, *, concurrency: int = 1, max_tokens: int = 4) -> Traffic:
    """Requests with distinct session ids through the router at ``router`` (each session is drawn
    once over the alias weights), for about the given seconds; failures count as sent.

    One user by default: the demo's replicas decode one request at a time (transformers), so
    concurrent users would queue, and a version's latency would measure its share of the traffic
    (at 100% the challenger's queue against the champion's stragglers) instead of the version."""
    import grpc

    from llmops.proto.common.v1 import generation_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb
    from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc

    counter = iter(range(1 << 62))
    request = pb.GenerateStreamRequest(
        model=pb.ModelSelector(served_name=model),
        prompt=generation_pb2.Prompt(text="### Instruction:\nSay hello.\n\n### Response:\n"),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, greedy=True, ignore_eos=True),
        cache=pb.CacheControl(bypass=True, no_store=True),  # every request reaches a replica
    )

    async def send(seconds: float) -> int:
        end = time.monotonic() + seconds
        sent = 0
        async with grpc.aio.insecure_channel(router) as channel:
            stub = pb_grpc.ServingServiceStub(channel)

            async def user() -> None:
                nonlocal sent
                while time.monotonic() < end:
                    session = (("x-llmops-session-id", f"rollout-{next(counter)}"),)
                    try:
                        async for _ in stub.GenerateStream(request, timeout=30, metadata=session):
                            pass
                    except grpc.aio.AioRpcError:
                        pass  # the router counts it against its version: that is the evidence
                    sent += 1

            await asyncio.gather(*(user() for _ in range(concurrency)))
        return sent

    return send


#: The demo's rollouts run on a model of their own (the tiny Llama, three registry versions of the
#: same weights), so they never move the pipeline's champion.
ROLLOUT_MODEL = "rollout-demo"
#: The worse replica: a second of added TTFT and 30% of generations failed (INTERNAL).
FAULTY_REPLICA_ENV = {
    "LLMOPS_SERVING_FAULTS__TTFT_DELAY_MS": "1000",
    "LLMOPS_SERVING_FAULTS__ERROR_RATIO": "0.3",
    "LLMOPS_SERVING_FAULTS__SEED": "7",
}


async def _versions(registry: Any, source: Any, say: Say) -> tuple[int, int, int]:
    """The demo model's champion (imported with alias ``champion`` the first time) and two new
    versions of the same weights: the healthy challenger and the one the worse replica serves."""
    from llmops.common.errors import NotFound
    from llmops.registry.importer import import_model

    try:
        champion = (await registry.get_alias_weights(ROLLOUT_MODEL)).versions.get("champion")
    except NotFound:
        champion = None
    if champion is None:
        first = await import_model(registry, source, ROLLOUT_MODEL, aliases=("champion",),
                                   description="the rollout demo's champion (tiny Llama)")  # fmt: skip
        champion = int(first.version)
    good = await import_model(registry, source, ROLLOUT_MODEL, description="rollout demo: healthy challenger")
    bad = await import_model(registry, source, ROLLOUT_MODEL, description="rollout demo: served with faults")
    say(
        f"{ROLLOUT_MODEL}: champion v{champion}, healthy challenger v{good.version}, worse one v{bad.version}"
    )
    return int(champion), int(good.version), int(bad.version)


async def show_rollouts(
    state: Any,
    load: Callable[..., Awaitable[Any]],
    say: Say,
    *,
    healthy: tuple[str, str] = ("serving", "serving-2"),
    faulty: str = "serving-3",
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """The two cases on a running stack whose ``faulty`` replica runs with :data:`FAULTY_REPLICA_ENV`:
    the champion on ``healthy[0]``, a healthy challenger on ``healthy[1]`` (promotes), then a
    challenger on ``faulty`` (rolls back). Returns each case's :func:`record`."""
    from llmops.common.clients import RegistryClient, ServingClient
    from llmops.common.rollout_client import RolloutClient
    from llmops.common.tiny_model import build_tiny_model
    from llmops.proto.common.v1 import model_pb2
    from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
    from llmops.proto.serving.v1 import serving_service_pb2 as pb
    from llmops.stack.split_demo import _part_address, _wait_routable

    source = await asyncio.to_thread(lambda: build_tiny_model().path)
    registry_address = _part_address(state, "registry")
    async with RegistryClient.connect(registry_address, timeout=120) as registry:
        champion, good, bad = await _versions(registry, source, say)
    placement = {healthy[0]: champion, healthy[1]: good, faulty: bad}
    for part, version in placement.items():
        say(f"{part} loads {ROLLOUT_MODEL}:{version}" + (" (fault injection on)" if part == faulty else ""))
        async with ServingClient.connect(_part_address(state, part), timeout=600) as client:
            await load(
                client,
                pb.LoadModelRequest(
                    model_ref=model_pb2.ModelRef(name=ROLLOUT_MODEL, version=version),
                    served_name=ROLLOUT_MODEL,
                    engine=pb.ENGINE_TRANSFORMERS,
                    replace=True,
                ),
            )
    router = _part_address(state, "router")
    import grpc

    async with grpc.aio.insecure_channel(router) as channel:
        await _wait_routable(rpb_grpc.RouterServiceStub(channel), ROLLOUT_MODEL, set(placement.values()))
    traffic = router_traffic(router, ROLLOUT_MODEL)
    cases = [
        RolloutCase("healthy challenger", ROLLOUT_MODEL, good, RolloutState.PROMOTED),
        RolloutCase(
            f"challenger on {faulty}, fault injection on", ROLLOUT_MODEL, bad, RolloutState.ROLLED_BACK
        ),
    ]
    results = []
    async with RolloutClient.connect(registry_address, timeout=30) as rollouts:
        for case in cases:
            results.append(await follow(rollouts, case, traffic, say, timeout=timeout))
    async with RegistryClient.connect(registry_address, timeout=30) as registry:
        final = (await registry.get_alias_weights(ROLLOUT_MODEL)).versions.get("champion")
    say(f"final state: {ROLLOUT_MODEL}@champion is v{final}; " + "; ".join(
        f"rollout {r['id']} {r['state']}" for r in results))  # fmt: skip
    return results

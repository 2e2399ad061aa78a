"""The demo's traffic split: two serving replicas behind the router, the registry's alias weights.

The first replica (part ``serving``) serves ``<model>@champion`` (the demo loaded it); this step
loads ``<model>@challenger`` on the second (``serving-2``) under the same served name, sets the
registry's alias weights (champion 90, challenger 10 by default), and sends requests through the
router, each with its own session id (``x-llmops-session-id``: the router's draw is sticky per
session, a stable hash laid over the weights' cumulative shares). The counts come from both sides:
per version from the answers (``GenerateResponse.model``), per replica from the router's admin API
(``RouterService.ListEndpoints``: requests sent to each replica, before and after).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from llmops.stack.stack import StackState

Say = Callable[[str], None]
Load = Callable[..., Awaitable[Any]]
SESSION_HEADER = "x-llmops-session-id"
#: Requests in flight at once through the router.
CONCURRENCY = 8


def _part_address(state: StackState, name: str) -> str:
    part = state.part(name)
    if part is None or not part.address:
        raise RuntimeError(f"the stack has no {name}")
    return part.address


async def _wait_routable(stub: Any, model: str, versions: set[int], timeout: float = 120.0) -> None:
    """Until the router sees every version in ``versions`` READY on some replica as ``model``."""
    from llmops.proto.router.v1 import router_service_pb2 as rpb

    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while time.monotonic() < deadline:
        listed = await stub.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
        seen = {
            m.model.version
            for e in listed.endpoints
            if e.state == rpb.ENDPOINT_STATE_READY
            for m in e.models
            if m.served_name == model and m.ready
        }
        if versions <= seen:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the router saw versions {sorted(seen)} of {model}, not {sorted(versions)}")


async def _sent(stub: Any) -> dict[str, int]:
    from llmops.proto.router.v1 import router_service_pb2 as rpb

    listed = await stub.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
    return {e.address: int(e.requests) for e in listed.endpoints}


def table(result: dict[str, Any]) -> str:
    """The split as text: per alias (its version, weight, share asked, requests answered, share
    seen) and per replica (requests the router sent it)."""
    total = result["requests"]
    weights, versions, answered = result["weights"], result["versions"], result["per_version"]
    weight_sum = sum(weights.values())
    lines = [f"{'alias':<11} {'version':<14} {'weight':>6} {'asked':>6} {'answered':>8} {'seen':>6}"]
    for alias, weight in weights.items():
        version = versions[alias]
        got = answered.get(version, 0)
        lines.append(
            f"{alias:<11} {version:<14} {weight:>6} {weight / weight_sum:>6.1%} {got:>8} {got / total:>6.1%}"
        )
    lines.append(f"{'replica':<11} {'address':<22} {'requests':>8}")
    for name, (address, count) in result["per_replica"].items():
        lines.append(f"{name:<11} {address:<22} {count:>8}")
    return "\n".join(lines)


async def show_split(
    state: StackState,
    model: str,
    weights: tuple[int, int],
    requests: int,
    load: Load,
    say: Say,
    previous: int = 0,
) -> dict[str, Any]:
    """Load the challenger on the second replica, set the weights, send ``requests`` through the
    router. When the champion is the challenger (the promotion just moved it there), alias
    ``previous`` goes to version ``previous`` (the champion before) and takes the challenger's
    place. Returns the counts (``weights``, ``versions``, ``per_version``, ``per_replica``,
    ``requests``) and prints them as a table."""
    import grpc

    from llmops.common.clients import RegistryClient, ServingClient
    from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb
    from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
    from llmops.proto.serving.v1 import serving_service_pb2 as pb
    from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc

    replicas = {name: _part_address(state, name) for name in ("serving", "serving-2")}
    async with RegistryClient.connect(_part_address(state, "registry"), timeout=60) as registry:
        aliases = (await registry.get_alias_weights(model)).versions
        other = "challenger"
        champion, challenger = aliases.get("champion"), aliases.get(other)
        if champion is not None and challenger == champion and previous and previous != champion:
            # the promotion moved the champion onto the challenger: the previous champion is the other arm
            other, challenger = "previous", previous
            await registry.unary(
                registry.stub.SetAlias,
                rpb.SetAliasRequest(
                    model_name=model, alias=other, version=previous, reason="demo: the champion before"
                ),
            )
        if champion is None or challenger is None or champion == challenger:
            say(f"no split to show: champion {champion} and challenger {challenger} of {model}")
            return {}
        say(f"serving-2 loads {model}@{other} ({model}:{challenger}) on the transformers engine")
        async with ServingClient.connect(replicas["serving-2"], timeout=600) as client:
            await load(
                client,
                pb.LoadModelRequest(
                    model_ref=model_pb2.ModelRef(name=model, alias=other),
                    served_name=model,
                    engine=pb.ENGINE_TRANSFORMERS,
                    follow_alias=True,
                    replace=True,
                ),
            )
        chosen = {"champion": weights[0], other: weights[1]}
        say(f"alias weights of {model}: {chosen}")
        await registry.set_alias_weights(model, chosen, reason="demo: the traffic split")
    versions = {"champion": f"{model}:{champion}", other: f"{model}:{challenger}"}

    router = _part_address(state, "router")
    say(f"{requests} requests, each with its own session id, through the router at {router}")
    async with grpc.aio.insecure_channel(router) as channel:
        admin = rpb_grpc.RouterServiceStub(channel)
        serving = pb_grpc.ServingServiceStub(channel)
        await _wait_routable(admin, model, {champion, challenger})
        before = await _sent(admin)
        gate = asyncio.Semaphore(CONCURRENCY)
        request = pb.GenerateRequest(
            model=pb.ModelSelector(served_name=model),
            prompt=generation_pb2.Prompt(text="### Instruction:\nSay hello.\n\n### Response:\n"),
            sampling=sampling_pb2.SamplingParams(max_tokens=2, greedy=True),
            cache=pb.CacheControl(bypass=True),  # every request reaches a replica
        )

        async def one(index: int) -> str:
            async with gate:
                answer = await serving.Generate(
                    request, timeout=120, metadata=((SESSION_HEADER, f"demo-user-{index:04d}"),)
                )
            return f"{answer.model.name}:{answer.model.version}"

        answered = Counter(await asyncio.gather(*(one(i) for i in range(requests))))
        after = await _sent(admin)
    result: dict[str, Any] = {
        "requests": requests,
        "weights": chosen,
        "versions": versions,
        "per_version": dict(answered),
        "per_replica": {
            name: (address, after.get(address, 0) - before.get(address, 0))
            for name, address in replicas.items()
        },
    }
    result["table"] = table(result)
    say("traffic split through the router:\n" + result["table"])
    return result

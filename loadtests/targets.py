"""What a load test runs against: addresses, the served model, and checks made before any user starts.

:func:`check_target` asks each given service one cheap question with a short deadline, so a wrong
or dead address ends the run at once with a message naming it (instead of a run of failures, or a
hang), and picks the model to load-test: the one named, which must be READY, or else the first READY
model serving lists. :func:`stack_addresses` reads what ``llmops up`` recorded in
``<data_dir>/stack.json`` (the same file ``llmops status`` reads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loadtests.rpc import API_KEY_METADATA, RpcFailure, open_channel

#: Process exit code of a run that could not start: an address that does not answer, no model.
EXIT_TARGET = 2


class TargetError(RuntimeError):
    """The target cannot be load-tested; the message says what to fix."""


@dataclass(frozen=True)
class Target:
    """Where the users send their calls; ``registry``/``training`` empty means not called."""

    serving: str
    model: str
    registry: str = ""
    training: str = ""
    api_key: str = ""
    #: The served model's registry name and alias (from serving's ListModels), when it has them:
    #: the control-plane mix resolves that alias when the registry lists none.
    model_ref: tuple[str, str] | None = None
    loaded: tuple[str, ...] = field(default_factory=tuple)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((API_KEY_METADATA, self.api_key),) if self.api_key else ()


def _ask(what: str, address: str, call: Callable[[grpc.Channel], Any], timeout: float) -> Any:
    with open_channel(address) as channel:
        try:
            return call(channel)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            hint = ""
            if code is grpc.StatusCode.UNAVAILABLE:
                hint = " (is it running, is the address right?)"
            elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
                hint = f" (no answer within {timeout:g} s: is the address right?)"
            raise TargetError(f"{what} at {address} failed: {RpcFailure(exc)}{hint}") from None


def check_target(
    serving: str,
    *,
    model: str = "",
    registry: str = "",
    training: str = "",
    api_key: str = "",
    timeout: float = 5.0,
) -> Target:
    """Ask every given service once (``timeout`` each) and pick the model; :class:`TargetError` if not."""
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb
    from llmops.proto.registry.v1 import registry_service_pb2_grpc as rgrpc
    from llmops.proto.serving.v1 import serving_service_pb2 as spb
    from llmops.proto.serving.v1 import serving_service_pb2_grpc as sgrpc
    from llmops.proto.training.v1 import training_service_pb2 as tpb
    from llmops.proto.training.v1 import training_service_pb2_grpc as tgrpc

    if not serving:
        raise TargetError(
            "no serving address: pass --serving HOST:PORT (`make loadtest` finds the local stack's)"
        )
    metadata = ((API_KEY_METADATA, api_key),) if api_key else ()
    listed = _ask(
        "serving ListModels",
        serving,
        lambda ch: sgrpc.ServingServiceStub(ch).ListModels(
            spb.ListModelsRequest(), timeout=timeout, metadata=metadata
        ),
        timeout,
    )
    ready = {m.served_name: m for m in listed.models if m.state == spb.LOADED_MODEL_STATE_READY}
    states = {
        m.served_name: spb.LoadedModelState.Name(m.state).removeprefix("LOADED_MODEL_STATE_")
        for m in listed.models
    }
    described = ", ".join(f"{n} ({s})" for n, s in states.items()) or "none"
    if model and model not in ready:
        if model in states:
            raise TargetError(f"model {model!r} on serving at {serving} is {states[model]}, not READY")
        raise TargetError(f"serving at {serving} has no model {model!r}; loaded: {described}")
    if not model:
        if not ready:
            raise TargetError(
                f"serving at {serving} has no READY model (loaded: {described}); "
                "load one (`llmops demo`, LoadModel) or wait for it, or pass --model"
            )
        model = sorted(ready)[0]
    chosen = ready[model]
    model_ref = None
    if chosen.HasField("model") and chosen.model.name and chosen.model.alias:
        model_ref = (chosen.model.name, chosen.model.alias)
    if registry:
        _ask(
            "registry ListModels",
            registry,
            lambda ch: rgrpc.RegistryServiceStub(ch).ListModels(
                rpb.ListModelsRequest(page_size=1), timeout=timeout, metadata=metadata
            ),
            timeout,
        )
    if training:
        _ask(
            "training ListJobs",
            training,
            lambda ch: tgrpc.TrainingServiceStub(ch).ListJobs(
                tpb.ListJobsRequest(page_size=1), timeout=timeout, metadata=metadata
            ),
            timeout,
        )
    return Target(serving, model, registry, training, api_key, model_ref, tuple(sorted(ready)))


def stack_addresses(data_dir: Path) -> Mapping[str, str]:
    """``serving``/``registry``/``training``/``cache`` gRPC addresses and ``prometheus`` URL of the
    local stack recorded in ``data_dir`` and still running; empty when none runs there."""
    from llmops.stack.stack import running_state

    state = running_state(data_dir.expanduser().absolute())
    if state is None:
        return {}
    found = {}
    for part in state.parts:
        value = part.address if part.name != "prometheus" else part.url
        if value:
            found[part.name] = value
    return found

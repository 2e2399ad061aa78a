"""The scaler's decisions from router signals, without processes: a replica with no request, none
in flight and none pending for its models for the idle time is stopped; a stopped replica with
requests pending for one of its models (``name``, ``name@alias`` or ``name:version``) is started,
and one pending for another model leaves it stopped; traffic or in-flight work keeps it running."""

from __future__ import annotations

from llmops.common import metric_names as names
from llmops.stack.scaler import ReplicaLaunch, ReplicaState, RouterSignals, Scaler, model_name, parse_signals

ADDRESS = "127.0.0.1:5000"
PAGE = f"""# TYPE {names.ROUTER_PENDING_REQUESTS} gauge
{names.ROUTER_PENDING_REQUESTS}{{model="tiny@champion"}} 2.0
{names.ROUTER_PENDING_REQUESTS}{{model="other"}} 0.0
# TYPE {names.ROUTER_REQUESTS_TOTAL.removesuffix("_total")} counter
{names.ROUTER_REQUESTS_TOTAL}{{model="tiny",version="tiny:1",code="OK"}} 5.0
{names.ROUTER_REQUESTS_TOTAL}{{model="tiny",version="",code="DEADLINE_EXCEEDED"}} 1.0
# TYPE {names.ROUTER_ENDPOINT_IN_FLIGHT} gauge
{names.ROUTER_ENDPOINT_IN_FLIGHT}{{endpoint="{ADDRESS}"}} 1.0
# TYPE {names.ROUTER_ENDPOINT_LOAD} gauge
{names.ROUTER_ENDPOINT_LOAD}{{endpoint="{ADDRESS}",model="tiny"}} 0.0
"""


class Recorder:
    def __init__(self) -> None:
        self.actions: list[str] = []

    def start(self, launch: ReplicaLaunch) -> int:
        self.actions.append(f"start {launch.name}")
        return 4242

    def stop(self, pid: int) -> None:
        self.actions.append(f"stop {pid}")


def scaler(pid: int | None, models: set[str] | None = None) -> tuple[Scaler, ReplicaState, Recorder]:
    replica = ReplicaState(ReplicaLaunch("serving", ADDRESS, ["serve"], {}, "serving.log"), pid)
    replica.models = models or set()
    recorder = Recorder()
    return Scaler([replica], 10.0, recorder.start, recorder.stop, say=lambda _: None), replica, recorder


def test_router_metrics_page_becomes_signals() -> None:
    signals = parse_signals(PAGE)
    assert signals.pending == {"tiny@champion": 2.0, "other": 0.0}
    assert signals.requests == {"tiny": 6.0}
    assert signals.in_flight == {ADDRESS: 1.0}
    assert signals.served == {ADDRESS: {"tiny"}}
    assert [model_name(m) for m in ("tiny", "tiny@champion", "tiny:3")] == ["tiny"] * 3


def test_idle_replica_is_stopped_and_traffic_keeps_it() -> None:
    s, replica, recorder = scaler(pid=77, models={"tiny"})
    quiet = RouterSignals(requests={"tiny": 3.0})
    assert s.step(quiet, now=100.0) == []
    assert s.step(RouterSignals(requests={"tiny": 4.0}), now=108.0) == []  # a request: active again
    assert s.step(RouterSignals(requests={"tiny": 4.0}, in_flight={ADDRESS: 1}), now=117.0) == []
    assert s.step(RouterSignals(requests={"tiny": 4.0}), now=126.0) == []  # 9 s since in flight
    assert s.step(RouterSignals(requests={"tiny": 4.0, "other": 9.0}), now=127.5) == [("stop", "serving")]
    assert recorder.actions == ["stop 77"] and replica.pid is None


def test_pending_requests_for_its_model_start_a_stopped_replica() -> None:
    s, replica, recorder = scaler(pid=None, models={"tiny"})
    assert s.step(RouterSignals(pending={"other": 3.0}), now=1.0) == []
    assert s.step(RouterSignals(pending={"tiny@champion": 1.0}), now=2.0) == [("start", "serving")]
    assert replica.pid == 4242 and recorder.actions == ["start serving"]
    # idle counts from the start: not stopped before its first request could come
    assert s.step(RouterSignals(requests={"tiny": 1.0}), now=5.0) == []


def test_a_replica_whose_models_are_unknown_wakes_for_any_pending_request() -> None:
    s, _, _ = scaler(pid=None)
    assert s.step(RouterSignals(pending={"whatever:2": 1.0}), now=1.0) == [("start", "serving")]

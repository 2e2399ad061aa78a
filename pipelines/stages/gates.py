"""The promote stage's gates after evaluation: a Locust load gate on the challenger alone, and how
each gate's verdict is recorded.

Load gate: the chosen variant is loaded into serving under a served name of its own (so only it
answers), Locust's ``StreamUser`` (``loadtests/locustfile.py``) streams to it headless for
``promote.load_gate.seconds`` with ``users`` users, and the run's numbers are judged against
``params.yaml``'s bounds:

* ``max_error_ratio``: failed generation calls / generation calls;
* ``max_ttft_p95_ms``: 95th percentile of time to first token (Locust's ``TTFT`` entry);
* ``min_tokens_per_second``: tokens streamed over the run's length, all users together;
* ``min_requests``: a run that made fewer calls proves nothing and fails.

Every verdict (evaluation, load, rollout) becomes a :class:`GateVerdict`: its numbers and a
sentence. They go into ``reports/promote.json``, onto the candidate's MLflow run (its lineage's
run: ``gate.<name>.<number>`` metrics and a ``gate.<name>`` tag), and into the registry's alias
history (the ``challenger`` alias is set again with the verdicts as its reason, and the champion
move carries them too).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Locust's exit code when it could not reach the target (the locustfile's ``EXIT_TARGET``).
EXIT_TARGET = 2


@dataclasses.dataclass(frozen=True)
class GateVerdict:
    """One gate's outcome: passed or not, the numbers it judged, and why, in words."""

    gate: str
    passed: bool
    reason: str
    numbers: dict[str, float] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        return f"{self.gate} gate {'passed' if self.passed else 'FAILED'}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class LoadBounds:
    """``promote.load_gate`` of params.yaml; a bound of ``None`` is not checked."""

    max_error_ratio: float | None = 0.01
    max_ttft_p95_ms: float | None = None
    min_tokens_per_second: float | None = None
    min_requests: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> LoadBounds:
        def bound(key: str) -> float | None:
            value = params.get(key)
            return None if value is None else float(value)

        return cls(
            max_error_ratio=bound("max_error_ratio"),
            max_ttft_p95_ms=bound("max_ttft_p95_ms"),
            min_tokens_per_second=bound("min_tokens_per_second"),
            min_requests=int(params.get("min_requests", 1)),
        )


@dataclasses.dataclass(frozen=True)
class LoadMeasurement:
    """What one load run measured on the challenger."""

    requests: int
    failures: int
    ttft_p95_ms: float  # NaN when no stream delivered a token
    itl_p95_ms: float  # NaN when no stream delivered two
    tokens: int
    seconds: float

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


def judge_load(measured: LoadMeasurement, bounds: LoadBounds) -> GateVerdict:
    """The load gate's verdict: every bound set must hold; a bound with nothing measured fails."""
    numbers = {
        "requests": float(measured.requests),
        "error_ratio": measured.error_ratio,
        "ttft_p95_ms": measured.ttft_p95_ms,
        "itl_p95_ms": measured.itl_p95_ms,
        "tokens_per_second": measured.tokens_per_second,
        "seconds": measured.seconds,
    }
    checks: list[tuple[str, float, float, bool]] = [  # name, observed, bound, at least
        ("calls", float(measured.requests), float(bounds.min_requests), True)
    ]
    if bounds.max_error_ratio is not None:
        checks.append(("error ratio", measured.error_ratio, bounds.max_error_ratio, False))
    if bounds.max_ttft_p95_ms is not None:
        checks.append(("TTFT p95 ms", measured.ttft_p95_ms, bounds.max_ttft_p95_ms, False))
    if bounds.min_tokens_per_second is not None:
        checks.append(("tokens/s", measured.tokens_per_second, bounds.min_tokens_per_second, True))
    parts, failed = [], []
    for name, observed, bound, at_least in checks:
        ok = not math.isnan(observed) and (observed >= bound if at_least else observed <= bound)
        shown = "nothing measured" if math.isnan(observed) else f"{observed:.4g}"
        text = f"{name} {shown} ({'>=' if at_least else '<='} {bound:g})"
        parts.append(text)
        if not ok:
            failed.append(text)
    if failed:
        return GateVerdict("load", False, "breached: " + "; ".join(failed), numbers)
    return GateVerdict("load", True, ", ".join(parts), numbers)


def read_locust_csv(prefix: Path, seconds: float) -> LoadMeasurement:
    """The measurement from Locust's ``<prefix>_stats.csv`` (a run of ``seconds``)."""
    rows = list(csv.DictReader((prefix.parent / f"{prefix.name}_stats.csv").open(encoding="utf-8")))

    def p95(name: str) -> float:
        for row in rows:
            if row["Type"] == "token" and row["Name"] == name and int(row["Request Count"]):
                return float(row["95%"])
        return math.nan

    calls = [r for r in rows if r["Type"] == "grpc" and r["Name"].startswith("serving.Generate")]
    requests = sum(int(r["Request Count"]) for r in calls)
    failures = sum(int(r["Failure Count"]) for r in calls)
    # the content size of a generation is its tokens (failed calls report 0); Locust averages it
    # over every call of the entry
    tokens = round(sum(float(r["Average Content Size"]) * int(r["Request Count"]) for r in calls))
    return LoadMeasurement(requests, failures, p95("TTFT"), p95("ITL"), tokens, seconds)


def locustfile() -> Path:
    """``loadtests/locustfile.py`` of the repository llmops runs from (an editable install)."""
    import llmops

    return Path(llmops.__file__).resolve().parents[2] / "loadtests" / "locustfile.py"


def run_locust(
    serving: str, served_name: str, *, seconds: int, users: int, max_tokens: int, out: Path | None = None
) -> LoadMeasurement:
    """A headless Locust run of stream users against one served name; its measurement.

    Raises:
        RuntimeError: Locust could not reach the target or wrote no statistics.
    """
    folder = Path(out or tempfile.mkdtemp(prefix="load-gate-"))
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "locust"
    args = [
        sys.executable, "-m", "locust", "-f", str(locustfile()), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "10",
        "--serving", serving, "--model", served_name, "--scenario", "stream", "--max-tokens", str(max_tokens),
        "--max-error-ratio", "-1", "--csv", str(prefix),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    elapsed = time.monotonic() - started
    summary = prefix.parent / f"{prefix.name}_summary.json"
    if done.returncode == EXIT_TARGET or not (prefix.parent / f"{prefix.name}_stats.csv").is_file():
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the load run against {served_name} on {serving} did not run: {tail}")
    window = seconds
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("start") and data.get("end"):
            window = float(data["end"]) - float(data["start"])
    return read_locust_csv(prefix, min(window, elapsed) if window > 0 else elapsed)


def load_gate(
    serving: str,
    model: str,
    engine: str,
    engine_options: Mapping[str, Any],
    params: Mapping[str, Any],
) -> GateVerdict:
    """Load ``model`` (``name:version``) alone on ``serving``, put Locust on it, judge, unload."""
    import asyncio

    from google.protobuf.duration_pb2 import Duration

    from llmops.common.clients import ServingClient
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    from .services import ref
    from .speed import load

    name, version = model.rsplit(":", 1)
    served = f"gate/{model}"
    engines = {"vllm": pb.ENGINE_VLLM, "transformers": pb.ENGINE_TRANSFORMERS}

    async def loaded(work: Any) -> Any:
        async with ServingClient.connect(serving, timeout=900) as client:
            return await work(client)

    async def up(client: Any) -> None:
        from llmops.proto.common.v1 import generation_pb2, sampling_pb2

        await load(
            client,
            pb.LoadModelRequest(
                model_ref=ref(name, version=int(version)),
                served_name=served,
                engine=engines[engine],  # type: ignore[arg-type]
                options=pb.EngineOptions(**engine_options),
                replace=True,
            ),
        )
        # one request first: the engine's first one pays its warm-up, which users never see
        warm = pb.GenerateRequest(
            model=pb.ModelSelector(served_name=served),
            prompt=generation_pb2.Prompt(text="def main():"),
            sampling=sampling_pb2.SamplingParams(max_tokens=2, greedy=True),
            cache=pb.CacheControl(bypass=True, no_store=True),
        )
        await client.unary(client.stub.Generate, warm)

    async def down(client: Any) -> None:
        await client.unary(
            client.stub.UnloadModel,
            pb.UnloadModelRequest(model=pb.ModelSelector(served_name=served), drain_timeout=Duration()),
        )

    asyncio.run(loaded(up))
    try:
        measured = run_locust(
            serving,
            served,
            seconds=int(params.get("seconds", 10)),
            users=int(params.get("users", 2)),
            max_tokens=int(params.get("max_tokens", 16)),
        )
    except RuntimeError as exc:
        return GateVerdict("load", False, str(exc))
    finally:
        asyncio.run(loaded(down))
    return judge_load(measured, LoadBounds.from_params(params))


def record_in_mlflow(tracking_uri: str, run_id: str, verdicts: list[GateVerdict]) -> str:
    """Each verdict onto the MLflow run: ``gate.<gate>`` tag (passed/failed: why) and its numbers as
    ``gate.<gate>.<number>`` metrics. Returns what happened, in words (never raises: the gates
    decided already; a tracking store that is down is reported, not fatal)."""
    if not run_id:
        return "no MLflow run in the candidate's lineage: verdicts not logged there"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for verdict in verdicts:
            client.set_tag(run_id, f"gate.{verdict.gate}", verdict.line()[:5000])
            for key, value in verdict.numbers.items():
                if math.isfinite(value):
                    client.log_metric(run_id, f"gate.{verdict.gate}.{key}", value)
    except Exception as exc:  # the store's own errors vary by backend
        return f"MLflow run {run_id}: verdicts not logged ({type(exc).__name__}: {exc})"
    return f"MLflow run {run_id}: {len(verdicts)} gate verdicts logged"

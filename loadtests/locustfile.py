"""Locust load test of the llmops gRPC services (see loadtests/README.md for every option).

    mkdir -p build/loadtest/run    # Locust does not create the --csv folder
    .venv/bin/python -m locust -f loadtests/locustfile.py --headless -u 4 -r 2 -t 30s \\
        --serving 127.0.0.1:50054 --registry 127.0.0.1:50051 --training 127.0.0.1:50053 \\
        --csv build/loadtest/run/locust --html build/loadtest/run/locust.html

Scenarios (``--scenario``, one user class each; naming classes on the command line overrides it):

* ``generate``: unary Generate, greedy, cache bypassed (the engine's own latency);
* ``stream``: GenerateStream, the same requests; TTFT and ITL are measured from the stream;
* ``cache``: mostly repeated deterministic prompts (``--cache-repeat`` of them from a pool of
  ``--cache-pool``), unary and streamed, through the cache: hits after each prompt's first answer;
* ``control``: serving ListModels, registry ListModels + ResolveAlias, training ListJobs + GetJob;
* ``mixed`` (default): all of the above in one user class, by task weight (generate 3, stream 3,
  cached generate 2, cached stream 1, control 3), so any user count exercises every part.

Before any user starts, each given address is asked one question (``--connect-timeout``): a dead
address or a missing model ends the run with exit code 2 and says which. When Locust quits, the
thresholds (``--max-error-ratio``, ``--max-p95-ttft-ms``, ``--max-p95-latency-ms``) are checked and a
violation exits with code 3, naming it; with ``--csv PREFIX`` the run's window and checks are also
written to ``PREFIX_summary.json`` (read by ``python -m loadtests.plots``). ``--shape`` picks a load
shape (:mod:`loadtests.shapes`) sized by ``-u``, ``-r`` and ``-t``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]  # not in grpc-stubs
from locust import LoadTestShape, events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

# gRPC's C core must wait on gevent, not block the process: before any channel exists.
grpc_gevent.init_gevent()

# Locust puts the working folder on sys.path; put the repository root there too, for other folders.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from llmops.proto.common.v1 import generation_pb2, sampling_pb2  # noqa: E402
from llmops.proto.registry.v1 import registry_service_pb2 as rpb  # noqa: E402
from llmops.proto.registry.v1 import registry_service_pb2_grpc as rgrpc  # noqa: E402
from llmops.proto.serving.v1 import serving_service_pb2 as spb  # noqa: E402
from llmops.proto.serving.v1 import serving_service_pb2_grpc as sgrpc  # noqa: E402
from llmops.proto.training.v1 import training_service_pb2 as tpb  # noqa: E402
from llmops.proto.training.v1 import training_service_pb2_grpc as tgrpc  # noqa: E402
from loadtests.grpc_user import GrpcUser  # noqa: E402
from loadtests.shapes import SHAPES, profile_from_options  # noqa: E402
from loadtests.targets import EXIT_TARGET, Target, TargetError, check_target  # noqa: E402
from loadtests.thresholds import (  # noqa: E402
    EXIT_THRESHOLD,
    EntryStats,
    Thresholds,
    evaluate,
    violations,
)

log = logging.getLogger("loadtests")

SCENARIOS = ("mixed", "generate", "stream", "cache", "control")
PROMPTS = (
    "def add(a, b):",
    "The quick brown fox",
    "Once upon a time",
    "import numpy as np",
    "The capital of France is",
    "SELECT * FROM users WHERE",
    "In machine learning, a transformer",
    "class Stack:",
)


#: Our options, as (flag, keywords of ``add_argument``). Locust's own parser takes them (argument
#: groups would not know ``env_var=`` and ``is_secret=``), and lists them in ``--help``.
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    # target
    ("--serving", {"default": "", "env_var": "LLMOPS_LOADTEST_SERVING", "help": "Serving gRPC HOST:PORT"}),
    ("--registry", {"default": "", "env_var": "LLMOPS_LOADTEST_REGISTRY", "help": "Registry HOST:PORT"}),
    ("--training", {"default": "", "env_var": "LLMOPS_LOADTEST_TRAINING", "help": "Training HOST:PORT"}),
    ("--model", {"default": "", "help": "Served model name (default: the first READY one)"}),
    ("--api-key", {"default": "", "env_var": "LLMOPS_API_KEY", "is_secret": True, "help": "API key"}),
    ("--connect-timeout", {"type": float, "default": 5.0, "help": "Deadline (s) of checks, control calls"}),
    ("--rpc-timeout", {"type": float, "default": 60.0, "help": "Deadline (s) of each generation call"}),
    # workload
    ("--scenario", {"choices": SCENARIOS, "default": "mixed", "help": "User mix (see loadtests/README.md)"}),
    ("--max-tokens", {"type": int, "default": 32, "help": "Tokens per completion (ignore_eos: exact)"}),
    ("--cache-pool", {"type": int, "default": 8, "help": "Distinct prompts the cache mix repeats"}),
    ("--cache-repeat", {"type": float, "default": 0.9, "help": "Share of cache-mix prompts from the pool"}),
    ("--think-time", {"type": float, "default": 0.0, "help": "Seconds a user waits between tasks"}),
    # load shape
    ("--shape", {"choices": SHAPES, "default": "constant", "help": "Load shape, sized by -u/-r/-t"}),
    ("--ramp-up", {"type": float, "default": None, "help": "ramp: seconds to reach -u (default: -t / 2)"}),
    ("--steps", {"type": int, "default": 4, "help": "step: number of steps up to -u"}),
    ("--spike-start", {"type": float, "default": 0.4, "help": "spike: start, as a fraction of -t"}),
    ("--spike-length", {"type": float, "default": 0.2, "help": "spike: length, as a fraction of -t"}),
    ("--spike-base", {"type": float, "default": 0.25, "help": "spike: users outside it, fraction of -u"}),
    # thresholds (exit code 3 when exceeded)
    ("--max-error-ratio", {"type": float, "default": 0.01, "help": "Failed calls / calls; < 0 disables"}),
    ("--max-p95-ttft-ms", {"type": float, "default": None, "help": "p95 time to first token (ms)"}),
    ("--max-p95-latency-ms", {"type": float, "default": None, "help": "p95 of generation calls (ms)"}),
    ("--min-requests", {"type": int, "default": 1, "help": "Fewest calls a passing run makes"}),
)


def _add_options(parser: Any) -> None:
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)


def thresholds_of(options: Any) -> Thresholds:
    ratio = options.max_error_ratio
    return Thresholds(
        max_error_ratio=None if ratio is None or ratio < 0 else ratio,
        max_p95_ttft_ms=options.max_p95_ttft_ms,
        max_p95_latency_ms=options.max_p95_latency_ms,
        min_requests=options.min_requests,
    )


def _prepare(environment: Environment, **_: Any) -> None:
    """Pick the scenario's user class; check the target and the shape before any user starts."""
    options = environment.parsed_options
    if options is None:  # Locust used as a library: the caller set things up
        return
    if not options.user_classes:
        wanted = SCENARIO_USERS[options.scenario]
        environment.user_classes[:] = [u for u in environment.user_classes if u is wanted] or [wanted]
    if isinstance(environment.runner, MasterRunner):
        return  # the workers check the target they call
    try:
        profile_from_options(options)
        options.llmops_target = check_target(
            options.serving,
            model=options.model,
            registry=options.registry,
            training=options.training,
            api_key=options.api_key,
            timeout=options.connect_timeout,
        )
    except (TargetError, ValueError) as exc:
        log.error("cannot start the load test: %s", exc)
        sys.exit(EXIT_TARGET)
    target: Target = options.llmops_target
    log.info(
        "load-testing model %r on serving %s (registry %s, training %s), scenario %s",
        target.model, target.serving, target.registry or "not called", target.training or "not called",
        options.scenario,
    )  # fmt: skip


def _started(environment: Environment, **_: Any) -> None:
    if environment.parsed_options is not None:
        environment.parsed_options.llmops_started_at = time.time()


def _gate(environment: Environment, **_: Any) -> None:
    """Check the thresholds on the run's statistics; a violation sets exit code 3."""
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return
    entries = [
        EntryStats(e.method or "", e.name, e.num_requests, e.num_failures, dict(e.response_times))
        for e in environment.stats.entries.values()
    ]
    thresholds = thresholds_of(options)
    checks = evaluate(entries, thresholds)
    failed = violations(checks)
    for check in checks:
        (log.error if check.failed else log.info)("threshold %s", check)
    if failed:
        log.error("thresholds exceeded: %s", "; ".join(str(c) for c in failed))
        environment.process_exit_code = EXIT_THRESHOLD
    elif thresholds.max_error_ratio is not None and environment.process_exit_code is None:
        runner = environment.runner
        if runner is not None and not runner.exceptions:
            environment.process_exit_code = 0  # failures within the error budget pass the gate
    if options.csv_prefix:
        target = getattr(options, "llmops_target", None)
        summary = {
            "start": getattr(options, "llmops_started_at", None),
            "end": time.time(),
            "scenario": options.scenario,
            "shape": options.shape,
            "target": _public(target) if target is not None else None,
            "checks": [
                {"name": c.name, "observed": c.observed, "limit": c.limit, "failed": c.failed, "text": str(c)}
                for c in checks
            ],
            "exit_code": environment.process_exit_code,
        }
        path = Path(f"{options.csv_prefix}_summary.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _public(target: Target) -> dict[str, Any]:
    """The target as written to the summary: without the API key."""
    return {k: v for k, v in dataclasses.asdict(target).items() if k != "api_key"}


# Registered by call, not as decorators: Locust's hooks are untyped (mypy would untype the functions).
events.init_command_line_parser.add_listener(_add_options)  # type: ignore[no-untyped-call]
events.init.add_listener(_prepare)  # type: ignore[no-untyped-call]
events.test_start.add_listener(_started)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_gate)  # type: ignore[no-untyped-call]


class LoadShape(LoadTestShape):
    """The ``--shape`` profile; ``constant`` (default) is plain ``-u``/``-r``/``-t``."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        if not hasattr(self, "_profile"):
            self._profile = profile_from_options(self.runner.environment.parsed_options)
        return self._profile.at(self.get_run_time())  # type: ignore[no-untyped-call]


class LLMOpsUser(GrpcUser):
    """Every llmops call the scenarios make; subclasses pick them by task weight."""

    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.target: Target = options.llmops_target
        self.options = options
        self.metadata = self.target.metadata
        self.serving = sgrpc.ServingServiceStub(self.channel(self.target.serving))
        self.registry = (
            rgrpc.RegistryServiceStub(self.channel(self.target.registry)) if self.target.registry else None
        )
        self.training = (
            tgrpc.TrainingServiceStub(self.channel(self.target.training)) if self.target.training else None
        )
        pool = max(1, options.cache_pool)
        self.pool = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(pool)]

    def wait_time(self) -> float:
        return float(self.options.think_time)

    def _sampling(self) -> sampling_pb2.SamplingParams:
        return sampling_pb2.SamplingParams(greedy=True, max_tokens=self.options.max_tokens, ignore_eos=True)

    def _request(self, kind: Any, prompt: str, cache: spb.CacheControl | None) -> Any:
        return kind(
            model=spb.ModelSelector(served_name=self.target.model),
            prompt=generation_pb2.Prompt(text=prompt),
            sampling=self._sampling(),
            cache=cache,
        )

    def engine_prompt(self) -> tuple[str, spb.CacheControl]:
        """A prompt for the engine itself: the cache neither answers nor keeps it."""
        return random.choice(PROMPTS), spb.CacheControl(bypass=True, no_store=True)

    def cache_prompt(self) -> tuple[str, spb.CacheControl | None]:
        """Mostly a pooled prompt (a hit once answered); else a fresh one the cache does not keep."""
        if random.random() < self.options.cache_repeat:
            return random.choice(self.pool), None
        return f"{random.choice(PROMPTS)} [{uuid.uuid4().hex[:8]}]", spb.CacheControl(no_store=True)

    def generate(self, prompt: str, cache: spb.CacheControl | None) -> None:
        self.call(
            "serving.Generate",
            self.serving.Generate,
            self._request(spb.GenerateRequest, prompt, cache),
            timeout=self.options.rpc_timeout,
            length=lambda r: r.output.usage.completion_tokens,
            cached=lambda r: r.cached,
        )

    def generate_stream(self, prompt: str, cache: spb.CacheControl | None) -> None:
        self.stream(
            "serving.GenerateStream",
            self.serving.GenerateStream,
            self._request(spb.GenerateStreamRequest, prompt, cache),
            timeout=self.options.rpc_timeout,
        )

    def control_plane(self) -> None:
        timeout = self.options.connect_timeout
        self.call("serving.ListModels", self.serving.ListModels, spb.ListModelsRequest(), timeout=timeout)
        if self.registry is not None:
            models = self.call(
                "registry.ListModels",
                self.registry.ListModels,
                rpb.ListModelsRequest(page_size=50),
                timeout=timeout,
            )
            pairs = [(m.name, a) for m in (models.models if models else ()) for a in m.aliases]
            if not pairs and self.target.model_ref is not None:
                pairs = [self.target.model_ref]
            if pairs:
                name, alias = random.choice(pairs)
                request = rpb.ResolveAliasRequest(model_name=name, alias=alias)
                self.call("registry.ResolveAlias", self.registry.ResolveAlias, request, timeout=timeout)
        if self.training is not None:
            jobs = self.call(
                "training.ListJobs",
                self.training.ListJobs,
                tpb.ListJobsRequest(page_size=20),
                timeout=timeout,
            )
            if jobs is not None and jobs.jobs:
                job_id = random.choice(jobs.jobs).id
                self.call(
                    "training.GetJob", self.training.GetJob, tpb.GetJobRequest(job_id=job_id), timeout=timeout
                )


def generate_task(user: LLMOpsUser) -> None:
    user.generate(*user.engine_prompt())


def stream_task(user: LLMOpsUser) -> None:
    user.generate_stream(*user.engine_prompt())


def cached_generate_task(user: LLMOpsUser) -> None:
    user.generate(*user.cache_prompt())


def cached_stream_task(user: LLMOpsUser) -> None:
    user.generate_stream(*user.cache_prompt())


def control_task(user: LLMOpsUser) -> None:
    user.control_plane()


class GenerateUser(LLMOpsUser):
    tasks = [generate_task]


class StreamUser(LLMOpsUser):
    tasks = [stream_task]


class CacheUser(LLMOpsUser):
    tasks = {cached_generate_task: 3, cached_stream_task: 1}  # type: ignore[assignment]  # weights


class ControlUser(LLMOpsUser):
    tasks = [control_task]


class MixedUser(LLMOpsUser):
    # Control-plane calls take milliseconds against generations' seconds: a weight of 3 costs the
    # generation load next to nothing and makes a short run all but certain to include them.
    tasks = {  # type: ignore[assignment]  # Locust takes {task: weight}
        generate_task: 3,
        stream_task: 3,
        cached_generate_task: 2,
        cached_stream_task: 1,
        control_task: 3,
    }


SCENARIO_USERS: dict[str, type[LLMOpsUser]] = {
    "mixed": MixedUser,
    "generate": GenerateUser,
    "stream": StreamUser,
    "cache": CacheUser,
    "control": ControlUser,
}

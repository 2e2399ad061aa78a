"""Training benchmark: LoRA fine-tuning through a training job against the same loop run directly.

On the tiny model (a 12.6M Llama), both sides train the same LoRA adapter (r=8, alpha=16, dropout
0.05, every linear layer) on the same data: ``--rows`` prompt/completion pairs cut from
standard-library source, tokenized as the job's worker does (prompt ids + completion ids + eos,
loss on the completion only, truncated to ``--seq-len``), batch 8, lr 2e-4 cosine, seed 42,
``--steps`` optimizer steps, a step log every 5 steps.

  direct  trl's ``SFTTrainer`` with peft in this process: no service, no Ray, no tracking. A small
          ``TrainerCallback`` measures tokens/s exactly as the job's worker does (non-padding input
          tokens since the previous log / seconds since it).
  job     the training service started as ``llmops serve training`` starts it (gRPC on 127.0.0.1,
          the Ray runner on a local runtime, MLflow tracking on SQLite, local model folders), the job
          submitted with ``TrainingClient.SubmitJob`` and followed with ``WatchJob``.

The service is started once and kept up, so every job meets a warm Ray runtime; ``--rounds`` rounds
(at least 3) each run the direct loop and a job, in alternating order, and medians are reported.

Goals (printed last as RESULT lines; the exit code is 1 when one is missed):
  * the whole job's tokens/s >= 0.9x the direct loop's: every input token trained / the wall time from
    SubmitJob to the ``finished`` event (direct: from loading the model to the saved adapter);
  * SubmitJob -> the first training step <= 2 s (the direct loop's load-to-first-step is shown beside it).
The steady-state rate (step events after the first logging interval, interval-weighted) is shown too.
Ray sets a worker's torch threads to its CPUs, so the job asks for every CPU (``default_cpus``); a probe
actor reports the worker's threads and niceness. The result goes to ``benchmarks/results/training.json``.

Usage: ``python -m benchmarks.training.run [--steps 60] [--quick] [--rounds 3] [--rows 256]``
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.gate import Goal, alternating, finish, median, quick_default

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
GOAL = 0.9  # the whole job's tokens/s over the same loop in-process
PHASES = {"worker_up": "worker up", "loading": "body starts", "first_step": "load + first step"}
FIRST_STEP_GOAL = 2.0  # seconds from SubmitJob to the first step, Ray runtime warm
BATCH, LR, LORA_R, LORA_ALPHA, LORA_DROPOUT, SEED = 8, 2e-4, 8, 16, 0.05, 42
console = Console()


@dataclass(frozen=True)
class Workload:
    steps: int
    rows: int
    seq_len: int
    log_every: int

    @property
    def window_start(self) -> int:
        """The step whose log opens the steady-state window (the end of the first logging interval)."""
        return self.log_every


# data --------------------------------------------------------------------------------------------


def make_rows(count: int) -> list[dict[str, str]]:
    """Prompt/completion pairs from standard-library source: a few lines, then the lines after."""
    from llmops.common.tiny_model import corpus_files

    rows: list[dict[str, str]] = []
    for path, _, _ in corpus_files(10**9):
        lines = [
            line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
        for start in range(0, len(lines) - 10, 10):
            prompt, completion = lines[start : start + 4], lines[start + 4 : start + 10]
            rows.append({"prompt": "\n".join(prompt) + "\n", "completion": "\n".join(completion) + "\n"})
            if len(rows) == count:
                return rows
    raise RuntimeError(f"only {len(rows)} rows of text found")


def tokenize(tokenizer: Any, rows: list[dict[str, str]], seq_len: int) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``assistant_masks`` (1 on the completion and eos), as the job's worker does."""
    examples = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids, mask = (prompt + completion)[:seq_len], ([0] * len(prompt) + [1] * len(completion))[:seq_len]
        if any(mask):
            examples.append({"input_ids": ids, "assistant_masks": mask})
    return examples


# throughput over step logs -----------------------------------------------------------------------


@dataclass
class Log:
    """One step log: the step, its time (s), and (direct runs) the input tokens seen by then."""

    step: int
    time: float
    tokens_per_second: float
    tokens: int | None = None
    loss: float = 0.0


def steady(logs: list[Log], workload: Workload) -> list[Log]:
    """The window's logs, from the one that closes the first logging interval to the last."""
    return [log for log in logs if log.step >= workload.window_start]


def weighted_rate(window: list[Log]) -> float:
    """Mean of the intervals' tokens/s weighted by their lengths (the window's first log opens it)."""
    pairs = [(b.tokens_per_second, b.time - a.time) for a, b in itertools.pairwise(window)]
    seconds = sum(dt for _, dt in pairs)
    return sum(rate * dt for rate, dt in pairs) / seconds if seconds > 0 else float("nan")


def interval_rates(logs: list[dict[str, Any]], workload: Workload) -> list[float]:
    """tokens/s of each steady-state interval (the logs after the window's first)."""
    return [log["tokens_per_second"] for log in logs if log["step"] > workload.window_start]


def window_tokens(window: list[Log]) -> int:
    assert window[0].tokens is not None and window[-1].tokens is not None
    return window[-1].tokens - window[0].tokens


# direct ------------------------------------------------------------------------------------------


def run_direct(model_dir: Path, rows: list[dict[str, str]], workload: Workload, work: Path) -> dict[str, Any]:
    """The job's training loop in this process with plain transformers + peft + trl."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    class Meter(TrainerCallback):  # type: ignore[misc]
        """Tokens/s per logging interval, defined as the job's worker defines it."""

        def __init__(self) -> None:
            self.logs: list[Log] = []
            self.first_step_at = 0.0
            self._tokens, self._time = 0, time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._tokens, self._time = int(state.num_input_tokens_seen or 0), time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if "loss" not in (logs or {}):
                return
            now, tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            rate = (tokens - self._tokens) / (now - self._time) if now > self._time else 0.0
            self._tokens, self._time = tokens, now
            self.first_step_at = self.first_step_at or now
            self.logs.append(Log(state.global_step, now, rate, tokens, float(logs["loss"])))

    out = work / f"direct-{time.monotonic_ns()}"
    started = time.perf_counter()
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=workload.steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        data_seed=SEED,
        logging_steps=workload.log_every,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        max_length=workload.seq_len,
    )
    peft_config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    meter = Meter()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(tokenize(tokenizer, rows, workload.seq_len)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[meter],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")  # type: ignore[union-attr,operator]  # what the job exports, minus the registration
    tokenizer.save_pretrained(out / "adapter")
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    window = steady(meter.logs, workload)
    seconds = window[-1].time - window[0].time
    return {
        "total_tokens": int(trainer.state.num_input_tokens_seen or 0),
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "tokens_per_s": window_tokens(window) / seconds,
        "tokens_per_s_weighted": weighted_rate(window),
        "window_tokens": window_tokens(window),
        "window_seconds": seconds,
        "start_to_first_step_s": meter.first_step_at - started,
        "wall_s": wall,
        "logs": [vars(log) | {"time": log.time - started} for log in meter.logs],
    }


# job ---------------------------------------------------------------------------------------------


@dataclass
class Watched:
    """What the client saw of a job: receive times (client clock) and the step events."""

    submitted: float = 0.0
    started: float | None = None
    first_step: float | None = None
    ended: float | None = None
    final_state: str = ""
    error: str = ""
    logs: list[Log] = field(default_factory=list)
    #: Where SubmitJob -> first step goes (wall clock, the worker's events' own times): the worker up
    #: (actor process started, its body imported), the body loading (imports, tokenizer, data, model),
    #: the trainer built and its first step.
    phases: dict[str, float] = field(default_factory=dict)


def job_settings(data_dir: Path, data_repo: Path) -> Any:
    from llmops.common.settings import Settings

    return Settings.model_validate(
        {
            "host": "127.0.0.1",
            "log_level": "WARNING",
            "grace_seconds": 1.0,
            "data_dir": str(data_dir),
            "training": {
                "port": 0,
                "metrics_port": 0,
                "address": "127.0.0.1:0",
                "runner": "ray",
                "use_registry": False,
                "tracking": True,
                "data_repo": str(data_repo),
                "poll_seconds": 0.2,
                "default_cpus": os.cpu_count() or 1,
                "warm_worker": True,
            },
        }
    )


def job_spec(workload: Workload, dataset: str) -> Any:
    from llmops.proto.common.v1 import dataset_pb2, model_pb2
    from llmops.proto.training.v1 import training_service_pb2 as pb

    return pb.TrainingJobSpec(
        base_model=model_pb2.ModelRef(name="tiny", version=1),
        dataset=pb.TrainingDataset(
            ref=dataset_pb2.DatasetRef(path=dataset), format=pb.DATASET_FORMAT_PROMPT_COMPLETION
        ),
        method=pb.TRAINING_METHOD_LORA,
        hyperparameters=pb.Hyperparameters(
            max_steps=workload.steps,
            per_device_batch_size=BATCH,
            gradient_accumulation_steps=1,
            learning_rate=LR,
            lr_scheduler=pb.LR_SCHEDULER_COSINE,
            warmup_steps=0,
            max_grad_norm=1.0,
            max_seq_length=workload.seq_len,
            seed=SEED,
            logging_every_steps=workload.log_every,
            checkpoint_every_steps=workload.steps,  # one checkpoint, after the last step's log
        ),
        lora=pb.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT),
    )


async def follow(client: Any, workload: Workload, dataset: str, timeout: float) -> Watched:
    from llmops.proto.training.v1 import training_service_pb2 as pb

    seen = Watched(submitted=time.perf_counter())
    submitted_wall = time.time()
    response = await client.unary(
        client.stub.SubmitJob, pb.SubmitJobRequest(spec=job_spec(workload, dataset))
    )
    request = pb.WatchJobRequest(job_id=response.job.id)

    async def watch() -> None:
        async for message in client.stream(client.stub.WatchJob, request, timeout=None):
            now, event = time.perf_counter(), message.event
            kind = event.WhichOneof("payload")
            at_wall = event.time.ToNanoseconds() / 1e9
            if kind == "started" and seen.started is None:
                seen.started = now
                seen.phases["worker_up"] = at_wall - submitted_wall
            elif kind == "step" and event.step.phase == "load" and "loading" not in seen.phases:
                seen.phases["loading"] = at_wall - submitted_wall
            elif kind == "step" and event.step.phase == "train" and event.step.step >= 1:
                if seen.first_step is None:
                    seen.phases["first_step"] = at_wall - submitted_wall
                seen.first_step = seen.first_step or now
                if event.step.tokens_per_second > 0:  # a log (not the train-begin event)
                    at = event.time.ToNanoseconds() / 1e9  # the server's clock, when it emitted it
                    seen.logs.append(
                        Log(event.step.step, at, event.step.tokens_per_second, loss=event.step.loss)
                    )
            elif kind in ("finished", "failed", "cancelled"):
                seen.ended, seen.final_state = now, kind
                seen.error = event.failed.reason if kind == "failed" else ""

    await asyncio.wait_for(watch(), timeout)
    return seen


def probe_worker_threads(cpus: float) -> dict[str, Any]:
    """torch threads, OMP_NUM_THREADS and niceness of a Ray actor placed like the job's (same num_cpus)."""
    import ray

    class Probe:
        def threads(self) -> dict[str, Any]:
            import torch

            return {
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "niceness": os.nice(0),
            }

    actor: Any = ray.remote(Probe).options(num_cpus=cpus).remote()  # type: ignore[attr-defined]
    try:
        found: dict[str, Any] = ray.get(actor.threads.remote(), timeout=120)
        return found
    finally:
        ray.kill(actor)


class JobService:
    """The training service as ``llmops serve training`` starts it, kept up across rounds (so every job
    after the first one meets a warm Ray runtime), and jobs submitted to it."""

    def __init__(self, model_dir: Path, rows: list[dict[str, str]], work: Path) -> None:
        self.data_dir, self.data_repo = work / "data", work / "datarepo"
        self.data_repo.mkdir(parents=True)
        (self.data_repo / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        shutil.copytree(model_dir, self.data_dir / "training" / "models" / "tiny" / "1")
        self.settings = job_settings(self.data_dir, self.data_repo)
        self.start_seconds = 0.0
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None

    async def __aenter__(self) -> JobService:
        from llmops.common.app import start_app
        from llmops.common.clients import TrainingClient
        from llmops.training.app import build_app

        started = time.perf_counter()
        server, app = await start_app(build_app, self.settings, host="127.0.0.1", port=0, metrics_port=0)
        self._stack.push_async_callback(app.close)
        self._stack.push_async_callback(server.stop, 0)
        self.client = await self._stack.enter_async_context(
            TrainingClient.connect(f"127.0.0.1:{server.port}", timeout=120)
        )
        await self.client.wait_ready(timeout=60, interval=0.05)
        self.start_seconds = time.perf_counter() - started
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def run(self, workload: Workload, timeout: float) -> dict[str, Any]:
        seen = await follow(self.client, workload, "train.jsonl", timeout)
        if seen.final_state != "finished":
            raise RuntimeError(
                f"the job ended {seen.final_state or 'without a terminal event'}: {seen.error}"
            )
        assert seen.started is not None and seen.first_step is not None and seen.ended is not None
        window = steady(seen.logs, workload)
        return {
            "tokens_per_s_weighted": weighted_rate(window),
            "window_seconds": window[-1].time - window[0].time,
            "submit_to_started_s": seen.started - seen.submitted,
            "submit_to_first_step_s": seen.first_step - seen.submitted,
            "phases": seen.phases,
            "wall_s": seen.ended - seen.submitted,
            "logs": [vars(log) | {"time": log.time - window[0].time} for log in seen.logs],
        }

    async def probe(self) -> dict[str, Any]:
        return await asyncio.to_thread(probe_worker_threads, self.settings.training.default_cpus)


# report ------------------------------------------------------------------------------------------


def report(record: dict[str, Any]) -> None:
    direct, job, ratios, workload = record["direct"], record["job"], record["ratios"], record["workload"]
    worker = record["worker"]
    table = Table(
        title=(
            f"LoRA on the tiny model: {workload['steps']} steps of {BATCH} x <= {workload['seq_len']} tokens, "
            f"medians of {record['rounds']} rounds in alternating order"
        ),
        caption="direct: SFTTrainer in this process; job: SubmitJob + WatchJob on a training service kept up",
    )
    for column in ("measure", "direct", "job", "job/direct"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        "whole run tokens/s (all tokens / wall time)",
        f"{direct['whole_tokens_per_s']:.0f}",
        f"{job['whole_tokens_per_s']:.0f}",
        f"{ratios['whole_tokens_per_s']:.3f}",
    )
    table.add_row(
        f"steady tokens/s (steps {workload['window_start'] + 1}..{workload['steps']}, interval-weighted)",
        f"{direct['tokens_per_s_weighted']:.0f}",
        f"{job['tokens_per_s_weighted']:.0f}",
        f"{ratios['tokens_per_s']:.3f}",
    )
    table.add_row("submit -> started (s)", "", f"{job['submit_to_started_s']:.2f}", "")
    table.add_row(
        "submit (direct: start) -> first step (s)",
        f"{direct['start_to_first_step_s']:.2f}",
        f"{job['submit_to_first_step_s']:.2f}",
        f"{ratios['first_step']:.2f}",
    )
    phases, previous, parts = job["phases"], 0.0, []
    for key, label in PHASES.items():
        parts.append(f"{label} {phases[key] - previous:.2f}")
        previous = phases[key]
    table.add_row("  submit -> first step, by phase (s)", "", "; ".join(parts), "")
    table.add_row("wall time (s)", f"{direct['wall_s']:.1f}", f"{job['wall_s']:.1f}", f"{ratios['wall']:.2f}")
    table.add_row("  per round: direct", " / ".join(f"{w:.1f}" for w in direct["walls"]), "", "")
    table.add_row("  per round: job", "", " / ".join(f"{w:.1f}" for w in job["walls"]), "")
    table.add_row("torch threads / niceness", f"{direct['torch_threads']} / {direct['niceness']}",
                  f"{worker['torch_threads']} / {worker['niceness']}", "")  # fmt: skip
    console.print(table)
    console.print(
        f"service start {record['service_start_s']:.1f} s (Ray runtime included; every job meets it warm); "
        f"results in {record['json']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 60, 15 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="fewer steps")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (direct, job), alternating order")
    parser.add_argument("--rows", type=int, default=256, help="prompt/completion rows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800, help="longest wait for a job, in seconds")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "training.json")
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="run the job's Ray workers at this niceness (RAY_worker_niceness); default: the runner's",
    )
    args = parser.parse_args()
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112 - Ray reads this exact name
    steps = args.steps or (15 if args.quick else 60)
    workload = Workload(steps=steps, rows=args.rows, seq_len=args.seq_len, log_every=5)
    if steps < 3 * workload.log_every:
        parser.error(f"--steps must be at least {3 * workload.log_every} for a steady-state window")

    import datasets
    import transformers

    from llmops.common.tiny_model import build_tiny_model

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    model_dir = build_tiny_model().path
    rows = make_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="llmops-bench-training-") as tmp:
        work = Path(tmp)
        runs, jobs, service_start, worker = asyncio.run(measure(model_dir, rows, workload, work, args))
    return summarize(runs, jobs, service_start, worker, workload, args)


async def measure(
    model_dir: Path, rows: list[dict[str, str]], workload: Workload, work: Path, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float, dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    async with JobService(model_dir, rows, work / "job") as service:
        for order in alternating(["direct", "job"], args.rounds):
            for side in order:
                console.print(f"{side} ({workload.steps} steps)...")
                if side == "direct":
                    runs.append(await asyncio.to_thread(run_direct, model_dir, rows, workload, work))
                else:
                    jobs.append(await service.run(workload, args.timeout))
        worker = await service.probe()
        return runs, jobs, service.start_seconds, worker


def summarize(
    runs: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    service_start: float,
    worker: dict[str, Any],
    workload: Workload,
    args: argparse.Namespace,
) -> int:
    tokens = median(r["total_tokens"] for r in runs)  # the job trains the same batches (data, seed)
    if len({r["total_tokens"] for r in runs}) > 1:
        console.print("[yellow]the direct runs saw different token counts; the job's tokens/s is approximate")
    direct: dict[str, Any] = {
        "whole_tokens_per_s": median(r["total_tokens"] / r["wall_s"] for r in runs),
        "tokens_per_s_weighted": median(r["tokens_per_s_weighted"] for r in runs),
        "start_to_first_step_s": median(r["start_to_first_step_s"] for r in runs),
        "wall_s": median(r["wall_s"] for r in runs),
        "walls": [r["wall_s"] for r in runs],
        "torch_threads": runs[0]["torch_threads"],
        "niceness": runs[0]["niceness"],
    }
    job: dict[str, Any] = {
        "whole_tokens_per_s": median(tokens / j["wall_s"] for j in jobs),
        "tokens_per_s_weighted": median(j["tokens_per_s_weighted"] for j in jobs),
        "submit_to_started_s": median(j["submit_to_started_s"] for j in jobs),
        "submit_to_first_step_s": median(j["submit_to_first_step_s"] for j in jobs),
        "wall_s": median(j["wall_s"] for j in jobs),
        "walls": [j["wall_s"] for j in jobs],
        "first_steps": [j["submit_to_first_step_s"] for j in jobs],
        "phases": {k: median(j["phases"].get(k, float("nan")) for j in jobs) for k in PHASES},
    }
    ratios = {
        "whole_tokens_per_s": job["whole_tokens_per_s"] / direct["whole_tokens_per_s"],
        "tokens_per_s": job["tokens_per_s_weighted"] / direct["tokens_per_s_weighted"],
        "first_step": job["submit_to_first_step_s"] / direct["start_to_first_step_s"],
        "wall": job["wall_s"] / direct["wall_s"],
    }
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "workload": {
            "model": "tiny Llama (12.6M parameters)",
            "method": f"LoRA r={LORA_R} alpha={LORA_ALPHA} dropout={LORA_DROPOUT} all-linear",
            "batch_size": BATCH,
            "steps": workload.steps,
            "rows": workload.rows,
            "seq_len": workload.seq_len,
            "window_start": workload.window_start,
            "quick": args.quick,
        },
        "rounds": args.rounds,
        "service_start_s": service_start,
        "worker": worker,
        "direct": direct,
        "job": job,
        "ratios": ratios,
        "json": str(args.json_out),
        "runs": runs,
        "jobs": jobs,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(record, indent=2) + "\n")
    report(record)
    return finish(
        Goal("training_job_over_direct_whole_tokens_per_s", ratios["whole_tokens_per_s"], ">=", GOAL),
        Goal("training_submit_to_first_step_s", job["submit_to_first_step_s"], "<=", FIRST_STEP_GOAL),
    )


if __name__ == "__main__":
    sys.exit(main())

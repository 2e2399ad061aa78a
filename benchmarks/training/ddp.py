"""Data-parallel training benchmark: 2 workers (Ray Train DDP, gloo) vs 1 worker at the same global batch.

On a two-node Ray cluster on this machine (``ray start`` twice, one CPU each, separate temp folders;
:mod:`benchmarks.training.ray_cluster`), a training service (the Ray runner, local model folders, no
tracking) runs the same LoRA job (tiny Llama, r=8, dropout 0, seed 42, lr 2e-4 cosine, a step log
every step) two ways, in alternating order over ``--rounds`` rounds:

  one  ``num_workers=1``, per-device batch 8: the single-worker path (one Ray actor, warm spare).
  two  ``num_workers=2``, per-device batch 4: a Ray Train ``TorchTrainer`` of one rank per node.

Reported (medians): whole-job wall time and steady-state seconds per step (the second step log to
the last), their two/one ratios (on 2 shared cores expect no speed-up: two ranks split the same
cores and add an all-reduce per step), and SubmitJob -> first step for both.

Goals (RESULT lines, last; exit 1 on a miss):
  * ``training-submit-to-first-step-s``: the 2-worker job's SubmitJob -> first step <= 2 s;
  * ``training-ddp-loss-match``: the largest |loss(two) - loss(one)| at any logged step of any round
    <= 0.01 (same seed, data order and global batch, dropout off).

Usage: ``python -m benchmarks.training.ddp [--steps 20] [--quick] [--rounds 3]``
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.gate import Goal, alternating, finish, median, quick_default
from benchmarks.training.ray_cluster import start_cluster, stop_cluster

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
GLOBAL_BATCH, SEED, LR, SEQ_LEN = 8, 42, 2e-4, 128
FIRST_STEP_GOAL, LOSS_GOAL = 2.0, 0.01
console = Console()


def settings(work: Path, address: str) -> Any:
    from llmops.common.settings import Settings

    return Settings.model_validate(
        {
            "host": "127.0.0.1",
            "log_level": "WARNING",
            "grace_seconds": 1.0,
            "data_dir": str(work / "data"),
            "ray_address": address,
            "training": {
                "port": 0,
                "metrics_port": 0,
                "address": "127.0.0.1:0",
                "runner": "ray",
                "use_registry": False,
                "tracking": False,
                "data_repo": str(work / "datarepo"),
                "poll_seconds": 0.1,
                "default_cpus": 1.0,
                "warm_worker": True,
                "checkpoint_storage": str(work / "checkpoints"),
            },
        }
    )


def job_spec(workers: int, steps: int) -> Any:
    from llmops.proto.common.v1 import dataset_pb2, model_pb2
    from llmops.proto.training.v1 import training_service_pb2 as pb

    return pb.TrainingJobSpec(
        base_model=model_pb2.ModelRef(name="tiny", version=1),
        dataset=pb.TrainingDataset(
            ref=dataset_pb2.DatasetRef(path="train.jsonl"), format=pb.DATASET_FORMAT_PROMPT_COMPLETION
        ),
        method=pb.TRAINING_METHOD_LORA,
        hyperparameters=pb.Hyperparameters(
            max_steps=steps,
            per_device_batch_size=GLOBAL_BATCH // workers,
            learning_rate=LR,
            max_seq_length=SEQ_LEN,
            seed=SEED,
            logging_every_steps=1,
            checkpoint_every_steps=steps,
        ),
        lora=pb.LoraConfig(r=8, alpha=16, dropout=0.0),
        num_workers=workers,
        register=False,
    )


async def run_job(client: Any, workers: int, steps: int) -> dict[str, Any]:
    from llmops.proto.training.v1 import training_service_pb2 as pb

    submitted = time.perf_counter()
    response = await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=job_spec(workers, steps)))
    first_step, ended, state, losses, times = None, None, "", {}, {}
    request = pb.WatchJobRequest(job_id=response.job.id)
    async for message in client.stream(client.stub.WatchJob, request, timeout=None):
        now, event = time.perf_counter(), message.event
        kind = event.WhichOneof("payload")
        if kind == "step" and event.step.phase == "train" and event.step.step >= 1:
            first_step = first_step or now
            if event.step.loss:
                losses[event.step.step] = event.step.loss
                times[event.step.step] = event.time.ToNanoseconds() / 1e9
        elif kind in ("finished", "failed", "cancelled"):
            ended, state = now, kind
            if kind == "failed":
                raise RuntimeError(f"the {workers}-worker job failed: {event.failed.reason}")
    assert state == "finished" and first_step is not None and ended is not None
    logged = sorted(times)
    steady = (times[logged[-1]] - times[logged[1]]) / (logged[-1] - logged[1])
    return {
        "workers": workers,
        "submit_to_first_step_s": first_step - submitted,
        "wall_s": ended - submitted,
        "seconds_per_step": steady,
        "losses": losses,
    }


async def measure(work: Path, address: str, steps: int, rounds: int) -> list[dict[str, Any]]:
    from llmops.common.app import start_app
    from llmops.common.clients import TrainingClient
    from llmops.training.app import build_app

    server, app = await start_app(
        build_app, settings(work, address), host="127.0.0.1", port=0, metrics_port=0
    )
    runs: list[dict[str, Any]] = []
    try:
        async with TrainingClient.connect(f"127.0.0.1:{server.port}", timeout=120) as client:
            await client.wait_ready(timeout=60, interval=0.05)
            for order in alternating([1, 2], rounds):
                for workers in order:
                    console.print(f"{workers} worker(s), {steps} steps...")
                    runs.append(await run_job(client, workers, steps))
    finally:
        await server.stop(0)
        await app.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 20, 8 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", default=quick_default())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "training_ddp.json")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 20)

    from benchmarks.training.run import make_rows
    from llmops.common.tiny_model import build_tiny_model

    model_dir = build_tiny_model().path
    rows = make_rows(256)
    cluster = start_cluster(cpus=1)
    try:
        with tempfile.TemporaryDirectory(prefix="llmops-bench-ddp-") as tmp:
            work = Path(tmp)
            (work / "datarepo").mkdir()
            (work / "datarepo" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            shutil.copytree(model_dir, work / "data" / "training" / "models" / "tiny" / "1")
            runs = asyncio.run(measure(work, cluster.address, steps, args.rounds))
    finally:
        stop_cluster(cluster)
    return summarize(runs, steps, args)


def summarize(runs: list[dict[str, Any]], steps: int, args: argparse.Namespace) -> int:
    one = [r for r in runs if r["workers"] == 1]
    two = [r for r in runs if r["workers"] == 2]
    diffs = [
        abs(b["losses"][step] - a["losses"][step])
        for a, b in zip(one, two, strict=True)
        for step in a["losses"]
        if step in b["losses"]
    ]
    missing = any(set(a["losses"]) != set(b["losses"]) for a, b in zip(one, two, strict=True))
    loss_match = max(diffs) if diffs and not missing else float("nan")
    stats = {
        side: {
            key: median(r[key] for r in found)
            for key in ("submit_to_first_step_s", "wall_s", "seconds_per_step")
        }
        for side, found in (("one", one), ("two", two))
    }
    ratios = {key: stats["two"][key] / stats["one"][key] for key in stats["one"]}
    table = Table(
        title=f"LoRA, tiny model, {steps} steps at global batch {GLOBAL_BATCH}: medians of {args.rounds} rounds",
        caption="one: 1 worker x batch 8; two: Ray Train DDP, 2 workers x batch 4 on two Ray nodes (gloo)",
    )
    for column in ("measure", "1 worker", "2 workers", "2/1"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for key, label in (
        ("submit_to_first_step_s", "SubmitJob -> first step (s)"),
        ("wall_s", "SubmitJob -> finished (s)"),
        ("seconds_per_step", "steady seconds per step"),
    ):
        table.add_row(label, f"{stats['one'][key]:.3f}", f"{stats['two'][key]:.3f}", f"{ratios[key]:.2f}")
    console.print(table)
    console.print(f"max |loss(2 workers) - loss(1 worker)| over {len(diffs)} logged steps: {loss_match:.6f}")
    record = {
        "steps": steps,
        "rounds": args.rounds,
        "stats": stats,
        "ratios": ratios,
        "loss_match": loss_match,
        "runs": runs,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(record, indent=2) + "\n")
    return finish(
        Goal(
            "training-submit-to-first-step-s", stats["two"]["submit_to_first_step_s"], "<=", FIRST_STEP_GOAL
        ),
        Goal("training-ddp-loss-match", loss_match, "<=", LOSS_GOAL),
    )


if __name__ == "__main__":
    sys.exit(main())

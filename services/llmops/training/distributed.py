"""Data-parallel training jobs: the training loop of :mod:`llmops.training.worker` on Ray Train ranks.

A job with ``num_workers`` > 1 runs as a Ray Train ``TorchTrainer`` (DistributedDataParallel over
gloo on CPUs, NCCL on GPUs). Each rank runs :func:`llmops.training.worker.train` unchanged (the same
trl/peft trainers for SFT, LoRA, QLoRA and DPO); Hugging Face's Trainer sees the process group Ray
Train set up and shards each global batch over the ranks, so a job of N workers at per-device batch
B trains on the same batches as one worker at batch N x B.

Checkpoints go through Ray Train's storage (``RunConfig(storage_path, name=<job id>)``: a shared
folder or an S3-compatible URI): on every save each rank reports its local ``checkpoint-<step>``
folder (rank 0 holds weights, optimizer and trainer state; every rank its RNG state) and Ray Train
merges them into ``<storage>/<job id>/checkpoint-<step>/``. A rank that starts again (Ray Train
restarts the group after a lost worker, or a new run of the same name restores the run's
checkpoint manager after the whole job was lost) resumes from ``ray.train.get_checkpoint()``:
the trainer restores its global step, so the step count has no gap and no repeat.

Events reach the job's coordinator (a detached actor, :mod:`llmops.training.runners.ray_train`) by
name: rank 0 sends the job's events (loss, learning rate, tokens/s of the whole group), every rank
its own step time, which the coordinator folds into rank 0's step events as ``worker<r>_step_seconds``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmops.common.runners.base import worker_name
from llmops.training.domain import WorkerPlan

#: Seconds a rank waits for the coordinator to take one event before it drops it.
_EVENT_TIMEOUT = 30.0


def checkpoint_uri(storage_path: str, job_id: str, step: int) -> str:
    """Where Ray Train persists a job's checkpoint of ``step``."""
    base = storage_path.rstrip("/")
    if "://" not in base:
        return Path(base, job_id, f"checkpoint-{step}").resolve().as_uri()
    return f"{base}/{job_id}/checkpoint-{step}"


class _RankEvents:
    """A rank's ``emit``: job events from rank 0, step times from the others, to the coordinator."""

    def __init__(self, coordinator: Any, rank: int, storage_path: str, job_id: str) -> None:
        self._coordinator = coordinator
        self._rank = rank
        self._storage_path = storage_path
        self._job_id = job_id
        self._last: tuple[int, float] | None = None  # (step, time) of the previous step event

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "checkpoint":  # the folder is this rank's scratch copy; storage has the real one
            return
        event = {"time": time.time(), **event}
        step_seconds = None
        if kind == "step" and event.get("phase") == "train" and "loss" in event:
            step, now = int(event["step"]), time.perf_counter()
            if self._last is not None and step > self._last[0]:
                step_seconds = (now - self._last[1]) / (step - self._last[0])
            self._last = (step, now)
        if step_seconds is not None:  # what differs between ranks: each one's own step time
            self._send({"kind": "rank", "rank": self._rank, "step_seconds": step_seconds}, wait=False)
        if self._rank == 0:
            self._send(event, wait=True)

    def hello(self) -> None:
        """Tell the coordinator where this rank runs (for operators and fault-injection tests)."""
        self._send(
            {"kind": "rank", "rank": self._rank, "pid": os.getpid(), "worker": worker_name()}, wait=True
        )

    def checkpoint(self, step: int) -> None:
        """Rank 0: report the checkpoint once Ray Train has committed it, so the event means what a
        restarted group resumes from (a report is registered at the controller's next poll)."""
        if self._rank != 0:
            return
        import ray.train

        try:
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=_EVENT_TIMEOUT
            )
        except Exception as error:  # training goes on; the checkpoint is reported when it can be
            message = f"checkpoint {step} not yet committed: {type(error).__name__}"
            self._send(
                {"time": time.time(), "kind": "log", "level": "warning", "message": message}, wait=True
            )
            return
        uri = checkpoint_uri(self._storage_path, self._job_id, step)
        self._send({"time": time.time(), "kind": "checkpoint", "step": step, "uri": uri}, wait=True)

    def _send(self, event: dict[str, Any], *, wait: bool) -> None:
        """To the coordinator; rank 0's job events wait, so they arrive in order."""
        import ray

        try:
            sent = self._coordinator.emit.remote(event)
            if wait:
                ray.get(sent, timeout=_EVENT_TIMEOUT)
        except Exception:  # the coordinator is gone (the job is being cancelled): train on, unheard
            pass


def _report_callback(events: _RankEvents) -> Any:
    """A trainer callback that reports each saved checkpoint folder to Ray Train (every rank)."""
    from transformers import TrainerCallback

    class ReportCheckpoint(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import ray.train

            step = int(state.global_step)
            folder = Path(args.output_dir) / f"checkpoint-{step}"
            checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder.is_dir() else None
            # A barrier: every rank reports each save once; Ray Train merges the folders.
            ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{step}")
            events.checkpoint(step)

    return ReportCheckpoint()


def train_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs (``TorchTrainer(train_loop, train_loop_config=...)``)."""
    import ray
    import ray.train

    plan = WorkerPlan.from_dict(config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    coordinator = ray.get_actor(config["coordinator"], namespace=config["namespace"])
    events = _RankEvents(coordinator, rank, config["storage_path"], plan.job_id)
    events.hello()
    # Scratch of this rank on its own node: checkpoints are written here, then reported to storage.
    scratch = Path(tempfile.mkdtemp(prefix=f"llmops-{plan.job_id}-rank{rank}-"))
    try:
        resume_from = None
        found = ray.train.get_checkpoint()
        if found is not None:
            # A local copy under the scratch folder: the trainer reads it like any checkpoint.
            resume = scratch / "resume"
            found.to_directory(str(resume))
            resume_from = str(resume)
            step = _step_of(resume)
            if rank == 0:
                events(
                    {"kind": "log", "level": "warning", "message": f"{world} workers resume from step {step}"}
                )
        plan = dataclasses.replace(
            plan,
            checkpoint_dir=str(scratch / "checkpoints"),
            output_dir=plan.output_dir if rank == 0 else str(scratch / "output"),
            resume_from=resume_from,
        )
        from llmops.training import worker

        result = worker.train(
            plan, events, threading.Event(), callbacks=[_report_callback(events)], exports=rank == 0
        )
        if rank == 0:
            ray.get(coordinator.set_result.remote(result), timeout=_EVENT_TIMEOUT)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _step_of(checkpoint: Path) -> int:
    import json

    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def run_trainer(
    plan: WorkerPlan,
    *,
    coordinator: str,
    namespace: str,
    storage_path: str,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_failures: int,
) -> None:
    """Run the job's ``TorchTrainer`` to its end (in the coordinator actor); raises when it fails."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = plan.device == "cuda"
    resources = {"CPU": cpus_per_worker}
    if cuda:
        resources["GPU"] = gpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "plan": plan.to_dict(),
            "coordinator": coordinator,
            "namespace": namespace,
            "storage_path": storage_path,
        },
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=cuda, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=plan.job_id,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": _worker_env()},  # type: ignore[call-arg]  # V2 RunConfig
        ),
    )
    trainer.fit()


def _worker_env() -> dict[str, str]:
    """What ranks must see as the service's workers do (offline hubs, no telemetry)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "RAY_AUTH_MODE")
    env = {name: os.environ[name] for name in names if name in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env

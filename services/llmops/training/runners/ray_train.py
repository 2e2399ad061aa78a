"""Data-parallel training jobs on Ray Train, run by a detached coordinator that outlives the service.

A job with ``num_workers`` > 1 starts one :class:`TrainCoordinator` actor, named after the job
(``llmops-train-<job id>``) in the training namespace, with ``lifetime="detached"`` and no CPUs: it
runs the job's ``TorchTrainer.fit()`` (:func:`llmops.training.distributed.run_trainer`) on a thread,
buffers the job's events (rank 0's, with every rank's step time folded in) and keeps how the job
ended. The Ray Train controller and its workers are owned by the coordinator, so they die with it.

The service only reads from the coordinator (``poll`` with an event cursor) and may go away at any
time: on its next start it finds the coordinator by name (:meth:`DistributedRunner.reattach`) and
reads on from the cursor its job book saved, so a restart neither kills nor duplicates the job.
A coordinator whose job the book does not hold as running is killed (:meth:`DistributedRunner.reconcile`).
When the whole job was lost (its coordinator's node went away, or an embedded Ray runtime stopped
with the service), a new coordinator runs a trainer of the same run name, which Ray Train restores
from the run's last checkpoint in storage. Cancelling kills the coordinator: DDP ranks stop together.

Jobs of one worker go to the single-worker runner this one wraps, exactly as before.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from llmops.common.runners.base import Attempt, Outcome, WorkerCore, outcome_of
from llmops.training.domain import Resources, WorkerPlan
from llmops.training.runners.base import JobRunner

log = logging.getLogger(__name__)
PREFIX = "llmops-train-"
#: Extra seconds a poll may take beyond its long-poll wait before the service polls again.
_POLL_SLACK = 30.0


def coordinator_name(job_id: str) -> str:
    return PREFIX + job_id


def cpus_per_worker(
    requested: float, default: float, workers: int, cluster_cpus: float, fixed: bool
) -> float:
    """CPUs of each rank: the job's, else the default, cut to share a ``fixed`` cluster (the embedded
    runtime, which never grows) so the job fits it instead of waiting forever; at least one."""
    if requested:
        return requested
    if fixed and cluster_cpus and default * workers > cluster_cpus:
        return max(1.0, float(int(cluster_cpus // workers)))
    return default


class TrainCoordinator:
    """The detached actor that drives one data-parallel job (wrapped with ``ray.remote`` at start)."""

    def __init__(self, name: str, namespace: str) -> None:
        self._name = name
        self._namespace = namespace
        self._core = WorkerCore(self._body)
        self._result: dict[str, Any] | None = None
        self._outcome: dict[str, Any] | None = None
        self._ranks: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return self._name

    def start(self, plan: dict[str, Any], options: dict[str, Any]) -> None:
        """Start the trainer on a thread (once); returns at once."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, args=({**plan, **options},), daemon=True)
            self._thread.start()

    def _run(self, plan: dict[str, Any]) -> None:
        outcome = self._core.run(plan)
        with self._lock:
            self._outcome = outcome

    def _body(self, raw: dict[str, Any], emit: Any, stop: threading.Event) -> dict[str, Any]:
        from llmops.training.distributed import run_trainer

        options = {
            k: raw.pop(k) for k in ("storage_path", "cpus_per_worker", "gpus_per_worker", "max_failures")
        }
        run_trainer(WorkerPlan.from_dict(raw), coordinator=self._name, namespace=self._namespace, **options)
        if self._result is None:
            raise RuntimeError("the trainer finished without rank 0's result")
        return self._result

    def emit(self, event: dict[str, Any]) -> None:
        """An event from a rank: ``rank`` events update that rank's figures, the rest are the job's."""
        if event.get("kind") == "rank":
            rank = int(event["rank"])
            with self._lock:
                self._ranks.setdefault(rank, {}).update(
                    {k: v for k, v in event.items() if k not in ("kind", "rank", "time")}
                )
            if "worker" in event:  # a rank (re)started: say where, for operators
                self._core.emit(
                    {"kind": "log", "level": "info", "message": f"rank {rank} runs on {event['worker']}"}
                )
            return
        if event.get("kind") == "step" and "loss" in event:
            with self._lock:
                per_rank = {
                    f"worker{rank}_step_seconds": float(figures["step_seconds"])
                    for rank, figures in sorted(self._ranks.items())
                    if "step_seconds" in figures
                }
            event = {**event, "metrics": {**event.get("metrics", {}), **per_rank}}
        self._core.emit(event)

    def set_result(self, result: dict[str, Any]) -> None:
        self._result = result

    def poll(self, since: int, wait: float) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Events from index ``since`` and, once every event is out, how the job ended."""
        with self._lock:
            outcome = self._outcome
        # Read after the outcome: once it is set, every event of the job is already buffered; a job
        # that ends during the wait hands its last events and its outcome to the next poll.
        return self._core.events(since, 0.0 if outcome is not None else wait), outcome

    def ranks(self) -> dict[int, dict[str, Any]]:
        """Each rank's pid, where it runs and its last step time."""
        with self._lock:
            return {rank: dict(figures) for rank, figures in self._ranks.items()}

    def pid(self) -> int:
        return os.getpid()


class TrainAttempt(Attempt):
    """One data-parallel job as the service follows it; it survives the service (``detached``)."""

    #: The service leaves it running when it stops; its next start reattaches.
    detached = True

    def __init__(self, ray: Any, actor: Any, cursor: int = 0) -> None:
        self._ray = ray
        self._actor = actor
        self._cursor = cursor

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        ray = self._ray
        try:
            events, raw = ray.get(
                self._actor.poll.remote(self._cursor, timeout), timeout=timeout + _POLL_SLACK
            )
        except ray.exceptions.GetTimeoutError:
            return [], None
        except ray.exceptions.RayActorError as error:
            return [], Outcome("lost", reason=f"job coordinator lost: {str(error).splitlines()[0][:300]}")
        self._cursor += len(events)
        if raw is None:
            return events, None
        self.kill()
        return events, outcome_of(raw)

    def request_cancel(self) -> None:
        # DDP ranks stop together or hang in a collective: the whole group goes at once.
        self.kill()

    def kill(self) -> None:
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:
            log.debug("kill of a gone coordinator", exc_info=True)

    def ranks(self, timeout: float = 30.0) -> dict[int, dict[str, Any]]:
        """Each rank's pid and host (for operators and fault-injection tests)."""
        value: dict[int, dict[str, Any]] = self._ray.get(self._actor.ranks.remote(), timeout=timeout)
        return value

    def pid(self, timeout: float = 30.0) -> int:
        value: int = self._ray.get(self._actor.pid.remote(), timeout=timeout)
        return value


class DistributedRunner(JobRunner):
    """Jobs of several workers on Ray Train; jobs of one on ``single`` (a Ray actor runner)."""

    def __init__(
        self,
        single: JobRunner,
        *,
        storage_path: str,
        namespace: str = "llmops-training",
        default_cpus: float = 1.0,
        max_failures: int = 2,
        fixed_cluster: bool = False,
    ) -> None:
        import ray  # connected by ``single`` (which connects nothing under ``serve --check``)

        self._ray: Any = ray
        self._single = single
        self._storage_path = storage_path
        self._namespace = namespace
        self._default_cpus = default_cpus
        self._max_failures = max_failures
        self._fixed_cluster = fixed_cluster
        self._actor_class = ray.remote(TrainCoordinator)

    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        if plan.num_workers <= 1:
            return self._single.start(plan, resources)
        name = coordinator_name(plan.job_id)
        stale = self._find(name)
        if stale is not None:  # a previous attempt's coordinator that ended without being collected
            self._ray.kill(stale, no_restart=True)
        actor: Any = self._actor_class.options(
            name=name,
            namespace=self._namespace,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=16,
            max_restarts=0,
        ).remote(name, self._namespace)
        options = {
            "storage_path": self._storage_path,
            "cpus_per_worker": cpus_per_worker(
                resources.cpus,
                self._default_cpus,
                plan.num_workers,
                self._ray.cluster_resources().get("CPU", 0.0) if self._fixed_cluster else 0.0,
                self._fixed_cluster,
            ),
            "gpus_per_worker": resources.gpus,
            "max_failures": self._max_failures,
        }
        actor.start.remote(plan.to_dict(), options)
        return TrainAttempt(self._ray, actor)

    def reattach(self, job_id: str, cursor: int) -> Attempt | None:
        """The running coordinator of ``job_id``, read on from event ``cursor``; None when there is none."""
        actor = self._find(coordinator_name(job_id))
        return None if actor is None else TrainAttempt(self._ray, actor, cursor)

    def reconcile(self, running: set[str]) -> list[str]:
        """Kill coordinators of jobs not in ``running`` (the book ended them, or never had them)."""
        killed = []
        for entry in self._ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            namespace = entry.get("namespace") if isinstance(entry, dict) else self._namespace
            if namespace != self._namespace or not name.startswith(PREFIX):
                continue
            if name.removeprefix(PREFIX) not in running:
                actor = self._find(name)
                if actor is not None:
                    self._ray.kill(actor, no_restart=True)
                    killed.append(name.removeprefix(PREFIX))
        return killed

    def _find(self, name: str) -> Any:
        try:
            return self._ray.get_actor(name, namespace=self._namespace)
        except ValueError:
            return None

    def max_workers(self) -> int:
        return 512

    def accelerator(self) -> tuple[bool, bool]:
        return self._single.accelerator()

    def shutdown(self) -> None:
        """Leaves coordinators running (they outlive the service); releases the single runner."""
        self._single.shutdown()

"""Job bodies in Ray actors: one actor per attempt, placed with the job's resources.

The actor (:class:`WorkerActor`, the same class for every service; the body is its argument) is
threaded (``max_concurrency``): ``run`` runs the body in one thread while ``events`` long-polls and
``cancel`` sets the stop flag from others. The service keeps at most one ``events`` call in flight
per attempt, so an actor still waiting for resources does not pile up calls. When the actor's
process dies (killed, OOM, node lost) ``run`` raises ``RayActorError`` and the attempt ends
``lost``; killing an attempt kills its actor, which frees its CPUs and GPUs at once.

With ``warm``, the runner keeps one spare actor up with the body imported (and the body module's
``preload()`` run, when it has one): a job that asks for CPUs only takes it instead of waiting for a
new process to start and import torch and the training libraries (seconds). The spare holds no CPUs
while it waits (it is created with ``num_cpus=0``); the job's CPUs are reserved by a placement group
that its ``run`` call waits for, so jobs still queue for CPUs as before, and the worker's torch
threads are set to the job's CPUs (Ray would have set them from the actor's ``num_cpus``). A new spare
is started when the previous one is taken; the spare is killed when the runner shuts down.

With no address a local Ray runtime is started (no dashboard, its own temp folder, workers at
niceness 0); with an address (``ray://`` or ``host:port``, or ``auto`` inside a KubeRay pod) the
service joins that cluster. A runtime this module started is shared by every runner of the process
and shut down (its temp folder removed) when the last of them shuts down; one started by someone
else (a test session's) is left alone.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from llmops.common.checking import build_only
from llmops.common.errors import Unavailable
from llmops.common.runners.base import (
    Attempt,
    JobRunner,
    Outcome,
    Resources,
    WorkerCore,
    load_body,
    outcome_of,
)

log = logging.getLogger(__name__)
#: How long to wait for a finished actor's last events before giving up on them.
_DRAIN_SECONDS = 10.0


class WorkerActor:
    """The Ray actor class (wrapped with ``ray.remote`` at start); holds one :class:`WorkerCore`."""

    def __init__(self, body: str, job_id: str = "", preload: bool = False) -> None:
        self._name = f"{body.rpartition(':')[2]}[{job_id}]" if job_id else body
        self._core = WorkerCore(load_body(body))
        if preload:  # a spare: import now what the body imports when it runs
            warm = getattr(importlib.import_module(body.partition(":")[0]), "preload", None)
            if callable(warm):
                warm()

    def __repr__(self) -> str:  # what Ray's logs and state API call the actor
        return self._name

    def ready(self) -> bool:
        return True

    def run(self, plan: dict[str, Any], reserved: Any = None, threads: int = 0) -> dict[str, Any]:
        """Run the body; ``reserved`` (a spare's placement group, resolved by Ray before this call
        runs) and ``threads`` (the job's CPUs: torch's threads) are set when a spare took the job."""
        del reserved  # Ray resolved it: the job's CPUs are reserved
        if threads:
            # Read by torch (and OpenMP, MKL) when first imported; set now too where the spare already
            # imported torch. A body that imports torch only when it runs gets the same count.
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[name] = str(threads)
            torch = sys.modules.get("torch")
            if torch is not None:
                torch.set_num_threads(threads)
        return self._core.run(plan)

    def events(self, since: int, wait: float) -> list[dict[str, Any]]:
        return self._core.events(since, wait)

    def cancel(self) -> None:
        self._core.cancel()

    def pid(self) -> int:
        return os.getpid()


class RayAttempt(Attempt):
    def __init__(
        self, ray: Any, actor: Any, plan: Mapping[str, Any], *, group: Any = None, threads: int = 0
    ) -> None:
        self._ray: Any = ray
        self._actor = actor
        self._group = group  # the placement group holding a spare's CPUs for this job
        reserved = None if group is None else group.ready()
        self._run = actor.run.remote(dict(plan), reserved, threads)
        self._pending: Any = None
        self._cursor = 0

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        ray = self._ray
        if self._pending is None:
            self._pending = self._actor.events.remote(self._cursor, timeout)
        ray.wait([self._pending, self._run], num_returns=1, timeout=timeout + 1.0)
        events = self._take(0.0)
        if not ray.wait([self._run], timeout=0)[0]:
            return events, None
        events += self._take(_DRAIN_SECONDS)
        events += self._take(_DRAIN_SECONDS)  # anything emitted after the in-flight call answered
        try:
            outcome = outcome_of(ray.get(self._run))
        except ray.exceptions.RayActorError as error:
            outcome = Outcome("lost", reason=f"worker lost: {str(error).splitlines()[0][:300]}")
        except ray.exceptions.RayError as error:
            outcome = Outcome("failed", reason=str(error).splitlines()[0][:400])
        self.kill()
        return events, outcome

    def _take(self, wait: float) -> list[dict[str, Any]]:
        """The in-flight ``events`` call's answer if it came within ``wait`` s (and start the next)."""
        ray = self._ray
        if self._pending is None:
            self._pending = self._actor.events.remote(self._cursor, 0.0)
        if not ray.wait([self._pending], timeout=wait)[0]:
            return []
        pending, self._pending = self._pending, None
        try:
            events: list[dict[str, Any]] = ray.get(pending)
        except ray.exceptions.RayError:
            return []
        self._cursor += len(events)
        return events

    def request_cancel(self) -> None:
        try:
            self._actor.cancel.remote()
        except Exception:  # the actor is already gone; the next poll reports it
            log.debug("cancel of a gone actor", exc_info=True)

    def kill(self) -> None:
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:
            log.debug("kill of a gone actor", exc_info=True)
        if self._group is not None:
            group, self._group = self._group, None
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(group)
            except Exception:
                log.debug("removal of a gone placement group", exc_info=True)

    def pid(self, timeout: float = 30.0) -> int:
        """The worker process id (for operators and fault-injection tests)."""
        value: int = self._ray.get(self._actor.pid.remote(), timeout=timeout)
        return value


class _Runtime:
    """The Ray runtime this module connected (a local one it started, or a cluster it joined),
    shared by the runners of the process and released by the last of them."""

    lock = threading.Lock()
    connected = False
    users = 0
    own_temp: str | None = None
    #: Bumped at each connection, so a runner of an earlier one never releases a later one.
    generation = 0


class RayRunner(JobRunner):
    """Starts attempts of ``body`` as Ray actors, on a local runtime or the cluster at ``address``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        body: str,
        default_cpus: float = 1.0,
        temp_dir: str | None = None,
        namespace: str = "llmops",
        warm: bool = False,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise Unavailable(
                "ray is not installed; install llmops[training] or llmops[quantization]"
            ) from None
        self._ray: Any = ray
        self._default_cpus = default_cpus
        self._body = body
        self._generation: int | None = None  # of the runtime this runner holds a share of
        with _Runtime.lock:
            if not ray.is_initialized() and not build_only():  # `serve --check` connects nothing
                _connect(ray, address, temp_dir, namespace)
            if _Runtime.connected:
                _Runtime.users += 1
                self._generation = _Runtime.generation
        self._actor_class = ray.remote(WorkerActor)
        self._warm = warm
        self._spare: Any = None
        self._spare_lock = threading.Lock()
        if warm:
            self._start_spare()

    def _start_spare(self) -> None:
        with self._spare_lock:
            if self._spare is None and self._generation is not None:
                options = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 0}
                self._spare = self._actor_class.options(**options).remote(self._body, "", True)

    def _take_spare_for(self, cpus: float, plan: Mapping[str, Any]) -> RayAttempt | None:
        """The spare, placed on a new placement group of ``cpus`` CPUs; None when there is none ready."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:  # a spare still starting would make the job wait for it: start a fresh actor instead
            ready, _ = self._ray.wait([spare.ready.remote()], timeout=0.05)
        except Exception:
            ready = []
        if not ready:
            with self._spare_lock:
                if self._spare is None:
                    self._spare = spare  # keep it warming for the next job
                    return None
            self._kill_quietly(spare)
            return None
        from ray.util.placement_group import placement_group

        group = placement_group([{"CPU": cpus}])
        return RayAttempt(self._ray, spare, plan, group=group, threads=max(1, int(cpus)))

    def _kill_quietly(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:
            log.debug("kill of a gone actor", exc_info=True)

    def start(self, job_id: str, plan: Mapping[str, Any], resources: Resources) -> RayAttempt:
        cpus = resources.cpus or self._default_cpus
        if self._warm and not (resources.gpus or resources.memory_bytes or resources.accelerator_type):
            attempt = self._take_spare_for(cpus, plan)
            if attempt is not None:
                self._start_spare()
                return attempt
        options: dict[str, Any] = {
            "num_cpus": resources.cpus or self._default_cpus,
            "num_gpus": resources.gpus,
            "max_concurrency": 4,
            "max_restarts": 0,
        }
        if resources.memory_bytes:
            options["memory"] = resources.memory_bytes
        if resources.accelerator_type:
            options["accelerator_type"] = resources.accelerator_type
        actor = self._actor_class.options(**options).remote(self._body, job_id)
        return RayAttempt(self._ray, actor, plan)

    def accelerator(self) -> tuple[bool, bool]:
        gpus = self._ray.cluster_resources().get("GPU", 0)
        return gpus > 0, gpus > 0  # Ampere and newer (what clusters run jobs on) do BF16

    def shutdown(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and self._ray.is_initialized():
            self._kill_quietly(spare)
        with _Runtime.lock:
            if self._generation != _Runtime.generation or not _Runtime.connected:
                return
            self._generation = None
            _Runtime.users -= 1
            if _Runtime.users > 0:
                return
            if self._ray.is_initialized():
                self._ray.shutdown()
            if _Runtime.own_temp is not None:
                shutil.rmtree(_Runtime.own_temp, ignore_errors=True)
            _Runtime.connected, _Runtime.own_temp = False, None


def _connect(ray: Any, address: str | None, temp_dir: str | None, namespace: str) -> None:
    """``ray.init``: join ``address``, or start a local runtime (caller holds the lock)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    options: dict[str, Any] = {"namespace": namespace, "log_to_driver": False, "configure_logging": False}
    own_temp = None
    if address:
        options["address"] = address
    else:
        if temp_dir is None:
            temp_dir = own_temp = tempfile.mkdtemp(prefix="llmops-ray-")
        options.update(
            include_dashboard=False,
            _temp_dir=temp_dir,
            object_store_memory=256 * 1024 * 1024,
            # Ray starts workers at nice 15 by default; here they are the job, not a
            # background chore, and would lose every core to the rest of the host.
            _system_config={"worker_niceness": 0},
        )
    try:
        ray.init(**options)
    except Exception as error:
        if own_temp is not None:
            shutil.rmtree(own_temp, ignore_errors=True)
        raise Unavailable(f"cannot start or reach Ray: {str(error).splitlines()[0]}") from None
    if _Runtime.own_temp is not None:  # a runtime shut down behind our back: its folder goes too
        shutil.rmtree(_Runtime.own_temp, ignore_errors=True)
    _Runtime.connected, _Runtime.users, _Runtime.own_temp = True, 0, own_temp
    _Runtime.generation += 1

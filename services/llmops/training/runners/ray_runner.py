"""Training job bodies in Ray actors: the common :mod:`llmops.common.runners.ray_runner` with
training's body (``llmops.training.worker:train``), plan conversion and namespace."""

from __future__ import annotations

from llmops.common.runners import ray_runner
from llmops.common.runners.ray_runner import RayAttempt, WorkerActor
from llmops.training.runners.base import DEFAULT_BODY, PlanRunner

__all__ = ["RayAttempt", "RayRunner", "WorkerActor"]


class RayRunner(PlanRunner):
    """Starts training attempts as Ray actors, on a local runtime or the cluster at ``address``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        default_cpus: float = 1.0,
        body: str = DEFAULT_BODY,
        temp_dir: str | None = None,
        namespace: str = "llmops-training",
        warm: bool = False,
    ) -> None:
        super().__init__(
            ray_runner.RayRunner(
                address,
                body=body,
                default_cpus=default_cpus,
                temp_dir=temp_dir,
                namespace=namespace,
                warm=warm,
            )
        )

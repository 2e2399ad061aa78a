"""Where job bodies run, for every service with long jobs (training, quantization).

A service hands a runner a job's plan (a plain JSON-able dict), its id and the resources it asks
for; the runner starts an :class:`~llmops.common.runners.base.Attempt` that runs the service's job
body (``"package.module:function"``, called as ``body(plan, emit, stop)``) in a Ray actor
(:mod:`~llmops.common.runners.ray_runner`) or a thread (:mod:`~llmops.common.runners.local`).
"""

from llmops.common.runners.base import (
    Attempt,
    Body,
    CancelDeadline,
    Cancelled,
    Emit,
    JobRunner,
    Outcome,
    Resources,
    WorkerCore,
    worker_name,
)

__all__ = [
    "Attempt",
    "Body",
    "CancelDeadline",
    "Cancelled",
    "Emit",
    "JobRunner",
    "Outcome",
    "Resources",
    "WorkerCore",
    "worker_name",
]

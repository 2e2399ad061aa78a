"""Where training job bodies run: the shared runners of :mod:`llmops.common.runners`, over WorkerPlans.

:class:`~llmops.training.runners.base.JobRunner` is training's view of a runner (it starts a
:class:`~llmops.training.domain.WorkerPlan`); ``ray_runner.RayRunner`` and ``local.ThreadRunner``
are the common runners with training's body and plan conversion.
"""

from llmops.training.runners.base import Attempt, JobRunner, Outcome, PlanRunner, WorkerCore

__all__ = ["Attempt", "JobRunner", "Outcome", "PlanRunner", "WorkerCore"]

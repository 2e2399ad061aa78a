"""Where job bodies run: :class:`~llmops.training.runners.base.JobRunner` and its implementations."""

from llmops.training.runners.base import Attempt, JobRunner, Outcome, WorkerCore

__all__ = ["Attempt", "JobRunner", "Outcome", "WorkerCore"]

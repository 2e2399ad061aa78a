"""Training job bodies on threads of the service process: for unit tests and development.

The common :class:`llmops.common.runners.local.ThreadRunner` with training's plan conversion; see
there for what a thread can and cannot do.
"""

from __future__ import annotations

from typing import cast

from llmops.common.runners import local
from llmops.common.runners.local import ThreadAttempt
from llmops.training.runners.base import DEFAULT_BODY, Body, PlanRunner, load_body, typed_body

__all__ = ["ThreadAttempt", "ThreadRunner"]


class ThreadRunner(PlanRunner):
    def __init__(self, body: Body | str = DEFAULT_BODY) -> None:
        function = cast(Body, load_body(body)) if isinstance(body, str) else body  # takes a WorkerPlan
        super().__init__(local.ThreadRunner(typed_body(function)))

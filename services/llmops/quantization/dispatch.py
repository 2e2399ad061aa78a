"""Who runs the supervisors of queued jobs, and so how many quantization jobs run at once."""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class Dispatcher(abc.ABC):
    """Runs the supervisors of queued jobs, so it decides when each starts and how many run at once."""

    @abc.abstractmethod
    def submit(self, work: Callable[[], None]) -> None:
        """Start ``work`` eventually; must not block on it."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop accepting work and wait for running work to end."""


class ThreadDispatcher(Dispatcher):
    """A bounded local thread pool: ``max_workers`` jobs run at once, the rest wait QUEUED."""

    def __init__(self, max_workers: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="quantize")

    def submit(self, work: Callable[[], None]) -> None:
        self._pool.submit(work)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

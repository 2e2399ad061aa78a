"""A process's access control: its API keys and its tenants' rate limiter, one of each.

Every API the process serves (the gRPC runtime, serving's OpenAI HTTP API) checks callers with the
same :class:`~llmops.common.auth.Authenticator` and charges the same
:class:`~llmops.common.ratelimit.RateLimiter`, so the keys file is read, and Redis dialled, once.
Whoever builds an :class:`Access` closes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmops.common.auth import Authenticator
from llmops.common.ratelimit import RateLimiter, limiter_from_settings
from llmops.common.settings import Settings


@dataclass(frozen=True)
class Access:
    """Who may call (API keys; none: an open platform) and how much (``None``: no shared limits)."""

    authenticator: Authenticator
    limiter: RateLimiter | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        """Keys from ``api_keys_file``; with keys, the tenants' budgets in the Redis at ``redis_url``."""
        authenticator = Authenticator(settings.api_keys_file)
        return cls(authenticator, limiter_from_settings(settings) if authenticator.enabled else None)

    async def close(self) -> None:
        """Close the limiter's Redis client."""
        if self.limiter is not None:
            await self.limiter.close()

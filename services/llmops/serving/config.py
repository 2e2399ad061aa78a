"""How the serving service treats requests and models, and how it builds an engine for a folder.

Read by the model lifecycle (:mod:`llmops.serving.lifecycle`) and the generation path
(:mod:`llmops.serving.service`) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmops.serving.domain import EngineKind, EngineOptions
from llmops.serving.engines.base import Engine
from llmops.serving.validation import Limits

#: Builds an engine for a model folder: (kind, folder, served name, options) -> engine (not started).
EngineFactory = Callable[[EngineKind, Path, str, EngineOptions], Engine]


@dataclass(frozen=True)
class ServingConfig:
    """How the service treats requests and models."""

    default_engine: EngineKind = EngineKind.VLLM
    max_waiting: int = 256
    limits: Limits = field(default_factory=Limits)
    drain_timeout: float = 30.0
    alias_poll_seconds: float = 30.0
    #: A replacing load frees the old model before loading the new one (for models that do not fit
    #: twice on the pod's GPUs); the name answers UNAVAILABLE meanwhile.
    replace_unloads_first: bool = False
    #: The serving pool this replica belongs to: the pool loop (llmops.serving.pool) decides its
    #: version, so follow_alias is refused and a request for the pool's alias is served without a lookup.
    pool: str | None = None

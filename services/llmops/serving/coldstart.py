"""Where a model's cold start spends its time: ``llmops_serving_cold_start_seconds{model,phase}``.

Every load observes each phase once (names in :data:`llmops.common.metric_names.COLD_START_PHASES`):

* ``resolve``: the load request to a local folder: the registry lookup, download and sha256 check
  (near 0 for a folder on the server or a version already in the cache);
* ``weights``: the engine reading the weights. transformers: ``from_pretrained`` and the move to the
  device; vLLM: the figure its EngineCore logs ("Loading weights took ..."). An engine that cannot
  tell reports 0 and its whole start counts as ``engine_start``;
* ``engine_start``: the rest of the engine's start. vLLM: the EngineCore process, memory profiling,
  KV cache allocation, compilation and warm-up; transformers: the tokenizer;
* ``first_token``: the first request on the fresh engine, from its arrival at serving to its first
  token: what a first batch still pays lazily (kernels picked, caches filled). It is observed when
  that request comes. No warm-up generation is made at load: it would be counted by vLLM's own
  request metrics as traffic, and a replica scaled up from zero has its first request waiting anyway
  (held by the router, see ``llmops_router_hold_seconds``).

A load logs one line when the model is READY (the first three phases) and one at its first token
(with the total). A failed load observes nothing.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Histogram

log = logging.getLogger(__name__)


class ColdStart:
    """The phases of one model load, observed once it is READY (and at its first token).

    Args:
        histogram: ``llmops_serving_cold_start_seconds`` (labels ``model``, ``phase``).
        served_name: the model's ``model`` label.
    """

    def __init__(self, histogram: Histogram, served_name: str) -> None:
        self._histogram = histogram
        self.served_name = served_name
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._first_token_seen = False

    def resolved(self) -> None:
        """The artifact is local now (ends the ``resolve`` phase)."""
        self.phases["resolve"] = time.perf_counter() - self.started

    def engine_started(self, seconds: float, engine_phases: dict[str, float]) -> None:
        """The engine's start took ``seconds``; ``engine_phases`` may split off its ``weights``."""
        weights = max(0.0, float(engine_phases.get("weights", 0.0)))
        self.phases["weights"] = weights
        self.phases["engine_start"] = max(0.0, float(engine_phases.get("engine_start", seconds - weights)))

    def ready(self, engine: str) -> None:
        """The model is READY: observe resolve, weights and engine start, and log them."""
        for phase in ("resolve", "weights", "engine_start"):
            self._histogram.labels(self.served_name, phase).observe(self.phases.get(phase, 0.0))
        log.info(
            "cold start of %s on %s: resolve %.3f s, weights %.3f s, engine start %.3f s "
            "(first token on its first request)",
            self.served_name,
            engine,
            self.phases.get("resolve", 0.0),
            self.phases.get("weights", 0.0),
            self.phases.get("engine_start", 0.0),
        )

    def first_token(self, seconds: float) -> None:
        """The first request's time to first token on this load (later calls are ignored)."""
        if self._first_token_seen:
            return
        self._first_token_seen = True
        self.phases["first_token"] = seconds
        self._histogram.labels(self.served_name, "first_token").observe(seconds)
        log.info(
            "cold start of %s: first token %.3f s after its request came; phases total %.3f s",
            self.served_name,
            seconds,
            sum(self.phases.values()),
        )

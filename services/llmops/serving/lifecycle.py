"""Loading, replacing, following, unloading models, and their LoRA adapters.

Invariants: a served name maps to at most one model; a model answers requests only when READY; a
``replace`` load keeps the old model serving until the new one is READY, then swaps and drains the
old one; a failed load is listed as FAILED (with the engine's error) until unloaded or loaded again;
a model loaded with ``follow_alias`` is reloaded when its alias moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from llmops.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LLMOpsError, NotFound
from llmops.serving.coldstart import ColdStart
from llmops.serving.config import EngineFactory, ServingConfig
from llmops.serving.domain import (
    LoadedAdapter,
    LoadRequest,
    ModelInfo,
    ModelSelector,
    ModelSource,
    ModelState,
    UnloadResult,
)
from llmops.serving.engines.base import Engine
from llmops.serving.load import ModelLoad, model_load
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics, update_shim_gauges
from llmops.serving.models import Admission, ServedModel, new_entry
from llmops.serving.resolver import ModelResolver
from llmops.serving.validation import check_served_name

log = logging.getLogger(__name__)


def default_served_name(source: ModelSource) -> str:
    """The registry model name, or the folder's base name."""
    if source.model_ref is not None:
        return source.model_ref.name
    return Path(source.local_path or "model").name


class ModelLifecycle:
    """The model table and everything that changes it."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        resolver: ModelResolver,
        metrics: ServingMetrics,
        shim: EngineShimMetrics,
        config: ServingConfig,
    ) -> None:
        self._factory = engine_factory
        self._resolver = resolver
        self.metrics = metrics
        self.shim = shim
        self.config = config
        self._models: dict[str, ServedModel] = {}

    def list_models(self) -> list[ModelInfo]:
        """Models loaded or loading, sorted by served name."""
        return [self._models[name].snapshot() for name in sorted(self._models)]

    def engine_of(self, served_name: str) -> Engine | None:
        """The engine behind a served name (None when absent or not started)."""
        entry = self._models.get(served_name)
        return entry.engine if entry is not None else None

    def waiting(self, served_name: str) -> int:
        """Requests queued for a model now."""
        entry = self._models.get(served_name)
        return entry.admission.waiting if entry is not None and entry.admission is not None else 0

    def loads(self) -> list[ModelLoad]:
        """Each model's load now, sorted by served name (WatchLoad)."""
        return [model_load(self._models[name]) for name in sorted(self._models)]

    def refresh_engine_gauges(self) -> None:
        """Update the ``vllm:*`` gauges of engines that do not publish their own (before a scrape)."""
        for name, entry in list(self._models.items()):
            if entry.engine is not None and not entry.engine.exports_engine_metrics:
                waiting = entry.admission.waiting if entry.admission is not None else 0
                update_shim_gauges(self.shim, name, waiting, entry.engine.stats())

    # --- load -------------------------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> ModelInfo:
        """Load (or replace) a model; returns it READY, or LOADING with ``no_wait``."""
        source = request.source
        if (source.model_ref is None) == (source.local_path is None):
            raise InvalidArgument("exactly one of model_ref or local_path must be set", field="source")
        if request.follow_alias and (source.model_ref is None or source.model_ref.alias is None):
            raise InvalidArgument("needs a model_ref that names an alias", field="follow_alias")
        if request.follow_alias and self.config.pool:
            raise FailedPrecondition(
                f"this replica is in pool {self.config.pool!r}, which decides its version: no follow_alias"
            )
        served_name = check_served_name(request.served_name or default_served_name(source))
        existing = self._models.get(served_name)
        if existing is not None and existing.state is not ModelState.FAILED and not request.replace:
            raise AlreadyExists(f"a model is already served as {served_name!r} (set replace to swap it)")
        if (
            existing is not None
            and existing.state is not ModelState.FAILED
            and self.config.replace_unloads_first
        ):
            # one copy fits (e.g. a 70B model on the pod's GPUs): free it before loading the next
            await self._retire(existing, self.config.drain_timeout)
            if self._models.get(served_name) is existing:
                del self._models[served_name]
            existing = None
        kind = request.engine or self.config.default_engine
        cold_start = ColdStart(self.metrics.cold_start, served_name)
        resolved = await self._resolver.resolve(source)
        cold_start.resolved()
        engine = self._factory(kind, resolved.path, served_name, request.options)
        engine.check_options(request.options)
        entry = new_entry(
            served_name,
            engine,
            request.options,
            local_path=str(resolved.path) if source.local_path is not None else "",
            model=resolved.model,
            model_format=resolved.format,
            follow_alias=request.follow_alias,
        )
        entry.cold_start = cold_start
        entry.weights_path = resolved.path
        if existing is None or existing.state is ModelState.FAILED:
            self._models[served_name] = entry  # listed as LOADING meanwhile
        if request.no_wait:
            entry.load_task = asyncio.create_task(
                self._start_quietly(entry, request), name=f"load-{served_name}"
            )
            return entry.snapshot()
        await self._start(entry, request)
        return entry.snapshot()

    async def _start_quietly(self, entry: ServedModel, request: LoadRequest) -> None:
        with contextlib.suppress(LLMOpsError):
            await self._start(entry, request)

    async def _start(self, entry: ServedModel, request: LoadRequest) -> None:
        engine = entry.engine
        assert engine is not None
        name = entry.served_name
        log.info("loading %s into %s from %s", name, engine.kind.value, engine.model_path)
        started = time.perf_counter()
        try:
            await engine.start()
        except BaseException as exc:
            message = exc.message if isinstance(exc, LLMOpsError) else f"{type(exc).__name__}: {exc}"
            entry.set_state(ModelState.FAILED, message)
            log.warning("loading %s failed: %s", name, message)
            with contextlib.suppress(Exception):
                await engine.shutdown()
            if isinstance(exc, LLMOpsError | asyncio.CancelledError):
                raise
            raise FailedPrecondition(f"loading {name} failed: {message}") from exc
        if entry.cold_start is not None:
            entry.cold_start.engine_started(time.perf_counter() - started, engine.load_phases)
            entry.cold_start.ready(engine.kind.value)
        entry.admission = Admission(engine.max_concurrency, self.config.max_waiting)
        entry.set_state(ModelState.READY)
        old = self._models.get(name)
        self._models[name] = entry
        if old is not None and old is not entry:
            await self._retire(old, self.config.drain_timeout)
        self.metrics.model_loaded.labels(name, engine.kind.value).set(1)
        if request.follow_alias:
            entry.watch_task = asyncio.create_task(self._follow(entry, request), name=f"follow-{name}")
        log.info("%s is ready (context %d tokens)", name, engine.max_model_len)

    async def _follow(self, entry: ServedModel, request: LoadRequest) -> None:
        ref = request.source.model_ref
        assert ref is not None and entry.info.model is not None
        while True:
            await asyncio.sleep(self.config.alias_poll_seconds)
            try:
                now = await self._resolver.resolve_ref(ref)
                if now.version != entry.info.model.version:
                    log.info("%s moved to version %d: reloading %s", ref, now.version, entry.served_name)
                    await self.load(replace(request, replace=True, no_wait=False))
                    return
            except LLMOpsError as exc:
                log.warning("following %s: %s", ref, exc.message)

    # --- unload -----------------------------------------------------------------------------------

    def _find(self, selector: ModelSelector) -> ServedModel:
        if selector.served_name is not None:
            entry = self._models.get(selector.served_name)
        elif selector.model_ref is not None:
            ref = selector.model_ref
            entry = next(
                (
                    e
                    for e in self._models.values()
                    if e.info.model is not None
                    and e.info.model.name == ref.name
                    and (ref.version is None or e.info.model.version == ref.version)
                    and (ref.alias is None or e.info.model.alias == ref.alias)
                ),
                None,
            )
        else:
            raise InvalidArgument("name the model: served_name or model_ref", field="model")
        if entry is None:
            raise NotFound("no such model is loaded on this server")
        return entry

    async def unload(self, selector: ModelSelector, drain_timeout: float | None) -> UnloadResult:
        """Stop serving a model: drain, abort the rest, free the engine."""
        entry = self._find(selector)
        aborted = await self._retire(
            entry, self.config.drain_timeout if drain_timeout is None else drain_timeout
        )
        if self._models.get(entry.served_name) is entry:
            del self._models[entry.served_name]
        return UnloadResult(entry.served_name, aborted)

    async def _retire(self, entry: ServedModel, drain_timeout: float) -> int:
        name = entry.served_name
        entry.set_state(ModelState.UNLOADING, entry.info.error_message)
        for task in (entry.load_task, entry.watch_task):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        aborted = await entry.drain(drain_timeout)
        if entry.engine is not None:
            try:
                await entry.engine.shutdown()
            except Exception:
                log.warning("shutting down the engine of %s failed", name, exc_info=True)
        if self._models.get(name) in (None, entry):
            with contextlib.suppress(KeyError):
                self.metrics.model_loaded.remove(name, entry.info.engine.value)
            self.shim.forget(name)
        if entry.weights_path is not None:
            self._resolver.release(entry.weights_path)  # its node-cache entry may be evicted now
            entry.weights_path = None
        log.info("unloaded %s (%d requests aborted)", name, aborted)
        return aborted

    async def close(self) -> None:
        """Unload everything at once (the server has already drained its calls)."""
        for entry in list(self._models.values()):
            await self._retire(entry, 0.0)
        self._models.clear()
        await self._resolver.close()

    # --- adapters ---------------------------------------------------------------------------------

    async def add_adapter(
        self, entry: ServedModel, source: ModelSource, name: str, replace: bool
    ) -> LoadedAdapter:
        """Load a LoRA adapter onto a READY model."""
        if (source.model_ref is None) == (source.local_path is None):
            raise InvalidArgument("exactly one of adapter_ref or local_path must be set", field="source")
        name = check_served_name(name or default_served_name(source), "adapter_name")
        if name in entry.adapters and not replace:
            raise AlreadyExists(f"adapter {name!r} is already loaded on {entry.served_name} (set replace)")
        resolved = await self._resolver.resolve(source, adapter=True)
        base = resolved.adapter_base
        model = entry.info.model
        if (
            base is not None
            and model is not None
            and (base.name != model.name or (base.version is not None and base.version != model.version))
        ):
            raise FailedPrecondition(f"adapter was trained on {base}, but {entry.served_name} serves {model}")
        engine = entry.engine
        assert engine is not None
        if name in entry.adapters:
            await engine.unload_adapter(name)
        info = await engine.load_adapter(name, resolved.path)
        adapter = LoadedAdapter(
            name=name,
            local_path=str(resolved.path) if source.local_path is not None else "",
            rank=info.rank,
            loaded_at=datetime.now(UTC),
            adapter=resolved.model,
        )
        entry.adapters[name] = adapter
        return adapter

    async def remove_adapter(self, entry: ServedModel, name: str) -> ModelInfo:
        """Remove a LoRA adapter from a model."""
        if name not in entry.adapters:
            raise NotFound(f"adapter {name!r} is not loaded on {entry.served_name}")
        engine = entry.engine
        assert engine is not None
        await engine.unload_adapter(name)
        del entry.adapters[name]
        return entry.snapshot()

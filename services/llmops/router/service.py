"""The router's logic: pick a replica per request, forward the call, retry, hold, count.

Requests and answers stay serving protos end to end: the router reads the few fields it routes on
(model, prompt) and forwards the message untouched, so it adds no decode/encode of a domain form to
the hot path. Flow of one generation:

1. the route: policy from the policy header (else the session header's presence, else settings),
   prompt block hashes for prefix affinity; a bad header is INVALID_ARGUMENT;
2. candidates: ready replicas with the model READY; none -> the request is held (counted in
   ``llmops_router_pending_requests{model}``) until one appears or its deadline passes
   (DEADLINE_EXCEEDED), or ``max_hold_seconds`` without a deadline (UNAVAILABLE);
3. the policy picks one;
4. the response cache in front (when configured, :mod:`llmops.router.cached`): a deterministic
   request already answered on the chosen replica's version is served without touching a replica;
5. the call goes there with the caller's API key and remaining deadline;
6. a replica that fails before its first answer (UNAVAILABLE: dead, unreachable, draining;
   RESOURCE_EXHAUSTED: its queue is full) is left for another, up to ``max_attempts``; once a
   stream has delivered a message, a replica failure ends it with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from llmops.common.clients import API_KEY_METADATA, TrafficSplit, translate
from llmops.common.domain import ResolvedModel
from llmops.common.errors import DeadlineExceeded, InvalidArgument, LLMOpsError, Unavailable
from llmops.common.settings import RouterSection
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.router.cached import FrontCache, request_key
from llmops.router.endpoints import Endpoint, EndpointPool, ModelSlot
from llmops.router.metrics import RouterMetrics
from llmops.router.policy import Candidate, Decision, Policies, Policy, prompt_blocks, token_blocks
from llmops.router.slis import VersionSlis
from llmops.router.split import AliasSplitter

Metadata = Sequence[tuple[str, Any]]
SESSION_PATTERN = re.compile(r"^[A-Za-z0-9._:@/=+-]{1,128}$")
# UNAVAILABLE: dead, unreachable or draining; RESOURCE_EXHAUSTED: its queue is full; NOT_FOUND: its
# model was unloaded a moment ago (before its next load report said so)
_RETRY_ELSEWHERE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
)
_REPLICA_BROKE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
_FORWARDED = frozenset({API_KEY_METADATA, "authorization"})


@dataclass(slots=True)
class Route:
    """What a request is routed on."""

    model: str  # the selector as text: served name, or name@alias / name:version
    selector: pb.ModelSelector
    policy: Policy
    session: str
    blocks: list[int]
    metadata: tuple[tuple[str, str], ...]  # forwarded to the replica
    deadline: float | None  # monotonic
    version: int = 0  # the version a name@alias selector points at now, by the registry (0: unknown)


class RouterStats:
    """Counters GetStats reports (Prometheus has the same, labelled)."""

    def __init__(self) -> None:
        self.since = time.time()
        self.decisions: dict[Policy, int] = dict.fromkeys(Policy, 0)
        self.outcomes: dict[str, int] = {"prefix_hit": 0, "prefix_miss": 0, "spill": 0}
        self.retries = 0
        self.held = 0
        self.pending = 0
        self.cache_hits = 0
        self.versions: dict[ResolvedModel, int] = {}
        self.decision_seconds: deque[float] = deque(maxlen=10_000)

    def decision_quantile(self, q: float) -> float:
        values = sorted(self.decision_seconds)
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def selector_text(selector: pb.ModelSelector) -> str:
    which = selector.WhichOneof("kind")
    if which == "served_name":
        return selector.served_name
    if which == "model_ref":
        ref = selector.model_ref
        if ref.alias:
            return f"{ref.name}@{ref.alias}"
        return f"{ref.name}:{ref.version}" if ref.version else ref.name
    raise InvalidArgument("a model (served_name or model_ref) is required", field="model")


def prompt_text(prompt: Any) -> str | None:
    """The prompt as characters for prefix hashing (None for a token prompt)."""
    which = prompt.WhichOneof("kind")
    if which == "text":
        return str(prompt.text)
    if which == "chat":
        # role and content of each message in order: the chat template renders them in this order
        return "".join(f"\x1e{m.role}\x1f{m.content}" for m in prompt.chat.messages)
    return None


class Router:
    """Routes serving calls over an :class:`EndpointPool`."""

    def __init__(
        self,
        pool: EndpointPool,
        settings: RouterSection,
        metrics: RouterMetrics,
        *,
        front: FrontCache | None = None,
        splitter: AliasSplitter | None = None,
        seed: int | None = None,
    ) -> None:
        self.pool = pool
        self.front = front
        self.splitter = splitter
        self.settings = settings
        self.metrics = metrics
        self.policy = Policy(settings.policy)
        self.policies = Policies(
            saturation_waiting=settings.saturation_waiting, table_size=settings.prefix_table_size, seed=seed
        )
        self.stats = RouterStats()
        # per-version TTFT, inter-token latency and outcomes: what rollouts are judged on
        self.slis = VersionSlis(metrics.ttft, metrics.inter_token)
        self._policy_header = settings.policy_header.lower()
        self._session_header = settings.session_header.lower()

    # --- the route ---------------------------------------------------------------------------------

    def route(self, request: Any, metadata: Metadata, timeout: float | None) -> Route:
        """Parse what ``request`` is routed on; bad routing headers are INVALID_ARGUMENT."""
        policy_text = session = ""
        forwarded: list[tuple[str, str]] = []
        for key, value in metadata:
            if key == self._policy_header:
                policy_text = str(value)
            elif key == self._session_header:
                session = str(value)
            elif key in _FORWARDED:
                forwarded.append((key, str(value)))
        if policy_text:
            policy = Policy.parse(policy_text, self._policy_header)
        else:
            policy = Policy.SESSION_AFFINITY if session else self.policy
        if session and not SESSION_PATTERN.match(session):
            raise InvalidArgument(
                "a session id is 1-128 characters from [A-Za-z0-9._:@/=+-]", field=self._session_header
            )
        if policy is Policy.SESSION_AFFINITY and not session:
            raise InvalidArgument(
                f"session affinity needs a session id in {self._session_header}", field=self._session_header
            )
        blocks: list[int] = []
        if (
            policy is Policy.PREFIX_AFFINITY
            and "prompt" in request.DESCRIPTOR.fields_by_name
            and request.HasField("prompt")
        ):
            text = prompt_text(request.prompt)
            s = self.settings
            if text is not None:
                blocks = prompt_blocks(text, s.prefix_block_chars, s.prefix_max_blocks)
            else:
                tokens = request.prompt.tokens.token_ids
                blocks = token_blocks(tokens, max(1, s.prefix_block_chars // 4), s.prefix_max_blocks)
        deadline = None if timeout is None else time.monotonic() + timeout
        return Route(
            selector_text(request.model), request.model, policy, session, blocks, tuple(forwarded), deadline
        )

    # --- picking -----------------------------------------------------------------------------------

    def candidates(self, selector: pb.ModelSelector, exclude: set[str], version: int = 0) -> list[Candidate]:
        """Ready replicas serving ``selector``; a name@alias with its ``version`` known goes to every
        replica serving that version (whatever alias or pool loaded it: the challenger pool takes a
        moved champion's traffic while the champion pool rolls), else to those that loaded the alias."""
        which = selector.WhichOneof("kind")
        if version and which == "model_ref" and selector.model_ref.alias:
            ref = selector.model_ref
            by_version = [
                (endpoint, slot)
                for endpoint in self.pool.ready
                if endpoint.address not in exclude
                for slot in endpoint.by_name.get(ref.name, ())
                if slot.ready and slot.model is not None and slot.model.version == version
            ]
            if by_version:
                return by_version
        found: list[Candidate] = []
        for endpoint in self.pool.ready:
            if endpoint.address in exclude:
                continue
            if which == "served_name":
                slot = endpoint.slot(selector.served_name)
                if slot is not None:
                    found.append((endpoint, slot))
                continue
            ref = selector.model_ref
            for slot in endpoint.by_name.get(ref.name, ()):
                if (
                    slot.ready
                    and slot.model is not None
                    and (not ref.version or slot.model.version == ref.version)
                ) and (not ref.alias or slot.model.alias in ("", ref.alias)):
                    found.append((endpoint, slot))
                    break
        return found

    async def pick(self, route: Route, exclude: set[str]) -> Decision:
        """A replica for ``route``, holding the request while there is none."""
        started = time.perf_counter()
        if not route.version and self.splitter is not None and route.selector.model_ref.alias:
            route.version = await self._alias_version(route.selector.model_ref)
            started = time.perf_counter()
        candidates = self.candidates(route.selector, exclude, route.version)
        if not candidates:
            candidates = await self._hold(route, exclude)
            started = time.perf_counter()
        if self.splitter is not None and candidates[0][1].model is not None:
            ref = route.selector.model_ref if route.selector.WhichOneof("kind") == "model_ref" else None
            if ref is None or not (ref.alias or ref.version):  # a pinned alias or version is not split
                split = await self.splitter.split(candidates[0][1].model.name)
                if split is not None:
                    started = time.perf_counter()
                    candidates = self._split(split, route, candidates)
        decision = self.policies.choose(route.policy, candidates, route.blocks, route.session)
        elapsed = time.perf_counter() - started
        stats = self.stats
        stats.decision_seconds.append(elapsed)
        stats.decisions[decision.policy] += 1
        if decision.outcome != "chosen":
            stats.outcomes[decision.outcome] += 1
        self.metrics.decision_seconds.observe(elapsed)
        self.metrics.decisions.labels(decision.policy.value, decision.outcome).inc()
        return decision

    async def _alias_version(self, ref: Any) -> int:
        """The version an alias points at, as the splitter's cached registry read says (0: unknown)."""
        assert self.splitter is not None
        split = await self.splitter.split(ref.name)
        return split.versions.get(ref.alias, 0) if split is not None else 0

    def _split(self, split: TrafficSplit, route: Route, candidates: list[Candidate]) -> list[Candidate]:
        assert self.splitter is not None
        chosen = self.splitter.choose(split, route.session)
        if chosen is None:
            return candidates
        _, version = chosen
        narrowed = [c for c in candidates if c[1].model is not None and c[1].model.version == version]
        return narrowed or candidates  # no replica of the drawn version: serve from what there is

    async def _hold(self, route: Route, exclude: set[str]) -> list[Candidate]:
        if exclude and self.candidates(route.selector, set()):
            raise Unavailable(f"every ready replica of {route.model} failed this request")
        limit = time.monotonic() + self.settings.max_hold_seconds
        # A held request gives up a little before the caller's deadline (a tenth of what is left, at
        # most 0.25 s), so the caller hears the router's reason, counted in its metrics, rather than
        # its own timer racing the router's.
        until = limit
        if route.deadline is not None:
            until = min(route.deadline - min(0.25, 0.1 * max(0.0, route.deadline - time.monotonic())), limit)
        self.stats.held += 1
        self.stats.pending += 1
        pending = self.metrics.pending.labels(route.model)
        pending.inc()
        held_from = time.monotonic()
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    if route.deadline is not None and route.deadline <= limit:
                        raise DeadlineExceeded(
                            f"no replica of {route.model} became ready before the deadline"
                        )
                    raise Unavailable(
                        f"no replica of {route.model} became ready in {self.settings.max_hold_seconds:g}s"
                    )
                await self.pool.wait_change(left)
                candidates = self.candidates(route.selector, exclude, route.version)
                if candidates:
                    return candidates
        finally:
            pending.dec()
            self.stats.pending -= 1
            self.metrics.hold_seconds.labels(route.model).observe(time.monotonic() - held_from)

    def _timeout(self, route: Route) -> float | None:
        if route.deadline is None:
            return None
        left = route.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the deadline passed before a replica answered")
        return left

    def answered(self, route: Route, model: ResolvedModel | None, code: str) -> None:
        version = f"{model.name}:{model.version}" if model is not None else ""
        self.metrics.requests.labels(route.model, version, code).inc()
        if model is not None:
            self.stats.versions[model] = self.stats.versions.get(model, 0) + 1

    def begin(self, endpoint: Endpoint) -> None:
        endpoint.in_flight += 1
        endpoint.requests += 1
        self.metrics.endpoint_in_flight.labels(endpoint.address).set(endpoint.in_flight)

    def end(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.metrics.endpoint_in_flight.labels(endpoint.address).set(endpoint.in_flight)

    def _failed(self, route: Route, endpoint: Endpoint, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            self.pool.mark_failed(endpoint)
        self.stats.retries += 1
        self.metrics.retries.labels(route.model).inc()

    # --- calls -------------------------------------------------------------------------------------

    async def _first(self, route: Route, *, counted: bool) -> Decision:
        """The first replica; a generation that finds none (held past its deadline) is counted too."""
        try:
            return await self.pick(route, set())
        except LLMOpsError as exc:
            if counted:
                self.answered(route, None, exc.code.name)
            raise

    async def unary(self, method: str, request: Any, route: Route) -> Any:
        """Forward a unary call (Generate, Tokenize, Detokenize, Embed); Generate meets the cache first."""
        first = await self._first(route, counted=method == "Generate")
        if method == "Generate" and self.front is not None:
            model = first.slot.model
            key = request_key(request, model)
            if key is not None and model is not None:
                response = await self.front.generate(
                    request,
                    key,
                    first.slot.served_name,
                    model,
                    lambda: self._forward(method, request, route, first),
                    None if route.deadline is None else route.deadline - time.monotonic(),
                )
                if response.cached:
                    self.stats.cache_hits += 1
                    self.answered(route, model, "OK")
                return response
        return await self._forward(method, request, route, first)

    async def _forward(self, method: str, request: Any, route: Route, first: Decision) -> Any:
        """The call on ``first``'s replica, then on others while replicas fail before answering."""
        tried: set[str] = set()
        for attempt in range(1, self.settings.max_attempts + 1):
            decision = first if attempt == 1 else await self.pick(route, tried)
            endpoint = decision.endpoint
            self.begin(endpoint)
            try:
                response = await getattr(endpoint.connect()[1], method)(
                    request, timeout=self._timeout(route), metadata=route.metadata
                )
            except grpc.aio.AioRpcError as exc:
                if method == "Generate":
                    self.slis.outcome(decision.slot.model, exc.code().name)
                if exc.code() in _RETRY_ELSEWHERE and attempt < self.settings.max_attempts:
                    tried.add(endpoint.address)
                    self._failed(route, endpoint, exc)
                    continue
                if method == "Generate":
                    self.answered(route, None, exc.code().name)
                raise translate(exc) from None
            finally:
                self.end(endpoint)
            if method == "Generate":
                answered = response.model if response.HasField("model") else None
                model = ResolvedModel(answered.name, answered.version, answered.alias) if answered else None
                self.answered(route, model or decision.slot.model, "OK")
                self.slis.outcome(model or decision.slot.model, "OK")
            return response
        raise Unavailable(f"no replica of {route.model} answered")  # pragma: no cover - loop returns

    async def stream(self, request: pb.GenerateStreamRequest, route: Route) -> AsyncIterator[Any]:
        """Forward GenerateStream: retried elsewhere before the first message, UNAVAILABLE after."""
        first = await self._first(route, counted=True)
        model = first.slot.model
        key = request_key(request, model) if self.front is not None else None
        if key is not None and model is not None and self.front is not None:
            replayed = await self.front.replay(request, key, first.slot.served_name, model)
            if replayed is not None:
                self.stats.cache_hits += 1
                self.answered(route, model, "OK")
                for message in replayed:
                    yield message
                return
        tried: set[str] = set()
        for attempt in range(1, self.settings.max_attempts + 1):
            decision = first if attempt == 1 else await self.pick(route, tried)
            endpoint = decision.endpoint
            self.begin(endpoint)
            call = endpoint.connect()[1].GenerateStream(
                request, timeout=self._timeout(route), metadata=route.metadata
            )
            started = False
            sent_at = last = time.monotonic()
            try:
                async for message in call:
                    if message.HasField("delta"):
                        now = time.monotonic()
                        if not started:
                            self.slis.first_token(decision.slot.model, now - sent_at)
                        else:
                            self.slis.inter_token(
                                decision.slot.model, now - last, len(message.delta.token_ids) or 1
                            )
                        last = now
                    started = True
                    if message.HasField("end"):
                        end = message.end
                        model = (
                            ResolvedModel(end.model.name, end.model.version, end.model.alias)
                            if end.HasField("model")
                            else decision.slot.model
                        )
                        self.answered(route, model, "OK")
                        self.slis.outcome(model, "OK")
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                self.slis.outcome(decision.slot.model, exc.code().name)
                if not started and exc.code() in _RETRY_ELSEWHERE and attempt < self.settings.max_attempts:
                    tried.add(endpoint.address)
                    self._failed(route, endpoint, exc)
                    continue
                self.answered(route, None, exc.code().name)
                if started and exc.code() in _REPLICA_BROKE:
                    self.pool.mark_failed(endpoint)
                    raise Unavailable(
                        f"replica {endpoint.address} failed after the stream started; generate again"
                    ) from None
                raise translate(exc) from None
            finally:
                call.cancel()
                self.end(endpoint)

    async def list_models(self, metadata: Metadata) -> pb.ListModelsResponse:
        """Models of every ready replica, one entry per served name (READY ones first)."""
        forwarded = tuple((k, str(v)) for k, v in metadata if k in _FORWARDED)
        calls = [
            e.connect()[1].ListModels(pb.ListModelsRequest(), timeout=5, metadata=forwarded)
            for e in self.pool.ready
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        merged: dict[str, pb.LoadedModel] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                continue
            for model in answer.models:
                known = merged.get(model.served_name)
                if known is None or (
                    known.state != pb.LOADED_MODEL_STATE_READY and model.state == pb.LOADED_MODEL_STATE_READY
                ):
                    merged[model.served_name] = model
        return pb.ListModelsResponse(models=[merged[name] for name in sorted(merged)])


__all__ = ["ModelSlot", "Route", "Router", "RouterStats", "prompt_text", "selector_text"]

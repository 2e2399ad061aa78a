"""The fuzz suite every service's test class inherits: fuzzed messages, random bytes, an oversized
message, then health and a known-good call.

A subclass names the generated module (``pb_module``), the service (``service``), seeds per RPC
(known-good requests that mutations start from), extra allowed codes per RPC with the reason, and
a ``target`` fixture: the real server on 127.0.0.1 port 0 and a channel to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import SERVING, Answer, Code, budget, call, health_status, judge
from tests.fuzz.messages import Sizes, messages, requests

#: Answers to bytes that do not parse as the request type. grpc-python parses the request before any
#: handler or interceptor runs and answers UNKNOWN itself when that fails; our runtime's interceptor
#: maps a parse failure to INVALID_ARGUMENT instead (``llmops.common.server``). Bytes that happen
#: to parse (random ones, a request cut at a field boundary) are judged like any other request.
RAW_ALLOWED = frozenset({Code.INVALID_ARGUMENT})


@dataclass
class Target:
    """A running server under fuzz."""

    channel: grpc.aio.Channel
    health_name: str
    #: A call that must still succeed after the fuzzing.
    known_good: Callable[[], Awaitable[object]]
    max_message_bytes: int
    #: ``host:port`` of the server (client streams go through grpc's sync API: see ``call``).
    address: str


class FuzzSuite:
    """Fuzzes every RPC of ``pb_module``'s service (parametrized by ``tests/fuzz/conftest.py``)."""

    pb_module: ClassVar[ModuleType]
    service: ClassVar[str]
    #: Known-good requests per RPC name (a client stream: one list of messages per seed).
    seeds: ClassVar[Mapping[str, Sequence[Any]]] = {}
    #: Codes one RPC may answer beyond :data:`tests.fuzz.harness.ALLOWED`, each with its reason.
    extra_allowed: ClassVar[Mapping[str, frozenset[Code]]] = {}
    #: Deadline of one call, in seconds, and shorter ones by RPC (a stream that follows a job).
    timeout: ClassVar[float] = 20.0
    timeouts: ClassVar[Mapping[str, float]] = {}
    examples: ClassVar[int] = 20
    raw_examples: ClassVar[int] = 10
    sizes: ClassVar[Sizes] = Sizes()

    def judge(self, method: MethodDescriptor, answer: Answer) -> None:
        problem = judge(self.service, method, answer, self.extra_allowed.get(method.name, ()))
        assert problem is None, problem

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Hypothesis settings belong to one function object: each suite gets its own, with its
        # budget. Assigned here, in the order they run: the health check comes last.
        cls.test_fuzzed_messages_get_ok_or_a_caller_error = _fuzz_test(cls.examples)  # type: ignore[attr-defined]
        cls.test_random_bytes_get_invalid_argument = _raw_test(cls.raw_examples)  # type: ignore[attr-defined]
        cls.test_an_oversized_message_gets_resource_exhausted = FuzzSuite.oversized_one  # type: ignore[attr-defined]
        cls.test_server_is_still_healthy_and_answers_a_known_good_call = FuzzSuite.healthy_after  # type: ignore[attr-defined]

    async def fuzz_one(self, target: Target, method: MethodDescriptor, data: st.DataObject) -> None:
        single = [s for s in self.seeds.get(method.name, ()) if isinstance(s, Message)]
        strategy = requests(method.input_type, single, sizes=self.sizes)
        if method.client_streaming:
            streams = [list(s) for s in self.seeds.get(method.name, ()) if not isinstance(s, Message)]
            options = [st.lists(strategy, min_size=0, max_size=4)]
            options += [_mutated_stream(method, stream, self.sizes) for stream in streams]
            request: Any = data.draw(st.one_of(options), label="stream")
        else:
            request = data.draw(strategy, label="request")
        answer = await call(
            target.channel,
            method,
            request,
            timeout=self.timeouts.get(method.name, self.timeout),
            address=target.address,
        )
        self.judge(method, answer)

    async def raw_one(self, target: Target, method: MethodDescriptor, data: st.DataObject) -> None:
        seeds = [s for s in self.seeds.get(method.name, ()) if isinstance(s, Message)]
        payload = data.draw(_wire_bytes(method, seeds), label="payload")
        answer = await call(
            target.channel,
            method,
            payload,
            timeout=self.timeouts.get(method.name, self.timeout),
            address=target.address,
        )
        problem = judge(self.service, method, answer, ())
        parts = payload if isinstance(payload, list) else [payload]
        broken = not all(_parses(method, part) for part in parts)
        if broken and not method.client_streaming and answer.code not in RAW_ALLOWED:
            problem = problem or f"{method.name} answered {answer.code.name} to undecodable bytes"
        if broken and answer.code == Code.OK:
            problem = problem or f"{method.name} accepted a stream with undecodable messages"
        assert problem is None, f"{problem} (payload {payload!r})"

    async def oversized_one(self, target: Target, method: MethodDescriptor) -> None:
        # Field 999 is unknown to every request type: the server refuses it on size before parsing.
        payload = _unknown_field(target.max_message_bytes + 1)
        answer = await call(
            target.channel,
            method,
            payload,
            timeout=self.timeouts.get(method.name, self.timeout),
            address=target.address,
        )
        judge(self.service, method, answer, ())
        assert answer.code == Code.RESOURCE_EXHAUSTED, answer

    async def healthy_after(self, target: Target) -> None:
        assert await health_status(target.channel) == SERVING
        assert await health_status(target.channel, target.health_name) == SERVING
        await target.known_good()


def _fuzz_test(examples: int) -> Callable[..., Awaitable[None]]:
    @budget(examples)
    @given(data=st.data())
    async def test_fuzzed_messages_get_ok_or_a_caller_error(
        self: FuzzSuite, target: Target, method: MethodDescriptor, data: st.DataObject
    ) -> None:
        await self.fuzz_one(target, method, data)

    return test_fuzzed_messages_get_ok_or_a_caller_error


def _raw_test(examples: int) -> Callable[..., Awaitable[None]]:
    @budget(examples)
    @given(data=st.data())
    async def test_random_bytes_get_invalid_argument(
        self: FuzzSuite, target: Target, method: MethodDescriptor, data: st.DataObject
    ) -> None:
        await self.raw_one(target, method, data)

    return test_random_bytes_get_invalid_argument


def _mutated_stream(
    method: MethodDescriptor, stream: list[Message], sizes: Sizes
) -> st.SearchStrategy[list[Message]]:
    """A known-good client stream with messages mutated, dropped, repeated or reordered."""
    one = [st.one_of(st.just(m), messages(method.input_type, sizes=sizes, base=m)) for m in stream]
    return (
        st.tuples(*one)
        .flatmap(lambda items: st.permutations(list(items)) | st.just(list(items)))
        .flatmap(
            lambda items: st.lists(st.sampled_from(items), max_size=len(items) + 1) | st.just(list(items))
        )
    )


def _undecodable() -> st.SearchStrategy[bytes]:
    """Bytes that never parse: bad tags, truncated fields, wire types that do not exist."""
    return st.one_of(
        st.just(b"\xff"),  # a tag whose varint never ends
        st.just(b"\x0a\x05ab"),  # field 1, length 5, 2 bytes given
        st.just(b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"),  # an 11-byte varint
        st.binary(min_size=1, max_size=64).map(lambda b: b"\x0a\x7f" + b),  # a length past the end
        st.just(b"\x0f"),  # wire type 7 does not exist
    )


def _wire_bytes(method: MethodDescriptor, seeds: list[Message]) -> st.SearchStrategy[bytes | list[bytes]]:
    """Undecodable bytes, random bytes, and known-good requests cut short at a random byte."""
    options = [_undecodable(), st.binary(min_size=1, max_size=256)]
    for seed in seeds:
        wire = seed.SerializeToString()
        if len(wire) > 1:
            options.append(st.integers(1, len(wire) - 1).map(lambda n, w=wire: w[:n]))
    one = st.one_of(options)
    if method.client_streaming:
        return st.lists(one, min_size=1, max_size=3)
    return one


def _parses(method: MethodDescriptor, data: bytes) -> bool:
    try:
        message_factory.GetMessageClass(method.input_type).FromString(data)
    except DecodeError:
        return False
    return True


def _unknown_field(size: int) -> bytes:
    """A message of about ``size`` bytes: field 999 as length-delimited bytes (unknown, so skipped)."""
    header = bytes([0xBA, 0x3E])  # (999 << 3) | 2 as a varint
    body = size
    length = bytearray()
    while True:
        byte = body & 0x7F
        body >>= 7
        length.append(byte | (0x80 if body else 0))
        if not body:
            break
    return header + bytes(length) + b"\x00" * size


class JobServiceFuzz(FuzzSuite):
    """A job service's suite (training, quantization); defined after the test factories its
    subclass hook uses."""

    timeout = 15.0
    #: WatchJob follows a job until it ends: on a job that is still queued or running the stream
    #: legitimately outlives our deadline.
    extra_allowed = {"WatchJob": frozenset({Code.DEADLINE_EXCEEDED})}
    timeouts = {"WatchJob": 3.0}

"""Hypothesis strategies that build any protobuf message from its descriptor.

:func:`messages` walks ``DESCRIPTOR.fields``: scalars get edge values (empty, huge, negative, NaN and
infinities, odd unicode, long strings and bytes), enums get unknown numbers too, repeated and map
fields 0..N entries, nested messages recurse to a depth limit, and at most one member of each oneof
is set. With ``base`` the strategy mutates a known-good message instead (each field kept or
replaced), which reaches the checks behind the first "not found" far more often than pure noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
_SIGNED = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}
#: Strings a service may treat specially: paths, URIs, names, separators, control characters.
_ODD_TEXT = [
    "",
    " ",
    "\x00",
    "..",
    "../../etc/passwd",
    "/",
    "a/../../b",
    "s3://bucket/key",
    "file:///etc/passwd",
    "http://127.0.0.1:1/",
    "%s%n%x",
    "{{}}{0}",
    "\u202e\u200b\ufeff",
    "名前",
    "\U0001f600",
    "a" * 129,
    "tiny",
    "champion",
    "latest",
    "-1",
    "1e309",
    "NaN",
]


@dataclass(frozen=True)
class Sizes:
    """How big generated values get.

    Attributes:
        max_list: entries of a repeated or map field.
        max_text: characters of an ordinary random string.
        huge_bytes: length of the occasional very long string or bytes value (keep it under the
            server's max message size so the message itself is accepted).
        max_depth: nesting depth of message fields; deeper ones are left unset.
    """

    max_list: int = 5
    max_text: int = 40
    huge_bytes: int = 256 * 1024
    max_depth: int = 4


def _integers(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    candidates = (low, high, -1, 0, 1, 2, 7, 1024, 65536, 2**31 - 1, 2**32 - 1, 2**63 - 1)
    edges = sorted({v for v in candidates if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(min_value=low, max_value=high))


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1e-45 if width == 32 else 5e-324,
        float("nan"),
        float("inf"),
        -float("inf"),
    ]
    edges.append(3.4e38 if width == 32 else 1.7e308)
    return st.one_of(st.sampled_from(edges), st.floats(width=width, allow_nan=True, allow_infinity=True))


def _text(sizes: Sizes) -> st.SearchStrategy[str]:
    # Surrogates are not UTF-8: protobuf refuses them client-side, so they never reach a server.
    alphabet = st.characters(blacklist_categories=("Cs",))
    return st.one_of(
        st.text(alphabet, max_size=sizes.max_text),
        st.sampled_from(_ODD_TEXT),
        st.integers(min_value=1, max_value=sizes.huge_bytes).map(lambda n: "x" * n),
        st.from_regex(r"[a-z][a-z0-9._-]{0,20}", fullmatch=True),
    )


def _bytes(sizes: Sizes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=sizes.max_text),
        st.integers(min_value=1, max_value=sizes.huge_bytes).map(lambda n: b"\xff" * n),
    )


def scalars(field: FieldDescriptor, sizes: Sizes) -> st.SearchStrategy[object]:
    """Values of one non-message field (enums included)."""
    kind = field.type
    if kind in _SIGNED:
        return _integers(_SIGNED[kind])
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _floats(32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _floats(64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return _text(sizes)
    if kind == FieldDescriptor.TYPE_BYTES:
        return _bytes(sizes)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        if field.enum_type.is_closed:  # proto2 enums: unknown numbers are refused client-side
            return st.sampled_from(known)
        return st.one_of(st.sampled_from(known), _integers(INT32))
    raise TypeError(f"no strategy for field type {kind} of {field.full_name}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@st.composite
def _fill(draw: st.DrawFn, descriptor: Descriptor, sizes: Sizes, depth: int, base: Message | None) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    if base is not None:
        message.CopyFrom(base)
    for oneof in descriptor.oneofs:
        if len(oneof.fields) == 1:
            continue  # a proto3 ``optional`` field (a synthetic oneof): handled as a field below
        if base is not None and draw(st.integers(0, 3)) != 0:
            continue  # a mutation keeps about three parts in four as they were
        message.ClearField(oneof.name)
        pick = draw(st.sampled_from([None, *oneof.fields]))
        if pick is not None:
            _set_field(draw, message, pick, sizes, depth)
    for field in descriptor.fields:
        if field.containing_oneof is not None and len(field.containing_oneof.fields) > 1:
            continue
        if base is not None and draw(st.integers(0, 3)) != 0:
            continue
        if base is None and not draw(st.booleans()):
            continue
        _set_field(draw, message, field, sizes, depth)
    return message


def _set_field(draw: st.DrawFn, message: Message, field: FieldDescriptor, sizes: Sizes, depth: int) -> None:
    message.ClearField(field.name)
    if _is_map(field):
        key_field, value_field = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        container = getattr(message, field.name)
        for _ in range(draw(st.integers(0, sizes.max_list))):
            key = draw(scalars(key_field, sizes))
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= sizes.max_depth:
                    continue
                container[key].CopyFrom(draw(_fill(value_field.message_type, sizes, depth + 1, None)))
            else:
                container[key] = draw(scalars(value_field, sizes))
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= sizes.max_depth:
            return
        if _is_repeated(field):
            container = getattr(message, field.name)
            for _ in range(draw(st.integers(0, sizes.max_list))):
                container.add().CopyFrom(draw(_fill(field.message_type, sizes, depth + 1, None)))
        else:
            getattr(message, field.name).CopyFrom(draw(_fill(field.message_type, sizes, depth + 1, None)))
            getattr(message, field.name).SetInParent()
        return
    values = scalars(field, sizes)
    if _is_repeated(field):
        getattr(message, field.name).extend(draw(st.lists(values, max_size=sizes.max_list)))
    else:
        setattr(message, field.name, draw(values))


def messages(
    descriptor: Descriptor, *, sizes: Sizes | None = None, base: Message | None = None
) -> st.SearchStrategy[Message]:
    """Messages of type ``descriptor``: random ones, or mutations of ``base`` when it is given."""
    return _fill(descriptor, sizes or Sizes(), 0, base)


def requests(
    descriptor: Descriptor, seeds: list[Message] | tuple[Message, ...] = (), *, sizes: Sizes | None = None
) -> st.SearchStrategy[Message]:
    """Requests for an RPC: pure noise, a seed as is, or a mutated seed."""
    options: list[st.SearchStrategy[Message]] = [messages(descriptor, sizes=sizes)]
    for seed in seeds:
        options += [st.just(seed), messages(descriptor, sizes=sizes, base=seed)]
    return st.one_of(options)

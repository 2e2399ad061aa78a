"""Hypothesis strategies over the OpenAI API's request bodies, as the bytes a client sends.

Three kinds, mixed per endpoint by :func:`bodies`:

* valid: every field of the schema in its documented range (:func:`completion` and :func:`chat`
  draw the fields the tiny model can answer quickly: at most 4 new tokens);
* mutated: a valid body with fields dropped, replaced by any JSON value of the wrong type, pushed
  out of range (huge and negative integers, 2**64, 1e308), unknown fields added, or strings made
  invalid Unicode (a lone surrogate, as a ``\\ud800`` escape or as raw surrogate bytes);
* bytes: random bytes, a valid body cut short or with bytes flipped, inserted or deleted, and
  deeply nested JSON.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

MODEL = "tiny-fuzz"
#: Strings that are not valid Unicode text: a lone surrogate among ordinary characters.
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
BAD_TEXT = st.tuples(st.text(max_size=8), SURROGATES, st.text(max_size=8)).map("".join)
TEXT = st.text(max_size=40) | st.sampled_from(
    ["", " ", "\x00", "def add(a, b):", "名前", "\U0001f600", "\u202e"]
)
EXTREME_INTS = st.sampled_from([-1, 0, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)])
EXTREME_FLOATS = st.sampled_from([-1e308, 1e308, -0.0, 1e-320, 2.5, -2.5, 101.0, 3.0])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def _sampling() -> dict[str, st.SearchStrategy[Any]]:
    """Optional controls both endpoints share, in their documented ranges."""
    return {
        "n": st.integers(1, 2),
        "temperature": st.floats(0, 2) | st.none(),
        "top_p": st.floats(0.01, 1) | st.none(),
        "stop": st.none()
        | st.text(min_size=1, max_size=4)
        | st.lists(st.text(min_size=1, max_size=4), max_size=3),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "logit_bias": st.dictionaries(st.integers(0, 255).map(str), st.floats(-100, 100), max_size=3),
        "seed": st.integers(-(2**63), 2**63 - 1) | st.none(),
        "user": st.text(max_size=10),
        "top_k": st.integers(0, 50),
        "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(0.5, 2) | st.none(),
        "min_tokens": st.integers(0, 2),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, 255), max_size=3),
        "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "request_id": st.text(max_size=10),
    }


def completion() -> st.SearchStrategy[dict[str, Any]]:
    prompt = (
        st.text(min_size=1, max_size=60)
        | st.lists(st.integers(0, 255), min_size=1, max_size=20)
        | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=2)
        | st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=8), min_size=1, max_size=2)
    )
    optional = {**_sampling(), "logprobs": st.integers(0, 3), "echo": st.just(False)}
    return st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": prompt, "max_tokens": st.integers(1, 4)}, optional=optional
    )


def chat() -> st.SearchStrategy[dict[str, Any]]:
    content = st.text(max_size=60) | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), min_size=1, max_size=2
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": content},
        optional={"name": st.text(alphabet="abc", min_size=1, max_size=5)},
    )
    optional = {
        **_sampling(),
        "logprobs": st.booleans(),
        "max_completion_tokens": st.integers(1, 4),
        "add_generation_prompt": st.booleans(),
        "response_format": st.just({"type": "text"}),
        "tool_choice": st.just("none"),
    }
    required = {
        "model": st.just(MODEL),
        "messages": st.lists(message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 4),
    }
    return st.fixed_dictionaries(required, optional=optional)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (keys and indexes)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*prefix, i))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


def _delete(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        copy = dict(value) if isinstance(value, dict) else list(value)
        del copy[path[0]]
        return copy
    return _replace(value, path[:1], _delete(value[path[0]], path[1:]))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid body with one to three mutations."""
    body: Any = draw(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(body)
        kind = draw(
            st.sampled_from(["replace", "extreme", "delete", "unknown", "bad_text", "bad_text", "bad_key"])
        )
        if kind == "unknown" or not paths:
            body = {**body, draw(st.text(min_size=1, max_size=12)): draw(JSON)}
            continue
        path = draw(st.sampled_from(paths))
        if kind == "replace":
            body = _replace(body, path, draw(JSON))
        elif kind == "extreme":
            body = _replace(body, path, draw(EXTREME_INTS | EXTREME_FLOATS))
        elif kind == "delete":
            body = _delete(body, path)
        elif kind == "bad_text":
            body = _replace(body, path, draw(BAD_TEXT))
        else:  # a key that is not valid text
            body = {**body, draw(BAD_TEXT): 1}
    return body


def encode(body: Any, raw_surrogates: bool) -> bytes:
    """JSON bytes; a lone surrogate as a ``\\uXXXX`` escape, or (``raw_surrogates``) as the 3 bytes
    UTF-8 would give it, which are not valid UTF-8."""
    if raw_surrogates:
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(body).encode()


@st.composite
def damaged(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> bytes:
    """A valid body's bytes cut short, or with bytes flipped, inserted or deleted."""
    data = bytearray(encode(draw(valid), False))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        if kind == "cut":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(
                st.binary(min_size=1, max_size=4) | st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80"])
            )
        elif data:
            del data[at]
    return bytes(data)


NESTED = st.integers(30, 5000).flatmap(
    lambda depth: st.sampled_from(
        [b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth]
    )
)
ODD_JSON = st.sampled_from(
    [b"", b"null", b"[]", b"1", b'"x"', b"{}", b'{"prompt": NaN}', b'{"prompt": Infinity}', b"\xef\xbb\xbf{}",
     b'{"model": "tiny-fuzz", "model": 1}', b'{"prompt": "\\ud800"}', b'{"prompt": "\\udfff\\ud800"}']
)  # fmt: skip


def bodies(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """The bytes of one request body: valid, mutated or damaged (see the module doc)."""
    as_json = st.tuples(st.one_of(valid, valid, mutated(valid)), st.booleans()).map(
        lambda pair: encode(*pair)
    )
    return st.one_of(  # about 4 in 10 bodies are valid requests, 2 in 10 mutated ones
        as_json,
        as_json,
        as_json,
        damaged(valid),
        st.binary(max_size=200),
        NESTED,
        ODD_JSON,
    )

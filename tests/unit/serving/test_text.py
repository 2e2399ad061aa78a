"""Incremental detokenization: stop strings never reach the client, partial UTF-8 is held back.

The assembler must emit text only when it cannot be the start of a stop string, end the text right
before a matched stop string (or after it when asked), and never emit a broken character.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmops.serving.engines.text import TextAssembler


def bytes_decode(ids: Sequence[int]) -> str:
    """Token ids are raw bytes, so multi-byte characters arrive in pieces."""
    return bytes(ids).decode("utf-8", errors="replace")


def feed(assembler: TextAssembler, text: str) -> tuple[list[str], str | None]:
    deltas, stop = [], None
    for byte in text.encode():
        delta, stop = assembler.push([byte])
        deltas.append(delta)
        if stop is not None:
            break
    return deltas, stop


def test_text_before_a_stop_string_only() -> None:
    assembler = TextAssembler(bytes_decode, ["STOP"], include_stop=False)
    deltas, stop = feed(assembler, "hello STOP world")
    assert stop == "STOP"
    assert "".join(deltas) == "hello "
    assert all("S" not in d for d in deltas)  # a possible stop prefix was held back, not sent


def test_included_stop_string() -> None:
    assembler = TextAssembler(bytes_decode, ["\n\n"], include_stop=True)
    deltas, stop = feed(assembler, "a\nb\n\nc")
    assert stop == "\n\n"
    assert "".join(deltas) == "a\nb\n\n"


def test_held_back_prefix_is_released_when_it_diverges_or_ends() -> None:
    assembler = TextAssembler(bytes_decode, ["abc"], include_stop=False)
    deltas, stop = feed(assembler, "xab")
    assert stop is None and "".join(deltas) == "x"  # "ab" might start "abc"
    delta, _ = assembler.push([ord("d")])
    assert delta == "abd"
    assembler2 = TextAssembler(bytes_decode, ["abc"], include_stop=False)
    feed(assembler2, "xab")
    assert assembler2.flush() == "ab"  # finished for another reason: nothing is lost


def test_earliest_of_several_stop_strings_wins() -> None:
    assembler = TextAssembler(bytes_decode, ["world", "lo w"], include_stop=False)
    deltas, stop = feed(assembler, "hello world")
    assert stop == "lo w" and "".join(deltas) == "hel"


def test_partial_utf8_is_never_emitted() -> None:
    assembler = TextAssembler(bytes_decode, [], include_stop=False)
    deltas, _ = feed(assembler, "né€")
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "né€"

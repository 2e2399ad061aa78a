"""Incremental detokenization with stop strings, for engines that decode token by token themselves.

:class:`TextAssembler` turns the growing list of a completion's token ids into text deltas. It holds
back (a) characters of an incomplete UTF-8 sequence and (b) a tail of text that could be the start of
a stop string, so a stop string never reaches the client; when one matches, the text ends before it
(or after it with ``include_stop_str_in_output``). vLLM does the same inside its own detokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextAssembler:
    """Text of one completion, emitted in safe deltas.

    Args:
        decode: token ids -> text (with the request's ``skip_special_tokens``).
        stop: stop strings.
        include_stop: keep a matched stop string at the end of the text.
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], stop: Sequence[str], include_stop: bool
    ) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._emitted = 0  # characters of the text handed out so far
        self._text = ""
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._emitted]

    def push(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Add tokens; returns (text delta safe to emit now, matched stop string or None)."""
        if self.stopped_by is not None:
            return "", self.stopped_by
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        stable = text.rstrip(REPLACEMENT)  # an incomplete UTF-8 sequence decodes to U+FFFD for now
        self._text = stable
        if self._stop:
            start = max(0, self._emitted - self._longest_stop + 1)
            match = self._find_stop(stable, start)
            if match is not None:
                position, stop = match
                end = position + len(stop) if self._include_stop else position
                delta = stable[self._emitted : end]
                self._emitted = max(self._emitted, end)
                self._text = stable[:end]
                self.stopped_by = stop
                return delta, stop
        safe_end = len(stable) - self._partial_stop_suffix(stable)
        delta = stable[self._emitted : safe_end] if safe_end > self._emitted else ""
        self._emitted = max(self._emitted, safe_end)
        return delta, None

    def flush(self) -> str:
        """The held-back tail, when the completion ends for another reason than a stop string."""
        if self.stopped_by is not None:
            return ""
        text = self._decode(self._ids)
        delta = text[self._emitted :]
        self._text = text
        self._emitted = len(text)
        return delta

    def _find_stop(self, text: str, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            position = text.find(stop, start)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

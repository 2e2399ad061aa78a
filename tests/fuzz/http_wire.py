"""HTTP/1.1 on a raw socket: send any bytes, read back each response and whether the server kept the
connection open; and the rules every answer of the OpenAI API is judged by.

An HTTP client library would refuse to send most of what the transport fuzzing sends (a wrong
``Content-Length``, a broken chunked body) and hides a dropped connection behind a retry; this one
sends bytes as given and reports exactly what came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class Dropped(Exception):
    """The server closed the connection without a (complete) response."""


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 60.0) -> Reply:
        return await asyncio.wait_for(self._reply(), timeout)

    async def _reply(self) -> Reply:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise Dropped(f"closed before a response (got {exc.partial[:200]!r})") from None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    chunk = await self.reader.readexactly(size + 2)
                    body += chunk[:-2]
                    if size == 0:
                        break
            else:
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ValueError) as exc:
            raise Dropped(f"closed mid-response ({exc})") from None
        return Reply(status, headers, body)

    async def at_eof(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the connection (within ``timeout``) instead of keeping it."""
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def request(
    method: str, path: str, body: bytes = b"", *, headers: dict[str, str] | None = None, length: bool = True
) -> bytes:
    """Request bytes: ``Content-Length`` from ``body`` unless ``headers`` or ``length=False`` say otherwise."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    given = {k.lower() for k in headers or {}}
    if length and "content-length" not in given and "transfer-encoding" not in given:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_request(path: str, body: dict[str, Any]) -> bytes:
    return request("POST", path, json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def problem_with(reply: Reply, *, stream: bool = False) -> str | None:
    """Why ``reply`` breaks the API's rule (a 2xx, or a 4xx with an OpenAI error body), else None."""
    if reply.closes and reply.status != 413:
        return f"status {reply.status} closed the connection: {reply.body[:300]!r}"
    if 200 <= reply.status < 300:
        if stream and reply.headers.get("content-type", "").startswith("text/event-stream"):
            return _stream_problem(reply.body)
        return None
    if not 400 <= reply.status < 500:
        return f"status {reply.status}: {reply.body[:300]!r}"
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {reply.status} without an OpenAI error body: {reply.body[:300]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"status {reply.status} with a malformed error body: {error!r}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"status {reply.status} with an empty message"
    return None


def _stream_problem(body: bytes) -> str | None:
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        for event in events:
            if '"error"' in event:
                return f"the stream ended with an error: {event[:300]}"
        return f"the stream did not end with [DONE]: {body[-300:]!r}"
    return None


@dataclass
class ErrorLog(logging.Handler):
    """Every ERROR (or worse) logged anywhere in the process while installed (uvicorn's loggers do
    not propagate to the root, so they are watched too)."""

    records: list[logging.LogRecord] = field(default_factory=list)
    _loggers: tuple[str, ...] = ("", "uvicorn", "uvicorn.error")

    def __post_init__(self) -> None:
        logging.Handler.__init__(self, logging.ERROR)

    def __hash__(self) -> int:
        return id(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def install(self) -> None:
        for name in self._loggers:
            logging.getLogger(name).addHandler(self)

    def remove(self) -> None:
        for name in self._loggers:
            logging.getLogger(name).removeHandler(self)

    def lines(self) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()}" + (f" [{r.exc_info[1]!r}]" if r.exc_info else "")
            for r in self.records
        ]


class HttpTally:
    """Inputs sent and statuses answered, per endpoint, over the session (printed by the fuzz
    conftest's summary hook), and the seed of a random-seeded run."""

    counts: dict[str, dict[int | str, int]] = {}
    failures: dict[str, int] = {}
    seed: int | None = None

    @classmethod
    def record(cls, endpoint: str, status: int | str, problem: str | None) -> None:
        counts = cls.counts.setdefault(endpoint, {})
        counts[status] = counts.get(status, 0) + 1
        if problem is not None:
            cls.failures[endpoint] = cls.failures.get(endpoint, 0) + 1

    @classmethod
    def lines(cls) -> list[str]:
        lines = []
        if cls.seed is not None:
            lines.append(f"fuzz: http seed {cls.seed} (make fuzz FUZZ_SEED={cls.seed} repeats this run)")
        total = 0
        for endpoint, counts in sorted(cls.counts.items()):
            n = sum(counts.values())
            total += n
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(
                f"fuzz: http {endpoint}: {n:,} inputs, {cls.failures.get(endpoint, 0)} failures ({shown})"
            )
        if cls.counts:
            lines.append(f"fuzz: http {total:,} inputs, {sum(cls.failures.values())} failures")
        return lines

"""What stands between the network and the OpenAI API's handlers: body limits, decoding, error bodies.

* :class:`Guard` (ASGI middleware, outermost) refuses a body larger than ``max_body_bytes`` before
  reading it (by its ``Content-Length``, 413) or while it arrives (chunked), a compressed body
  (``Content-Encoding``, 415), an unparseable ``Content-Length`` (400), and turns an exception nothing else handled into a JSON 500 whose
  error id is logged with the trace (the HTTP twin of gRPC's ``INTERNAL``).
* :func:`parse_body` decodes a request body strictly: UTF-8 only, JSON only (no ``NaN``, at most
  :data:`MAX_JSON_DEPTH` levels), no string holding a lone surrogate (``"\\ud800"`` is valid JSON
  but no valid text: it would crash every ``str.encode`` downstream), then the pydantic body in
  strict mode (``"5"`` is not a number, ``1.5`` not an integer). Each failure is an
  :class:`InvalidArgument` naming the OpenAI field.
* :func:`error_body` maps any exception to an HTTP status and an OpenAI error body
  (``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from llmops.common.errors import InvalidArgument, NotFound, ResourceExhausted, status_for

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Body = TypeVar("Body", bound=BaseModel)

#: Largest request body, in bytes. A prompt is bounded tighter by the model's context
#: (``validation.MAX_PROMPT_BYTES_PER_TOKEN``); this bounds what is read and parsed at all.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Deepest nesting of a JSON body: OpenAI's bodies need 5 levels.
MAX_JSON_DEPTH = 32

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499, "UNIMPLEMENTED": 501,
}  # fmt: skip


class PayloadTooLarge(InvalidArgument):
    """A request body over the limit: HTTP 413."""

    http_status = 413


class UnsupportedEncoding(InvalidArgument):
    """A compressed (``Content-Encoding``) body: HTTP 415, as OpenAI's API takes plain JSON only."""

    http_status = 415


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for an exception (generic INTERNAL, with an error id that
    is logged with the trace, for unexpected ones)."""
    mapped = status_for(exc)
    if mapped.error_id is not None:
        log.error("unexpected error %s in the HTTP API", mapped.error_id, exc_info=exc)
    status = getattr(exc, "http_status", None) or _HTTP_STATUS.get(mapped.code.name, 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    field = getattr(exc, "field", None)
    param = field.removeprefix("sampling.") if isinstance(field, str) else None  # OpenAI's own field names
    if isinstance(exc, NotFound):
        code = "model_not_found"
    elif isinstance(exc, PayloadTooLarge):
        code = "payload_too_large"
    elif isinstance(exc, UnsupportedEncoding):
        code = "unsupported_content_encoding"
    else:
        code = mapped.code.name.lower()
    return status, {"error": {"message": mapped.message, "type": kind, "param": param, "code": code}}


def error_headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ResourceExhausted) and exc.retry_after_seconds is not None:
        return {"Retry-After": str(max(1, round(exc.retry_after_seconds)))}
    return {}


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """Body limits and the last-resort JSON 500 around the whole HTTP app (see the module doc)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        headers = scope.get("headers", ())
        declared = [v for k, v in headers if k.lower() == b"content-length"]
        encodings = {
            v.decode("latin-1").strip().lower() for k, v in headers if k.lower() == b"content-encoding"
        }
        refusal: InvalidArgument | None = None
        if encodings - {"", "identity"}:
            refusal = UnsupportedEncoding(
                f"Content-Encoding {', '.join(sorted(encodings))} is not accepted: send plain JSON"
            )
        elif declared:
            text = declared[0].decode("latin-1").strip()
            if not text.isdigit() or len(set(declared)) > 1:
                refusal = InvalidArgument("Content-Length must be one non-negative integer")
            elif int(text) > limit:
                refusal = PayloadTooLarge(f"the body has {int(text)} bytes; at most {limit} are accepted")
        if refusal is not None:
            status, body = error_body(refusal)
            # A refused length leaves the body unread (or its end unknown): the connection ends too.
            close = {} if isinstance(refusal, UnsupportedEncoding) else {"Connection": "close"}
            await _send_json(send, status, body, close)
            return
        received, too_large = 0, False

        async def limited() -> Message:
            # Past the limit the app sees the client gone (an exception raised here would surface
            # inside middleware task groups), and the refusal below answers 413.
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except ClientDisconnect:  # the client hung up mid-body (an answer it will not read), or too large
            if not started:
                refused = (
                    PayloadTooLarge(f"the body is over the limit of {limit} bytes")
                    if too_large
                    else InvalidArgument("the client closed the connection mid-body")
                )
                status, body = error_body(refused)
                await _send_json(send, status, body, {"Connection": "close"})
        except Exception as exc:  # the last resort: a JSON answer, never a dropped connection
            status, body = error_body(exc)
            if started:  # too late for a status: the response ends here, the error is logged
                log.error("error after the response started: %s", body["error"]["message"])
                return
            await _send_json(send, status, body, error_headers(exc))


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """The request body as ``model``; :class:`InvalidArgument` naming the field when it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the body is not UTF-8 (byte {exc.start} is not valid)") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise InvalidArgument(f"the body nests more than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"the body must be a JSON object, not {_json_type(value)}")
    _check_text(value)
    try:
        return model.model_validate(value, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(value, first["loc"], named=first["type"] in ("missing", "extra_forbidden"))
        raise InvalidArgument(_shown(str(first["msg"]), first.get("input")), field=param or None) from None


def _refuse_constant(name: str) -> Any:
    raise InvalidArgument(f"{name} is not a JSON number")


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _check_text(value: object) -> None:
    """Refuse nesting deeper than :data:`MAX_JSON_DEPTH` and strings (keys too) that are not valid
    Unicode text: a lone surrogate, which JSON's ``\\uXXXX`` escapes can spell."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise InvalidArgument(f"the body nests more than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            _check_string(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))


def _check_string(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise InvalidArgument(
            f"not valid Unicode text: a lone surrogate U+{code:04X} at character {exc.start}",
            field=_dotted(path) or None,
        ) from None


def _param(value: object, loc: tuple[str | int, ...], *, named: bool) -> str:
    """The part of pydantic's error location that is a path into the body (not union member tags);
    ``named``: the last part is a field that is missing or unknown, named too."""
    path: list[str | int] = []
    for part in loc:
        inside = (isinstance(value, dict) and part in value) or (
            isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        )
        if not inside:
            if not path or (named and part == loc[-1] and isinstance(value, dict)):
                path.append(part)  # the missing field, or the top-level one
            break
        value = value[part]  # type: ignore[index]
        path.append(part)
    return _dotted(tuple(path))


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(message: str, value: object) -> str:
    """pydantic's message with the value when short (never a whole prompt)."""
    if isinstance(value, (dict, list)) or value is None:
        return message
    text = repr(value)
    return f"{message} (got {text if len(text) <= 60 else text[:60] + '…'})"

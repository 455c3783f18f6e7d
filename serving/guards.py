"""What the service refuses before any endpoint (or its authentication) sees a request.

`RequestGuard` is ASGI middleware in front of every route:

- a body over ``serving.max_request_bytes`` gets 413, whether it declares its length
  (``Content-Length``) or arrives in chunks: the bytes received are counted as they arrive and
  reading stops at the limit, before the body is parsed and before the token is checked;
- a JSON body (``application/json``, ``+json``, or no Content-Type) is parsed once, with limits
  (`loads_bounded`): nested at most `MAX_JSON_DEPTH` deep, numbers of at most `MAX_NUMBER_CHARS`
  characters, every string valid Unicode (no lone surrogate such as ``\\ud800``). Anything else is
  a 422 that says what was wrong and where, and never echoes
  the text. The parsed document rides along in the request scope (`parsed_json`), so an
  endpoint that reads its body by hand need not parse it twice.

`store_outage` is what every route says when the feedback store is not answering (a restart):
the Retry-After seconds, the database's own words to the log and never to the client.

`validation_problem` turns FastAPI's request validation errors into one short paragraph that
names each field and at most a short, escaped excerpt of what was sent (`excerpt`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_JSON_DEPTH = 32  # the deepest request medloop takes is 3 ({"instances": [{...}]})
MAX_NUMBER_CHARS = 40  # digits, sign, point and exponent of one JSON number
EXCERPT_CHARS = 40  # the most of a sent value an error answer repeats
PARSED_JSON = "medloop.parsed_json"  # request scope key of the parsed body

log = logging.getLogger("medloop.serving")


def store_errors() -> tuple[type[BaseException], ...]:
    """What the feedback store raises when its database is not answering: `StoreUnavailable`
    after the store's own retries, or a connection failure outside them."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from pipelines.store.db import StoreUnavailable

    return StoreUnavailable, OperationalError, InterfaceError


def store_outage(method: str, path: str, exc: BaseException, retry_seconds: float) -> int:
    """Log a request the feedback store could not take (masked, one line; the store logged the end
    of its own retries itself) and return the Retry-After seconds to answer it with."""
    from pipelines.errors import mask_credentials
    from pipelines.store.db import StoreUnavailable

    if not isinstance(exc, StoreUnavailable):
        log.warning("%s %s: the feedback store is not answering: %s", method, path,
                    mask_credentials(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return min(30, max(1, math.ceil(retry_seconds)))


class BadJson(ValueError):
    """A JSON body outside the limits (or not JSON); the message says what and where."""


def loads_bounded(body: bytes) -> Any:
    """``json.loads`` with limits on depth, number size and strings (see the module docstring).

    Raises:
        BadJson: the body is not JSON, is nested too deep, holds a number that is too long, or a
            string that is not valid Unicode.
    """
    try:
        document = json.loads(body, parse_int=_bounded_number(int), parse_float=_bounded_number(float))
    except RecursionError:
        raise BadJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels; send at most {MAX_JSON_DEPTH}") from None
    except UnicodeDecodeError:
        raise BadJson("body is not valid UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise BadJson(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    _check_document(document)
    return document


def parsed_json(scope: Scope) -> Any:
    """The body `RequestGuard` parsed for this request (None when it parsed none)."""
    return scope.get(PARSED_JSON)


def excerpt(value: Any) -> str:
    """A short, escaped excerpt of a sent value, safe to put in an answer: at most
    `EXCERPT_CHARS` characters of its ASCII repr, and its length when it was cut."""
    shown = ascii(value)
    if len(shown) <= EXCERPT_CHARS:
        return shown
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{shown[:EXCERPT_CHARS]}...{size}"


def validation_problem(errors: list[dict[str, Any]], limit: int = 5) -> str:
    """FastAPI's validation errors as one paragraph: each field, what is wrong, and a short
    excerpt of what was sent for a scalar (never the whole input)."""
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(part) for part in error.get("loc", ())) or "request"
        sent = error.get("input")
        got = f" (got {excerpt(sent)})" if isinstance(sent, (str, int, float, bool)) else ""
        parts.append(f"{where}: {error.get('msg', 'invalid')}{got}")
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return "; ".join(parts) + more


class RequestGuard:
    """ASGI middleware: body size limit and bounded JSON parsing for every HTTP request
    (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_request_bytes: int):
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value for key, value in scope.get("headers", [])}
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            await _answer(send, 413, self._over(f"{declared} bytes"))
            return
        chunks, received = [], 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_request_bytes:  # chunked, or longer than it declared
                await _answer(send, 413, self._over(f"more than {self.max_request_bytes} bytes"))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and _is_json(headers.get(b"content-type")):
            try:
                scope[PARSED_JSON] = loads_bounded(body)
            except BadJson as exc:
                await _answer(send, 422, str(exc))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # the body was read: what is left is waiting for the client to go
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _over(self, size: str) -> str:
        return (f"request body of {size} is over the limit of {self.max_request_bytes} bytes "
                "(serving.max_request_bytes); send fewer or smaller inputs per request")


def _is_json(content_type: bytes | None) -> bool:
    if not content_type:
        return True  # FastAPI reads a body without a Content-Type as JSON
    media = content_type.decode("latin-1").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _bounded_number(kind: type) -> Any:
    def parse(text: str) -> int | float:
        if len(text) > MAX_NUMBER_CHARS:
            raise BadJson(f"a JSON number of {len(text)} characters; numbers may have at most "
                          f"{MAX_NUMBER_CHARS}")
        return kind(text)
    return parse


def _check_document(document: Any) -> None:
    """Depth and strings of a parsed document, walked without recursion."""
    pending: list[tuple[Any, str, int]] = [(document, "body", 1)]
    while pending:
        value, where, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise BadJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels at {where}; send at most "
                          f"{MAX_JSON_DEPTH}")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"{where} (a key)")
                pending.append((item, f"{where}.{key}" if len(key) <= EXCERPT_CHARS and key.isidentifier()
                                else f"{where}[...]", depth + 1))
        else:
            pending.extend((item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadJson(f"the string at {where} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                      "which is not text; send valid Unicode") from None


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

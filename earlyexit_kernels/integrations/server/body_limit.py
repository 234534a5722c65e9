"""The request body's size, bounded before it is read whole: 413 at once past ``max_body_bytes``.

Without a bound a single request of 10 MB (one text of 2,000,000 words) was read, parsed and
tokenized whole before being refused, and held every other request up for seconds. This ASGI
middleware answers 413 from the ``Content-Length`` header without reading the body; where the
client sends no length (chunked), it counts the bytes as the route reads them and answers 413 as
soon as they pass the bound, the rest unread. TEI bounds the payload the same way
(``--payload-limit``, 2,000,000 bytes by default), which is the default here too.
"""

from __future__ import annotations

import json

__all__ = ["DEFAULT_MAX_BODY_BYTES", "BodyLimitMiddleware", "check_max_body_bytes"]

DEFAULT_MAX_BODY_BYTES = 2_000_000


def check_max_body_bytes(value) -> int:
    """``value`` if it is an integer >= 1, else a ``ValueError`` saying what to pass."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1 (bytes), got {value!r}")
    return value


class _TooLarge(Exception):
    """The body passed the bound while the route read it."""


class BodyLimitMiddleware:
    """ASGI middleware: a request whose body is over ``max_bytes`` gets 413, its body not read whole."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = check_max_body_bytes(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope["headers"])
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"the request body is {declared} bytes")
            return
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send, f"the request body passed {self.max_bytes} bytes")

    async def _refuse(self, send, what: str) -> None:
        body = json.dumps(
            {
                "error": f"{what}; this server takes at most {self.max_bytes} bytes in one request "
                "(--max-body-bytes): send fewer or shorter inputs",
                "error_type": "Validation",
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

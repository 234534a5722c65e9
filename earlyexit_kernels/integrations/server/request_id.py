"""The request id: every answer carries an ``x-request-id`` header, the client's or a new one.

A request that sends ``X-Request-Id`` gets the same value back (so a client, a proxy and the
server's log can follow one request), provided it is 1 to 128 visible ASCII characters (no
spaces); any other value, or none, is replaced by a new random id (32 hex digits) rather than
refused: the id is for tracing, and a request should not fail over it. Handlers read it as
``request.state.request_id``; the OpenAI-style answers carry it as their ``id``.
"""

from __future__ import annotations

import re
import time
import uuid

__all__ = ["HEADER", "RequestIdMiddleware", "request_id_of"]

HEADER = "x-request-id"
_ACCEPTED = re.compile(rb"[!-~]{1,128}")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The request id for a request with these raw ASGI headers."""
    for name, value in headers:
        if name.lower() == HEADER.encode() and _ACCEPTED.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: puts the request id on ``scope["state"]`` and on every answer's headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()  # the request's arrival: before any middleware or handler runs
        request_id = request_id_of(scope["headers"])
        scope.setdefault("state", {}).update(request_id=request_id, arrived=arrived)
        header = (HEADER.encode(), request_id.encode("ascii"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() != header[0]]
                message = {**message, "headers": [*kept, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)

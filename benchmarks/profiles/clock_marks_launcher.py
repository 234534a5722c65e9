"""``eek`` whose answers carry three marks on the machine's monotonic clock, for
``request_latency_parts.py --launcher``: where a request's time outside the app goes.

``time.perf_counter()`` is ``CLOCK_MONOTONIC`` on Linux, one clock for every process of the machine,
so the client's send and receive times and the server's marks subtract. Each answer gets, in µs:

- ``x-read-at``: uvicorn's HTTP parser begins the request (its first bytes read off the socket);
- ``x-arrived-at``: the app receives it (the mark the timing headers start from);
- ``x-handed-at``: the app hands the answer's start to uvicorn (after every timing header is set).

The client's time before ``x-read-at`` is the request waiting to be read (the socket, the event
loop's turn); after ``x-handed-at`` the answer's writing and the client's reading of it::

    python benchmarks/profiles/request_latency_parts.py FOLDER TEXTS.txt \\
        --launcher benchmarks/profiles/clock_marks_launcher.py
"""

import runpy
import sys
import time

from uvicorn.protocols.http import httptools_impl  # uvicorn's parser where httptools is installed

from earlyexit_kernels.integrations.server import request_id

_begin = httptools_impl.HttpToolsProtocol.on_message_begin


def _marked_begin(self) -> None:
    read_at = time.perf_counter()
    _begin(self)
    self.scope["state"]["eek_read_at"] = read_at


httptools_impl.HttpToolsProtocol.on_message_begin = _marked_begin

_call = request_id.RequestIdMiddleware.__call__


async def _marked_call(self, scope, receive, send):
    if scope["type"] != "http":
        await _call(self, scope, receive, send)
        return

    async def send_marked(message):
        if message["type"] == "http.response.start":
            state = scope["state"]
            marks = {"x-handed-at": time.perf_counter(), "x-arrived-at": state.get("arrived")}
            marks["x-read-at"] = state.get("eek_read_at")
            extra = [(name.encode(), str(round(1e6 * at)).encode()) for name, at in marks.items() if at is not None]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    await _call(self, scope, receive, send_marked)


request_id.RequestIdMiddleware.__call__ = _marked_call
sys.argv = ["earlyexit_kernels", *sys.argv[1:]]
runpy.run_module("earlyexit_kernels", run_name="__main__", alter_sys=True)

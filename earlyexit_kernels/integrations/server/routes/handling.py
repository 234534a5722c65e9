"""How a route's handler runs: the API key checked first (:func:`guarded`), and the path every POST route
that runs the model shares (:func:`answer`): the body read and parsed on a worker thread, its sequences run
by :meth:`~..serving_state.ServingState.run`, the answer formatted, its costs in its headers and metrics.
"""

from __future__ import annotations

import asyncio
import time

from earlyexit_kernels.integrations.server.errors import RequestError, error_answer, unauthorized_answer
from earlyexit_kernels.integrations.server.request_costs import RequestCosts

__all__ = ["answer", "guarded", "refused"]


def guarded(state, handler):
    """``handler`` behind ``state``'s API key (401 without it)."""

    async def route(request):
        if not state.authorized(request.headers):
            state.metrics.requests.labels("401").inc()
            return unauthorized_answer()
        return await handler(request)

    return route


def refused(state, error: RequestError, headers: dict | None = None):
    """``error``'s answer, counted by its status."""
    state.metrics.requests.labels(str(error.status)).inc()
    return error_answer(error, headers)


#: bodies of at most this many bytes are parsed on the event loop (:func:`answer`)
INLINE_BODY_BYTES = 4096


async def answer(state, request, parse, formatted):
    """Parse the body, run its sequences, format: the common path of the POST routes.

    ``parse(raw)`` makes the request (anything :meth:`~..serving_state.ServingState.run` takes);
    ``formatted(parsed, finished, costs)`` makes the answer's body."""
    from starlette.responses import JSONResponse, Response

    # arrived: stamped by the outermost middleware (request_id.py) as the app receives the request
    costs = RequestCosts(getattr(request.state, "arrived", None) or time.perf_counter())
    try:
        # a large body is parsed on a worker thread: a body of megabytes holds up no other request; a
        # small one here, where parsing costs less than the thread's hand-over (tokenization.INLINE_CHARS)
        raw = await request.body()
        parsed = parse(raw) if len(raw) <= INLINE_BODY_BYTES else await asyncio.to_thread(parse, raw)
        finished = await state.run(parsed, request, costs)
        if finished is None:  # the client went away; nobody reads this
            state.metrics.requests.labels("499").inc()
            return Response(status_code=499)
        body = formatted(parsed, finished, costs)
    except RequestError as error:
        return refused(state, error, costs.headers())
    state.metrics.requests.labels("200").inc()
    costs.answered = time.perf_counter()
    state.metrics.record_request(costs.spans())
    return JSONResponse(body, headers=costs.headers())

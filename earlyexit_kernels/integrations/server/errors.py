"""How the server refuses: :class:`RequestError` (a status, a kind and a message saying what to change), its
JSON body ``{"error", "error_type"}`` (:class:`Error`, the OpenAPI document's schema of it), and the answers
the app gives outside a route: a missing API key (401) and Starlette's own 404 and 405.

The status codes are text-embeddings-inference's: 400 (not JSON, an empty input), 401, 404 (a model
name or a route not served), 413 (too long without ``truncate``, too many inputs), 422 (a wrong
shape), 429 (queue full), 500 (the model failed), 503 (shutting down, or the engine stopped).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

__all__ = ["Error", "RequestError", "error_answer", "http_error_handler", "read_json", "unauthorized_answer"]


class RequestError(Exception):
    """A request the server refuses: ``status``, ``error_type`` and a message saying what to change."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


class Error(BaseModel):
    error: str = Field(description="what is wrong and what to change")
    error_type: str = Field(examples=["Validation", "Empty", "NotFound", "Overloaded"])


def read_json(raw: bytes, send: str):
    """The body parsed; 400 saying to ``send`` the route's shape when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, "Validation", f"the body is not valid JSON ({error}); send {send}") from None
    except RecursionError:
        raise RequestError(400, "Validation", f"the body nests too deeply to read; send {send}") from None


def error_answer(error: RequestError, headers: dict | None = None):
    """``error`` as the JSON answer every route gives."""
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def unauthorized_answer():
    """401 for a request without the server's API key."""
    from starlette.responses import JSONResponse

    return JSONResponse(
        {
            "error": "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            "error_type": "Unauthorized",
        },
        status_code=401,
        headers={"www-authenticate": "Bearer"},
    )


def http_error_handler(routes: list[tuple[str, str, str]]):
    """Starlette's own 404 and 405 (no such route, or not this method) as JSON like every other error; a 404
    lists ``routes`` (``(method, path, summary)`` rows)."""
    from starlette.responses import JSONResponse

    listed = ", ".join(f"{method} {path}" for method, path, _ in routes)

    async def http_error(request, error):
        if error.status_code == 404:
            message = f"no route {request.url.path}; the routes are {listed} (GET /docs)"
            kind = "NotFound"
        elif error.status_code == 405:
            # Starlette names the header "Allow": read it whatever its case
            allowed = next((v for k, v in (error.headers or {}).items() if k.lower() == "allow"), "")
            message = f"{request.method} is not allowed on {request.url.path}; send {allowed or 'another method'}"
            kind = "MethodNotAllowed"
        else:
            message, kind = str(error.detail), "HTTP"
        return JSONResponse(
            {"error": message, "error_type": kind}, status_code=error.status_code, headers=error.headers
        )

    return http_error

"""OpenAI's model list: ``GET /v1/models`` (as vLLM and Infinity answer it).

Answer: ``{"object": "list", "data": [{"id": NAME, "object": "model", "created": UNIX_TIME, "owned_by":
"earlyexit_kernels"}]}``: the one model a server serves, under the name requests may send
(:mod:`..served_model`); ``created`` is when the server started.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from earlyexit_kernels.integrations.server.routes.operations import Served, get, ref, response

__all__ = ["ModelEntry", "Models", "handlers", "models_answer", "operations", "schemas"]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="when the server started (Unix time)")
    owned_by: str


class Models(BaseModel):
    """``GET /v1/models``: OpenAI's shape."""

    object: Literal["list"]
    data: list[ModelEntry]


def models_answer(model_id: str, created: int) -> dict:
    """``GET /v1/models``'s answer, in OpenAI's shape (as vLLM and Infinity answer it)."""
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "earlyexit_kernels"}],
    }


def handlers(state) -> dict:
    """The routes' handlers over ``state`` (a :class:`~..serving_state.ServingState`), by path."""
    from starlette.responses import JSONResponse

    async def models(request):
        return JSONResponse(models_answer(state.model_id, state.started))

    return {"/v1/models": models}


def operations(served: Served) -> dict:
    """The routes' OpenAPI entries, by path."""
    models = response("the served model", schema=ref("Models"))
    return {"/v1/models": get(served.summaries["/v1/models"], models, served.keyed)}


def schemas(served: Served) -> list[type[BaseModel]]:
    """The models of the routes' bodies (the OpenAPI document's components)."""
    return [Models]

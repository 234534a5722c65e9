"""The served model's names: what ``GET /v1/models`` lists and what a request's ``"model"`` may say.

A server serves one model. Its name is the ``model_id`` the app was made with (``eek serve``:
MODEL as given, the name ``/info`` reports); the last part of that path (the folder's name,
or the name of a Hub id ``org/name``) is accepted too. A request of the OpenAI-style routes may
leave ``"model"`` out (or null); any other name gets 404 naming the served one, so a client
pointed at the wrong server learns it instead of getting another model's answers.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from earlyexit_kernels.integrations.server.predict_schema import RequestError

__all__ = ["MODELS_ANSWER_SCHEMA", "check_model", "model_field_schema", "models_answer", "served_names"]


def served_names(model_id: str) -> list[str]:
    """``model_id`` and, where it differs, the last part of its path."""
    names = [model_id]
    folder = PurePosixPath(model_id.replace("\\", "/").rstrip("/")).name
    if folder and folder not in names:
        names.append(folder)
    return names


def check_model(body: dict, model_id: str) -> None:
    """Nothing when ``body["model"]`` is absent, null or a served name; 422 or 404 otherwise."""
    requested = body.get("model")
    if requested is None:
        return
    if not isinstance(requested, str):
        raise RequestError(
            422, "Validation", f"model must be a string (the served model's name), got {json.dumps(requested)}"
        )
    if requested not in served_names(model_id):
        raise RequestError(
            404,
            "NotFound",
            f"model {json.dumps(requested)} is not served here; this server serves {json.dumps(model_id)} "
            f"(GET /v1/models): send that name or leave model out",
        )


def model_field_schema(model_id: str) -> dict:
    """The JSON Schema of a request's ``"model"`` on a server of ``model_id``."""
    return {
        "anyOf": [{"enum": served_names(model_id)}, {"type": "null"}],
        "description": "the served model (GET /v1/models); may be left out",
    }


def models_answer(model_id: str, created: int) -> dict:
    """``GET /v1/models``'s answer, in OpenAI's shape (as vLLM and Infinity answer it)."""
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "earlyexit_kernels"}],
    }


MODELS_ANSWER_SCHEMA = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer", "description": "when the server started (Unix time)"},
                    "owned_by": {"type": "string"},
                },
            },
        },
    },
}

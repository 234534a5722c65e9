"""The served model's names: what ``GET /v1/models`` and ``GET /models`` list and what a request's ``"model"`` may say.

A server serves one model. Its name is the ``model_id`` the app was made with: for ``eek serve``
the ``--served-model-name``, else the model folder's name (never its path, which would show the
server's file system and which clients would have to send back), else the Hub id as given
(:func:`served_model_name`). The last part of a path-like id is accepted too, and so is
``"default/not-specified"``, what Infinity's client (``infinity_client``) sends when it is told
no model. A request of the OpenAI-style routes may leave ``"model"`` out (or null); any other
name gets 404 naming the served one, so a client pointed at the wrong server learns it instead
of getting another model's answers.

``GET /v1/models`` answers in OpenAI's shape (:mod:`.routes.openai`); ``GET /models``, Infinity's route,
in Infinity's (:mod:`.routes.infinity`).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from earlyexit_kernels.integrations.server.errors import RequestError

__all__ = [
    "INFINITY_DEFAULT_MODEL",
    "check_model",
    "model_field_schema",
    "served_model_name",
    "served_names",
]

#: the model name Infinity's client sends when it is given none
INFINITY_DEFAULT_MODEL = "default/not-specified"


def served_model_name(model: str, name: str | None = None) -> str:
    """The name a server of ``model`` (a folder or a Hub id) answers to: ``name`` when given, else the
    folder's name for a local folder (its path stays private), else the Hub id as given."""
    if name is not None:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"a served model name must be a non-empty text without surrounding spaces, got {name!r}")
        return name
    local = Path(model)
    if local.exists():
        return local.resolve().name or str(model)
    return model


def served_names(model_id: str) -> list[str]:
    """``model_id``, the last part of its path where it differs, and Infinity's default name."""
    names = [model_id]
    folder = PurePosixPath(model_id.replace("\\", "/").rstrip("/")).name
    if folder and folder not in names:
        names.append(folder)
    if INFINITY_DEFAULT_MODEL not in names:
        names.append(INFINITY_DEFAULT_MODEL)
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

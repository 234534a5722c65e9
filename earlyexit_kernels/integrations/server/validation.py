"""How a request body is validated by its pydantic model (each in its protocol's module, :mod:`.routes`) and
refused in the server's words.

:func:`validated` reads a body as JSON (400 for a body that is not) and validates it with a model; a
:class:`pydantic.ValidationError` becomes one :class:`~.errors.RequestError` in the words the
hand-written parsers used: a missing field, then unknown fields, 422; an empty text or list 400
``"Empty"``; a lone UTF-16 surrogate 400; a wrong value 422 saying what the field must be (the model's
``MUST``), an item named as the route names it (``ITEM``: ``documents[0]``, ``input 1``). A field read
by a function of the server's own (:func:`refused_by`) refuses in that function's words.
:func:`component_schemas` makes models' JSON Schemas OpenAPI components.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from earlyexit_kernels.integrations.server.errors import RequestError, read_json

__all__ = ["checked", "component_schemas", "refused_by", "validated"]


def refused_by(check):
    """``check`` as a validator: its :class:`RequestError` passed through pydantic as it is (status, kind, words)."""

    def validator(value):
        try:
            return check(value)
        except RequestError as error:
            raise PydanticCustomError(
                "eek_refusal",
                "{message}",
                {"message": error.message, "status": error.status, "kind": error.error_type},
            ) from None

    return validator


#: refusals of a wrong value that answer 400 "Empty" rather than 422: an empty text or list
_EMPTY = {
    "string_too_short": "an empty text; send at least one character",
    "too_short": "an empty list; send at least one item",
}


def _where(loc: tuple, item: str = "{field}[{index}]") -> str:
    """``("texts", 0)`` -> ``texts[0]`` (``item``: how the model names an item): the field and, where the
    problem is in one of its items, the item's index (the members of a union that pydantic names between
    them, and a field of the item, are left to the messages)."""
    if not loc:
        return "the body"
    index = next((part for part in loc[1:3] if isinstance(part, int)), None)
    return str(loc[0]) if index is None else item.format(field=loc[0], index=index)


def validated(model: type[BaseModel], raw: bytes, send: str, route: str = "this route") -> BaseModel:
    """``raw`` read as JSON (400 saying to ``send`` the route's shape when it is not) and validated by
    ``model``. A :class:`pydantic.ValidationError` becomes one refusal, the first the body shows in the
    order of the model's fields: unknown fields 422, naming what ``route`` takes; an empty text or list
    400 ``"Empty"``; a wrong value 422, saying what the field must be (``model.MUST[field]``, else
    pydantic's words)."""
    return checked(model, read_json(raw, send), send, route)


def checked(model: type[BaseModel], body, send: str, route: str = "this route") -> BaseModel:
    """:func:`validated` of a body already read as JSON."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise _refusal(model, error.errors(include_url=False), send, route) from None


def _refusal(model: type[BaseModel], problems: list[dict], send: str, route: str) -> RequestError:
    takes = ", ".join(model.model_fields)
    if any(not problem["loc"] for problem in problems):  # not an object
        return RequestError(422, "Validation", f"the body must be a JSON object: {send}")
    refused = next((problem for problem in problems if problem["type"] == "eek_refusal"), None)
    musts = getattr(model, "MUST", {})
    missing = [
        str(problem["loc"][0]) for problem in problems if problem["type"] == "missing" and len(problem["loc"]) == 1
    ]
    if missing:
        field = missing[0]
        if field not in musts:
            return RequestError(422, "Validation", f'the body has no "{field}": send it')
        return RequestError(422, "Validation", f'{field} must be {musts[field]}; the body has no "{field}"')
    unknown = [str(problem["loc"][0]) for problem in problems if problem["type"] == "extra_forbidden"]
    if unknown:
        return RequestError(422, "Validation", f"unknown field(s) {', '.join(unknown)}; {route} takes {takes}")
    if refused is not None and refused is problems[0]:
        context = refused["ctx"]
        return RequestError(context["status"], context["kind"], context["message"])
    item = getattr(model, "ITEM", "{field}[{index}]")
    problem = problems[0]
    where, field = _where(problem["loc"], item), str(problem["loc"][0])
    # an item of a union refused by every member: where one member found it empty, it is empty
    problem = next((p for p in problems if _where(p["loc"], item) == where and p["type"] in _EMPTY), problem)
    if problem["type"] == "string_unicode":  # JSON's escapes can carry half a UTF-16 pair
        return RequestError(
            400, "Validation", f"{where} holds a lone UTF-16 surrogate, which is not a character: send valid Unicode"
        )
    if problem["type"] in _EMPTY:
        return RequestError(400, "Empty", f"{where} is {_EMPTY[problem['type']]}")
    if where != field and f"{field}[]" in musts:  # an item of a list
        return RequestError(422, "Validation", f"{where} must be {musts[field + '[]']}, got {_json(problem)}")
    must = musts.get(field)
    if must is None:
        return RequestError(422, "Validation", f"{where}: {problem['msg']}")
    return RequestError(422, "Validation", f"{field} must be {must}, got {_json(problem)}")


def _json(problem: dict) -> str:
    """The value at fault, as JSON."""
    try:
        return json.dumps(problem.get("input"))
    except (TypeError, ValueError):
        return repr(problem.get("input"))


def component_schemas(models: list[type[BaseModel]]) -> dict:
    """The JSON Schemas of ``models`` and of the models they hold, by class name, as OpenAPI components."""
    _, schemas = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return schemas.get("$defs", {})

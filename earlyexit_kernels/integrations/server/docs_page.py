"""``GET /docs``: the OpenAPI document as one self-contained HTML page.

No script and nothing fetched from elsewhere, so the page works on a server without internet
access: each route with its summary, description, request and answer schemas and status codes,
rendered from :func:`.openapi.openapi_document`. Interactive viewers (Swagger UI, Redoc,
editors' REST clients) read ``/openapi.json`` itself.
"""

from __future__ import annotations

import html
import json
import re

__all__ = ["docs_page"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}"
    "h2{font-family:monospace;border-top:1px solid #ccc;padding-top:1rem}"
    "pre{background:#f5f5f5;padding:.5rem;overflow-x:auto;font-size:.85rem}"
    "summary{cursor:pointer}"
)


def _prose(text: str) -> str:
    """``text`` escaped for HTML, its Markdown code spans (the document's descriptions use them) as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def docs_page(document: dict) -> str:
    """The HTML page of ``document`` (an OpenAPI 3.1 dict as :func:`.openapi.openapi_document` builds)."""
    schemas = document.get("components", {}).get("schemas", {})
    info = document["info"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(info['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(info['title'])} <small>{html.escape(info['version'])}</small></h1>",
        f"<p>{_prose(info.get('description', ''))}</p>",
        "<p>The machine-readable document: <a href='openapi.json'>openapi.json</a>.</p>",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            parts.append(f"<h2>{method.upper()} {html.escape(path)}</h2>")
            parts.append(f"<p>{_prose(operation.get('summary', ''))}</p>")
            if operation.get("description"):
                parts.append(f"<p>{_prose(operation['description'])}</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                parts.append(_schema_block("Request body", body["schema"], schemas))
            for status, answer in operation["responses"].items():
                for media, content in answer.get("content", {}).items():
                    title = f"{status} ({media}): {answer['description']}"
                    parts.append(_schema_block(title, content["schema"], schemas))
    parts.append("</body></html>")
    return "\n".join(parts)


def _schema_block(title: str, schema: dict, schemas: dict) -> str:
    text = json.dumps(_resolved(schema, schemas), indent=2, ensure_ascii=False)
    return f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>"


def _resolved(schema, schemas: dict):
    """``schema`` with each ``$ref`` to a component replaced by the component (they do not nest in themselves)."""
    if isinstance(schema, dict):
        reference = schema.get("$ref", "")
        if reference.startswith("#/components/schemas/"):
            return _resolved(schemas[reference.rsplit("/", 1)[1]], schemas)
        return {key: _resolved(value, schemas) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_resolved(value, schemas) for value in schema]
    return schema

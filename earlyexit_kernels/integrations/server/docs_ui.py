"""``GET /docs``: Swagger UI over ``/openapi.json``, "Try it out" included, served offline.

Swagger UI's files come from the ``swagger-ui-bundle`` package (PyPI, in the ``serve`` extra) and
are served by this server itself at ``GET /docs/{asset}``, so the page fetches nothing from
elsewhere and works on a server without internet access; its requests go to this server. Without
the package, ``/docs`` is a short page saying how to install it, and ``/openapi.json`` (which any
OpenAPI viewer or client reads) is unchanged.

The files are Swagger UI's own, public: ``/docs/{asset}`` needs no API key (a browser loading the
page sends none with them); ``/docs`` itself does, like every route but ``/health`` (Swagger UI's
"Authorize" takes the key for "Try it out").
"""

from __future__ import annotations

import html
from pathlib import Path

__all__ = ["ASSETS", "assets_folder", "docs_page"]

#: the files of Swagger UI the page loads -> their media types
ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}


def assets_folder() -> Path | None:
    """The folder of Swagger UI's files, or None where ``swagger-ui-bundle`` is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(swagger_ui_path)


def docs_page(title: str) -> str:
    """The page: Swagger UI over ``openapi.json`` (paths relative, so a proxy's prefix is kept)."""
    title = html.escape(title)
    if assets_folder() is None:
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>The interactive page needs Swagger UI's files: <code>pip install "
            "swagger-ui-bundle</code> (in the <code>serve</code> extra) and restart the server. The OpenAPI "
            "document is at <a href='openapi.json'>openapi.json</a>.</p></body></html>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<link rel='stylesheet' href='docs/swagger-ui.css'><link rel='icon' href='docs/favicon-32x32.png'>"
        "</head><body><div id='swagger-ui'></div><script src='docs/swagger-ui-bundle.js'></script><script>"
        "window.ui = SwaggerUIBundle({url: 'openapi.json', dom_id: '#swagger-ui', tryItOutEnabled: true, "
        "deepLinking: true, persistAuthorization: true, displayRequestDuration: true});"
        "</script></body></html>"
    )

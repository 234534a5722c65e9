"""``GET /docs``: Swagger UI over ``/openapi.json``, "Try it out" included, served offline.

Swagger UI's files come from the ``swagger-ui-py`` package (PyPI, in the ``serve`` extra; it ships
Swagger UI 5, the first to read OpenAPI 3.1, which ``/openapi.json`` is) and are served by this
server itself at ``GET /docs/{asset}``, so the page fetches nothing from elsewhere and works on a
server without internet access; its requests go to this server. Without the package, ``/docs`` is
a short page saying how to install it, and ``/openapi.json`` (which any OpenAPI viewer or client
reads) is unchanged. ``swagger-ui-bundle``, the package before, ships Swagger UI 4, which shows
"the provided definition does not specify a valid version field" for a 3.1 document: it is not used.

The files are Swagger UI's own, public: ``/docs/{asset}`` needs no API key (a browser loading the
page sends none with them); ``/docs`` itself does, like every route but ``/health`` (Swagger UI's
"Authorize" takes the key for "Try it out").
"""

from __future__ import annotations

import html
import importlib.util
import re
from pathlib import Path

__all__ = ["ASSETS", "INSTALL", "assets_folder", "docs_page", "bundled_version", "reads_openapi"]

#: the files of Swagger UI the page loads -> their media types
ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
#: what to install for the page
INSTALL = "pip install swagger-ui-py"


def assets_folder() -> Path | None:
    """The folder of Swagger UI's files (``swagger-ui-py``'s ``static``), or None where it is not installed.

    Found without importing the package (its import pulls in its web-framework handlers)."""
    try:
        spec = importlib.util.find_spec("swagger_ui")
    except (ImportError, ValueError, AttributeError):  # not installed, or blocked (sys.modules entry None)
        return None
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if all((folder / name).is_file() for name in ASSETS) else None


def bundled_version(folder: Path | None = None) -> str | None:
    """The version of Swagger UI in ``folder`` (default :func:`assets_folder`), read from its bundle's build
    constants; None where there is none or the bundle does not say."""
    folder = assets_folder() if folder is None else folder
    if folder is None:
        return None
    text = (folder / "swagger-ui-bundle.js").read_text(encoding="utf-8", errors="replace")
    found = re.search(r'PACKAGE_VERSION:"(\d+\.\d+\.\d+)"', text)
    return found.group(1) if found else None


def reads_openapi(ui_version: str, openapi_version: str) -> bool:
    """Whether Swagger UI ``ui_version`` renders a document of OpenAPI ``openapi_version``: 3.0 from Swagger
    UI 3, 3.1 from Swagger UI 5 (5.0.0, 2023)."""
    ui = tuple(int(part) for part in ui_version.split(".")[:2])
    spec = tuple(int(part) for part in openapi_version.split(".")[:2])
    if spec[0] == 3 and spec[1] == 0:
        return ui >= (3, 0)
    if spec[0] == 3 and spec[1] == 1:
        return ui >= (5, 0)
    return False


def docs_page(title: str) -> str:
    """The page: Swagger UI over ``openapi.json`` (paths relative, so a proxy's prefix is kept)."""
    title = html.escape(title)
    if assets_folder() is None:
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>The interactive page needs Swagger UI's files: <code>{INSTALL}</code> (in the "
            "<code>serve</code> extra) and restart the server. The OpenAPI document is at "
            "<a href='openapi.json'>openapi.json</a>.</p></body></html>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<link rel='stylesheet' href='docs/swagger-ui.css'><link rel='icon' href='docs/favicon-32x32.png'>"
        "</head><body><div id='swagger-ui'></div><script src='docs/swagger-ui-bundle.js'></script><script>"
        "window.ui = SwaggerUIBundle({url: 'openapi.json', dom_id: '#swagger-ui', tryItOutEnabled: true, "
        "deepLinking: true, persistAuthorization: true, displayRequestDuration: true});"
        "</script></body></html>"
    )

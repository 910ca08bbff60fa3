"""Pages for people: the playground at ``/`` and the API docs at ``/docs`` and ``/redoc``, served
from files in this package (the docs' assets from fastapi-offline's copy of Swagger UI 5 and ReDoc),
so they work on a machine with no internet."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"


# ReDoc's footer shows Redocly's logo from their CDN (hidden when it fails): on a machine with no
# internet a failed request, and elsewhere a request to a third party from every reader. The
# script is served with that address made an empty data: URL, which fails at once, unseen.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def _redoc_script() -> bytes:
    return (DOCS_ASSETS / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, b"data:,")


def mount_pages(app: FastAPI) -> None:
    redoc_script = _redoc_script()

    # Before the mount below: this path is the mount's, and routes are matched in order.
    @app.get("/static/docs/redoc.standalone.js", include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(redoc_script, media_type="text/javascript", headers={"cache-control": "public, max-age=3600"})

    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "playground" / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="neuroserve API",
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/static/docs/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="neuroserve API",
            redoc_js_url="/static/docs/redoc.standalone.js",
            redoc_favicon_url="/static/docs/favicon.png",
            with_google_fonts=False,
        )

"""The dashboard's web app: one HTML page, its script and style, and the JSON state they draw.

``/`` serves ``static/index.html``; ``/static/dashboard.js`` and ``/static/dashboard.css`` are read from
the package (nothing from a CDN: the page works on a machine without internet). The page polls
``/api/v1/state``, the raw picture from :func:`corolla.monitor.state.swarm_json`. FastAPI's own docs
pages are off: they load their assets from a CDN.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response

STATIC_FILES = {  # served name -> media type; a fixed list, so no path from a URL reaches the file system
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
NO_CACHE = {"Cache-Control": "no-store"}


def static_text(name: str) -> str:
    return resources.files("corolla.monitor").joinpath("static", name).read_text(encoding="utf-8")


def create_app(get_state: Callable[[], dict[str, Any]]) -> FastAPI:
    """The app; ``get_state`` returns the latest JSON picture (it must be cheap: every poll calls it)."""
    app = FastAPI(title="corolla monitor", docs_url=None, redoc_url=None, openapi_url=None)
    page = static_text("index.html")
    assets = {name: static_text(name) for name in STATIC_FILES}

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=NO_CACHE)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
        return Response(assets[name], media_type=STATIC_FILES[name], headers=NO_CACHE)

    @app.get("/api/v1/state")
    def state() -> JSONResponse:
        return JSONResponse(get_state(), headers=NO_CACHE)

    return app

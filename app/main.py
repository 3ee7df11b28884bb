"""The application factory: `create_app(settings)` wires settings, state, middleware, errors and routers.

Nothing loads here: app/lifespan.py loads the checkpoint (and the index) at start-up, and
app/openapi.py shapes the schema clients are generated from.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .dependencies import ServiceState
from .errors import install_error_handlers
from .lifespan import lifespan
from .limits import ServingLimits, load_limits
from .middleware import (
    AuthFirstMiddleware,
    BodyLimitMiddleware,
    JsonErrorsMiddleware,
    RequestContextMiddleware,
)
from .multipart_guard import MultipartGuardMiddleware
from .openapi import DESCRIPTION, TAGS, install_openapi
from .routers import classify, embed, images, search, similarity, system
from .settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
VERSION = "0.1.0"


def create_app(settings: Settings, limits: ServingLimits | None = None) -> FastAPI:
    """A FastAPI app over one checkpoint (and optionally one index); nothing loads until start-up.

    `limits` defaults to the CLIPFORGE_* environment (app/limits.py).
    """
    limits = limits if limits is not None else load_limits()
    state = ServiceState(settings=settings, limits=limits)
    form_fields = max(settings.max_labels, settings.max_texts) + 16
    app = FastAPI(
        title="clipforge", version=VERSION, lifespan=lifespan(state), openapi_tags=TAGS, description=DESCRIPTION,
        form_limits={"max_fields": form_fields, "max_files": settings.max_images + 1,
                     "max_part_size": max(settings.max_text_chars * 4 + 1024, 64 * 1024)},
    )
    app.state.service = state
    install_error_handlers(app)
    # outermost last: request ids and logs, CORS, every error as JSON, the key, then the body's limits
    app.add_middleware(MultipartGuardMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       idle_timeout_s=limits.body_idle_timeout_s, total_timeout_s=limits.body_timeout_s)
    app.add_middleware(AuthFirstMiddleware, router=app.router, settings=settings)
    app.add_middleware(JsonErrorsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"], expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    for module in (classify, search, similarity, embed, images, system):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    install_openapi(app, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

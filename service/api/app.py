"""The application factory: ``create_app(settings)`` builds everything; nothing happens at import."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from service import __version__, tracing
from service.admission import Claim
from service.api.auth import KeyStore, load_keys
from service.api.crossorigin import CorsMiddleware, CrossOriginPolicy, HostAllowlist
from service.api.handlers import install_handlers
from service.api.middleware import EarlyRefusals, RequestGuard
from service.api.pages import mount_pages
from service.api.routes import health, v2
from service.api.routes import metrics as metrics_routes
from service.api.schemas import apply_limits, protocol_statuses
from service.config import Settings
from service.errors import Overloaded
from service.memory import settle_heap
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.responses import JSONResponse
from service.tasks import TASKS

log = logging.getLogger(__name__)

DESCRIPTION = """
A model server for ONNX models: the Open Inference Protocol (KServe v2) for every model in the
repository, and task endpoints for web and mobile clients that send files and text.

Errors always have the shape `{"error": "...", "error_type": "..."}`. Responses that ran a batch
carry `x-queue-time-ms`, `x-inference-time-ms` and `x-batch-size` headers.
"""


# What a browser page may read of an answer besides the body.
EXPOSED_HEADERS = [
    "x-request-id",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "x-queue-time-ms",
    "x-inference-time-ms",
    "x-batch-size",
    "x-decode-steps",
    "x-seed",  # a generated PNG's seed, so that a page can make it again
]


# FastAPI's own OpenTelemetry hook (0.16x) asks OpenTelemetry's global providers on every request:
# 5 % of the event loop's time at 64 clients on 2 cores when opentelemetry is installed (py-spy).
_NO_NATIVE_TELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters
    else {}
)


def _admissions(registry: ModelRegistry):  # type: ignore[no-untyped-def]
    """What the middleware asks of each request before routing: a 429 when the task (or
    the v2 model) it is for has every queue full, else its claim on places in those queues
    (see service.admission). The task of each POST path is read off its router."""
    task_of = {
        route.path: task.name
        for task in TASKS.values()
        if (router := task.router()) is not None
        for route in router.routes
        if "POST" in getattr(route, "methods", ())
    }

    def admit(method: str, path: str) -> Claim | Overloaded | None:
        if method != "POST":
            return None
        task = task_of.get(path)
        if task is not None:
            return registry.admission(task)
        parts = path.split("/")  # /v2/models/<name>/infer
        if len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[4] == "infer":
            return registry.infer_admission(parts[3])
        return None

    return admit


def _state_limits(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document states the limits this server runs with (its settings), not defaults."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = protocol_statuses(apply_limits(generate(), settings))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    tracing.configure(settings.otel_exporter, endpoint=settings.otel_endpoint, service_name=settings.otel_service_name)
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.discover()
        # Load in the background so that liveness answers at once and readiness reports progress.
        loader = asyncio.create_task(registry.load_all(), name="load-models")
        loader.add_done_callback(lambda _: settle_heap())
        poller = None
        if settings.model_control == "poll":
            poller = asyncio.create_task(registry.poll_repository(settings.model_poll_interval_s), name="poll-models")
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
            # Shutdown: the server has stopped taking requests; answer everything already queued.
            if not loader.done():
                loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await registry.close(drain=True)
            gallery = getattr(app.state, "gallery", None)
            if gallery is not None:  # opened on first use by the face routes
                app.state.gallery = None
                gallery.close()
            log.info("all model queues drained; shutting down")

    app = FastAPI(
        title="neuroserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=JSONResponse,
        docs_url=None,  # served below from this package's own files: no CDN, works offline
        redoc_url=None,
        **_NO_NATIVE_TELEMETRY,
    )
    # No redirect from /v2/ to /v2: it reflected the Host header into Location, and the protocol's
    # paths have no trailing slash.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    # The server's HTTP protocol answers the guard's refusals itself (service.server).
    app.state.early_refusals = EarlyRefusals()
    # How many images decode at once, across every request: each may be a full-size photo.
    app.state.decode_slots = threading.BoundedSemaphore(settings.image_decode_slots or Settings.cpu_cores())
    install_handlers(app)
    # Innermost first: compression, then the request guard (ids, limits, keys, shedding), then
    # CORS outermost, so that preflights need no key and every answer, errors too, is readable
    # by an allowed origin.
    app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_min_bytes)  # never on event streams
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_request_bytes,
        metrics=metrics,
        access_log=settings.access_log,
        admit=_admissions(registry),
        keys=KeyStore(load_keys(settings.api_keys_file)) if settings.api_keys_file else None,
        fast=v2.fast_path(app.exception_handlers),
        early=app.state.early_refusals,
        cross_origin=CrossOriginPolicy(settings.cors_allow_origins) if settings.cross_origin_protection else None,
        hosts=HostAllowlist(settings.allowed_hosts)
        if settings.allowed_hosts and "*" not in settings.allowed_hosts
        else None,
    )
    if settings.cors_allow_origins:
        cors = {
            "allow_origins": settings.cors_allow_origins,
            "allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],  # DELETE: the face gallery
            "allow_headers": ["authorization", "content-type", "x-api-key", "x-request-id", "traceparent"],
            "expose_headers": EXPOSED_HEADERS,
            "max_age": settings.cors_max_age_s,
        }
        app.add_middleware(CorsMiddleware, **cors)
        # The same headers on the answers the HTTP protocol gives before the stack (EarlyRefusals).
        app.state.early_refusals.cors = CORSMiddleware(app=None, **cors)  # type: ignore[arg-type]
    _state_limits(app, settings)
    app.router.routes.extend(v2.fast_routes)
    mount_pages(app)
    for router in (health.router, v2.router, *(task.router() for task in TASKS.values()), metrics_routes.router):
        if router is not None:
            app.include_router(router)
    return app

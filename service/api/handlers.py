"""One place that turns errors into the service's JSON error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InvalidJSON,
    ModelNotReady,
    Overloaded,
    SchemaError,
    ServiceError,
    TextTooLong,
    TooManyItems,
    describe_validation,
    error_for_status,
)
from service.responses import JSONResponse

log = logging.getLogger(__name__)


def speaks_openai(path: str) -> bool:
    """The OpenAI-compatible routes (and OpenAI paths this server lacks, so that an OpenAI client
    reads their 404) answer errors in OpenAI's shape: its client libraries parse that."""
    return path in ("/v1/completions", "/v1/models") or path.startswith(("/v1/models/", "/v1/chat/", "/v1/embeddings"))


def error_status(exc: ServiceError, path: str | None = None) -> int:
    """On the OpenAI routes a request OpenAI would call invalid is a 400, as there (its clients map
    400 to BadRequestError): a schema error (422 here) or too many or too long prompts (413). On the
    Open Inference Protocol's routes (``/v2/...``) a schema error is a 400 too: the published spec
    documents 400 for a bad request and no 422 (as Triton answers)."""
    if path is not None and isinstance(exc, SchemaError | TooManyItems | TextTooLong) and speaks_openai(path):
        return 400
    if path is not None and isinstance(exc, SchemaError) and path.startswith("/v2/"):
        return 400
    return exc.status_code


def error_body(exc: ServiceError, path: str | None = None) -> dict:
    return exc.to_openai_dict() if path is not None and speaks_openai(path) else exc.to_dict()


def error_response(exc: ServiceError, path: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(exc, path), status_code=error_status(exc, path), headers=exc.headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, Overloaded | DeadlineExceeded | ModelNotReady):
            log.error("request failed: %s", exc.message)
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A body that is not JSON at all is a 400; JSON of the wrong shape is a 422.
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_response(InvalidJSON("request body is not valid JSON"), request.url.path)
        return error_response(SchemaError(describe_validation(exc.errors(), skip=("body",))), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            # Starlette names the methods of the first route on the path; /v1/faces has three.
            # (None found: a mounted app such as /static, whose own Allow stands.)
            headers = {**(headers or {}), "Allow": allowed}
        detail = str(exc.detail)
        if exc.status_code == 404 and request.url.path.startswith(("/v1/chat/", "/v1/embeddings")):
            # What an OpenAI client tries first; a bare "Not Found" left its users guessing.
            detail = (
                f"{request.url.path} is not served: this server's language models continue text (no chat "
                "template, no embeddings); use POST /v1/completions with a prompt (GET /v1/models lists them)"
            )
        return error_response(error_for_status(exc.status_code, detail, headers), request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left mid-upload: nobody reads this answer; logs and metrics see 499, not a 500.
        return error_response(ClientDisconnected("the client disconnected before its request body arrived"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ServiceError(f"internal error: {type(exc).__name__}"), request.url.path)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (HEAD with GET: the guard answers it)."""
    routes = request.app.router.routes
    methods = [
        method
        for method in ("DELETE", "GET", "POST", "PUT", "PATCH")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    if "GET" in methods:
        methods.append("HEAD")
    return ", ".join(sorted(methods))

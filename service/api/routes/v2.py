"""Open Inference Protocol (KServe v2) model endpoints, for every model in the repository."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Scope

from service import protocol
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.routes.health import ModelStateName
from service.api.schemas import V2_ERROR_RESPONSES as ERROR_RESPONSES
from service.api.schemas import ErrorType, is_json_media, json_body_doc, media_type, read_json
from service.config import Settings
from service.errors import InvalidInput, ModelControlDisabled, ModelNotReady, UnsupportedMediaType
from service.registry import ModelRegistry, ModelState, ModelVersionMetadata
from service.responses import JSONResponse, ModelResponse

router = APIRouter(tags=["open inference protocol (v2)"])


class IndexRow(BaseModel):
    name: str
    task: str | None = Field(
        description="The task that serves it; 'none' for v2 only; null if model.json is unreadable"
    )
    default: bool = Field(description="Its task's default model (answers requests that name none)")
    state: ModelStateName
    version: str | None = None
    reason: str | None = Field(None, description="Why it failed to load")


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


class ModelNotReadyResponse(BaseModel):
    error: str
    error_type: ErrorType
    name: str
    ready: bool


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="Row-major values (absent when sent as binary)")
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


_INFER_EXAMPLE = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype", "data"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "example": "FP32"},
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {}}}},
                    },
                },
                "example": _INFER_EXAMPLE,
            },
            # Triton's binary tensor extension (README): the JSON header, then each binary input's
            # raw bytes; the header's length in Inference-Header-Content-Length.
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Binary tensor extension: bytes of the JSON header at the start of the body; the "
            "raw bytes of the inputs marked binary_data_size follow it.",
        }
    ],
    "responses": {
        "200": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON, or with binary_data_output (or an output's binary_data) the JSON header "
            "followed by those outputs' raw bytes, its length in Inference-Header-Content-Length.",
        }
    },
}


@router.get(
    "/v2/models",
    summary="Every model in the repository with its state",
    response_model=list[IndexRow],
    responses=ERROR_RESPONSES,
)
async def models_index(registry: RegistryDep) -> Response:
    return _index(registry, ready_only=False)


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="Only the models that are ready to serve")


@router.post(
    "/v2/repository/index",
    summary="Model repository index (Triton's extension)",
    response_model=list[IndexRow],
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(IndexRequest, required=False),
)
async def repository_index(request: Request, registry: RegistryDep) -> Response:
    body = await read_json(request, IndexRequest, optional=True)
    return _index(registry, ready_only=body.ready)


def _index(registry: ModelRegistry, *, ready_only: bool) -> Response:
    rows = []
    for status in registry.models.values():
        if ready_only and status.state is not ModelState.READY:
            continue
        for version in sorted(status.versions) or [None]:
            rows.append(
                IndexRow(
                    name=status.name,
                    task=status.task,
                    default=status.default,
                    state=status.state.value,
                    version=None if version is None else str(version),
                    reason=status.reason,
                )
            )
    # "version" and "reason" only where there is one; "task" always (null: model.json unreadable).
    dumped = [{k: v for k, v in row.model_dump().items() if v is not None or k == "task"} for row in rows]
    return JSONResponse(dumped)


class LoadParameters(BaseModel):
    config: str | None = Field(
        None,
        description="model.json fields (a JSON object as a string: Triton's form) replacing the file's for this load",
    )


class LoadRequest(BaseModel):
    parameters: LoadParameters | None = None


class ModelControlAnswer(BaseModel):
    name: str
    state: ModelStateName
    versions: list[str] = Field(description="The versions that serve now")
    reason: str | None = None


def _control_allowed(settings: Settings) -> None:
    if settings.model_control != "explicit":
        how = "the repository is polled" if settings.model_control == "poll" else "model control is off"
        raise ModelControlDisabled(f"loading and unloading by request needs NEUROSERVE_MODEL_CONTROL=explicit ({how})")


def _answer(status: Any) -> ModelResponse:
    return ModelResponse(
        ModelControlAnswer(
            name=status.name,
            state=status.state.value,
            versions=[str(v) for v in sorted(status.versions)],
            reason=status.reason,
        )
    )


@router.post(
    "/v2/repository/models/{model}/load",
    summary="Load or reload a model (Triton's model repository extension)",
    description="The model's folder is read again; its versions load and warm beside those that serve, then "
    "requests switch to them at once; requests already running or queued finish on the old ones. If loading "
    "fails, the versions that served go on serving (400 with the reason). Needs NEUROSERVE_MODEL_CONTROL=explicit.",
    response_model=ModelControlAnswer,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(LoadRequest, required=False),
)
async def load_model(model: str, request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    _control_allowed(settings)
    # Read by hand, not as a FastAPI body parameter: that one took only a JSON Content-Type, and
    # tritonclient's load_model sends "{}" with none (422 before).
    body = await read_json(request, LoadRequest, optional=True)
    override = None
    if body.parameters is not None and body.parameters.config is not None:
        try:
            override = orjson.loads(body.parameters.config)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"parameters.config is not JSON: {exc}") from None
        if not isinstance(override, dict):
            raise InvalidInput("parameters.config must be a JSON object of model.json fields")
    return _answer(await registry.load_model(model, override))


@router.post(
    "/v2/repository/models/{model}/unload",
    summary="Unload a model (Triton's model repository extension)",
    description="New requests for it get 503 at once; requests already running or queued finish. Needs "
    "NEUROSERVE_MODEL_CONTROL=explicit.",
    response_model=ModelControlAnswer,
    responses=ERROR_RESPONSES,
)
async def unload_model(model: str, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    _control_allowed(settings)
    return _answer(await registry.unload_model(model))


class DurationStat(BaseModel):
    count: int
    ns: int


class InferenceStats(BaseModel):
    success: DurationStat
    fail: DurationStat
    queue: DurationStat
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat
    cache_hit: DurationStat
    cache_miss: DurationStat


class BatchStat(BaseModel):
    batch_size: int
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat


class ModelStat(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch of the last execution (0: none yet).")
    inference_count: int = Field(description="Rows run (a batch of 8 counts 8; a decoder step counts its rows).")
    execution_count: int = Field(description="Batches run (decoder steps for step-level decoding).")
    inference_stats: InferenceStats
    batch_stats: list[BatchStat]


class ModelStatsResponse(BaseModel):
    model_stats: list[ModelStat]


# Before "/v2/models/{model}", which would otherwise take "stats" for a model's name.
@router.get(
    "/v2/models/stats",
    summary="Every serving model version's statistics (Triton's statistics extension)",
    response_model=ModelStatsResponse,
    responses=ERROR_RESPONSES,
)
@router.get(
    "/v2/models/{model}/stats",
    summary="A model's statistics, every serving version",
    response_model=ModelStatsResponse,
    responses=ERROR_RESPONSES,
)
@router.get(
    "/v2/models/{model}/versions/{version}/stats",
    summary="A model version's statistics",
    response_model=ModelStatsResponse,
    responses=ERROR_RESPONSES,
)
async def model_stats(registry: RegistryDep, model: str | None = None, version: str | None = None) -> ModelResponse:
    """Totals since each version was loaded: successful and failed requests with their time,
    time queued, executions by batch size (a decoding model's steps by rows)."""
    if version is not None:
        served = [registry.get(model, version)]  # type: ignore[arg-type]
    elif model is not None:
        registry.get(model)  # unknown: 404; loading or failed: 503 with the reason
        served = [registry.status(model).versions[v] for v in sorted(registry.status(model).versions)]
    else:
        served = [s for status in registry.models.values() for _, s in sorted(status.versions.items())]
    stats = [s.observer.stats.snapshot(s.name, str(s.version)) for s in served]
    return ModelResponse(ModelStatsResponse.model_validate({"model_stats": stats}))


@router.get(
    "/v2/models/{model}", summary="Model metadata", response_model=ModelVersionMetadata, responses=ERROR_RESPONSES
)
@router.get(
    "/v2/models/{model}/versions/{version}",
    summary="Model version metadata",
    response_model=ModelVersionMetadata,
    responses=ERROR_RESPONSES,
)
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> ModelResponse:
    return ModelResponse(registry.get(model, version).metadata())


_READY_DOC = {
    "response_model": ModelReady,
    "responses": {**ERROR_RESPONSES, 503: {"model": ModelNotReadyResponse, "description": "Loading or failed"}},
}


@router.get("/v2/models/{model}/ready", summary="Model readiness (503 while loading or failed)", **_READY_DOC)
@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness", **_READY_DOC)
async def model_ready(model: str, registry: RegistryDep, version: str | None = None) -> ModelResponse:
    status = registry.status(model)
    if status.state is not ModelState.READY:
        err = ModelNotReady(
            f"model {model!r} is {status.state.value}" + (f": {status.reason}" if status.reason else "")
        )
        body = ModelNotReadyResponse(**err.to_dict(), name=model, ready=False)
        return ModelResponse(body, status_code=err.status_code)
    served = registry.get(model, version)
    return ModelResponse(ModelReady(name=model, version=str(served.version), ready=True))


async def infer_endpoint(request: Request) -> Response:
    """The hot path, as a plain Starlette endpoint: FastAPI's dependency resolution and validation
    cost more event-loop time per request than a small model's whole inference, and the event loop
    is what limits throughput on a small CPU machine."""
    params = request.path_params
    served = request.app.state.registry.get(params["model"], params.get("version"))
    kind = media_type(request)
    if not (is_json_media(kind) or kind == "application/octet-stream"):  # octet-stream: binary tensors
        raise UnsupportedMediaType(
            f"content type {kind!r} is not accepted; send application/json (or application/octet-stream "
            "with Inference-Header-Content-Length)"
        )
    header, binary = protocol.split_binary(await request.body(), request.headers.get("inference-header-content-length"))
    settings = request.app.state.settings
    parse = functools.partial(_parse, header, binary, served.spec, served.batched, settings.max_tensor_elements)
    # A large body is parsed off the event loop: millions of JSON numbers take most of a second,
    # which every other request would wait through.
    parsed = parse() if len(header) + len(binary) < _PARSE_INLINE_BYTES else await run_in_threadpool(parse)
    result = await unless_disconnected(request, served.infer(parsed.feeds))
    datatypes = {t.name: t.datatype for t in served.spec.outputs}
    body, blobs = protocol.infer_response(served.name, served.version, result.outputs, parsed, datatypes)
    headers = result.timing_headers()
    if not blobs:
        return JSONResponse(body, headers=headers)
    # Binary tensor extension: the JSON header, then the raw output bytes.
    json_header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    headers["inference-header-content-length"] = str(len(json_header))
    return Response(json_header + b"".join(blobs), media_type="application/octet-stream", headers=headers)


_PARSE_INLINE_BYTES = 256 * 1024


def _parse(header: bytes, binary: bytes, spec, batched: bool, max_elements: int) -> protocol.InferRequest:  # type: ignore[no-untyped-def]
    return protocol.parse_infer_request(
        protocol.parse_json(header), spec.inputs, spec.outputs, batched, binary, max_elements
    )


class _FastRoute(Route):
    """A Starlette route that records itself in the scope, like FastAPI's, for per-route metrics."""

    def matches(self, scope):  # type: ignore[no-untyped-def]
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


INFER_PATHS = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
# Matched before every other route (see create_app); the FastAPI routes below document them.
fast_routes = [_FastRoute(path, infer_endpoint, methods=["POST"]) for path in INFER_PATHS]


def fast_path(exception_handlers: dict) -> Callable[[Scope], ASGIApp | None]:
    """The infer routes, run straight from the request guard: the middleware and router layers
    between it and the endpoint (compression, exception, exit-stack, routing) cost about 12 % of
    the event loop's time at 64 clients on 2 cores (py-spy, bench/run.py), for requests that use
    none of them. Errors still go through the application's handlers, as Starlette's exception
    middleware would pass them; a client that takes gzip goes the usual way, through compression.
    ``exception_handlers``: the application's, as ``app.exception_handlers``."""
    # Split as Starlette's exception middleware does; Exception (and 500) stay with the
    # outermost server-error middleware, which still wraps this path.
    handlers = (
        {k: v for k, v in exception_handlers.items() if not isinstance(k, int) and k is not Exception},
        {k: v for k, v in exception_handlers.items() if isinstance(k, int) and k != 500},
    )
    assert HTTPException in handlers[0], "install the application's handlers first"

    def dispatch(scope: Scope) -> ASGIApp | None:
        if scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            return None
        for name, value in scope["headers"]:
            if name == b"accept-encoding" and b"gzip" in value:
                return None
        for route in fast_routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                scope["starlette.exception_handlers"] = handlers
                return route.app
        return None

    return dispatch


_INFER_ROUTE = {"openapi_extra": _INFER_DOC, "response_model": InferResponse, "responses": ERROR_RESPONSES}


@router.post(INFER_PATHS[0], summary="Run inference (JSON tensors)", **_INFER_ROUTE)
@router.post(INFER_PATHS[1], summary="Run inference on a version", **_INFER_ROUTE)
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    return await infer_endpoint(request)

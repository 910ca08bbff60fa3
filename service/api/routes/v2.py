"""Open Inference Protocol (KServe v2) model endpoints, for every model in the repository."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import Match, Route

from service import protocol
from service.api.deps import RegistryDep
from service.api.disconnect import unless_disconnected
from service.errors import ModelNotReady
from service.registry import ModelState
from service.responses import JSONResponse

router = APIRouter(tags=["open inference protocol (v2)"])

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
            }
        },
    }
}


@router.get("/v2/models", summary="Every model in the repository with its state")
@router.post("/v2/repository/index", summary="Model repository index (Triton's extension)")
async def repository_index(registry: RegistryDep) -> JSONResponse:
    rows = []
    for status in registry.models.values():
        versions = sorted(status.versions) or [None]
        for version in versions:
            row = {"name": status.name, "task": status.task, "state": status.state.value}
            if version is not None:
                row["version"] = str(version)
            if status.reason:
                row["reason"] = status.reason
            rows.append(row)
    return JSONResponse(rows)


@router.get("/v2/models/{model}", summary="Model metadata")
@router.get("/v2/models/{model}/versions/{version}", summary="Model version metadata")
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> JSONResponse:
    return JSONResponse(registry.get(model, version).metadata())


@router.get("/v2/models/{model}/ready", summary="Model readiness (503 while loading or failed)")
@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness")
async def model_ready(model: str, registry: RegistryDep, version: str | None = None) -> JSONResponse:
    status = registry.status(model)
    if status.state is not ModelState.READY:
        err = ModelNotReady(
            f"model {model!r} is {status.state.value}" + (f": {status.reason}" if status.reason else "")
        )
        return JSONResponse({**err.to_dict(), "name": model, "ready": False}, status_code=err.status_code)
    served = registry.get(model, version)
    return JSONResponse({"name": model, "version": str(served.version), "ready": True})


async def infer_endpoint(request: Request) -> Response:
    """The hot path, as a plain Starlette endpoint: FastAPI's dependency resolution and validation
    cost more event-loop time per request than a small model's whole inference, and the event loop
    is what limits throughput on a small CPU machine."""
    params = request.path_params
    served = request.app.state.registry.get(params["model"], params.get("version"))
    header, binary = protocol.split_binary(await request.body(), request.headers.get("inference-header-content-length"))
    parsed = protocol.parse_infer_request(
        protocol.parse_json(header), served.spec.inputs, served.spec.outputs, served.batched, binary
    )
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


@router.post(INFER_PATHS[0], summary="Run inference (JSON tensors)", openapi_extra=_INFER_DOC)
@router.post(INFER_PATHS[1], summary="Run inference on a version", openapi_extra=_INFER_DOC)
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    return await infer_endpoint(request)

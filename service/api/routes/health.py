"""Liveness, readiness and server metadata (Open Inference Protocol)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service import __version__
from service.api.deps import RegistryDep, SettingsDep
from service.api.schemas import ERROR_RESPONSES, V2_ERROR_RESPONSES, ErrorType
from service.errors import NotReady
from service.responses import ModelResponse

router = APIRouter(tags=["health"])

ModelStateName = Literal["LOADING", "READY", "FAILED", "UNAVAILABLE"]
# What is implemented of the protocol's extensions: Triton's binary tensor data and statistics, and
# its model repository (index, load, unload) where model control is on.
EXTENSIONS = ["binary_tensor_data", "statistics"]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    models: dict[str, ModelStateName] = Field(description="Every model's state, by name.")
    failed: dict[str, str] = Field(default_factory=dict, description="Why each failed model failed, by name.")


class NotReadyResponse(Ready):
    error: str = Field(description="Why the server is not ready.")
    error_type: ErrorType


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


@router.get("/v2/health/live", summary="The process is up", response_model=Live, responses=ERROR_RESPONSES)
async def live() -> ModelResponse:
    return ModelResponse(Live(live=True))


@router.get(
    "/v2/health/ready",
    summary="Every model has been loaded and warmed (503 until then)",
    response_model=Ready,
    responses={
        **ERROR_RESPONSES,
        503: {"model": NotReadyResponse, "description": "Still loading, or no model could be loaded"},
    },
)
async def ready(registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    states = {name: status.state.value for name, status in registry.models.items()}
    failed = {name: status.reason or "" for name, status in registry.models.items() if status.state.value == "FAILED"}
    if registry.ready:
        return ModelResponse(Ready(ready=True, models=states, failed=failed))
    if not registry.loading_done.is_set():
        reason = "models are still loading"
    elif registry.error is not None:
        reason = registry.error
    else:
        reason = "no model serves" if not settings.require_all_models else "some models failed to load"
    err = NotReady(reason, headers={"Retry-After": str(settings.retry_after_s)})
    body = NotReadyResponse(**err.to_dict(), ready=False, models=states, failed=failed)
    return ModelResponse(body, status_code=err.status_code, headers=err.headers)


# The protocol's published OpenAPI document names it /v2/, its prose /v2: both answer, and neither
# redirects (a redirect put the request's Host header into Location).
@router.get("/v2/", include_in_schema=False)
@router.get("/v2", summary="Server metadata", response_model=ServerMetadata, responses=V2_ERROR_RESPONSES)
async def server_metadata(settings: SettingsDep) -> ModelResponse:
    extensions = [*EXTENSIONS, "model_repository"] if settings.model_control != "none" else EXTENSIONS
    return ModelResponse(ServerMetadata(name="neuroserve", version=__version__, extensions=extensions))

"""Liveness, readiness and server metadata (Open Inference Protocol)."""

from __future__ import annotations

from fastapi import APIRouter

from service import __version__
from service.api.deps import RegistryDep, SettingsDep
from service.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/v2/health/live", summary="The process is up")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get(
    "/v2/health/ready",
    summary="Every model has been loaded and warmed (503 until then)",
    responses={503: {"description": "Still loading, or no model could be loaded"}},
)
async def ready(registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    states = {name: status.state.value for name, status in registry.models.items()}
    if registry.ready:
        return JSONResponse({"ready": True, "models": states})
    if not registry.loading_done.is_set():
        reason = "models are still loading"
    elif registry.error is not None:
        reason = registry.error
    else:
        reason = "no model serves" if not settings.require_all_models else "some models failed to load"
    return JSONResponse(
        {"error": reason, "error_type": "not_ready", "ready": False, "models": states},
        status_code=503,
        headers={"Retry-After": str(settings.retry_after_s)},
    )


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": "neuroserve", "version": __version__, "extensions": ["model_repository"]})

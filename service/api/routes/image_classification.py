"""``POST /v1/image-classification``: image files in (multipart or base64 JSON), ranked labels out."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.images import Blobs, decode_all, read_images, request_doc
from service.api.schemas import ERROR_RESPONSES, ImageClassificationRequest, ImageClassificationResponse
from service.config import Settings
from service.errors import SchemaError
from service.responses import JSONResponse
from service.tasks import image_classification as task

router = APIRouter(tags=["tasks"])
TASK = "image-classification"


def _top_k(value: Any, settings: Settings) -> int:
    if value is None:
        return 5
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise SchemaError(f"top_k must be an integer, got {value!r}") from None
    if not 1 <= k <= settings.max_top_k:
        raise SchemaError(f"top_k must be between 1 and {settings.max_top_k}, got {k}")
    return k


def _prepare(blobs: Blobs, input_shape: list[int], method: str, settings: Settings) -> np.ndarray:
    return task.preprocess(decode_all(blobs, settings), input_shape, method)


@router.post(
    "/v1/image-classification",
    summary="Classify images (multipart files or base64 JSON)",
    response_model=ImageClassificationResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_doc(ImageClassificationRequest),
)
async def classify(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    blobs, fields = await read_images(request, settings, ImageClassificationRequest)
    k, model = _top_k(fields.get("top_k"), settings), fields.get("model")
    served = registry.for_task(TASK, model if isinstance(model, str) and model else None)
    spec_input, spec_output = served.spec.inputs[0], served.spec.outputs[0]
    method = served.spec.parameters.get("preprocessing", "resize")
    batch = await run_in_threadpool(_prepare, blobs, spec_input.shape, method, settings)
    result = await unless_disconnected(request, served.infer({spec_input.name: batch}))
    scores = result.outputs[spec_output.name]
    if served.spec.parameters.get("output") == "logits":
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    body = {
        "model": served.name,
        "version": str(served.version),
        "predictions": task.top_k(scores, served.spec.labels, k),
    }
    return JSONResponse(body, headers=result.timing_headers())

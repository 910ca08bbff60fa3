"""``POST /v1/image-classification``: image files in (multipart or base64 JSON), ranked labels out."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service import imaging
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import (
    ERROR_RESPONSES,
    ImageClassificationRequest,
    ImageClassificationResponse,
    parse_body,
)
from service.config import Settings
from service.errors import InvalidInput, SchemaError, TooManyItems, UnsupportedMediaType
from service.responses import JSONResponse
from service.tasks import image_classification as task

router = APIRouter(tags=["tasks"])
TASK = "image-classification"

_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ImageClassificationRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer", "default": 5},
                        "model": {"type": "string"},
                    },
                }
            },
        },
    }
}


async def _read_multipart(request: Request, settings: Settings) -> tuple[list[tuple[str, bytes]], Any, Any]:
    try:
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=16)
    except HTTPException as exc:  # Starlette's multipart errors (too many files, malformed body)
        raise InvalidInput(f"multipart body rejected: {exc.detail}") from None
    try:
        uploads = [f for key in ("files", "file") for f in form.getlist(key)]
        if not uploads:
            raise SchemaError("multipart body has no 'files' part")
        if len(uploads) > settings.max_images_per_request:
            raise TooManyItems(f"{len(uploads)} images; at most {settings.max_images_per_request} per request")
        blobs = []
        for i, upload in enumerate(uploads):
            if not isinstance(upload, UploadFile):
                raise SchemaError(f"files[{i}] must be a file part, not a text field")
            data = await upload.read(settings.max_image_bytes + 1)
            blobs.append((f"files[{i}] ({upload.filename})", data))
        return blobs, form.get("top_k"), form.get("model")
    finally:
        await form.close()  # spooled temporary files


def _read_json(body: bytes, settings: Settings) -> tuple[list[tuple[str, bytes]], Any, Any]:
    request = parse_body(body, ImageClassificationRequest)
    if len(request.images) > settings.max_images_per_request:
        raise TooManyItems(f"{len(request.images)} images; at most {settings.max_images_per_request} per request")
    blobs = [(f"images[{i}]", imaging.decode_base64(text, i)) for i, text in enumerate(request.images)]
    return blobs, request.top_k, request.model


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


def _prepare(blobs: list[tuple[str, bytes]], input_shape: list[int], method: str, settings: Settings) -> np.ndarray:
    images = [
        imaging.decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, name=name)
        for name, data in blobs
    ]
    return task.preprocess(images, input_shape, method)


@router.post(
    "/v1/image-classification",
    summary="Classify images (multipart files or base64 JSON)",
    response_model=ImageClassificationResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_DOC,
)
async def classify(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        blobs, top_k, model = await _read_multipart(request, settings)
    elif content_type in ("application/json", ""):
        blobs, top_k, model = _read_json(await request.body(), settings)
    else:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not accepted; send multipart/form-data files or application/json"
        )
    k = _top_k(top_k, settings)
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

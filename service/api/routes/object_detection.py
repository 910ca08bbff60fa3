"""``POST /v1/object-detection``: image files in (multipart or base64 JSON), boxes in their pixels out.

Several images of a request go to the model as one batch (and share batches with other requests).
``render=png|jpeg`` answers with the image and its boxes drawn instead of JSON, for demos.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.images import Blobs, decode_all, read_images, request_doc
from service.api.schemas import (
    ERROR_RESPONSES,
    DetectionOptions,
    ObjectDetectionRequest,
    ObjectDetectionResponse,
    validation_message,
)
from service.config import Settings
from service.errors import SchemaError
from service.responses import JSONResponse
from service.tasks import object_detection as task

router = APIRouter(tags=["tasks"])
TASK = "object-detection"
DEFAULT_SCORE_THRESHOLD = 0.3  # for a model whose model.json names no operating point


def _prepare(blobs: Blobs, size: int, pad_value: float, settings: Settings):
    images = decode_all(blobs, settings)
    boxed = [task.letterbox(image, size, pad_value) for image in images]
    return images, np.stack([b[0] for b in boxed]), [b[1] for b in boxed]


@router.post(
    "/v1/object-detection",
    summary="Detect objects in images (multipart files or base64 JSON)",
    response_model=ObjectDetectionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}, "image/jpeg": {}}}},
    openapi_extra=request_doc(ObjectDetectionRequest),
)
async def detect(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    blobs, fields = await read_images(request, settings, ObjectDetectionRequest)
    try:
        options = DetectionOptions.model_validate(fields)
    except ValidationError as exc:
        raise SchemaError(validation_message(exc)) from None
    served = registry.for_task(TASK, options.model)
    limit = served.spec.outputs[0].shape[1]
    max_detections = options.max_detections or (limit if limit > 0 else 100)
    if limit > 0 and max_detections > limit:
        raise SchemaError(f"max_detections: at most {limit} for model {served.name}, got {max_detections}")
    if options.render != "none" and len(blobs) != 1:
        raise SchemaError(f"render: send exactly one image to render, got {len(blobs)}")
    size = int(served.spec.parameters.get("input_size", served.spec.inputs[0].shape[-1]))
    pad_value = float(served.spec.parameters.get("pad_value", 114 / 255))
    score_threshold = options.score_threshold
    if score_threshold is None:
        score_threshold = float(served.spec.parameters.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
    images, batch, boxes = await run_in_threadpool(_prepare, blobs, size, pad_value, settings)
    result = await unless_disconnected(request, served.infer({served.spec.inputs[0].name: batch}))
    out_boxes, out_scores, out_classes = (result.outputs[t.name] for t in served.spec.outputs)
    found = [
        task.detections(
            out_boxes[i],
            out_scores[i],
            out_classes[i],
            boxes[i],
            served.spec.labels or [],
            score_threshold=score_threshold,
            iou_threshold=options.iou_threshold,
            max_detections=max_detections,
        )
        for i in range(len(images))
    ]
    headers = result.timing_headers()
    if options.render != "none":
        data = await run_in_threadpool(task.render, images[0], found[0], options.render)
        return Response(data, media_type=f"image/{options.render}", headers=headers)
    body = {
        "model": served.name,
        "version": str(served.version),
        "images": [{"width": b.width, "height": b.height, "detections": d} for b, d in zip(boxes, found, strict=True)],
    }
    return JSONResponse(body, headers=headers)

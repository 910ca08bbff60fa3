"""``POST /v1/object-detection``: image files in (multipart or base64 JSON), boxes in their pixels out.

Several images of a request go to the model as one batch (and share batches with other requests).
``render=png|jpeg`` answers with the image and its boxes drawn instead of JSON, for demos.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import imaging
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.images import Blobs, decode_each, read_images, request_doc
from service.api.schemas import ERROR_RESPONSES, SEVEN_PNG_BASE64, limit, validate
from service.errors import SchemaError
from service.responses import ModelResponse
from service.tasks import object_detection as task

router = APIRouter(tags=["tasks"])


class DetectionOptions(BaseModel):
    """The parameters of /v1/object-detection (form fields in multipart, keys in JSON)."""

    model_config = ConfigDict(extra="forbid")
    score_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Detections scoring lower are dropped; default: the model's own operating point "
        "(parameters.score_threshold in its model.json), else 0.3.",
    )
    iou_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Class-wise suppression: of two boxes of one class overlapping more, the lower goes.",
    )
    max_detections: int | None = Field(
        None, ge=1, description="Most detections per image (default and ceiling: the model's own maximum)."
    )
    class_agnostic: bool = Field(
        True,
        description="Suppress overlapping boxes whatever their class (one label per place, the best, with the "
        "others as alternatives); false: per class, as COCO's mAP is computed.",
    )
    render: Literal["none", "png", "jpeg"] = Field(
        "none", description="png/jpeg: answer with the (single) image and its boxes drawn, instead of JSON."
    )
    model: str | None = Field(None, description="A detection model by name; default: the task's default model.")


class ObjectDetectionRequest(DetectionOptions):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"images": [SEVEN_PNG_BASE64]}]}
    )
    images: list[str] = Field(
        min_length=1,
        json_schema_extra=limit("max_images_per_request"),
        description="Base64-encoded image files (PNG, JPEG, WebP, BMP, GIF); data URLs accepted.",
    )


class Box(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


class Alternative(BaseModel):
    label: str
    class_id: int
    score: float


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: Box = Field(description="Corners in the pixels of the image as sent (after its EXIF orientation).")
    alternatives: list[Alternative] = Field(
        default_factory=list,
        description="Other labels the model gave the same place, best first (at most 2): suppression is "
        "class-agnostic, so a place gets one detection with its best label.",
    )


class ImageDetections(BaseModel):
    width: int
    height: int
    detections: list[Detection]


class ObjectDetectionResponse(BaseModel):
    model: str
    version: str
    images: list[ImageDetections] = Field(description="One entry per image, in request order.")


def _prepare(request: Request, blobs: Blobs, size: int, pad_value: float, render: bool):
    def boxed(decoded: imaging.Decoded):
        array, box = task.letterbox(decoded.image, size, pad_value, original=(decoded.width, decoded.height))
        return array, box, decoded.image if render else None

    # Rendering draws on the image as sent, so it is decoded in full; else a JPEG decodes reduced.
    out = decode_each(
        blobs, request.app.state.settings, request.app.state.decode_slots, boxed, reduce_to=None if render else size
    )
    return [o[2] for o in out], np.stack([o[0] for o in out]), [o[1] for o in out]


@router.post(
    "/v1/object-detection",
    summary="Detect objects in images (multipart files or base64 JSON)",
    response_model=ObjectDetectionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}, "image/jpeg": {}}}},
    openapi_extra=request_doc(ObjectDetectionRequest),
)
async def detect(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    blobs, fields = await read_images(request, settings, ObjectDetectionRequest)
    options = validate(DetectionOptions, fields)
    served = registry.for_task(task.TASK.name, options.model)
    parameters: task.ObjectDetectionParameters = served.parameters  # type: ignore[assignment]
    limit = served.spec.outputs[0].shape[1]
    max_detections = options.max_detections or (limit if limit > 0 else 100)
    if limit > 0 and max_detections > limit:
        raise SchemaError(f"max_detections: at most {limit} for model {served.name}, got {max_detections}")
    if options.render != "none" and len(blobs) != 1:
        raise SchemaError(f"render: send exactly one image to render, got {len(blobs)}")
    size = task.TASK.input_size(served.spec, parameters)
    score_threshold = parameters.score_threshold if options.score_threshold is None else options.score_threshold
    images, batch, boxes = await run_in_threadpool(
        _prepare, request, blobs, size, parameters.pad_value, options.render != "none"
    )
    result = await unless_disconnected(request, served.infer_rows({served.spec.inputs[0].name: batch}))
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
            class_agnostic=options.class_agnostic,
        )
        for i in range(len(boxes))
    ]
    headers = result.timing_headers()
    if options.render != "none":
        data = await run_in_threadpool(task.render, images[0], found[0], options.render)
        return Response(data, media_type=f"image/{options.render}", headers=headers)
    body = ObjectDetectionResponse(
        model=served.name,
        version=str(served.version),
        images=[
            ImageDetections(width=b.width, height=b.height, detections=d) for b, d in zip(boxes, found, strict=True)
        ],
    )
    return ModelResponse(body, headers=headers)

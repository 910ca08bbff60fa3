"""``POST /v1/image-classification``: image files in (multipart or base64 JSON), ranked labels out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service import tracing
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.images import Blobs, decode_each, decode_inline, read_images, request_doc
from service.api.schemas import ERROR_RESPONSES, SEVEN_PNG_BASE64, limit
from service.config import Settings
from service.errors import SchemaError, ServiceError
from service.registry import ModelRegistry, ServedModel
from service.responses import ModelResponse
from service.tasks import image_classification as task
from service.tasks import image_ood

router = APIRouter(tags=["tasks"])
log = logging.getLogger(__name__)


class ImageClassificationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"images": [SEVEN_PNG_BASE64], "top_k": 3}]},
    )
    images: list[str] = Field(
        min_length=1,
        json_schema_extra=limit("max_images_per_request"),
        description="Base64-encoded image files (PNG, JPEG, WebP, BMP, GIF); data URLs accepted.",
    )
    top_k: int = Field(
        5, ge=1, json_schema_extra=limit("max_top_k"), description="Labels to return per image, best first."
    )
    model: str | None = Field(None, description="A model of this task; default: the task's default model.")


class LabelScore(BaseModel):
    label: str
    score: float


class OodScore(BaseModel):
    score: float = Field(
        description="Higher: less like the images the model was trained on. Its scale is the companion's own "
        "(mnist-ood: a negative log-likelihood; digits about -75 to -25, a blank page about 6e4)."
    )
    threshold: float = Field(description="The companion's calibrated threshold: flagged when the score is above it.")
    flagged: bool = Field(
        description="The score is past the threshold calibrated on held-out training-like images: "
        "the image is probably not what the model knows (a digit, for a digit classifier)."
    )


class ImageClassificationResponse(BaseModel):
    model: str
    version: str
    predictions: list[list[LabelScore]] = Field(description="One ranked list per image, in request order.")
    ood: list[OodScore] | None = Field(
        None,
        description="One per image, in request order, from the model's out-of-distribution companion "
        "(model.json parameters.ood); null when it has none or the companion is not serving.",
    )


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


def _prepare(
    request: Request,
    blobs: Blobs,
    input_shape: list[int],
    parameters: task.ImageClassificationParameters,
    *,
    inline: bool = False,
) -> np.ndarray:
    rows = decode_each(
        blobs,
        request.app.state.settings,
        # On the event loop the server-wide slots are never waited for: workers decoding large
        # images hold them for seconds, and the whole server would wait with this request.
        contextlib.nullcontext() if inline else request.app.state.decode_slots,
        lambda decoded: task.prepare(decoded.image, input_shape, parameters),
        reduce_to=task.decode_size(input_shape, parameters),
    )
    return np.stack(rows)


@router.post(
    "/v1/image-classification",
    summary="Classify images (multipart files or base64 JSON)",
    response_model=ImageClassificationResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_doc(ImageClassificationRequest),
)
async def classify(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    blobs, fields = await read_images(request, settings, ImageClassificationRequest)
    k, model = _top_k(fields.get("top_k"), settings), fields.get("model")
    served = registry.for_task(task.TASK.name, model if isinstance(model, str) and model else None)
    parameters: task.ImageClassificationParameters = served.parameters  # type: ignore[assignment]
    spec_input, spec_output = served.spec.inputs[0], served.spec.outputs[0]
    prepare = functools.partial(_prepare, request, blobs, spec_input.shape, parameters)
    with tracing.stage("preprocess", images=len(blobs)):
        if decode_inline(blobs, settings):
            batch = prepare(inline=True)
        else:
            batch = await run_in_threadpool(prepare)
    companion = _companion(registry, parameters)
    if companion is None:
        result = await unless_disconnected(request, served.infer_rows({spec_input.name: batch}))
        ood = None
    else:  # both graphs take the same prepared batch, each through its own batcher, at once
        both = asyncio.gather(
            served.infer_rows({spec_input.name: batch}),
            _judge(companion, batch),
        )
        result, ood = await unless_disconnected(request, both)
    scores = task.scores(result.outputs[spec_output.name], parameters)
    body = ImageClassificationResponse(
        model=served.name,
        version=str(served.version),
        predictions=task.top_k(scores, served.spec.labels, k),
        ood=ood,
    )
    return ModelResponse(body, headers=result.timing_headers())


async def _judge(companion: ServedModel, batch: np.ndarray) -> list[OodScore] | None:
    """The companion's verdicts, or None when it cannot give them now (its queue full, its graph
    failing): the classification does not fail with it."""
    try:
        judged = await companion.infer_rows({companion.spec.inputs[0].name: batch})
    except ServiceError as exc:
        log.warning("out-of-distribution companion %s gave no scores: %s", companion.name, exc.message)
        return None
    threshold = float(companion.parameters.threshold)  # type: ignore[attr-defined]
    return [
        OodScore(score=round(float(v), 6), threshold=round(threshold, 6), flagged=bool(v > threshold))
        for v in judged.outputs[image_ood.SCORE]
    ]


def _companion(registry: ModelRegistry, parameters: task.ImageClassificationParameters) -> ServedModel | None:
    """The classifier's out-of-distribution companion when it names one and it serves (a missing or
    failed companion leaves the answer without ``ood``, never fails the classification)."""
    if parameters.ood is None:
        return None
    try:
        companion = registry.get(parameters.ood)
    except ServiceError:
        return None
    return companion if companion.spec.task == image_ood.TASK.name else None

"""``POST /v1/image-generation``: handwritten numbers drawn by a generator, as PNG images."""

from __future__ import annotations

import base64
import secrets
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import ERROR_RESPONSES, json_body_doc, limit, read_json
from service.errors import SchemaError, TooManyItems
from service.responses import ModelResponse
from service.tasks import image_generation as task

router = APIRouter(tags=["tasks"])

MAX_SEED = 2**32 - 1


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"digits": "2026", "n": 4, "seed": 7}]}
    )
    digits: str = Field(
        min_length=1,
        pattern=r"^[0-9]+$",
        json_schema_extra=limit("max_generated_digits"),
        description="The number to draw, digits 0-9 only; each digit is drawn separately, side by side.",
    )
    n: int = Field(1, ge=1, json_schema_extra=limit("max_generated_images"), description="Images to draw.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Image i is drawn from seed + i: the same seed and digits give the same images. "
        "Default: a random seed, returned with each image.",
    )
    polarity: Literal["light-on-dark", "dark-on-light"] = Field(
        "light-on-dark", description="light-on-dark: white ink on black, as MNIST; dark-on-light: ink on paper."
    )
    scale: int = Field(1, ge=1, le=8, description="Each pixel becomes scale x scale pixels (28 px digits are small).")
    format: Literal["json", "png"] = Field("json", description="png: the image file itself (n must be 1).")
    model: str | None = Field(None, description="A model of this task; default: the task's default model.")


class GeneratedImage(BaseModel):
    digits: str
    seed: int = Field(description="Draws this image again with n 1 and the same digits.")
    width: int
    height: int
    png: str = Field(description="The PNG file, base64-encoded (grey, 8 bits).")


class ImageGenerationResponse(BaseModel):
    model: str
    version: str
    images: list[GeneratedImage]


@router.post(
    "/v1/image-generation",
    summary="Draw handwritten numbers (a generator trained on MNIST)",
    response_model=ImageGenerationResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}}}},
    openapi_extra=json_body_doc(ImageGenerationRequest),
)
async def generate(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Each digit of ``digits`` is drawn by the generator and the digits are set side by side; image
    ``i`` is drawn from ``seed + i`` (any image can be redrawn alone). With ``format`` png the
    answer is the PNG file itself and its seed is in the ``x-seed`` header."""
    body = await read_json(request, ImageGenerationRequest)
    if len(body.digits) > settings.max_generated_digits:
        raise TooManyItems(f"digits: at most {settings.max_generated_digits} digits, got {len(body.digits)}")
    if body.n > settings.max_generated_images:
        raise TooManyItems(f"n: at most {settings.max_generated_images} images, got {body.n}")
    if body.seed is not None and body.seed + body.n - 1 > MAX_SEED:  # every image's seed must be one to send
        raise SchemaError(f"seed: at most {MAX_SEED - body.n + 1} for n {body.n} (image i uses seed + i)")
    if body.format == "png" and body.n != 1:
        raise SchemaError(f"format png returns one image: n must be 1, got {body.n}")
    served = registry.for_task(task.TASK.name, body.model)
    parameters: task.ImageGenerationParameters = served.parameters  # type: ignore[assignment]
    if any(int(d) >= parameters.classes for d in body.digits):
        raise SchemaError(f"digits: model {served.name} draws classes 0-{parameters.classes - 1}")
    seed = secrets.randbelow(MAX_SEED - body.n + 2) if body.seed is None else body.seed
    seeds = [seed + i for i in range(body.n)]
    feeds = task.feeds(served.spec, body.digits, seeds, parameters.latent_dim)
    result = await unless_disconnected(request, served.infer_rows(feeds))
    tiles = result.outputs[served.spec.outputs[0].name]
    pixels = task.compose(tiles, body.n, dark_on_light=body.polarity == "dark-on-light", scale=body.scale)
    files = await run_in_threadpool(lambda: [task.png(p) for p in pixels])
    headers = result.timing_headers()
    if body.format == "png":
        return Response(files[0], media_type="image/png", headers={**headers, "x-seed": str(seed)})
    images = [
        GeneratedImage(
            digits=body.digits, seed=s, width=p.shape[1], height=p.shape[0], png=base64.b64encode(f).decode("ascii")
        )
        for s, p, f in zip(seeds, pixels, files, strict=True)
    ]
    return ModelResponse(
        ImageGenerationResponse(model=served.name, version=str(served.version), images=images), headers=headers
    )

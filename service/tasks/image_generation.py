"""Image generation: a class-conditional generator draws handwritten numbers, digit by digit.

The graph (``training/image_generation.py``) takes noise ``[batch, latent]`` (FP32, standard
normal) and the class to draw ``[batch]`` (INT64) and returns images ``[batch, 1, H, W]`` in
[0, 1], light ink on dark (MNIST's polarity). A number is drawn one digit per row, and the rows
are set side by side.

Noise comes from a seed, so that a seed says what an image is: image ``i`` of a request with seed
``s`` uses ``numpy.random.Generator(PCG64(s + i))``, one standard-normal row per digit, left to
right. Whatever else shares the batch, the same seed and digits give the same pixels; and image
``i`` can be redrawn alone with seed ``s + i`` and ``n`` 1.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pydantic import Field

from service.repository import ModelSpec
from service.tasks.base import Parameters, Task, require

# MNIST digits sit in a 20x20 box centred in 28x28: side by side they would stand 8 px apart, far
# wider than handwriting. Each tile loses this many columns on either side before they are joined.
_TRIM = 3


class ImageGenerationParameters(Parameters):
    latent_dim: int = Field(ge=1, description="Width of the noise input; must match the graph's")
    classes: int = Field(10, ge=1, description="Classes the generator draws (digits 0-9)")


class ImageGeneration(Task[ImageGenerationParameters]):
    name = "image-generation"
    parameters_model = ImageGenerationParameters
    routes = "service.api.routes.image_generation"

    def check(self, spec: ModelSpec, parameters: ImageGenerationParameters) -> None:
        require(len(spec.inputs) == 2, f"it takes noise and a class, the graph has {len(spec.inputs)} inputs")
        noise, label = noise_input(spec), label_input(spec)
        require(noise is not None, "one input must be FP32 [batch, latent] noise")
        require(label is not None, "one input must be INT64 [batch] classes")
        require(
            noise.shape[1] in (-1, parameters.latent_dim),  # type: ignore[union-attr]
            f"noise input is {noise.shape}, parameters.latent_dim is {parameters.latent_dim}",  # type: ignore[union-attr]
        )
        image = spec.outputs[0]
        require(
            len(image.shape) == 4 and image.shape[1] == 1 and image.shape[2] > 0 and image.shape[3] > 0,
            f"output {image.name!r} {image.shape} is not [batch, 1, height, width]",
        )


TASK = ImageGeneration()


def noise_input(spec: ModelSpec):  # type: ignore[no-untyped-def]
    return next((t for t in spec.inputs if t.datatype == "FP32" and len(t.shape) == 2), None)


def label_input(spec: ModelSpec):  # type: ignore[no-untyped-def]
    return next((t for t in spec.inputs if t.datatype == "INT64" and len(t.shape) == 1), None)


def feeds(spec: ModelSpec, digits: str, seeds: Sequence[int], latent: int) -> dict[str, np.ndarray]:
    """The graph's inputs for ``len(seeds)`` images of the number ``digits``: one row per digit."""
    noise = np.concatenate(
        [np.random.Generator(np.random.PCG64(s)).standard_normal((len(digits), latent)) for s in seeds]
    ).astype(np.float32)
    labels = np.tile(np.frombuffer(digits.encode("ascii"), dtype=np.uint8) - ord("0"), len(seeds)).astype(np.int64)
    return {noise_input(spec).name: noise, label_input(spec).name: labels}  # type: ignore[union-attr]


def compose(tiles: np.ndarray, count: int, *, dark_on_light: bool, scale: int) -> list[np.ndarray]:
    """``[count * digits, 1, H, W]`` in [0, 1] to ``count`` grey uint8 images of the digits side by side."""
    per = tiles.shape[0] // count
    trim = _TRIM if tiles.shape[3] > 4 * _TRIM else 0
    images = []
    for i in range(count):
        row = tiles[i * per : (i + 1) * per, 0, :, trim : tiles.shape[3] - trim]
        joined = np.concatenate(list(row), axis=1)
        if dark_on_light:
            joined = 1.0 - joined
        pixels = np.clip(np.rint(joined * 255.0), 0, 255).astype(np.uint8)
        if scale > 1:
            pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
        images.append(pixels)
    return images


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG", optimize=False)
    return out.getvalue()

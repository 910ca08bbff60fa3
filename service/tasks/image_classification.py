"""Image classification: client images in, ranked labels out.

The task feeds what the graph declares (one FP32 input ``[batch, C, H, W]``, C = 1 grey or 3 RGB,
H and W fixed; one output ``[batch, classes]``) and is told how in ``model.json`` ``parameters``
(:class:`ImageClassificationParameters`):

* ``preprocessing: "mnist"`` (grey 28x28 only) finds the digit in a photo and reproduces how MNIST
  itself was made, so that a phone photo or a scan of a digit looks to the model like a test digit
  (:mod:`service.digit_image`: the page's light, ruled lines, underlines and the table removed, then
  the digit cropped to its ink, fitted in a 20x20 box and centred by its centre of mass in 28x28).
* ``preprocessing: "resize"`` (the default) resizes the whole image to H x W (bilinear), grey or
  RGB as the graph takes, scales to [0, 1], optionally inverts (``invert``: light-on-dark models
  fed dark-on-light photos), then normalises per channel with ``mean`` and ``std``.
* ``output``: ``probabilities`` (default) or ``logits`` (a softmax is applied here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from service import imaging
from service.digit_image import mnist_like
from service.repository import ModelSpec
from service.tasks.base import Parameters, Task, require

# Past this size the photo is shrunk before analysis; the digit ends up 20 px tall anyway.
_ANALYSIS_MAX_SIDE = 512


def resized(image: Image.Image, channels: int, height: int, width: int) -> np.ndarray:
    """The whole image at the model's size, ``[channels, H, W]`` in [0, 1]."""
    if channels == 1:
        gray = imaging.to_gray(image, max_side=_ANALYSIS_MAX_SIDE)
        out = Image.fromarray(gray, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)[None]
    rgb = imaging.to_rgb(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


class ImageClassificationParameters(Parameters):
    preprocessing: Literal["mnist", "resize"] = Field(
        "resize", description="mnist: find, crop and centre a digit as MNIST did (grey 28x28); resize: whole image"
    )
    output: Literal["probabilities", "logits"] = Field("probabilities", description="logits get a softmax here")
    invert: bool = Field(False, description="resize: 1 - pixel (for light-on-dark models)")
    mean: list[float] | None = Field(None, description="Per-channel mean subtracted after scaling to [0, 1]")
    std: list[float] | None = Field(None, description="Per-channel divisor after the mean")
    ood: str | None = Field(
        None,
        description="A companion model of task image-ood: answers then say, per image, how unlike the training "
        "images it is, and whether that is past the companion's calibrated threshold",
    )


class ImageClassification(Task[ImageClassificationParameters]):
    name = "image-classification"
    parameters_model = ImageClassificationParameters
    routes = "service.api.routes.image_classification"

    def check(self, spec: ModelSpec, parameters: ImageClassificationParameters) -> None:
        require(len(spec.inputs) == 1, f"it takes one image input, the graph has {len(spec.inputs)}")
        image = spec.inputs[0]
        require(image.datatype == "FP32", f"input {image.name!r} must be FP32, not {image.datatype}")
        require(
            len(image.shape) == 4 and image.shape[1] in (1, 3) and image.shape[2] > 0 and image.shape[3] > 0,
            f"input {image.name!r} {image.shape} is not [batch, 1 or 3 channels, fixed height, fixed width]",
        )
        channels = image.shape[1]
        if parameters.preprocessing == "mnist":
            require(image.shape[1:] == [1, 28, 28], f"mnist preprocessing needs a [1, 28, 28] input, not {image.shape}")
            given = [k for k in ("mean", "std") if getattr(parameters, k) is not None] + (
                ["invert"] if parameters.invert else []
            )
            require(not given, f"mnist preprocessing sets its own scale and polarity: drop {', '.join(given)}")
        for key in ("mean", "std"):
            values = getattr(parameters, key)
            require(
                values is None or len(values) in (1, channels),
                f"parameters.{key} has {len(values or [])} values for {channels} channels",
            )
        require(parameters.std is None or all(v > 0 for v in parameters.std), "parameters.std must be positive")
        require(len(spec.outputs[0].shape) == 2, f"output {spec.outputs[0].name!r} must be [batch, classes]")
        super().check(spec, parameters)


TASK = ImageClassification()


def decode_size(input_shape: Sequence[int], parameters: ImageClassificationParameters) -> int:
    """The fewest pixels a side of the decoded image needs (a JPEG decodes at a reduced scale down
    to this): the digit analysis's working size, else twice the model's input side."""
    if parameters.preprocessing == "mnist":
        return _ANALYSIS_MAX_SIDE
    return 2 * max(input_shape[2], input_shape[3])


def prepare(image: Image.Image, input_shape: Sequence[int], parameters: ImageClassificationParameters) -> np.ndarray:
    """One decoded image to the model's input ``[C, H, W]`` float32 (the shape ``check`` accepted)."""
    _, channels, height, width = input_shape
    if parameters.preprocessing == "mnist":
        return mnist_like(imaging.to_gray(image, max_side=_ANALYSIS_MAX_SIDE))[None]
    out = resized(image, channels, height, width)
    if parameters.invert:
        out = 1.0 - out
    if parameters.mean is not None:
        out -= np.asarray(parameters.mean, dtype=np.float32).reshape(-1, 1, 1)
    if parameters.std is not None:
        out /= np.asarray(parameters.std, dtype=np.float32).reshape(-1, 1, 1)
    return out


def preprocess(
    images: Sequence[Image.Image], input_shape: Sequence[int], parameters: ImageClassificationParameters
) -> np.ndarray:
    """Decoded images to the model's input batch ``[n, C, H, W]`` float32."""
    return np.stack([prepare(image, input_shape, parameters) for image in images])


def scores(outputs: np.ndarray, parameters: ImageClassificationParameters) -> np.ndarray:
    if parameters.output != "logits":
        return outputs
    exp = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: Sequence[str] | None, k: int) -> list[list[dict]]:
    """One ranked ``[{"label", "score"}]`` list per row, highest score first."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    ranked = []
    for row, idx in zip(probabilities, order, strict=True):
        ranked.append([{"label": labels[j] if labels else str(j), "score": round(float(row[j]), 6)} for j in idx])
    return ranked

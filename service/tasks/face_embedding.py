"""Face recognition: a face in, a unit vector out; two faces are one person when the cosine of
their vectors reaches the model's threshold.

The graph takes ``[batch, 3, S, S]`` RGB in [0, 1]: the *face square* of an aligned face, the way
training cut it from LFW's deep-funneled images (``parameters.crop``, fractions of the aligned
image: forehead to chin, ear to ear), and returns ``[batch, D]`` unit vectors. Faces come from
two places:

* an aligned image (an LFW-style portrait, or a crop a client aligned itself): its face square is
  ``parameters.crop`` of the whole image;
* any photo, through a face detector (``parameters.detector``: a model of task ``object-detection``
  with a ``face`` label, trained to box exactly that face square): the largest face, or every
  face, is cut from the photo by its box. A photo with no face is a 422 ``no_face``.

``parameters.threshold`` is the operating point chosen on LFW pairs of people the model never
trained on (see the model's metadata); a request may bring its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from service.repository import ModelSpec
from service.tasks.base import Parameters, Task, require


class FaceEmbeddingParameters(Parameters):
    crop: tuple[float, float, float, float] = Field(
        description="The face square of an aligned image: fractions (top, left, bottom, right) of its height and width"
    )
    threshold: float = Field(ge=-1, le=1, description="Cosine at or above which two faces are one person")
    identification_threshold: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Cosine a gallery match must reach to be called the same person (1:N needs a stricter point "
        "than 1:1: a stranger's best match is the highest of N); default: threshold",
    )
    detector: str | None = Field(
        None, description="A model of task object-detection with a 'face' label that finds faces in photos"
    )
    detector_score: float = Field(0.5, ge=0, le=1, description="The detector's score a face must reach")

    @field_validator("crop")
    @classmethod
    def _inside(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        top, left, bottom, right = v
        if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
            raise ValueError("crop must be 0 <= top < bottom <= 1 and 0 <= left < right <= 1")
        return v


class FaceEmbedding(Task[FaceEmbeddingParameters]):
    name = "face-embedding"
    parameters_model = FaceEmbeddingParameters
    routes = "service.api.routes.face_recognition"

    def check(self, spec: ModelSpec, parameters: FaceEmbeddingParameters) -> None:
        require(len(spec.inputs) == 1, f"it takes one image input, the graph has {len(spec.inputs)}")
        image = spec.inputs[0]
        require(
            image.datatype == "FP32"
            and len(image.shape) == 4
            and image.shape[1] == 3
            and image.shape[2] > 0
            and image.shape[2] == image.shape[3],
            f"input {image.name!r} must be FP32 [batch, 3, S, S] with S fixed, not {image.datatype} {image.shape}",
        )
        require(len(spec.outputs) == 1, f"it returns one embedding output, the graph has {len(spec.outputs)}")
        out = spec.outputs[0]
        require(
            out.datatype == "FP32" and len(out.shape) == 2 and out.shape[1] > 0,
            f"output {out.name!r} must be FP32 [batch, D], not {out.datatype} {out.shape}",
        )

    @staticmethod
    def side(spec: ModelSpec) -> int:
        return spec.inputs[0].shape[2]


TASK = FaceEmbedding()
FACE_LABEL = "face"


@dataclass(frozen=True)
class Face:
    """A face square in the pixels of the image as sent, and the detector's score (None: aligned)."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


def aligned_face(width: int, height: int, crop: tuple[float, float, float, float]) -> Face:
    """The face square of an aligned image of this size."""
    top, left, bottom, right = crop
    return Face(left * width, top * height, right * width, bottom * height)


def square(x1: float, y1: float, x2: float, y2: float, score: float) -> Face:
    """A detector's box made the square the embedding network was trained on (same centre, the
    side the mean of the box's sides: the detector was trained on squares, so they differ little)."""
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, ((x2 - x1) + (y2 - y1)) / 4
    return Face(cx - half, cy - half, cx + half, cy + half, score)


def cut(image: Image.Image, face: Face, original: tuple[int, int], side: int) -> np.ndarray:
    """The face square of ``image`` (decoded, maybe at a reduced scale of ``original``) at
    ``side`` x ``side``, ``[3, side, side]`` float32 RGB in [0, 1]. Parts of the square outside
    the image are filled with the mean colour of its edge pixels (a face at the border)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    sx, sy = rgb.width / original[0], rgb.height / original[1]
    box = (face.x1 * sx, face.y1 * sy, face.x2 * sx, face.y2 * sy)
    inside = box[0] >= 0 and box[1] >= 0 and box[2] <= rgb.width and box[3] <= rgb.height
    if inside:
        out = rgb.resize((side, side), Image.Resampling.BILINEAR, box=box)
    else:
        # Shrink first so that the (non-antialiasing) affine cut scales by 2 at most: it would alias a
        # large face.
        factor = max(1, math.floor((box[2] - box[0]) / side))
        if factor > 1:
            rgb = rgb.reduce(factor)
            box = tuple(v / factor for v in box)
        pixels = np.asarray(rgb, dtype=np.float32)
        edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        fill = tuple(int(v) for v in edge.mean(axis=0))
        out = rgb.transform((side, side), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR, fillcolor=fill)
    return np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 255.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The graph returns unit vectors; normalising again costs nothing and guards a model that does not."""
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))

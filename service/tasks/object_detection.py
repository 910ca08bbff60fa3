"""Object detection: images in, boxes in each image's own pixels out.

The model takes letterboxed squares (``parameters.input_size``; aspect ratio kept, grey padding of
``parameters.pad_value``) and returns its top detections already decoded (boxes in input pixels,
scores, classes). Here: the letterbox on the way in (with the scale and offsets of each image), and
on the way out the request's score threshold, a class-wise IoU suppression with the request's
threshold (vectorised numpy), the request's maximum, and the boxes mapped back through the exact
inverse of the letterbox, clipped to the image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from service.repository import ModelSpec
from service.tasks.base import Parameters, Task, require

# For a model whose model.json names no operating point.
DEFAULT_SCORE_THRESHOLD = 0.3


class ObjectDetectionParameters(Parameters):
    input_size: int | None = Field(None, ge=1, description="Letterbox side; default: the input's last axis")
    pad_value: float = Field(114 / 255, ge=0, le=1, description="Letterbox padding grey, in [0, 1]")
    score_threshold: float = Field(
        DEFAULT_SCORE_THRESHOLD, ge=0, le=1, description="Default operating point (a request may override it)"
    )


class ObjectDetection(Task[ObjectDetectionParameters]):
    """Graphs that take ``[batch, 3, S, S]`` letterboxed RGB in [0, 1] and return their top N
    detections decoded: ``boxes [batch, N, 4]`` (x1, y1, x2, y2 in input pixels), ``scores
    [batch, N]`` and integer ``classes [batch, N]`` (indexing ``labels``), in that order."""

    name = "object-detection"
    parameters_model = ObjectDetectionParameters
    routes = "service.api.routes.object_detection"

    def check(self, spec: ModelSpec, parameters: ObjectDetectionParameters) -> None:
        require(len(spec.inputs) == 1, f"it takes one image input, the graph has {len(spec.inputs)}")
        image = spec.inputs[0]
        size = self.input_size(spec, parameters)
        require(
            image.datatype == "FP32" and len(image.shape) == 4 and image.shape[1] == 3,
            f"input {image.name!r} must be FP32 [batch, 3, size, size], not {image.datatype} {image.shape}",
        )
        require(all(d in (-1, size) for d in image.shape[2:]), f"input {image.name!r} {image.shape} is not {size}px")
        require(len(spec.outputs) == 3, "outputs must be boxes, scores and classes")
        boxes, scores, classes = spec.outputs
        require(len(boxes.shape) == 3 and boxes.shape[2] == 4, f"output {boxes.name!r} must be [batch, N, 4]")
        require(len(scores.shape) == 2, f"output {scores.name!r} must be [batch, N]")
        require(
            len(classes.shape) == 2 and classes.datatype.startswith("INT"),
            f"output {classes.name!r} must be integer [batch, N]",
        )

    @staticmethod
    def input_size(spec: ModelSpec, parameters: ObjectDetectionParameters) -> int:
        return parameters.input_size or spec.inputs[0].shape[-1]


TASK = ObjectDetection()


@dataclass(frozen=True)
class Letterbox:
    scale: float
    left: int
    top: int
    width: int  # the original image's size
    height: int

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Input-pixel boxes [n, 4] back to the original image's pixels, clipped to it."""
        out = (boxes - np.array([self.left, self.top, self.left, self.top], dtype=np.float32)) / self.scale
        return np.clip(out, 0, np.array([self.width, self.height, self.width, self.height], dtype=np.float32))


def letterbox(
    image: Image.Image, size: int, pad_value: float, original: tuple[int, int] | None = None
) -> tuple[np.ndarray, Letterbox]:
    """An upright PIL image to ``[3, size, size]`` float32 RGB in [0, 1], keeping its aspect ratio.
    ``original``: the image's size as sent, when ``image`` was decoded at a reduced scale (boxes map
    back to the original's pixels; the letterbox is the same as from the original)."""
    rgb = image.convert("RGB")
    w, h = original or rgb.size
    scale = min(size / w, size / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(rgb.resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0
    out = np.full((size, size, 3), pad_value, dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out.transpose(2, 0, 1), Letterbox(scale, left, top, w, h)


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)


def suppress(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, *, class_agnostic: bool = True
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Non-maximum suppression: the indices kept, best first, and for each kept box the boxes it
    suppressed (best first). Class-agnostic (the default): one place on the image gets one label,
    its best; with suppression per class, one digit came back twice ("8" 0.597 and "9" 0.446 on
    the same box). Per class is what COCO's mAP assumes (a second guess at a place counts)."""
    order = np.argsort(-scores, kind="stable")
    overlap = iou_matrix(boxes[order]) > iou_threshold
    if not class_agnostic:
        overlap &= classes[order][:, None] == classes[order][None, :]
    keep = np.ones(len(order), dtype=bool)
    absorbed: dict[int, list[int]] = {}
    for i in range(len(order)):  # at most max_detections (100) rows: a loop over rows, not pairs
        if keep[i]:
            gone = np.flatnonzero(keep[i + 1 :] & overlap[i, i + 1 :]) + i + 1
            if gone.size:
                absorbed[int(order[i])] = [int(order[j]) for j in gone]
            keep[i + 1 :] &= ~overlap[i, i + 1 :]
    return order[keep], absorbed


def detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    box: Letterbox,
    labels: Sequence[str],
    *,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    max_alternatives: int = 2,
    class_agnostic: bool = True,
) -> list[dict]:
    """One image's model outputs to its detections, in its own pixels, best first. Each carries as
    ``alternatives`` the best other labels the model gave the same place (suppressed boxes of
    other classes, best first, at most ``max_alternatives``)."""
    keep = scores >= score_threshold
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    kept, absorbed = suppress(boxes, scores, classes, iou_threshold, class_agnostic=class_agnostic)
    kept = kept[:max_detections]
    mapped = box.to_image(boxes[kept])

    def name(cls: int) -> str:
        return labels[cls] if 0 <= cls < len(labels) else str(cls)

    out = []
    for (x1, y1, x2, y2), index in zip(mapped.tolist(), kept.tolist(), strict=True):
        cls = int(classes[index])
        alternatives: list[dict] = []
        for other in absorbed.get(index, []):
            other_cls = int(classes[other])
            if other_cls != cls and all(a["class_id"] != other_cls for a in alternatives):
                alternatives.append(
                    {"label": name(other_cls), "class_id": other_cls, "score": round(float(scores[other]), 6)}
                )
        out.append(
            {
                "label": name(cls),
                "class_id": cls,
                "score": round(float(scores[index]), 6),
                "box": {"x1": round(x1, 2), "y1": round(y1, 2), "x2": round(x2, 2), "y2": round(y2, 2)},
                "alternatives": alternatives[:max_alternatives],
            }
        )
    return out


_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


JPEG_MAX_SIDE = 65_500  # libjpeg's largest side


def render(image: Image.Image, found: list[dict], fmt: str) -> bytes:
    """The (upright) image with its boxes and labels drawn, as PNG or JPEG bytes."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    # Labels in proportion to the picture (a fixed 10 px font was unreadable on a phone photo shown
    # at screen size): about a fortieth of its longer side, at least 12 px.
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 40)))
    for d in reversed(found):  # the weakest first, so that the strongest label is drawn on top
        b = d["box"]
        colour = _COLOURS[d["class_id"] % len(_COLOURS)]
        draw.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=colour, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        left, top = b["x1"], max(0.0, b["y1"] - font.size * 1.2)
        draw.rectangle(draw.textbbox((left, top), text, font=font), fill=colour)
        draw.text((left, top), text, fill=(255, 255, 255), font=font)
    if fmt != "png" and max(canvas.size) > JPEG_MAX_SIDE:
        # JPEG cannot hold a side over 65,535 pixels (a 100,000 x 1 image was a 500): scaled to fit.
        canvas.thumbnail((JPEG_MAX_SIDE, JPEG_MAX_SIDE))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG" if fmt == "png" else "JPEG", quality=90)
    return buffer.getvalue()

"""What the scene generators (digits in photos, digits on paper, faces in photos) share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def iou(box: np.ndarray, boxes: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """IoU of ``box`` (x1, y1, x2, y2) with each of ``boxes``; empty when there are none."""
    if len(boxes) == 0:
        return np.zeros(0)
    b = np.asarray(np.stack(boxes) if isinstance(boxes, list) else boxes, dtype=np.float64)
    x1, y1 = np.maximum(box[0], b[:, 0]), np.maximum(box[1], b[:, 1])
    x2, y2 = np.minimum(box[2], b[:, 2]), np.minimum(box[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


class Photos:
    """Background photos, decoded once each and kept (coco128 is 128 photos: about 100 MB at most)."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise ValueError("no background photos")
        self.paths = paths
        self._decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if index not in self._decoded:
            with Image.open(self.paths[index]) as im:
                self._decoded[index] = np.asarray(im.convert("RGB"))
        return self._decoded[index]

    def random_crop(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """A random crop (a third of each side or more) of a random photo, resized to ``width x height``
        float32 RGB: any aspect ratio."""
        photo = self[int(rng.integers(len(self)))]
        ph, pw = photo.shape[:2]
        ch, cw = int(rng.integers(ph // 3, ph + 1)), int(rng.integers(pw // 3, pw + 1))
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((width, height), Image.BILINEAR)
        return np.asarray(crop, dtype=np.float32).copy()

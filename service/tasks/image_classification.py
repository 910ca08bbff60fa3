"""Image classification: client images in, ranked labels out.

Pre-processing is chosen by the model's ``parameters.preprocessing`` in ``model.json``:

* ``mnist`` reproduces how MNIST itself was made, so that a phone photo or a scan of a digit looks
  to the model like a test digit: grey levels, polarity detected from the image border (dark ink on
  light paper is inverted to MNIST's light on dark), contrast stretched, the digit cropped to its
  ink, fitted in a 20x20 box keeping its aspect ratio, and placed in 28x28 with its centre of mass
  at the centre.
* ``resize`` (the default for other models) just resizes to the input size and scales to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from service import imaging
from service.errors import InvalidInput

# Past this size the photo is shrunk before analysis; the digit ends up 20 px tall anyway.
_ANALYSIS_MAX_SIDE = 512
# Relative ink level that counts as part of the digit when finding its bounding box.
_INK_THRESHOLD = 0.2
# Below this (relative to the ink's peak) a pixel is background noise: JPEG ringing, paper texture.
_NOISE_FLOOR = 0.1


def _border(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    k = max(1, min(h, w) // 20)
    return np.concatenate([gray[:k].ravel(), gray[-k:].ravel(), gray[:, :k].ravel(), gray[:, -k:].ravel()])


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """A grey image in [0, 1] (any size, any polarity) to a 28x28 MNIST-style digit in [0, 1]."""
    background = float(np.median(_border(gray)))
    if background > 0.5:  # dark ink on light paper: make it MNIST's light ink on dark
        gray = 1.0 - gray
        background = 1.0 - background
    peak = float(gray.max())
    out = np.zeros((28, 28), dtype=np.float32)
    if peak - background < 0.05:
        return out  # blank: nothing to classify, the model sees an empty field
    ink = np.clip((gray - background) / (peak - background), 0.0, 1.0)
    ink[ink < _NOISE_FLOOR] = 0.0
    rows = np.flatnonzero((ink >= _INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink >= _INK_THRESHOLD).any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    digit = ink[top:bottom, left:right]

    # Fit in 20x20 keeping the aspect ratio (Pillow's resize antialiases when shrinking).
    h, w = digit.shape
    scale = 20.0 / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    patch = np.asarray(
        Image.fromarray(digit, mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32
    )
    patch = np.clip(patch, 0.0, None)
    patch /= max(float(patch.max()), 1e-6)

    # Centre of mass to the field's centre (MNIST's convention: pixel index 14 on both axes).
    total = float(patch.sum())
    ys, xs = np.indices(patch.shape)
    cy, cx = float((ys * patch).sum() / total), float((xs * patch).sum() / total)
    y0 = int(np.clip(round(14 - cy), 0, 28 - new_h))
    x0 = int(np.clip(round(14 - cx), 0, 28 - new_w))
    out[y0 : y0 + new_h, x0 : x0 + new_w] = patch
    return out


def resized(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(gray, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def preprocess(images: Sequence[Image.Image], input_shape: Sequence[int], method: str) -> np.ndarray:
    """Decoded images to the model's input batch ``[n, 1, H, W]`` float32."""
    if len(input_shape) != 4 or input_shape[1] != 1:
        raise InvalidInput(f"model input shape {list(input_shape)} is not a single-channel image batch")
    height, width = input_shape[2], input_shape[3]
    batch = np.empty((len(images), 1, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        gray = imaging.to_gray(image, max_side=_ANALYSIS_MAX_SIDE)
        if method == "mnist":
            if (height, width) != (28, 28):
                raise InvalidInput("mnist pre-processing needs a 28x28 model input")
            batch[i, 0] = mnist_like(gray)
        else:
            batch[i, 0] = resized(gray, height, width)
    return batch


def top_k(probabilities: np.ndarray, labels: Sequence[str] | None, k: int) -> list[list[dict]]:
    """One ranked ``[{"label", "score"}]`` list per row, highest score first."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    ranked = []
    for row, idx in zip(probabilities, order, strict=True):
        ranked.append([{"label": labels[j] if labels else str(j), "score": round(float(row[j]), 6)} for j in idx])
    return ranked

"""A detection dataset made here: handwritten MNIST digits pasted into real photos, with exact boxes.

No pretrained backbone can be downloaded and 128 COCO photos are far too few to train a detector
from scratch, so the default detector finds digits in cluttered photos. Each scene is a crop of a
coco128 photo (``train2017`` photos for training scenes, ``val2017`` for test scenes) of random size
and aspect ratio, with 1 to ``max_digits`` MNIST digits (train digits for training scenes, test
digits for test scenes) pasted at random scales, positions, contrasts and colours, light or dark,
overlapping each other little. A digit's box is the tight box of its ink after scaling, so the
labels are exact. Scene ``i`` of a split depends only on ``(seed, split, i)``: the dataset is
reproducible and any scene can be rebuilt alone.

The scenes are written in the YOLO layout that ``training/object_detection.py`` also reads for real
datasets (``images/<split>/*.png``, ``labels/<split>/*.txt`` with ``class xc yc w h`` normalised,
``classes.txt``):

    python -m training.digit_scenes --out ../digit-scenes --train 20000 --test 2000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.idx import load_mnist
from training.scene_tools import Photos, iou

CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class SceneConfig:
    min_side: int = 240
    max_side: int = 480
    max_digits: int = 12
    min_digit: int = 16  # digit height in pixels (the 28x28 cell scaled), smallest and largest
    max_digit: int = 112
    max_overlap: float = 0.15  # largest IoU of a new digit's box with any box already placed


class SceneMaker:
    """Builds scene ``i`` of a split from the digits and background photos it was given."""

    def __init__(
        self, digits: np.ndarray, labels: np.ndarray, backgrounds: list[Path], seed: int, cfg: SceneConfig
    ) -> None:
        self.digits, self.labels, self.photos = digits, labels, Photos(backgrounds)
        self.seed, self.cfg = seed, cfg

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image [H, W, 3] uint8, boxes [n, 4] x1 y1 x2 y2 in pixels, classes [n])``."""
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, i])
        h, w = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        image = self.photos.random_crop(rng, w, h)
        boxes: list[np.ndarray] = []
        classes: list[int] = []
        for _ in range(int(rng.integers(1, cfg.max_digits + 1))):
            for _attempt in range(20):
                size = int(rng.integers(cfg.min_digit, min(cfg.max_digit, h, w) + 1))
                k = int(rng.integers(len(self.digits)))
                cell = Image.fromarray(self.digits[k]).resize((size, size), Image.BILINEAR)
                alpha = np.asarray(cell, dtype=np.float32) / 255.0
                ys, xs = np.nonzero(alpha > 0.1)
                if len(ys) == 0:
                    continue
                top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                box = np.array([left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1], float)
                if iou(box, boxes).max(initial=0.0) > cfg.max_overlap:
                    continue
                region = image[top : top + size, left : left + size]
                # Ink colour far from the local background, so every digit is visible.
                local = region.mean(axis=(0, 1))
                ink = np.where(local > 127, rng.uniform(0, 70, 3), rng.uniform(185, 255, 3))
                strength = rng.uniform(0.75, 1.0)
                a = (alpha * strength)[..., None]
                image[top : top + size, left : left + size] = region * (1 - a) + ink * a
                boxes.append(box)
                classes.append(int(self.labels[k]))
                break
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 6))
        out = np.clip(image, 0, 255).astype(np.uint8)
        return out, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(classes, dtype=np.int64)


def makers(data_dir: Path, seed: int, cfg: SceneConfig | None = None) -> dict[str, SceneMaker]:
    """``{"train": ..., "test": ...}``: train digits on train2017 photos, test digits on val2017."""
    cfg = cfg or SceneConfig()
    coco = data_dir / "object_detection" / "coco128" / "images"
    mnist = data_dir / "image_classification" / "mnist"
    out = {}
    for split, photos, offset in (("train", "train2017", 0), ("test", "val2017", 1)):
        digits, labels = load_mnist(mnist, split)
        out[split] = SceneMaker(digits, labels, sorted((coco / photos).glob("*.jpg")), seed * 2 + offset, cfg)
    return out


def write_yolo(maker: SceneMaker, out: Path, split: str, count: int) -> None:
    images, labels = out / "images" / split, out / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i in range(count):
        image, boxes, classes = maker.scene(i)
        h, w = image.shape[:2]
        Image.fromarray(image).save(images / f"{i:06d}.png")
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / [w, h]
        size = (boxes[:, 2:] - boxes[:, :2]) / [w, h]
        lines = [
            f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}"
            for c, (cx, cy), (bw, bh) in zip(classes, centre, size, strict=True)
        ]
        (labels / f"{i:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds mnist and coco128")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    for split, maker in makers(args.data_dir, args.seed).items():
        write_yolo(maker, args.out, split, args.train if split == "train" else args.test)


if __name__ == "__main__":
    main()

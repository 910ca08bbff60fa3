"""A face-detection dataset made here: LFW faces in real photos, boxed exactly as the embedding
network crops them.

Two kinds of scene, so that the detector sees faces both as apps send them and in clutter:

* **portraits** (``portrait_share`` of scenes): an LFW photo itself, cut to a random window around
  the face (a selfie, an ID photo, a profile picture: the face large, with hair, shoulders and the
  photo's own background), at a random size and aspect ratio;
* **pasted**: a crop of a coco128 photo in which COCO labels no person (so that no unlabelled face
  is in the background), with 1 to ``max_faces`` heads pasted at random scales and places: the
  LFW image around the face, under a feathered elliptical mask (head and hair, no square edge).

Every box is the face square of :mod:`training.face_recognition` (``CROP`` of the aligned LFW
image) carried through the same transform, so a detected box is exactly what the embedding
network was trained to read. Some pasted scenes have no face at all. Training scenes use the LFW
people outside ``holdout`` (the verification folds) on coco128 ``train2017``; test scenes the
held-out people on ``val2017``. Scene ``i`` depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from training.scene_tools import Photos, iou

CLASSES = ["face"]
_SOURCE = 160  # LFW images are kept at 160x160 (from 250): faces rarely need more here


@dataclass(frozen=True)
class FaceSceneConfig:
    min_side: int = 160
    max_side: int = 448
    max_faces: int = 4
    min_face: int = 20  # face square side in scene pixels
    max_face: float = 0.75  # of the scene's shorter side
    portrait_share: float = 0.4
    empty_share: float = 0.08
    max_overlap: float = 0.1


def _crop_square(size: int) -> tuple[float, float, float, float]:
    from training.face_recognition import CROP

    top, left, bottom, right = CROP
    return left * size, top * size, right * size, bottom * size  # x1, y1, x2, y2


class FaceSceneMaker:
    def __init__(self, faces: np.ndarray, backgrounds: list[Path], seed: int, cfg: FaceSceneConfig) -> None:
        if len(faces) == 0 or not backgrounds:
            raise ValueError("no faces or no background photos")
        self.faces, self.photos, self.seed, self.cfg = faces, Photos(backgrounds), seed, cfg
        self.face_box = np.array(_crop_square(faces.shape[1]), dtype=np.float32)
        self._mask = self._head_mask(faces.shape[1])

    def _head_mask(self, size: int) -> np.ndarray:
        """A feathered ellipse over head and hair: wider than the face square, taller upwards."""
        x1, y1, x2, y2 = self.face_box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - 0.08 * (y2 - y1)
        rx, ry = 0.62 * (x2 - x1), 0.78 * (y2 - y1)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        mask = Image.fromarray((inside * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 40))
        return np.asarray(mask, dtype=np.float32) / 255.0

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image [H, W, 3] uint8, boxes [n, 4] x1 y1 x2 y2 in pixels, classes [n])``."""
        rng = np.random.default_rng([self.seed, i])
        if rng.random() < self.cfg.portrait_share:
            image, boxes = self._portrait(rng)
        else:
            image, boxes = self._pasted(rng)
        if rng.random() < 0.5:  # mirror
            w = image.shape[1]
            image = image[:, ::-1]
            boxes = [np.array([w - b[2], b[1], w - b[0], b[3]], dtype=np.float32) for b in boxes]
        out = image.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-20, 20)
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0, 5))
        arr = np.clip(out, 0, 255).astype(np.uint8)
        return arr, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.zeros(len(boxes), dtype=np.int64)

    def _portrait(self, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
        face = self.faces[int(rng.integers(len(self.faces)))]
        size = face.shape[0]
        x1, y1, x2, y2 = self.face_box
        side = x2 - x1
        # A window around the face: from just past the face square to the whole photo.
        ww = rng.uniform(1.15 * side, size)
        wh = float(np.clip(ww * rng.uniform(0.75, 1.35), 1.15 * side, size))
        left = rng.uniform(max(0.0, x2 - ww + 0.05 * side), min(size - ww, x1 - 0.05 * side) + 1e-3)
        top = rng.uniform(max(0.0, y2 - wh + 0.05 * side), min(size - wh, y1 - 0.05 * side) + 1e-3)
        left, top = float(np.clip(left, 0, size - ww)), float(np.clip(top, 0, size - wh))
        out_w = int(rng.integers(self.cfg.min_side, self.cfg.max_side + 1))
        out_h = max(self.cfg.min_side // 2, round(out_w * wh / ww))
        image = Image.fromarray(face).resize((out_w, out_h), Image.BILINEAR, box=(left, top, left + ww, top + wh))
        sx, sy = out_w / ww, out_h / wh
        box = np.array([(x1 - left) * sx, (y1 - top) * sy, (x2 - left) * sx, (y2 - top) * sy], dtype=np.float32)
        return np.asarray(image), [box]

    def _pasted(self, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
        cfg = self.cfg
        h, w = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        image = self.photos.random_crop(rng, w, h)
        boxes: list[np.ndarray] = []
        count = 0 if rng.random() < cfg.empty_share else int(rng.integers(1, cfg.max_faces + 1))
        fx1, fy1, fx2, _ = self.face_box
        for _ in range(count):
            for _attempt in range(20):
                side = rng.uniform(cfg.min_face, max(cfg.min_face + 1, cfg.max_face * min(h, w)))
                scale = side / (fx2 - fx1)
                src = self.faces[int(rng.integers(len(self.faces)))]
                n = max(2, round(src.shape[0] * scale))
                # Where the face square lands; the head (the whole pasted patch) may leave the scene.
                bx1 = rng.uniform(-0.1 * side, w - 0.9 * side)
                by1 = rng.uniform(-0.1 * side, h - 0.9 * side)
                box = np.array([bx1, by1, bx1 + side, by1 + side], dtype=np.float32)
                if iou(box, boxes).max(initial=0.0) > cfg.max_overlap:
                    continue
                patch = np.asarray(Image.fromarray(src).resize((n, n), Image.BILINEAR), dtype=np.float32)
                alpha = np.asarray(Image.fromarray(self._mask).resize((n, n), Image.BILINEAR), dtype=np.float32)
                px, py = round(bx1 - fx1 * scale), round(by1 - fy1 * scale)  # patch origin in the scene
                sx1, sy1, sx2, sy2 = max(0, px), max(0, py), min(w, px + n), min(h, py + n)
                if sx2 <= sx1 or sy2 <= sy1:
                    continue
                a = alpha[sy1 - py : sy2 - py, sx1 - px : sx2 - px, None]
                region = image[sy1:sy2, sx1:sx2]
                image[sy1:sy2, sx1:sx2] = region * (1 - a) + patch[sy1 - py : sy2 - py, sx1 - px : sx2 - px] * a
                clipped = np.array([max(bx1, 0), max(by1, 0), min(bx1 + side, w), min(by1 + side, h)], np.float32)
                boxes.append(clipped)
                break
        return image, boxes


def load_faces(data_dir: Path, people: set[str] | None, exclude: set[str], limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` LFW images (of ``people``, or of everyone not in ``exclude``), 160x160 RGB."""
    chosen = []
    for tar_path in sorted((data_dir / "face_recognition").glob("lfw-deepfunneled-part*.tar.gz")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".jpg"):
                    continue
                person = member.name.split("/")[-2]
                if person in exclude or (people is not None and person not in people):
                    continue
                chosen.append((tar_path, member.name))
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(chosen), size=min(limit, len(chosen)), replace=False).tolist())
    wanted = {chosen[k] for k in picked}
    out = []
    for tar_path in sorted({t for t, _ in wanted}):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if (tar_path, member.name) in wanted:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:  # type: ignore[union-attr]
                        out.append(np.asarray(im.convert("RGB").resize((_SOURCE, _SOURCE), Image.BILINEAR)))
    return np.stack(out)


def backgrounds_without_people(coco: Path, split: str) -> list[Path]:
    """coco128 photos of ``split`` in which COCO labels no person (class 0)."""
    out = []
    for path in sorted((coco / "images" / split).glob("*.jpg")):
        label = coco / "labels" / split / f"{path.stem}.txt"
        rows = label.read_text().split("\n") if label.is_file() else []
        if not any(r.split()[:1] == ["0"] for r in rows):
            out.append(path)
    return out


def makers(
    data_dir: Path, seed: int, holdout: set[str], cfg: FaceSceneConfig | None = None, faces_per_split: int = 4000
) -> dict[str, FaceSceneMaker]:
    cfg = cfg or FaceSceneConfig()
    coco = data_dir / "object_detection" / "coco128"
    return {
        "train": FaceSceneMaker(
            load_faces(data_dir, None, holdout, faces_per_split, seed),
            backgrounds_without_people(coco, "train2017"),
            seed * 2,
            cfg,
        ),
        "test": FaceSceneMaker(
            load_faces(data_dir, holdout, set(), faces_per_split // 4, seed),
            backgrounds_without_people(coco, "val2017"),
            seed * 2 + 1,
            cfg,
        ),
    }

"""Train a single-shot, anchor-free detector (CenterNet-style) and export it to ONNX with its decoding.

    python -m training.object_detection --data-dir ../shared/data                 # digit scenes: photos and paper
    python -m training.object_detection --dataset yolo --yolo-dir ../shared/data/object_detection/coco128

Why anchor-free (CenterNet, "Objects as Points"): one heatmap peak per object at stride 4, plus its
size and sub-pixel offset. No anchor shapes to tune for a new dataset, a loss that is three simple
terms, and decoding that is a 3x3 max-pool and a top-k, which export to plain ONNX ops, so the
graph returns final boxes; duplicate peaks are rare, and a class-wise IoU suppression with the
request's threshold runs after the graph.

Default data: :mod:`training.digit_scenes` (MNIST digits pasted into coco128 photos, seeded, exact
boxes; train digits and photos for training, test ones for the held-out scenes) and
:mod:`training.paper_scenes` (numbers written on photographed paper), scored apart. ``--dataset yolo``
reads any dataset in the YOLO layout (``images/<split>``, ``labels/<split>``, ``classes.txt``), such
as coco128. Images are letterboxed to a square input (aspect kept, grey padding); the ONNX graph
takes ``images [B, 3, S, S]`` (RGB in [0, 1]) and returns ``boxes [B, K, 4]`` (x1, y1, x2, y2 in input
pixels), ``scores [B, K]`` and ``classes [B, K]``, best first. mAP is measured with pycocotools on
the exported graph in onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from training import common
from training.digit_scenes import CLASSES, SceneConfig, makers

STRIDE = 4
PAD_VALUE = 114 / 255.0


def multiple_of_32(text: str) -> int:
    if int(text) % 32:
        raise argparse.ArgumentTypeError("the input size must be a multiple of 32")
    return int(text)


@dataclasses.dataclass
class Config:
    dataset: Literal["digits", "yolo", "faces"] = field(
        default="digits",
        metadata={"help": "digits: digit scenes; faces: LFW faces in photos (training/face_scenes.py); yolo: a folder"},
    )
    data_dir: Path = field(default=Path("../shared/data"), metadata={"help": "holds mnist and coco128 (digit scenes)"})
    yolo_dir: Path = field(
        default=Path("../shared/data/object_detection/coco128"),
        metadata={"help": "a YOLO-layout dataset (--dataset yolo)"},
    )
    train_split: str = "train2017"
    val_split: str = "val2017"
    output_dir: Path = Path("models")
    name: str = "digit-detector"
    version: int = 1
    input_size: int = field(
        default=320, metadata={"help": "letterboxed square input (multiple of 32)", "type": multiple_of_32}
    )
    train_size: int | None = field(
        default=None,
        metadata={
            "help": "train at this input size (multiple of 32; default: --input-size); the graph is exported "
            "and scored at --input-size",
            "type": multiple_of_32,
        },
    )
    width: int = field(default=32, metadata={"help": "channels of the first stage"})
    train_scenes: int = 20000
    test_scenes: int = 1000
    paper_scenes: int = field(
        default=20000,
        metadata={"help": "digits: training scenes of numbers written on paper (training/paper_scenes.py)"},
    )
    paper_test_scenes: int = field(default=1000, metadata={"help": "digits: held-out paper scenes, scored apart"})
    max_detections: int = 100
    score_threshold: float = field(
        default=0.4, metadata={"help": "the endpoint's default operating point (model.json)"}
    )
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 1
    device: str = "auto"
    workers: int = field(default=-1, metadata={"help": "data-loading processes (-1: one per core, up to 16)"})
    checkpoint_dir: Path = field(default=Path("checkpoints"), metadata={"help": "where the torch weights go"})
    # Fully convolutional: weights trained at one input size fine-tune at another.
    init_from: Path | None = field(
        default=None,
        metadata={"help": "start from these weights: a torch checkpoint, or an exported model.onnx (fine-tuning)"},
    )
    score: Path | None = field(
        default=None,
        metadata={"help": "only score this exported model.onnx on the held-out scenes of this configuration"},
    )
    smoke: bool = field(default=False, metadata={"help": "a few scenes, a tiny model, one epoch: checks the pipeline"})


# --- data ----------------------------------------------------------------------------------------


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    """``image`` [H, W, 3] uint8 -> ``[3, size, size]`` float in [0, 1], scale, left, top padding."""
    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out.transpose(2, 0, 1), scale, left, top


def read_yolo(folder: Path, split: str) -> tuple[list[Path], list[np.ndarray], list[np.ndarray], list[str]]:
    """Images of a YOLO-layout split with their boxes in pixels; an image without labels has none."""
    classes = (folder / "classes.txt").read_text(encoding="utf-8").split("\n")
    classes = [c.strip() for c in classes if c.strip()]
    paths = sorted(p for p in (folder / "images" / split).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    all_boxes, all_classes = [], []
    for path in paths:
        label = folder / "labels" / split / f"{path.stem}.txt"
        rows = np.loadtxt(label, ndmin=2) if label.is_file() and label.stat().st_size else np.zeros((0, 5))
        with Image.open(path) as im:
            w, h = im.size
        xc, yc, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        all_boxes.append(np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], axis=1).astype(np.float32))
        all_classes.append(rows[:, 0].astype(np.int64))
    return paths, all_boxes, all_classes, classes


class Samples:
    """Indexable ``(image uint8 [H, W, 3], boxes [n, 4] pixels, classes [n])``."""

    def __init__(self, get, count: int) -> None:
        self.get, self.count = get, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        return self.get(i)

    @staticmethod
    def joined(first: Samples, second: Samples) -> Samples:
        """``first`` then ``second``, as one set (training shuffles it)."""

        def get(i: int):
            return first[i] if i < len(first) else second[i - len(first)]

        return Samples(get, len(first) + len(second))


def paper_test_set(cfg: Config) -> Samples | None:
    """The held-out paper scenes (digits only), scored apart from the photo scenes."""
    if cfg.dataset != "digits" or cfg.paper_test_scenes <= 0:
        return None
    from training import paper_scenes

    return Samples(paper_scenes.makers(cfg.data_dir, cfg.seed)["test"].scene, cfg.paper_test_scenes)


def load_samples(cfg: Config) -> tuple[Samples, Samples, list[str]]:
    if cfg.dataset == "digits":
        from training import paper_scenes

        photo, paper = makers(cfg.data_dir, cfg.seed, SceneConfig()), paper_scenes.makers(cfg.data_dir, cfg.seed)
        return (
            Samples.joined(
                Samples(photo["train"].scene, cfg.train_scenes), Samples(paper["train"].scene, cfg.paper_scenes)
            ),
            Samples(photo["test"].scene, cfg.test_scenes),
            CLASSES,
        )
    if cfg.dataset == "faces":
        from training import face_recognition, face_scenes

        pairs = face_recognition.load_pairs(cfg.data_dir / "face_recognition" / "pairs_folds1-8.txt")
        holdout = {
            p for k in face_recognition.Config().holdout_folds for p in face_recognition.fold_people(pairs[k - 1])
        }
        face_makers = face_scenes.makers(cfg.data_dir, cfg.seed, holdout, faces_per_split=400 if cfg.smoke else 4000)
        return (
            Samples(face_makers["train"].scene, cfg.train_scenes),
            Samples(face_makers["test"].scene, cfg.test_scenes),
            face_scenes.CLASSES,
        )
    parts = {}
    for split in (cfg.train_split, cfg.val_split):
        paths, boxes, classes, names = read_yolo(cfg.yolo_dir, split)

        def get(i, paths=paths, boxes=boxes, classes=classes):
            with Image.open(paths[i]) as im:
                return np.asarray(im.convert("RGB")), boxes[i], classes[i]

        parts[split] = Samples(get, len(paths))
    return parts[cfg.train_split], parts[cfg.val_split], names


def gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift that keeps IoU >= ``min_overlap`` (its formula)."""
    a1, b1, c1 = 1, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def targets(boxes: np.ndarray, classes: np.ndarray, n_classes: int, size: int, max_objects: int):
    """Heatmap [C, S/4, S/4], and per object: centre index, size (input pixels), offset, mask."""
    out = size // STRIDE
    heat = np.zeros((n_classes, out, out), dtype=np.float32)
    index = np.zeros(max_objects, dtype=np.int64)
    wh = np.zeros((max_objects, 2), dtype=np.float32)
    offset = np.zeros((max_objects, 2), dtype=np.float32)
    mask = np.zeros(max_objects, dtype=np.float32)
    ys, xs = np.ogrid[:out, :out]
    for k, (box, c) in enumerate(zip(boxes[:max_objects], classes[:max_objects], strict=True)):
        x1, y1, x2, y2 = box / STRIDE
        bw, bh = x2 - x1, y2 - y1
        if bw <= 0 or bh <= 0:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = min(int(cx), out - 1), min(int(cy), out - 1)
        sigma = max(0.0, int(gaussian_radius(math.ceil(bh), math.ceil(bw)))) * 2 / 6 + 1e-3
        g = np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
        heat[c] = np.maximum(heat[c], g)
        index[k], mask[k] = iy * out + ix, 1.0
        wh[k] = (bw * STRIDE, bh * STRIDE)
        offset[k] = (cx - ix, cy - iy)
    return heat, index, wh, offset, mask


class TrainingScenes(torch.utils.data.Dataset):
    """Training samples as tensors; item ``epoch * N + i`` is sample ``i`` with the augmentation of
    that epoch, drawn from ``(seed, epoch, i)``: the same batches whatever the number of workers."""

    def __init__(self, samples: Samples, cfg: Config, n_classes: int) -> None:
        self.samples, self.cfg, self.n_classes = samples, cfg, n_classes

    def __len__(self) -> int:
        return len(self.samples) * self.cfg.epochs

    def __getitem__(self, item: int):
        epoch, i = divmod(item, len(self.samples))
        rng = np.random.default_rng([self.cfg.seed, epoch, i])
        return tuple(torch.from_numpy(a) for a in prepare(self.samples[i], self.cfg, self.n_classes, rng))


def prepare(sample, cfg: Config, n_classes: int, rng: np.random.Generator | None):
    image, boxes, classes = sample
    if rng is not None and rng.random() < 0.5:  # scale jitter: the scene smaller inside the input
        factor = rng.uniform(0.6, 1.0)
        h, w = image.shape[:2]
        small = np.asarray(Image.fromarray(image).resize((max(8, int(w * factor)), max(8, int(h * factor)))))
        boxes = boxes * np.array([small.shape[1] / w, small.shape[0] / h] * 2, dtype=np.float32)
        image = small
    # Training may run at a smaller size than the graph serves: on 2 CPU cores a 320 input trains 2.5x
    # faster than 384 (25.9 against 10.2 images/s, width 32, batch 16), and the network is fully
    # convolutional.
    size = (cfg.train_size or cfg.input_size) if rng is not None else cfg.input_size
    x, scale, left, top = letterbox(image, size)
    boxes = boxes * scale + np.array([left, top, left, top], dtype=np.float32)
    return (x, *targets(boxes, classes, n_classes, size, cfg.max_detections))


# --- model ---------------------------------------------------------------------------------------


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Detector(nn.Module):
    """A small backbone down to stride 32, a top-down path back to stride 4, and three heads."""

    def __init__(self, n_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv(3, w // 2, 2), conv(w // 2, w, 2))  # stride 4
        self.s8 = nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w))
        self.s16 = nn.Sequential(conv(2 * w, 4 * w, 2), conv(4 * w, 4 * w))
        self.s32 = nn.Sequential(conv(4 * w, 4 * w, 2), conv(4 * w, 4 * w))
        self.lat16, self.lat8, self.lat4 = (
            nn.Conv2d(4 * w, 2 * w, 1),
            nn.Conv2d(2 * w, 2 * w, 1),
            nn.Conv2d(w, 2 * w, 1),
        )
        self.top32 = nn.Conv2d(4 * w, 2 * w, 1)
        self.smooth = conv(2 * w, 2 * w)

        def head(out: int) -> nn.Sequential:
            return nn.Sequential(conv(2 * w, 2 * w), nn.Conv2d(2 * w, out, 1))

        self.heat, self.size, self.offset = head(n_classes), head(2), head(2)
        self.heat[-1].bias.data.fill_(-2.19)  # CenterNet's prior: sigmoid = 0.1

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c4 = self.stem(images)
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p = self.top32(c32)
        p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat16(c16)
        p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat8(c8)
        p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat4(c4)
        p = self.smooth(p)
        return self.heat(p), self.size(p), self.offset(p)


class ExportGraph(nn.Module):
    """The detector with its decoding: peaks of the heatmap (3x3 max-pool), top-k, boxes."""

    def __init__(self, model: Detector, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heat, size, offset = self.model(images)
        heat = torch.sigmoid(heat)
        b, _, h, w = heat.shape
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).float()
        scores, flat = torch.topk(peaks.reshape(b, -1), self.k)
        classes = torch.div(flat, h * w, rounding_mode="floor")
        pixel = flat - classes * (h * w)
        ys = torch.div(pixel, w, rounding_mode="floor").float()
        xs = (pixel - torch.div(pixel, w, rounding_mode="floor") * w).float()
        index = pixel.unsqueeze(1).expand(-1, 2, -1)
        sz = size.reshape(b, 2, -1).gather(2, index)  # [B, 2, K] width, height in input pixels
        off = offset.reshape(b, 2, -1).gather(2, index)
        cx, cy = (xs + off[:, 0]) * STRIDE, (ys + off[:, 1]) * STRIDE
        half_w, half_h = sz[:, 0] / 2, sz[:, 1] / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=2)
        return boxes, scores, classes


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), normalised by the object count."""
    pred = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1 - pos
    pos_loss = torch.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = torch.log(1 - pred) * pred**2 * (1 - target) ** 4 * neg
    n = pos.sum().clamp(min=1)
    return -(pos_loss.sum() + neg_loss.sum()) / n


def gather_at(feature: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    b, ch = feature.shape[:2]
    return feature.reshape(b, ch, -1).gather(2, index.unsqueeze(1).expand(-1, ch, -1)).transpose(1, 2)


def decoded_parity(graph: ExportGraph, path: Path, images: torch.Tensor) -> float:
    """Torch and onnxruntime agree on the scores (sorted, so ties do not matter) and on the boxes and
    classes of every detection whose score is unique (top-k may order equal scores either way)."""
    with torch.no_grad():
        want = [t.numpy() for t in graph(images)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    worst = float(np.abs(want[1] - got[1]).max())
    if worst > 1e-3:
        raise AssertionError(f"onnxruntime scores differ from torch by {worst:.3g}")
    for row in range(images.shape[0]):
        scores = want[1][row]
        gaps = np.abs(np.diff(scores))
        unique = np.ones(len(scores), dtype=bool)
        unique[:-1] &= gaps > 1e-3
        unique[1:] &= gaps > 1e-3
        box_diff = float(np.abs(want[0][row][unique] - got[0][row][unique]).max(initial=0.0))
        if box_diff > 1e-2 or not np.array_equal(want[2][row][unique], got[2][row][unique]):
            raise AssertionError(f"onnxruntime boxes or classes differ from torch (max |diff| {box_diff:.3g})")
        worst = max(worst, box_diff)
    return worst


# --- evaluation ----------------------------------------------------------------------------------


def coco_map(
    detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    truths: list[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
) -> dict[str, float]:
    """mAP@0.5:0.95 and mAP@0.5 by pycocotools; boxes in the same pixels for both sides."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, ((boxes, classes), (det_boxes, det_scores, det_classes)) in enumerate(zip(truths, detections, strict=True)):
        images.append({"id": i})
        for box, c in zip(boxes, classes, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, s, c in zip(det_boxes, det_scores, det_classes, strict=True):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(c),
                    "score": float(s),
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                }
            )
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(n_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            return {"map_50_95": 0.0, "map_50": 0.0}
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map_50_95": float(evaluator.stats[0]), "map_50": float(evaluator.stats[1])}


def detect_onnx(path: Path, samples: Samples, cfg: Config, score_threshold: float = 0.05):
    """Run the exported graph on every sample; boxes mapped back to the sample's own pixels."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    detections, truths = [], []
    for start in range(0, len(samples), 16):
        chunk = [samples[i] for i in range(start, min(start + 16, len(samples)))]
        boxed = [letterbox(image, cfg.input_size) for image, _, _ in chunk]
        boxes, scores, classes = session.run(None, {"images": np.stack([b[0] for b in boxed])})
        for (image, truth_boxes, truth_classes), (_, scale, left, top), bx, sc, cl in zip(
            chunk, boxed, boxes, scores, classes, strict=True
        ):
            keep = sc >= score_threshold
            h, w = image.shape[:2]
            mapped = (bx[keep] - np.array([left, top, left, top])) / scale
            mapped = np.clip(mapped, 0, [w, h, w, h])
            detections.append((mapped, sc[keep], cl[keep]))
            truths.append((truth_boxes, truth_classes))
    return detections, truths


# --- training ------------------------------------------------------------------------------------


def model_config(cfg: Config, classes: list[str]) -> dict:
    s = cfg.input_size
    return {
        "name": cfg.name,
        "task": "object-detection",
        # The face detector serves face recognition (its model.json names it); the digit detector
        # stays the object-detection endpoint's default.
        "default": cfg.dataset != "faces",
        "description": (
            "Face detector: boxes the face square the face-embedding model reads. " if cfg.dataset == "faces" else ""
        )
        + "Single-shot anchor-free detector (CenterNet-style) with its decoding in the graph. "
        f"Input: letterboxed RGB in [0, 1], {s}x{s}; outputs: boxes (x1, y1, x2, y2 in input pixels), "
        "scores and classes of the top detections, best first.",
        "platform": "onnx_onnxv1",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, s, s]}],
        "outputs": [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, cfg.max_detections, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, cfg.max_detections]},
            {"name": "classes", "datatype": "INT64", "shape": [-1, cfg.max_detections]},
        ],
        "max_batch_size": 16,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "labels": classes,
        "parameters": {"input_size": s, "pad_value": PAD_VALUE, "score_threshold": cfg.score_threshold},
    }


def smoke_sized(cfg: Config) -> Config:
    return dataclasses.replace(
        cfg,
        train_scenes=64,
        test_scenes=16,
        paper_scenes=min(cfg.paper_scenes, 32),
        paper_test_scenes=min(cfg.paper_test_scenes, 8),
        epochs=1,
        batch_size=8,
        width=8,
        input_size=128,
        workers=0,
    )


def load_data(cfg: Config) -> tuple[Samples, Samples, list[str]]:
    train_set, test_set, classes = load_samples(cfg)
    if cfg.smoke and cfg.dataset == "yolo":
        train_set.count, test_set.count = min(len(train_set), 32), min(len(test_set), 16)
    return train_set, test_set, classes


def new_model(cfg: Config, n_classes: int) -> tuple[Detector, dict | None]:
    """A fresh detector, or one from ``--init-from`` with what produced those weights (if known)."""
    model = Detector(n_classes, cfg.width)
    if cfg.init_from is None:
        return model, None
    if cfg.init_from.suffix == ".onnx":
        weights_from_onnx(model, cfg.init_from)
        provenance = cfg.init_from.parent / "metadata.json"
    else:
        # Fully convolutional: weights trained at one input size serve any other.
        model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=True))
        provenance = cfg.init_from.with_suffix(".json")
    earlier = json.loads(provenance.read_text()) if provenance.is_file() else {"checkpoint": str(cfg.init_from)}
    if earlier.get("frozen_norms"):  # weights that came from a graph: their norms have no statistics to update
        model.frozen_norms = True
    return model, earlier


def weights_from_onnx(model: Detector, path: Path) -> None:
    """Load a detector exported by this script back into ``model``, so that a committed model can be
    fine-tuned without its torch checkpoint (which is not committed).

    The export folds each batch norm into the convolution before it (a weight and a bias per
    channel), so the batch norms are set to the identity (mean 0, variance 1 - eps, scale 1) and
    carry the folded bias: the network computes exactly what the graph does. Their running
    statistics are gone, so :func:`fit` keeps them frozen (``frozen_norms``)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        # "/model/s8/s8.0/s8.0.0/Conv" -> the module "s8.0.0"; "/model/top32/Conv" -> "top32".
        parts = node.name.split("/")[2:-1]
        name = parts[-1] if parts else ""
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or name in loaded:
            raise ValueError(f"{path}: cannot place the convolution {node.name} in this detector")
        weight, bias = (torch.from_numpy(arrays[i].copy()) for i in node.input[1:3])
        if conv.weight.shape != weight.shape:
            raise ValueError(f"{path}: {name} is {tuple(weight.shape)} there, {tuple(conv.weight.shape)} here")
        prefix, _, index = name.rpartition(".")
        following = modules.get(f"{prefix}.{int(index) + 1}") if prefix and index.isdigit() else None
        if (conv.bias is None) != isinstance(following, nn.BatchNorm2d):
            raise ValueError(f"{path}: {name} is not a convolution with its own bias nor one before a batch norm")
        with torch.no_grad():
            conv.weight.copy_(weight)
            if conv.bias is not None:
                conv.bias.copy_(bias)
            else:  # conv() blocks: Conv2d (no bias) then BatchNorm2d, at index + 1 in the same Sequential
                norm = following
                assert isinstance(norm, nn.BatchNorm2d)
                norm.running_mean.zero_()
                norm.running_var.fill_(1 - norm.eps)
                norm.weight.fill_(1.0)
                norm.bias.copy_(bias)
        loaded.add(name)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if loaded != convs:
        raise ValueError(f"{path}: {len(loaded)} convolutions there, {len(convs)} here")
    model.frozen_norms = True


def detection_loss(model: Detector, batch) -> torch.Tensor:
    """Focal loss on the heatmap, L1 on the sizes (weight 0.1) and offsets at the objects' centres."""
    x, heat, index, wh, offset, mask = batch
    heat_logits, size, off = model(x)
    n = mask.sum().clamp(min=1)
    size_loss = (F.l1_loss(gather_at(size, index), wh, reduction="none").sum(2) * mask).sum() / n
    off_loss = (F.l1_loss(gather_at(off, index), offset, reduction="none").sum(2) * mask).sum() / n
    return focal_loss(heat_logits, heat) + 0.1 * size_loss + off_loss


def fit(model: Detector, cfg: Config, train_set: Samples, n_classes: int, checkpoint: Path) -> None:
    """Train for ``cfg.epochs``, saving the weights to ``checkpoint`` after each epoch."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps)
    rng = np.random.default_rng(cfg.seed)
    scenes = TrainingScenes(train_set, cfg, n_classes)
    workers = cfg.workers if cfg.workers >= 0 else min(16, max(0, (os.cpu_count() or 1) - 1))
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        if getattr(model, "frozen_norms", False):  # weights from an exported graph: no batch statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        order = (epoch * len(train_set) + rng.permutation(len(train_set))).tolist()
        loader = torch.utils.data.DataLoader(
            scenes, batch_size=cfg.batch_size, sampler=order, num_workers=workers, pin_memory=device.type == "cuda"
        )
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=5)
        for step, batch in enumerate(bar):
            loss = detection_loss(model, [t.to(device, non_blocking=True) for t in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, checkpoint)  # loads anywhere
        print(f"epoch {epoch + 1}: {time.perf_counter() - started:.0f} s, last loss {loss.item():.3f}", flush=True)


def export(graph: ExportGraph, cfg: Config, test_set: Samples, n_classes: int, onnx_path: Path) -> float:
    """The graph with its decoding, parity-checked on two test images; returns the largest difference."""
    example = torch.from_numpy(np.stack([prepare(test_set[i], cfg, n_classes, None)[0] for i in range(2)]))
    common.export_onnx(
        graph,
        (example,),
        onnx_path,
        input_names=["images"],
        output_names=["boxes", "scores", "classes"],
        dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}, "classes": {0: "batch"}},
    )
    return decoded_parity(graph, onnx_path, example)


def evaluate(onnx_path: Path, test_set: Samples, cfg: Config, n_classes: int, parity: float) -> dict:
    detections, truths = detect_onnx(onnx_path, test_set, cfg)
    scores = coco_map(detections, truths, n_classes)
    metrics = {
        "measured_on": "exported ONNX model in onnxruntime (CPU), boxes mapped back to each image's pixels",
        "evaluator": "pycocotools COCOeval (bbox)",
        "map_50_95": round(scores["map_50_95"], 4),
        "map_50": round(scores["map_50"], 4),
        "test_images": len(test_set),
        "onnx_vs_torch_max_abs_diff": parity,
    }
    paper = paper_test_set(cfg)
    if paper is not None:
        detections, truths = detect_onnx(onnx_path, paper, cfg)
        paper_scores = coco_map(detections, truths, n_classes)
        metrics["paper"] = {
            "map_50_95": round(paper_scores["map_50_95"], 4),
            "map_50": round(paper_scores["map_50"], 4),
            "test_images": len(paper),
        }
    return metrics


def dataset_description(cfg: Config, train_set: Samples, test_set: Samples) -> dict:
    if cfg.dataset == "faces":
        return {
            "name": "face scenes (training/face_scenes.py): LFW portraits and LFW heads pasted into coco128 photos "
            "without people",
            "train": f"{len(train_set)} scenes, LFW people outside the held-out pair folds, coco128 train2017, "
            f"seed {cfg.seed}",
            "test": f"{len(test_set)} scenes, the held-out folds' people (never trained on), coco128 val2017",
        }
    if cfg.dataset != "digits":
        return {"name": f"YOLO-layout dataset {cfg.yolo_dir}", "train": cfg.train_split, "test": cfg.val_split}
    return {
        "name": "digit scenes: MNIST digits pasted into coco128 photos (training/digit_scenes.py) and numbers "
        "of MNIST digits written on photographed paper (training/paper_scenes.py)",
        "train": f"{cfg.train_scenes} photo scenes and {cfg.paper_scenes} paper scenes, MNIST train digits, coco128 "
        f"train2017 photos, seed {cfg.seed}",
        "test": f"{len(test_set)} photo scenes (map_50) and {cfg.paper_test_scenes} paper scenes (paper.map_50), "
        f"MNIST test digits (writers apart from training's), coco128 val2017 photos, seed {cfg.seed}",
    }


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    device = common.pick_device(cfg.device)
    if cfg.smoke:
        cfg = smoke_sized(cfg)
    train_set, test_set, classes = load_data(cfg)
    if cfg.score:
        metrics = evaluate(cfg.score, test_set, cfg, len(classes), parity=float("nan"))
        print(f"{cfg.score}: {metrics}")
        return {"metrics": metrics}
    model, earlier = new_model(cfg, len(classes))
    model = model.to(device)
    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cfg.checkpoint_dir / f"{cfg.name}.pt"
    started = time.perf_counter()
    fit(model, cfg, train_set, len(classes), checkpoint)
    train_seconds = time.perf_counter() - started

    model = model.cpu().eval()
    graph = ExportGraph(model, cfg.max_detections).eval()
    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    parity = export(graph, cfg, test_set, len(classes), onnx_path)
    metrics = evaluate(onnx_path, test_set, cfg, len(classes), parity)
    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg, classes))
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset=dataset_description(cfg, train_set, test_set),
        command=command,
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
            **({"initialised_from": earlier} if earlier else {}),
        },
    )
    # What produced these weights, read back by a later --init-from.
    common.write_json(
        checkpoint.with_suffix(".json"),
        {
            "checkpoint": str(checkpoint),
            "command": command,
            "metrics": metrics,
            "training": meta["training"],
            "frozen_norms": bool(getattr(model, "frozen_norms", False)),
        },
    )
    print(f"wrote {onnx_path}: mAP@0.5:0.95 {metrics['map_50_95']:.4f}, mAP@0.5 {metrics['map_50']:.4f}")
    if "paper" in metrics:
        paper = metrics["paper"]
        print(f"paper scenes: mAP@0.5:0.95 {paper['map_50_95']:.4f}, mAP@0.5 {paper['map_50']:.4f}")
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.object_detection", argv))


if __name__ == "__main__":
    main()

"""Train a face-embedding network on Labeled Faces in the Wild and write it to the model repository.

    python -m training.face_recognition --data-dir ../shared/data/face_recognition

The seeds' pipeline: an aligned face in, a 128-number L2-normalised vector out, two faces the same
person when the cosine of their vectors passes a threshold. The network is a compact ResNet trained
from scratch on the LFW people here with a CosFace margin (additive cosine margin on a softmax over
the training people), heavy augmentation (most people have one or two images), and no outside data.

Honest validation: the official pairs' folds share no person with one another, so the people of
``--holdout-folds`` (default folds 1-3 of the 8 here) are removed from training entirely, and
verification is measured on those folds' pairs with the standard protocol (each fold's threshold
chosen on the other held-out folds, accuracy on it; mean and spread). 1:N identification uses the
held-out people too (their first image in the gallery with every held-out singleton as a distractor,
the rest as probes). A classic baseline, uniform LBP histograms on a 8x8 grid compared by cosine,
is measured the same way in the same run. The served threshold is the one the held-out folds
choose together. The withheld folds 9-10 (``../shared/eval``) are disjoint from all of this.

The exported graph takes ``[batch, 3, 64, 64]`` RGB in [0, 1] (the aligned crop, see ``CROP``), and
returns the normalised sum of the embeddings of the face and its mirror image.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import sys
import tarfile
import time
from dataclasses import field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training import common

SIZE = 64  # the network's input side
# The face in a deep-funneled 250x250 LFW image: a square around the point where the face's centre
# sits (row 132, column 125 of 250; scikit-learn's LFW crop, rows 70-195 and columns 78-172, is
# centred there), 130 pixels wide: forehead to chin, ear to ear. As fractions (top, left, bottom,
# right) of the aligned image, which is what model.json gives the service.
CROP = (67 / 250, 60 / 250, 197 / 250, 190 / 250)
# Training reads a wider square (x 72/64) and crops 64 from it at random scales and places.
LOAD = 72
MEAN, STD = 0.5, 0.5
EMBEDDING = 128


@dataclasses.dataclass
class Config:
    data_dir: Path = field(
        default=Path("../shared/data/face_recognition"), metadata={"help": "folder with the LFW tarballs and pairs"}
    )
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = field(default="face-embedding", metadata={"help": "model name in the repository"})
    version: int = 1
    holdout_folds: tuple[int, ...] = field(
        default=(1, 2, 3), metadata={"help": "pair folds whose people are never trained on (validation)"}
    )
    epochs: int = 30
    batch_size: int = 128
    lr: float = field(default=0.1, metadata={"help": "peak SGD learning rate (one-cycle)"})
    weight_decay: float = 5e-4
    width: int = field(default=24, metadata={"help": "channels of the first stage (doubled at each of 3 more)"})
    margin: float = field(default=0.35, metadata={"help": "CosFace additive margin"})
    scale: float = field(default=30.0, metadata={"help": "CosFace logit scale"})
    min_images: int = field(default=1, metadata={"help": "train on people with at least this many images"})
    seed: int = 1
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    detector: str = field(
        default="face-detector", metadata={"help": "the face detector named in model.json ('' for none)"}
    )
    evaluate_only: bool = field(
        default=False, metadata={"help": "measure the written version again and update its metrics (no training)"}
    )
    smoke: bool = field(default=False, metadata={"help": "a few people, one epoch: checks the pipeline end to end"})


# --------------------------------------------------------------------------------------------- data


def aligned_crop(image: Image.Image, side: int, widen: float = 1.0) -> np.ndarray:
    """The face square of an aligned (LFW-like) image at ``side`` x ``side``, RGB uint8 ``[3, s, s]``;
    ``widen`` > 1 takes a larger square around the same centre."""
    w, h = image.size
    top, left, bottom, right = CROP
    cy, cx = (top + bottom) / 2 * h, (left + right) / 2 * w
    half_h, half_w = (bottom - top) / 2 * h * widen, (right - left) / 2 * w * widen
    box = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    face = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR, box=box)
    return np.asarray(face, dtype=np.uint8).transpose(2, 0, 1)


def load_people(data_dir: Path, side: int, widen: float, only: set[str] | None = None) -> dict[str, list[np.ndarray]]:
    """Every image of the tarballs (or of ``only`` these people), cropped: ``{name: [image, ...]}``
    in the images' numbered order (the pairs' 1-based indices point into these lists)."""
    found: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
    for tar_path in sorted(data_dir.glob("lfw-deepfunneled-part*.tar.gz")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".jpg"):
                    continue
                person = member.name.split("/")[-2]
                if only is not None and person not in only:
                    continue
                number = int(member.name.rsplit("_", 1)[1].split(".")[0])
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:  # type: ignore[union-attr]
                    found[person][number] = aligned_crop(image, side, widen)
    if not found:
        raise SystemExit(f"no LFW images under {data_dir} (lfw-deepfunneled-part*.tar.gz)")
    return {p: [imgs[k] for k in sorted(imgs)] for p, imgs in found.items()}


Pair = tuple[str, int, str, int]  # person a, image index a (0-based), person b, image index b


def load_pairs(path: Path) -> list[list[Pair]]:
    """The official View 2 pairs, per fold: ``[(a, i, b, j)]`` (0-based image indices); same person
    when ``a == b``."""
    lines = path.read_text().split("\n")
    n_folds, per = (int(v) for v in lines[0].split())
    folds, at = [], 1
    for _ in range(n_folds):
        fold = []
        for _ in range(2 * per):
            parts = lines[at].split("\t")
            at += 1
            if len(parts) == 3:
                fold.append((parts[0], int(parts[1]) - 1, parts[0], int(parts[2]) - 1))
            else:
                fold.append((parts[0], int(parts[1]) - 1, parts[2], int(parts[3]) - 1))
        folds.append(fold)
    return folds


def fold_people(fold: list[Pair]) -> set[str]:
    return {p for a, _, b, _ in fold for p in (a, b)}


# ------------------------------------------------------------------------------------------ network


class Block(nn.Module):
    """A pre-activation-free basic residual block (conv-BN-PReLU-conv-BN + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class FaceNet(nn.Module):
    """64x64 RGB -> 128-d embedding (not normalised; :class:`Exported` normalises)."""

    def __init__(self, width: int = 32, dim: int = EMBEDDING, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.PReLU(w))
        self.stages = nn.Sequential(
            Block(w, 2 * w, 2),  # 32x32
            Block(2 * w, 2 * w, 1),
            Block(2 * w, 4 * w, 2),  # 16x16
            Block(4 * w, 4 * w, 1),
            Block(4 * w, 8 * w, 2),  # 8x8
            Block(8 * w, 8 * w, 1),
            Block(8 * w, 8 * w, 2),  # 4x4
        )
        # ArcFace's "E" head: BN, dropout, a dense layer over the whole 4x4 map (where in the face a
        # feature is matters; global pooling would throw that away), BN.
        self.head = nn.Sequential(
            nn.BatchNorm2d(8 * w),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(8 * w * 16, dim),
            nn.BatchNorm1d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem((x - MEAN) / STD)))


class Exported(nn.Module):
    """What the service runs: pixels in [0, 1] -> the unit vector of the face's and its mirror
    image's embeddings summed (the mirror costs a second pass and gains accuracy; see metadata)."""

    def __init__(self, net: FaceNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        both = self.net(image) + self.net(torch.flip(image, dims=[3]))
        return F.normalize(both, dim=1)


class CosFace(nn.Module):
    """Large-margin cosine loss (Wang et al., 2018): logits s * (cos - m) for the true class."""

    def __init__(self, dim: int, classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embedding), F.normalize(self.weight))
        cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.scale * cos, labels)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x``: uint8 ``[n, 3, LOAD, LOAD]`` -> float ``[n, 3, SIZE, SIZE]`` in [0, 1]: a random
    similarity warp (scale, rotation, shift: what an imperfect alignment or a detector's box gives),
    mirror, colour and brightness jitter, sometimes grey, sometimes blurred (phone photos)."""
    n = x.shape[0]
    x = x.float() / 255.0

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    # The sampled square is SIZE/LOAD of the loaded one at scale 1, i.e. exactly the CROP square.
    scale = SIZE / LOAD * uniform(0.88, 1.12)
    angle = uniform(-12, 12) * math.pi / 180
    tx, ty = uniform(-0.07, 0.07), uniform(-0.07, 0.07)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, SIZE, SIZE], align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    gain = uniform(0.6, 1.4).view(n, 1, 1, 1) * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(0.7, 1.3).view(n, 1, 1, 1)
    x = ((x - mean) * contrast + mean) * gain
    grey = (torch.rand(n, generator=generator) < 0.2).view(n, 1, 1, 1)
    x = torch.where(grey, x.mean(dim=1, keepdim=True).expand_as(x), x)
    blur = (torch.rand(n, generator=generator) < 0.2).view(n, 1, 1, 1)
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------- evaluation


def verification(scores_by_fold: list[np.ndarray], same_by_fold: list[np.ndarray]) -> dict:
    """The standard protocol: for each fold, the threshold that is most accurate on the other folds,
    and the accuracy it gives on this fold; the threshold over all folds is the one to serve."""
    accuracies, thresholds = [], []
    for k in range(len(scores_by_fold)):
        rest_s = np.concatenate([s for i, s in enumerate(scores_by_fold) if i != k])
        rest_y = np.concatenate([y for i, y in enumerate(same_by_fold) if i != k])
        t = best_threshold(rest_s, rest_y)
        thresholds.append(t)
        accuracies.append(float(((scores_by_fold[k] >= t) == same_by_fold[k]).mean()))
    all_s, all_y = np.concatenate(scores_by_fold), np.concatenate(same_by_fold)
    served = best_threshold(all_s, all_y)
    return {
        "accuracy_mean": round(float(np.mean(accuracies)), 4),
        "accuracy_std": round(float(np.std(accuracies)), 4),
        "fold_accuracies": [round(a, 4) for a in accuracies],
        "fold_thresholds": [round(t, 4) for t in thresholds],
        # The served operating point: chosen on all held-out pairs together, so its accuracy on them
        # is optimistic next to the cross-validated mean above; it is what an HTTP test can compare.
        "threshold": round(served, 4),
        "accuracy_at_threshold": round(float(((all_s >= round(served, 4)) == all_y).mean()), 4),
        # Identification (1:N) needs a stricter point: with a gallery of N people a stranger's best
        # match is the highest of N mismatched scores. The score that 1 % of mismatched pairs reach.
        "threshold_1pct_false_match": round(float(np.quantile(all_s[~all_y.astype(bool)], 0.99)), 4),
        "true_match_rate_at_1pct": round(
            float((all_s[all_y.astype(bool)] >= np.quantile(all_s[~all_y.astype(bool)], 0.99)).mean()), 4
        ),
        "roc_auc": round(roc_auc(all_s, all_y), 4),
        "pairs": len(all_s),
    }


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The midpoint between two neighbouring scores that classifies the most pairs right."""
    order = np.argsort(scores)
    s, y = scores[order], same[order].astype(np.int64)
    # Threshold just above s[i]: pairs 0..i are "different"; correct = negatives so far + positives after.
    correct = np.cumsum(1 - y) + (y.sum() - np.cumsum(y))
    i = int(np.argmax(correct))
    if (y.sum() - 0) > correct[i]:  # calling every pair "same" is better still
        return float(s[0] - 1e-6)
    return float((s[i] + s[i + 1]) / 2) if i + 1 < len(s) else float(s[i] + 1e-6)


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(scores)) + 1
    pos = same.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def identification(embed: dict[str, np.ndarray]) -> dict:
    """1:N on held-out people: each person's first image in the gallery (every held-out person,
    singletons included as distractors), every other image a probe; rank-1 and rank-5 rates."""
    names = sorted(embed)
    gallery = np.stack([embed[p][0] for p in names])
    probes, truth = [], []
    for i, p in enumerate(names):
        for v in embed[p][1:]:
            probes.append(v)
            truth.append(i)
    if not probes:
        return {}
    sims = np.stack(probes) @ gallery.T
    order = np.argsort(-sims, axis=1)
    truth_arr = np.asarray(truth)
    rank1 = float((order[:, 0] == truth_arr).mean())
    rank5 = float((order[:, :5] == truth_arr[:, None]).any(axis=1).mean())
    return {"rank1": round(rank1, 4), "rank5": round(rank5, 4), "gallery": len(names), "probes": len(probes)}


def lbp_features(images: np.ndarray, grid: int = 8) -> np.ndarray:
    """Classic baseline: uniform LBP (8 neighbours, radius 1) histograms on a ``grid`` x ``grid``
    grid of the grey crop, square-rooted (Hellinger) and L2-normalised, compared by cosine."""
    grey = images.astype(np.float32).mean(axis=1)  # [n, H, W]
    c = grey[:, 1:-1, 1:-1]
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    h, w = c.shape[1:]
    bits = [(grey[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] >= c).astype(np.uint8) for dy, dx in offsets]
    code = sum(b << k for k, b in enumerate(bits))
    # Map the 256 codes to 58 uniform patterns (at most two 0/1 transitions around the circle) + 1 other.
    table = np.full(256, 58, dtype=np.int64)
    uniform = [v for v in range(256) if bin(v ^ ((v >> 1) | ((v & 1) << 7))).count("1") <= 2]
    table[uniform] = np.arange(len(uniform))
    labels = table[code]
    n = len(images)
    feats = np.zeros((n, grid, grid, 59), dtype=np.float32)
    ys = np.minimum(np.arange(h) * grid // h, grid - 1)
    xs = np.minimum(np.arange(w) * grid // w, grid - 1)
    cell = (ys[:, None] * grid + xs[None, :]).ravel()
    flat = feats.reshape(n, grid * grid * 59)
    for i in range(n):
        np.add.at(flat[i], cell * 59 + labels[i].ravel(), 1.0)
    flat = np.sqrt(flat)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def evaluate(
    embed_fn, people: dict[str, list[np.ndarray]], folds: list[list[Pair]], heldout: set[str]
) -> tuple[dict, dict]:
    """Verification over ``folds`` and identification over ``heldout`` people with ``embed_fn``
    (a function from a batch of crops to unit vectors)."""
    names = sorted(heldout)
    vectors = {p: embed_fn(np.stack(people[p])) for p in names}
    scores, same = [], []
    for fold in folds:
        s = np.array([float(vectors[a][i] @ vectors[b][j]) for a, i, b, j in fold])
        scores.append(s)
        same.append(np.array([a == b for a, _, b, _ in fold]))
    return verification(scores, same), identification(vectors)


# --------------------------------------------------------------------------------------------- main


def embed_with(model: nn.Module, batch: int = 256):
    def run(images: np.ndarray) -> np.ndarray:
        out = []
        model.eval()
        with torch.no_grad():
            for i in range(0, len(images), batch):
                out.append(F.normalize(model(to_input(images[i : i + batch])), dim=1).numpy())
        return np.concatenate(out)

    return run


def to_input(loaded: np.ndarray) -> torch.Tensor:
    """Loaded crops (LOAD-sided, the CROP square widened by LOAD/SIZE) -> the served input: the CROP
    square at SIZE in [0, 1], cut and resized the way the service does from the aligned image."""
    t = torch.from_numpy(loaded).float() / 255.0
    margin = (LOAD - SIZE) // 2
    return t[:, :, margin : margin + SIZE, margin : margin + SIZE].contiguous()


def evaluation_folds(cfg: Config) -> tuple[list[list[Pair]], list[list[Pair]], set[str]]:
    """All folds, the held-out ones (a few pairs of each with ``--smoke``), and their people."""
    folds = load_pairs(cfg.data_dir / "pairs_folds1-8.txt")
    test_folds = [folds[k - 1] for k in cfg.holdout_folds]
    if cfg.smoke:
        test_folds = [f[:40] + f[300:340] for f in test_folds]
    heldout = set().union(*(fold_people(f) for f in test_folds)) if test_folds else set()
    return folds, test_folds, heldout


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    started = time.perf_counter()
    folds, test_folds, heldout = evaluation_folds(cfg)
    only = heldout | {p for f in folds[4:6] for p in fold_people(f[:150])} if cfg.smoke else None
    # Loaded at LOAD px from the CROP square widened by LOAD/SIZE: augmentation has room to move.
    people = load_people(cfg.data_dir, LOAD, LOAD / SIZE, only)
    n_images = sum(len(v) for v in people.values())
    print(f"loaded {n_images} images of {len(people)} people in {time.perf_counter() - started:.0f} s")
    train_people = sorted(p for p in people if p not in heldout and len(people[p]) >= cfg.min_images)
    x = torch.from_numpy(np.stack([img for p in train_people for img in people[p]]))
    y = torch.tensor([k for k, p in enumerate(train_people) for _ in people[p]])
    print(f"training on {len(x)} images of {len(train_people)} people; {len(heldout)} people held out")

    net = FaceNet(cfg.width).to(device)
    loss_fn = CosFace(EMBEDDING, len(train_people), cfg.scale, cfg.margin).to(device)
    params = list(net.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    epochs = 1 if cfg.smoke else cfg.epochs
    steps = math.ceil(len(x) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=epochs * steps, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(1, epochs + 1):
        net.train()
        loss_fn.train()
        order = torch.randperm(len(x), generator=generator)
        total, t0 = 0.0, time.perf_counter()
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            xb = augment(x[idx], generator).to(device)
            loss = loss_fn(net(xb), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        print(f"epoch {epoch}/{epochs}: loss {total / steps:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - started

    net = net.cpu().eval()
    exported = Exported(net).eval()
    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    sample = to_input(np.stack([people[p][0] for p in sorted(people)[:8]]))
    common.export_onnx(
        exported,
        (sample[:2],),
        onnx_path,
        input_names=["image"],
        output_names=["embedding"],
        dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
    )
    parity = common.check_parity(exported, onnx_path, {"image": sample})
    metrics = measure(onnx_path, people, cfg, test_folds, heldout, net)
    metrics["onnx_vs_torch_max_abs_diff"] = parity
    threshold = metrics["verification"]["threshold"] if test_folds else 0.3
    strict = metrics["verification"]["threshold_1pct_false_match"] if test_folds else 0.6
    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg, threshold, strict))
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset={
            "name": "Labeled Faces in the Wild, deep-funneled (folds 9-10 withheld)",
            "train_images": len(x),
            "train_people": len(train_people),
            "split": f"people of pair folds {list(cfg.holdout_folds)} never trained on; verified on those folds' pairs",
            "source": "../shared/data/face_recognition (see its SOURCE.md)",
        },
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
        },
        command=command,
    )
    print(f"wrote {onnx_path}")
    return meta


def measure(
    onnx_path: Path,
    people: dict[str, list[np.ndarray]],
    cfg: Config,
    test_folds: list[list[Pair]],
    heldout: set[str],
    net: FaceNet | None = None,
) -> dict:
    """Verification and identification of the exported graph on the held-out people, beside the
    LBP baseline (and, given the torch ``net``, without the mirror image)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def onnx_embed(images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [session.run(None, {"image": to_input(images[i : i + 128]).numpy()})[0] for i in range(0, len(images), 128)]
        )

    def lbp_embed(images: np.ndarray) -> np.ndarray:
        return lbp_features(to_input(images).numpy())

    metrics: dict = {"measured_on": "exported ONNX model in onnxruntime (CPU)"}
    if not test_folds:
        return metrics
    verify, identify = evaluate(onnx_embed, people, test_folds, heldout)
    base_verify, base_identify = evaluate(lbp_embed, people, test_folds, heldout)
    metrics.update(
        verification=verify,
        identification=identify,
        baseline_lbp={"verification": base_verify, "identification": base_identify},
        heldout_folds=list(cfg.holdout_folds),
        heldout_people=len(heldout),
    )
    if net is not None:
        metrics["without_mirror_accuracy"] = evaluate(embed_with(net), people, test_folds, heldout)[0]["accuracy_mean"]
    print(
        f"verification on folds {list(cfg.holdout_folds)} (people never trained on): "
        f"{verify['accuracy_mean']:.2%} +- {verify['accuracy_std']:.2%} (served threshold {verify['threshold']}: "
        f"{verify['accuracy_at_threshold']:.2%}), without the mirror {metrics.get('without_mirror_accuracy')}; "
        f"LBP baseline {base_verify['accuracy_mean']:.2%}; identification rank-1 {identify.get('rank1')} "
        f"(LBP {base_identify.get('rank1')})"
    )
    return metrics


def reevaluate(cfg: Config, command: str) -> dict:
    """``--evaluate-only``: measure a written version again (its graph unchanged) and update its
    metadata's metrics and model.json's threshold; what produced the weights stays as it was."""
    _, test_folds, heldout = evaluation_folds(cfg)
    people = load_people(cfg.data_dir, LOAD, LOAD / SIZE, heldout)
    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    meta_path = version_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    metrics = measure(version_dir / "model.onnx", people, cfg, test_folds, heldout)
    for kept in ("onnx_vs_torch_max_abs_diff", "without_mirror_accuracy"):
        if kept in meta["metrics"]:
            metrics[kept] = meta["metrics"][kept]
    meta["metrics"] = metrics
    meta["metrics_command"] = command
    common.write_json(meta_path, meta)
    spec_path = cfg.output_dir / cfg.name / "model.json"
    spec = json.loads(spec_path.read_text())
    spec["parameters"]["threshold"] = metrics["verification"]["threshold"]
    spec["parameters"]["identification_threshold"] = metrics["verification"]["threshold_1pct_false_match"]
    common.write_model_json(cfg.output_dir / cfg.name, spec)
    return meta


def model_config(cfg: Config, threshold: float, identification_threshold: float) -> dict:
    return {
        "name": cfg.name,
        "task": "face-embedding",
        "default": True,
        "description": "Face embedding (a compact ResNet trained from scratch on about 7,000 LFW images; no "
        "outside data). Input: the aligned face square, 64x64 RGB in [0, 1]. Output: a unit 128-d vector; "
        "two faces are the same person when the cosine of their vectors reaches the threshold.",
        "platform": "onnx_onnxv1",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, EMBEDDING]}],
        "max_batch_size": 32,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "parameters": {
            "crop": list(CROP),
            "threshold": threshold,
            "identification_threshold": identification_threshold,
            **({"detector": cfg.detector} if cfg.detector else {}),
        },
    }


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg, command = parse_args(argv), common.command_line("training.face_recognition", argv)
    return reevaluate(cfg, command) if cfg.evaluate_only else train(cfg, command)


if __name__ == "__main__":
    main()

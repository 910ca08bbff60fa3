"""Handwritten numbers on paper, photographed: the scenes a user's phone sends, with exact boxes.

The COCO scenes of :mod:`training.digit_scenes` paste single digits into clutter; a user who
photographs "4179" written in marker on a notepad sends something else: a bright page filling most
of the frame, digits written close together in rows, lines of a ruled or squared page, uneven
light. This generator draws that. A scene is a page (white, cream or grey recycled paper; plain,
ruled, with a margin, or squared) on which 1 to 4 numbers of 1 to 6 MNIST digits are written in
rows, digit beside digit, each with its own slant, rotation
and size; the ink is a pen or a marker, black or blue, its strokes thinned or thickened from
MNIST's; sometimes an underline or a wavy line of "text" that is no digit. The page is then
photographed: rotated a little, either filling the frame or lying on a coco128 photo, lit
unevenly (a gradient, a soft shadow, vignetting, a colour cast), blurred, noisy and JPEG-encoded.
Digit heights run from 14 pixels to 0.4 of the frame's shorter side.

Each box is the tight box of the digit's ink carried through every geometric step. Digits of a
number are spaced by the gaps between their ink (from slightly overlapping to a third of the
height), rows by at least a fifth of the row height; a page that fills the frame is 1.4 times it,
so a turned corner never shows (up to the default 8 degrees). Fixed for v3; v2 was trained on the
earlier scenes, whose boxes lay a pixel outside the ink on the right and bottom and whose digits
never touched. Known faults left: rank filters leave square-cut strokes on large marker digits; on
a turned page a box can lie up to 0.14 pixel inside the ink (each ink pixel is carried by two of
its four corners).

Training scenes use MNIST training digits and coco128 ``train2017`` photos; test scenes MNIST test
digits (other writers) and ``val2017`` photos. Scene ``i`` depends only on
``(seed, split, i)``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.digit_scenes import CLASSES
from training.idx import load_mnist
from training.scene_tools import Photos, iou

__all__ = ["CLASSES", "PaperSceneConfig", "PaperSceneMaker", "makers"]

# Paper and ink colours (RGB), each varied a little per scene.
PAPERS = {"white": (246, 246, 244), "cream": (248, 240, 214), "recycled": (222, 220, 212)}
INKS = {
    "black pen": ((35, 35, 45), "pen"),
    "blue pen": ((30, 55, 150), "pen"),
    "black marker": ((22, 22, 26), "marker"),
    "blue marker": ((30, 60, 170), "marker"),
}
MNIST_STROKE = 0.13  # an MNIST digit's stroke width, as a share of its ink height (measured by eye: 2-3 px of 20)


@dataclass(frozen=True)
class PaperSceneConfig:
    min_long_side: int = 320
    max_long_side: int = 640
    min_digit: int = 14  # digit ink height in frame pixels
    max_digit: float = 0.4  # of the frame's shorter side (a third of a portrait photo's height)
    max_rows: int = 4
    max_row_digits: int = 6
    on_photo_share: float = 0.35  # the page lies on a photo, which shows around it
    max_rotation: float = 8.0  # degrees, the whole page
    max_overlap: float = 0.3  # touching digits overlap a little; no more than this IoU


class PaperSceneMaker:
    """Builds paper scene ``i`` of a split from the digits and background photos it was given."""

    def __init__(
        self, digits: np.ndarray, labels: np.ndarray, backgrounds: list[Path], seed: int, cfg: PaperSceneConfig
    ) -> None:
        self.digits, self.labels, self.photos = digits, labels, Photos(backgrounds)
        self.seed, self.cfg = seed, cfg

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image [H, W, 3] uint8, boxes [n, 4] x1 y1 x2 y2 in pixels, classes [n])``."""
        for attempt in range(20):  # a layout that leaves a digit outside the frame is drawn again
            rng = np.random.default_rng([self.seed, i, attempt])
            made = self._try(rng)
            if made is not None:
                return made
        raise RuntimeError(f"paper scene {i}: no layout fitted in 20 attempts")  # pragma: no cover

    # --- the page ----------------------------------------------------------------------------------

    def _try(self, rng: np.random.Generator):
        cfg = self.cfg
        long_side = int(rng.integers(cfg.min_long_side, cfg.max_long_side + 1))
        aspect = float(rng.choice([3 / 4, 1.0, 9 / 16, 2 / 3]))
        short_side = round(long_side * aspect)
        fw, fh = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        on_photo = rng.random() < cfg.on_photo_share
        # Page size in frame pixels: larger than the frame (it fills it, rotation never shows a corner)
        # or smaller (it lies on a photo).
        # 1.4: a 9:16 frame turned by 8 degrees and shifted by 5 % needs 1.36 of its short side.
        cover = rng.uniform(0.55, 0.9) if on_photo else 1.4
        pw, ph = round(fw * cover), round(fh * cover)
        if on_photo and rng.random() < 0.5:
            pw = round(pw * rng.uniform(0.75, 1.0))
        page = self._blank_page(rng, pw, ph)
        # Where text may go, in page pixels: the part of the page that is surely in the frame.
        if on_photo:
            area = (0.08 * pw, 0.08 * ph, 0.92 * pw, 0.92 * ph)
        else:
            mx, my = (pw - fw) / 2, (ph - fh) / 2
            area = (mx + 0.1 * fw, my + 0.1 * fh, mx + 0.9 * fw, my + 0.9 * fh)
        ink_colour, kind = self._ink(rng)
        alpha = np.zeros((ph, pw), dtype=np.float32)
        points, classes = self._write_numbers(rng, alpha, area, min(fw, fh), kind)
        if not classes:
            return None
        self._scribble(rng, alpha, area, points, kind)
        strength = rng.uniform(0.8, 1.0) * self._pressure(rng, pw, ph)
        a = (alpha * strength)[..., None]
        page = page * (1 - a) + np.asarray(ink_colour, np.float32) * a
        # Photograph it: rotate and place the page in the frame.
        angle = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
        if on_photo:
            cx, cy = rng.uniform(0.4, 0.6) * fw, rng.uniform(0.4, 0.6) * fh
        else:
            cx, cy = fw / 2 + rng.uniform(-0.05, 0.05) * fw, fh / 2 + rng.uniform(-0.05, 0.05) * fh
        forward = _rotation_about(angle, pw / 2, ph / 2, cx, cy)
        background = self.photos.random_crop(rng, fw, fh) if on_photo else np.zeros((fh, fw, 3), np.float32)
        image = _place(page, forward, background, (fw, fh))
        boxes = []
        for pts in points:
            xy = pts @ forward[:, :2].T + forward[:, 2]
            x1, y1 = xy.min(axis=0)
            x2, y2 = xy.max(axis=0)  # the points are the ink pixels' corners already
            if x1 < 0 or y1 < 0 or x2 > fw or y2 > fh:
                return None
            boxes.append([x1, y1, x2, y2])
        image = self._camera(rng, image)
        return image, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(classes, dtype=np.int64)

    def _blank_page(self, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        base = np.array(PAPERS[str(rng.choice(list(PAPERS)))], np.float32) + rng.uniform(-8, 6, 3)
        page = np.empty((h, w, 3), np.float32)
        page[:] = base
        # Paper grain: low-frequency blotches and a little fine noise.
        grain = _smooth_field(rng, w, h, cells=int(rng.integers(4, 12)), amplitude=rng.uniform(0, 5))
        page += grain[..., None] + rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(0, 2))
        pattern = rng.choice(["plain", "ruled", "squared"], p=[0.4, 0.35, 0.25])
        if pattern == "plain":
            return page
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        spacing = float(rng.uniform(14, 44)) * (w / 400) ** 0.5
        thickness = int(rng.integers(1, 3))
        offset = rng.uniform(0, spacing)
        for k in range(int(h / spacing) + 1):
            y = offset + k * spacing
            draw.line([(0, y), (w, y)], fill=255, width=thickness)
        if pattern == "squared":
            for k in range(int(w / spacing) + 1):
                x = offset + k * spacing
                draw.line([(x, 0), (x, h)], fill=255, width=thickness)
        lines = np.asarray(canvas, np.float32)[..., None] / 255 * rng.uniform(0.35, 0.8)
        colour = np.array(
            [(150, 185, 225), (165, 165, 170), (140, 200, 200)][int(rng.integers(3))], np.float32
        ) + rng.uniform(-15, 15, 3)
        page = page * (1 - lines) + colour * lines
        if pattern == "ruled" and rng.random() < 0.5:  # a red margin
            margin = Image.new("L", (w, h), 0)
            x = rng.uniform(0.05, 0.2) * w
            ImageDraw.Draw(margin).line([(x, 0), (x, h)], fill=255, width=thickness)
            m = np.asarray(margin, np.float32)[..., None] / 255 * rng.uniform(0.4, 0.8)
            page = page * (1 - m) + np.array([215, 90, 100], np.float32) * m
        return page

    @staticmethod
    def _ink(rng: np.random.Generator) -> tuple[np.ndarray, str]:
        colour, kind = INKS[str(rng.choice(list(INKS)))]
        return np.clip(np.array(colour, np.float32) + rng.uniform(-15, 15, 3), 0, 255), kind

    @staticmethod
    def _pressure(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        """Ink that is not even: a pen pressed harder in places, a marker running dry."""
        return np.clip(1 - np.abs(_smooth_field(rng, w, h, cells=int(rng.integers(3, 9)), amplitude=0.25)), 0.55, 1)

    # --- the writing ---------------------------------------------------------------------------------

    def _digit(self, rng: np.random.Generator, height: float, kind: str) -> tuple[np.ndarray, int]:
        """One handwritten digit as ink coverage [h, w] in [0, 1], cut to its ink: slanted, rotated,
        scaled to ``height`` and with the pen's or marker's stroke width."""
        k = int(rng.integers(len(self.digits)))
        cell = self.digits[k]
        ys, xs = np.nonzero(cell > 25)
        cell = cell[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        ih, iw = cell.shape
        scale = height / ih
        width_factor = rng.uniform(0.85, 1.2)
        slant = rng.uniform(-0.25, 0.25)  # x shifts by slant * (distance above the middle)
        rot = math.radians(rng.uniform(-6, 6))
        # Map output pixels to cell pixels through (scale, slant, rotation) about the cell's centre.
        sx, sy = scale * width_factor, scale
        forward = np.array([[sx, -slant * sy], [0.0, sy]]) @ np.eye(2)
        c, s = math.cos(rot), math.sin(rot)
        forward = np.array([[c, -s], [s, c]]) @ forward
        corners = (np.array([[0, 0], [iw, 0], [0, ih], [iw, ih]], float) - [iw / 2, ih / 2]) @ forward.T
        ow, oh = (np.ceil(corners.max(0) - corners.min(0)) + 4).astype(int)
        inverse = np.linalg.inv(forward)
        # PIL's affine takes output -> input: input = inverse @ (out - out_centre) + in_centre.
        off = np.array([iw / 2, ih / 2]) - inverse @ np.array([ow / 2, oh / 2])
        coeffs = (inverse[0, 0], inverse[0, 1], off[0], inverse[1, 0], inverse[1, 1], off[1])
        big = Image.fromarray(cell).transform((int(ow), int(oh)), Image.AFFINE, coeffs, Image.BILINEAR)
        # Stroke width: MNIST's is about MNIST_STROKE of the height; a pen's is thinner, a marker's wider.
        # (A wider marker closes the loops of a large digit: an "0" became a "D".)
        target = rng.uniform(0.025, 0.09) if kind == "pen" else rng.uniform(0.08, 0.15)
        # Pixels of stroke width to add (or take away); a stroke keeps at least 1.6 pixels.
        change = max(target * height, 1.6) - MNIST_STROKE * height
        steps = min(round(abs(change) / 2), 12)
        ink = np.asarray(big, np.float32).sum()
        while steps > 0:  # one rank filter of 2 * steps + 1 pixels widens or narrows a stroke by 2 * steps
            changed = big.filter((ImageFilter.MaxFilter if change > 0 else ImageFilter.MinFilter)(2 * steps + 1))
            if change > 0 or np.asarray(changed, np.float32).sum() >= 0.3 * ink:
                big = changed
                break
            steps -= 1  # thinning that far would break the strokes: thin less
        alpha = np.asarray(big, np.float32) / 255
        if kind == "pen":  # a pen's ink is solid: sharpen the soft edges of the upscaled cell
            alpha = np.clip((alpha - 0.3) / 0.4, 0, 1)
        else:
            alpha = np.clip(alpha * 1.4, 0, 1)
        return alpha, int(self.labels[k])

    def _write_numbers(self, rng, alpha: np.ndarray, area, short_side: int, kind: str):
        """Numbers in rows inside ``area``; returns each digit's ink points (page pixels) and labels."""
        cfg = self.cfg
        x0, y0, x1, y1 = area
        points: list[np.ndarray] = []
        classes: list[int] = []
        boxes: list[np.ndarray] = []
        # One writer's size for the page, from small to a third of the frame (log-uniform).
        low, high = math.log(cfg.min_digit), math.log(max(cfg.min_digit + 1, cfg.max_digit * short_side))
        size = math.exp(rng.uniform(low, high))
        rows = int(rng.integers(1, cfg.max_rows + 1))
        for _row in range(rows):
            for _attempt in range(10):
                count = int(rng.integers(1, cfg.max_row_digits + 1))
                row_height = size * rng.uniform(0.9, 1.1)
                digits = [self._digit(rng, row_height * rng.uniform(0.88, 1.08), kind) for _ in range(count)]
                # Gaps between the digits' ink, not their canvases: negative ones make digits touch,
                # as handwriting often does.
                gaps = [row_height * rng.uniform(-0.08, 0.35) for _ in range(count - 1)]
                inks = [np.nonzero(d > 0.25) for d, _ in digits]  # (ys, xs) of each digit's ink
                if any(len(xs) == 0 for _, xs in inks):
                    continue
                total = sum(int(xs.max() - xs.min() + 1) for _, xs in inks) + sum(gaps)
                if total > x1 - x0 or row_height * 1.3 > y1 - y0:
                    if count == 1:
                        break
                    continue
                left = rng.uniform(x0, x1 - total)
                baseline = rng.uniform(y0 + row_height * 1.15, y1 - 2)
                placed = []
                x = left  # where the next digit's ink starts
                for n, (digit, label) in enumerate(digits):
                    h, w = digit.shape
                    top = baseline - h + rng.uniform(-0.06, 0.06) * row_height
                    ys, xs = inks[n]
                    ix, iy = int(np.rint(x - xs.min())), int(np.rint(top))
                    if iy < 0 or ix < 0 or iy + h > alpha.shape[0] or ix + w > alpha.shape[1]:
                        placed = []
                        break
                    box = np.array([ix + xs.min(), iy + ys.min(), ix + xs.max() + 1, iy + ys.max() + 1], float)
                    others = boxes + [b for b, *_ in placed]
                    if iou(box, others).max(initial=0.0) > cfg.max_overlap:
                        placed = []
                        break
                    placed.append((box, digit, label, ix, iy, xs, ys))
                    x = box[2] + (gaps[n] if n < len(gaps) else 0)
                if not placed:
                    continue
                # Keep away from earlier rows: no box of this row, grown by a fifth of the row height
                # above and below, may touch theirs.
                pad = np.array([0, -0.2, 0, 0.2]) * row_height
                if boxes and any(iou(b + pad, boxes).max() > 0 for b, *_ in placed):
                    continue
                for box, digit, label, ix, iy, xs, ys in placed:
                    h, w = digit.shape
                    region = alpha[iy : iy + h, ix : ix + w]
                    np.maximum(region, digit, out=region)
                    # Points at the corners of the ink pixels: their transform bounds the ink exactly.
                    px, py = xs + ix, ys + iy
                    points.append(
                        np.concatenate([np.stack([px, py], 1), np.stack([px + 1, py + 1], 1)]).astype(np.float64)
                    )
                    boxes.append(box)
                    classes.append(label)
                break
        return points, classes

    @staticmethod
    def _scribble(rng, alpha: np.ndarray, area, points: list[np.ndarray], kind: str) -> None:
        """Sometimes an underline under a number, or a wavy line of "words" away from the digits."""
        if not points or rng.random() > 0.35:
            return
        x0, y0, x1, y1 = area
        canvas = Image.new("L", (alpha.shape[1], alpha.shape[0]), 0)
        draw = ImageDraw.Draw(canvas)
        width = max(1, int(rng.integers(1, 3)) * (2 if kind == "marker" else 1))
        boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in points])
        if rng.random() < 0.5:  # underline the first number
            row = boxes[np.abs(boxes[:, 3] - boxes[0, 3]) < (boxes[0, 3] - boxes[0, 1]) * 0.5]
            y = row[:, 3].max() + rng.uniform(3, 10)
            draw.line([(row[:, 0].min(), y), (row[:, 2].max(), y + rng.uniform(-4, 4))], fill=255, width=width)
        else:  # cursive-like loops, where no digit is
            for _ in range(10):
                y = rng.uniform(y0, y1)
                height = rng.uniform(6, 18)
                if np.any((boxes[:, 1] - height < y) & (y < boxes[:, 3] + height)):
                    continue
                xs = np.linspace(rng.uniform(x0, (x0 + x1) / 2), rng.uniform((x0 + x1) / 2, x1), 120)
                ys = y + height / 2 * np.sin((xs - xs[0]) / rng.uniform(3, 7)) * rng.uniform(0.5, 1, len(xs))
                draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=255, width=width)
                break
        np.maximum(alpha, np.asarray(canvas, np.float32) / 255, out=alpha)

    # --- the camera ----------------------------------------------------------------------------------

    @staticmethod
    def _camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        # The light is smooth: computed on a grid 8 times coarser and upsampled (4x faster scenes).
        gh, gw = max(2, h // 8), max(2, w // 8)
        ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
        ys, xs = (ys + 0.5) * (h / gh), (xs + 0.5) * (w / gw)
        light = np.full((gh, gw), rng.uniform(0.7, 1.08), np.float32)
        gx, gy = rng.uniform(-0.35, 0.35, 2)
        light *= 1 + gx * (xs / w - 0.5) + gy * (ys / h - 0.5)
        if rng.random() < 0.5:  # the soft shadow of a hand or a phone
            theta = rng.uniform(0, 2 * math.pi)
            d = (xs - rng.uniform(0, w)) * math.cos(theta) + (ys - rng.uniform(0, h)) * math.sin(theta)
            soft = rng.uniform(0.02, 0.15) * max(w, h)
            light *= 1 - rng.uniform(0.2, 0.5) / (1 + np.exp(-d / soft))
        if rng.random() < 0.5:  # vignetting
            r = ((xs / w - 0.5) ** 2 + (ys / h - 0.5) ** 2) * 2
            light *= 1 - rng.uniform(0.1, 0.35) * r
        light = np.asarray(Image.fromarray(light.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
        cast = 1 + rng.uniform(-0.08, 0.08, 3).astype(np.float32)  # warm or cool light
        out = image * light[..., None] * cast
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0, 6))
        picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
        if rng.random() < 0.6:
            picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.4)))
        if rng.random() < 0.7:
            buffer = io.BytesIO()
            picture.save(buffer, "JPEG", quality=int(rng.integers(35, 96)))
            picture = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return np.asarray(picture)


def _smooth_field(rng: np.random.Generator, w: int, h: int, cells: int, amplitude: float) -> np.ndarray:
    """A smooth random field [h, w] in about [-amplitude, amplitude]: a coarse grid of noise, upsampled."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC)
    return np.asarray(field, np.float32) * np.float32(amplitude)


def _rotation_about(angle: float, px: float, py: float, fx: float, fy: float) -> np.ndarray:
    """The 2x3 map of page pixels to frame pixels: rotate by ``angle`` about the page point
    ``(px, py)``, which lands on the frame point ``(fx, fy)``."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return np.concatenate([rot, (np.array([fx, fy]) - rot @ np.array([px, py]))[:, None]], axis=1)


def _place(page: np.ndarray, forward: np.ndarray, background: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The page drawn into the frame through ``forward``, over ``background`` where it does not reach."""
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    coeffs = tuple(inverse.reshape(-1).tolist())
    picture = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))
    drawn = np.asarray(picture.transform(size, Image.AFFINE, coeffs, Image.BILINEAR), np.float32)
    mask = Image.new("L", (page.shape[1], page.shape[0]), 255)
    cover = np.asarray(mask.transform(size, Image.AFFINE, coeffs, Image.BILINEAR), np.float32)[..., None] / 255
    return drawn * cover + background * (1 - cover)


def makers(data_dir: Path, seed: int, cfg: PaperSceneConfig | None = None) -> dict[str, PaperSceneMaker]:
    """``{"train": ..., "test": ...}``: MNIST train digits and train2017 photos for training; MNIST
    test digits (other writers) and val2017 photos for the held-out scenes."""
    cfg = cfg or PaperSceneConfig()
    coco = data_dir / "object_detection" / "coco128" / "images"
    mnist = data_dir / "image_classification" / "mnist"
    out = {}
    for split, photos, offset in (("train", "train2017", 0), ("test", "val2017", 1)):
        digits, labels = load_mnist(mnist, split)
        # Seeds apart from digit_scenes' (seed * 2 + offset), so the two kinds never draw alike.
        backgrounds = sorted((coco / photos).glob("*.jpg"))
        out[split] = PaperSceneMaker(digits, labels, backgrounds, 1000 + seed * 2 + offset, cfg)
    return out


# One digit per page, large enough to be what a phone user frames (for the classifier's checks).
ONE_DIGIT = PaperSceneConfig(min_digit=40, max_rows=1, max_row_digits=1)


def framed_digits(maker: PaperSceneMaker, n: int, seed: int) -> list[tuple[Image.Image, int]]:
    """``n`` pictures of one digit on a page, framed as a phone user frames a digit: the digit 30-75 %
    of the picture's height, anywhere in it, never cut (scenes whose digit lies too near the edge to
    be framed whole are skipped), from scenes 0, 1, ... of ``maker`` (built with :data:`ONE_DIGIT`)."""
    out: list[tuple[Image.Image, int]] = []
    scene = -1
    while len(out) < n:
        scene += 1
        image, boxes, classes = maker.scene(scene)
        rng = np.random.default_rng([seed, scene])
        (x1, y1, x2, y2), (height, width) = boxes[0], image.shape[:2]
        crop_h = min(max((y2 - y1) / rng.uniform(0.3, 0.75), y2 - y1 + 4), height)
        crop_w = min(max(crop_h * rng.uniform(0.75, 1.0), x2 - x1 + 4), width)
        left = (max(0.0, x2 + 2 - crop_w), min(x1 - 2, width - crop_w))
        top = (max(0.0, y2 + 2 - crop_h), min(y1 - 2, height - crop_h))
        if left[0] > left[1] or top[0] > top[1]:
            continue
        x, y = rng.uniform(*left), rng.uniform(*top)
        out.append((Image.fromarray(image).crop((int(x), int(y), int(x + crop_w), int(y + crop_h))), int(classes[0])))
    return out

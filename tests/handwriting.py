"""Handwritten numbers on paper, "photographed": images for checking the digit detector with code
that shares nothing with how its training scenes are made (no MNIST, nothing pasted).

Every digit 0-9 has two or three hand-designed pen-stroke skeletons in a unit box (height 1, width
about 0.6), made of polylines, cubic Beziers and elliptic arcs. Each drawing perturbs them (control
points, radii and angles jittered, each stroke nudged, a smooth random warp, aspect, slant, a little
rotation, pen width and pressure) and draws them as round pen strokes (a disc at every point, points
closer than a third of the pen's radius) at 4x, then averages 4x4 blocks down. Numbers of 2-8
digits are written left to right with small gaps on a page (white, cream, ruled or squared), and the
page is "photographed": turned by up to 6 degrees, lit unevenly, blurred a little, with sensor noise
and JPEG at quality 60-90, in phone-like frames (480x640, 640x480, 600x800, ...).

The truth is exact: the page is drawn straight into the turned frame (points are turned, and a disc
stays a disc), so every digit's tight box is the box of its turned ink points grown by the pen's
radius there. All randomness comes from ``numpy.random.default_rng(seed)``, one seed per photo.

``python -m tests.handwriting /tmp/handwriting.png`` writes a contact sheet with the truth boxes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

INKS = ("ballpoint-black", "ballpoint-blue", "marker")
PAGES = ("white", "cream", "ruled", "squared")
SIZES = {"small": (0.05, 0.10), "medium": (0.10, 0.18), "large": (0.18, 0.30)}  # digit height / frame height
FRAMES = ((480, 640), (640, 480), (600, 800), (800, 600), (540, 720))  # width, height
SUPERSAMPLE = 4
MAX_ANGLE = 6.0  # degrees the page is turned in the photo, either way


# -- stroke skeletons --------------------------------------------------------------------------


def _line(*points: np.ndarray) -> np.ndarray:
    return np.array(points, dtype=float)


def _bezier(p0, p1, p2, p3, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _arc(center, radii, a0: float, a1: float) -> np.ndarray:
    """An elliptic arc, angles in degrees on the page (y down): 0 right, 90 bottom, 180 left, 270 top;
    increasing angles go clockwise on the page."""
    t = np.radians(np.linspace(a0, a1, max(8, int(abs(a1 - a0) / 4))))
    return np.stack([center[0] + radii[0] * np.cos(t), center[1] + radii[1] * np.sin(t)], axis=1)


def _chain(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


class _Jitter:
    """Perturbs the control values of one drawing: points, radii, angles."""

    def __init__(self, rng: np.random.Generator, sigma: float) -> None:
        self.rng, self.sigma = rng, sigma

    def p(self, x: float, y: float) -> np.ndarray:
        return np.array([x, y]) + self.rng.normal(0.0, self.sigma, 2)

    def r(self, rx: float, ry: float) -> np.ndarray:
        return np.array([rx, ry]) * (1.0 + self.rng.normal(0.0, 2 * self.sigma, 2))

    def a(self, degrees: float) -> float:
        return degrees + self.rng.normal(0.0, 250 * self.sigma)


Style = Callable[[_Jitter], list[np.ndarray]]


def _zero_ccw(j: _Jitter) -> list[np.ndarray]:
    return [_arc(j.p(0.3, 0.5), j.r(0.27, 0.5), j.a(-75), j.a(-445))]


def _zero_cw(j: _Jitter) -> list[np.ndarray]:
    return [_arc(j.p(0.28, 0.5), j.r(0.24, 0.5), j.a(-105), j.a(268))]


def _one_stick(j: _Jitter) -> list[np.ndarray]:
    return [_line(j.p(0.32, 0.0), j.p(0.29, 1.0))]


def _one_flag(j: _Jitter) -> list[np.ndarray]:
    return [_line(j.p(0.1, 0.25), j.p(0.36, 0.0), j.p(0.33, 1.0))]


def _one_flag_base(j: _Jitter) -> list[np.ndarray]:
    return [_line(j.p(0.12, 0.22), j.p(0.36, 0.0), j.p(0.34, 1.0)), _line(j.p(0.1, 1.0), j.p(0.58, 0.99))]


def _two_curve(j: _Jitter) -> list[np.ndarray]:
    top = _arc(j.p(0.3, 0.29), j.r(0.27, 0.27), j.a(195), j.a(378))
    down = _bezier(top[-1], j.p(0.5, 0.62), j.p(0.2, 0.82), j.p(0.03, 1.0))
    return [_chain(top, down, _line(down[-1], j.p(0.6, 0.98)))]


def _two_straight(j: _Jitter) -> list[np.ndarray]:
    top = _arc(j.p(0.3, 0.28), j.r(0.26, 0.26), j.a(200), j.a(372))
    down = _line(top[-1], j.p(0.05, 0.97))
    return [_chain(top, down, _bezier(down[-1], j.p(0.22, 0.9), j.p(0.42, 1.03), j.p(0.62, 0.95)))]


def _three_round(j: _Jitter) -> list[np.ndarray]:
    upper = _arc(j.p(0.28, 0.26), j.r(0.25, 0.25), j.a(200), j.a(465))
    lower = _arc(j.p(0.28, 0.75), j.r(0.29, 0.25), j.a(250), j.a(520))
    return [_chain(upper, lower)]


def _three_flat(j: _Jitter) -> list[np.ndarray]:
    lower = _arc(j.p(0.3, 0.69), j.r(0.28, 0.29), j.a(250), j.a(515))
    return [_chain(_line(j.p(0.05, 0.02), j.p(0.56, 0.0)), lower)]


def _four_open(j: _Jitter) -> list[np.ndarray]:
    return [_line(j.p(0.1, 0.0), j.p(0.04, 0.62), j.p(0.62, 0.6)), _line(j.p(0.46, 0.12), j.p(0.46, 1.0))]


def _four_closed(j: _Jitter) -> list[np.ndarray]:
    top = j.p(0.46, 0.0)
    return [_line(top, j.p(0.02, 0.64), j.p(0.62, 0.64)), _line(top, j.p(0.46, 1.0))]


def _five_two_strokes(j: _Jitter) -> list[np.ndarray]:
    belly = _arc(j.p(0.3, 0.69), j.r(0.27, 0.29), j.a(225), j.a(500))
    corner = j.p(0.13, 0.02)
    return [_chain(_line(corner, belly[0]), belly), _line(corner, j.p(0.57, 0.0))]


def _five_one_stroke(j: _Jitter) -> list[np.ndarray]:
    belly = _arc(j.p(0.3, 0.69), j.r(0.27, 0.29), j.a(225), j.a(500))
    return [_chain(_line(j.p(0.57, 0.0), j.p(0.13, 0.02), belly[0]), belly)]


def _six_curved(j: _Jitter) -> list[np.ndarray]:
    loop = _arc(j.p(0.3, 0.72), j.r(0.26, 0.27), j.a(180), j.a(-170))
    return [_chain(_bezier(j.p(0.52, 0.02), j.p(0.22, 0.1), j.p(0.03, 0.42), loop[0]), loop)]


def _six_straight(j: _Jitter) -> list[np.ndarray]:
    loop = _arc(j.p(0.3, 0.74), j.r(0.25, 0.25), j.a(190), j.a(-160))
    return [_chain(_line(j.p(0.45, 0.0), loop[0]), loop)]


def _seven_plain(j: _Jitter) -> list[np.ndarray]:
    return [_line(j.p(0.03, 0.04), j.p(0.6, 0.0), j.p(0.22, 1.0))]


def _seven_crossed(j: _Jitter) -> list[np.ndarray]:
    return [*_seven_plain(j), _line(j.p(0.16, 0.52), j.p(0.52, 0.5))]


def _seven_curved(j: _Jitter) -> list[np.ndarray]:
    corner = j.p(0.6, 0.0)
    stem = _bezier(corner, j.p(0.42, 0.35), j.p(0.3, 0.65), j.p(0.26, 1.0))
    return [_chain(_line(j.p(0.03, 0.05), corner), stem)]


def _eight_two_loops(j: _Jitter) -> list[np.ndarray]:
    upper = _arc(j.p(0.3, 0.25), j.r(0.22, 0.245), j.a(-60), j.a(-425))
    return [upper, _arc(j.p(0.3, 0.74), j.r(0.28, 0.26), j.a(-90), j.a(275))]


def _eight_one_stroke(j: _Jitter) -> list[np.ndarray]:
    t = np.linspace(0.35, 2 * np.pi + 0.25, 120)
    upper_w, lower_w = j.r(0.24, 0.3)
    waist = 0.45 + j.rng.normal(0.0, 0.03)
    x = 0.3 + np.where(np.cos(t) > 0, upper_w, lower_w) * np.sin(2 * t)
    y = np.where(np.cos(t) > 0, waist * (1 - np.cos(t)), waist - (1 - waist) * np.cos(t))
    return [np.stack([x, y], axis=1)]


def _nine_straight(j: _Jitter) -> list[np.ndarray]:
    loop = _arc(j.p(0.3, 0.27), j.r(0.25, 0.26), j.a(-15), j.a(-385))
    return [_chain(loop, _line(loop[-1], j.p(0.52, 1.0)))]


def _nine_curved(j: _Jitter) -> list[np.ndarray]:
    loop = _arc(j.p(0.3, 0.27), j.r(0.25, 0.26), j.a(-15), j.a(-385))
    return [_chain(loop, _bezier(loop[-1], j.p(0.57, 0.6), j.p(0.5, 0.9), j.p(0.2, 1.0)))]


STYLES: dict[int, tuple[Style, ...]] = {
    0: (_zero_ccw, _zero_cw),
    1: (_one_stick, _one_flag, _one_flag_base),
    2: (_two_curve, _two_straight),
    3: (_three_round, _three_flat),
    4: (_four_open, _four_closed),
    5: (_five_two_strokes, _five_one_stroke),
    6: (_six_curved, _six_straight),
    7: (_seven_plain, _seven_crossed, _seven_curved),
    8: (_eight_two_loops, _eight_one_stroke),
    9: (_nine_straight, _nine_curved),
}


def skeleton(digit: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One handwritten drawing of ``digit``: strokes as point arrays, the skeleton's box from (0, 0)
    with height 1."""
    styles = STYLES[digit]
    strokes = styles[rng.integers(len(styles))](_Jitter(rng, rng.uniform(0.01, 0.032)))
    if len(strokes) > 1:  # a pen lifted and put down again lands a little off
        strokes = [s + rng.normal(0.0, 0.015, 2) for s in strokes]
    # A smooth random warp: a few low-frequency waves per axis.
    waves = [(rng.normal(0.0, 0.018), rng.normal(0.0, 4.0, 2), rng.uniform(0, 2 * np.pi)) for _ in range(6)]

    def warp(p: np.ndarray) -> np.ndarray:
        out = p.copy()
        for k, (amp, freq, phase) in enumerate(waves):
            out[:, k % 2] += amp * np.sin(p @ freq + phase)
        return out

    aspect, slant, turn = rng.uniform(0.75, 1.2), rng.uniform(-0.1, 0.28), math.radians(rng.normal(0.0, 2.5))
    cos, sin = math.cos(turn), math.sin(turn)
    out = []
    for s in strokes:
        p = warp(s)
        x, y = p[:, 0] * aspect + slant * (1.0 - p[:, 1]), p[:, 1]
        out.append(np.stack([cos * x - sin * y, sin * x + cos * y], axis=1))
    points = np.concatenate(out)
    low, height = points.min(axis=0), np.ptp(points[:, 1])
    return [(s - low) / height for s in out]


def _resample(points: np.ndarray, spacing: float) -> np.ndarray:
    steps = np.hypot(*np.diff(points, axis=0).T)
    along = np.concatenate([[0.0], np.cumsum(steps)])
    t = np.linspace(0.0, along[-1], max(2, math.ceil(along[-1] / spacing) + 1))
    return np.stack([np.interp(t, along, points[:, 0]), np.interp(t, along, points[:, 1])], axis=1)


# -- pages and photos --------------------------------------------------------------------------


@dataclass
class Photo:
    """One photographed page and its truth (boxes in the frame's pixels, x1 y1 x2 y2)."""

    jpeg: bytes
    size: tuple[int, int]
    boxes: np.ndarray  # [n, 4] float
    labels: np.ndarray  # [n] int
    rows: np.ndarray  # [n] the row (number) each digit belongs to
    texts: list[str]  # each row's number, left to right
    bands: list[tuple[float, float, float, float]]  # each row's region on the page (unturned)
    angle: float  # degrees the page is turned (counter-clockwise in the photo)
    ink: str
    page: str
    size_bucket: str
    digit_height: float  # pixels
    conditions: dict[str, str] = field(default_factory=dict)

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.jpeg)).convert("RGB")

    def to_page(self, xy: np.ndarray) -> np.ndarray:
        """Frame pixels to unturned page coordinates."""
        return _turn(np.asarray(xy, dtype=float).reshape(-1, 2), -self.angle, self.size)

    def row_of(self, xy: np.ndarray) -> np.ndarray:
        """The row whose band holds each point (frame pixels), or -1."""
        page = self.to_page(xy)
        out = np.full(len(page), -1)
        for r, (x1, y1, x2, y2) in enumerate(self.bands):
            inside = (page[:, 0] >= x1) & (page[:, 0] <= x2) & (page[:, 1] >= y1) & (page[:, 1] <= y2)
            out[inside & (out < 0)] = r
        return out


def _turn(points: np.ndarray, degrees: float, size: tuple[int, int]) -> np.ndarray:
    """Turn page points about the frame's centre, counter-clockwise as seen (y down)."""
    a = math.radians(degrees)
    c = np.array(size, dtype=float) / 2
    d = points - c
    return (
        np.stack([math.cos(a) * d[:, 0] + math.sin(a) * d[:, 1], -math.sin(a) * d[:, 0] + math.cos(a) * d[:, 1]], 1) + c
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int = 6) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], of ``shape`` (h, w)."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    big = Image.fromarray(coarse).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 127.5 - 1.0


def _ink_style(ink: str, rng: np.random.Generator) -> tuple[np.ndarray, float, float, float]:
    """Colour, pen radius / digit height, pressure variation, ink opacity."""
    if ink == "marker":
        colour = [(18, 18, 22), (20, 30, 90), (25, 25, 25)][rng.integers(3)]
        return np.array(colour, float) + rng.normal(0, 4, 3), rng.uniform(0.055, 0.085), 0.05, rng.uniform(0.92, 1.0)
    colour = (28, 28, 36) if ink == "ballpoint-black" else (28, 50, 150)
    return np.array(colour, float) + rng.normal(0, 6, 3), rng.uniform(0.022, 0.036), 0.18, rng.uniform(0.75, 0.95)


def photograph(seed: int, ink: str | None = None, page: str | None = None, size: str | None = None) -> Photo:
    """One photo of numbers handwritten on a page; the unnamed conditions are drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    ink = ink or INKS[rng.integers(len(INKS))]
    page = page or PAGES[rng.integers(len(PAGES))]
    size = size or list(SIZES)[rng.integers(len(SIZES))]
    width, height = FRAMES[rng.integers(len(FRAMES))]
    h = rng.uniform(*SIZES[size]) * height  # digit height, frame pixels
    angle = rng.uniform(-MAX_ANGLE, MAX_ANGLE)
    colour, pen, pressure, opacity = _ink_style(ink, rng)
    radius = max(h * pen, 0.75 if ink == "marker" else 0.55)

    # Rows of digits on the unturned page, placed so that the turned page keeps them in the frame.
    sin, cos = abs(math.sin(math.radians(angle))), math.cos(math.radians(angle))
    margin = 0.05 * min(width, height) + radius
    ruled_pitch = h / rng.uniform(0.62, 0.85)
    pitch = ruled_pitch * rng.choice([1, 2]) if page == "ruled" else h * rng.uniform(1.6, 2.3)
    rows_fit = 1
    while rows_fit < 3:
        block = h + rows_fit * pitch
        if (block / 2) * cos + (width / 2 - margin) * sin > height / 2 - margin - 0.1 * h:
            break
        rows_fit += 1
    n_rows = int(rng.integers(1, rows_fit + 1))
    block = h + (n_rows - 1) * pitch
    half_w = (width / 2 - margin - (block / 2 + 0.1 * h) * sin) / cos
    half_h = (height / 2 - margin - half_w * sin) / cos
    top = height / 2 - half_h + rng.uniform(0.0, max(0.0, 2 * half_h - block - 0.2 * h)) + 0.1 * h

    digits: list[tuple[int, int, list[np.ndarray], list[np.ndarray]]] = []  # label, row, strokes, radii
    texts, bands = [], []
    for row in range(n_rows):
        baseline = top + h + row * pitch
        slope = rng.normal(0.0, 0.02)
        drawn, x = [], 0.0
        for _ in range(int(rng.integers(2, 9))):
            label = int(rng.integers(10))
            dh = h * rng.uniform(0.88, 1.1)
            strokes = [s * dh for s in skeleton(label, rng)]
            w = max(np.ptp(np.concatenate(strokes)[:, 0]), 0.0)
            if x + w + 2 * radius > 2 * half_w and len(drawn) >= 2:
                break
            dy = baseline - dh + rng.normal(0.0, 0.03 * h)
            drawn.append((label, [s + np.array([x + radius, dy]) for s in strokes]))
            x += w + 2 * radius + rng.uniform(0.06, 0.35) * h
        row_w = x
        left = width / 2 - half_w + rng.uniform(0.0, max(0.0, 2 * half_w - row_w))
        ink_points = []
        for label, strokes in drawn:
            placed, radii = [], []
            for s in strokes:
                p = s + np.array([left, 0.0])
                p[:, 1] += slope * (p[:, 0] - left)
                p = _resample(p, max(radius / 3, 0.25))
                wobble = 1.0 + pressure * np.sin(np.linspace(0, rng.uniform(2, 8), len(p)) + rng.uniform(0, 6.3))
                placed.append(p)
                radii.append(radius * wobble)
            digits.append((label, row, placed, radii))
            ink_points.append(np.concatenate(placed))
        pts = np.concatenate(ink_points)
        (x1, y1), (x2, y2) = pts.min(axis=0), pts.max(axis=0)
        pad_x, pad_y = 0.5 * h, min(0.3 * h, max(0.0, (pitch - h) / 2 - 0.05 * h) + 0.15 * h)
        bands.append((x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y))
        texts.append("".join(str(label) for label, _ in drawn))

    # Drawing, 4x, straight into the turned frame.
    s = SUPERSAMPLE
    big = (width * s, height * s)
    ink_mask = Image.new("L", big, 0)
    draw = ImageDraw.Draw(ink_mask)
    boxes, labels, rows = [], [], []
    for label, row, placed, radii in digits:
        alpha = int(255 * opacity * (rng.uniform(0.85, 1.0) if ink != "marker" else 1.0))
        lows, highs = [], []
        for p, r in zip(placed, radii, strict=True):
            q = _turn(p, angle, (width, height))
            for (px, py), pr in zip(q * s, r * s, strict=True):
                draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=alpha)
            lows.append((q - r[:, None]).min(axis=0))
            highs.append((q + r[:, None]).max(axis=0))
        low, high = np.min(lows, axis=0), np.max(highs, axis=0)
        boxes.append([max(low[0], 0.0), max(low[1], 0.0), min(high[0], width), min(high[1], height)])
        labels.append(label)
        rows.append(row)

    lines = Image.new("L", big, 0)
    line_colour = np.array([150, 185, 225], float) + rng.normal(0, 8, 3)
    if page in ("ruled", "squared"):
        ldraw = ImageDraw.Draw(lines)
        line_w = max(1, round(s * rng.uniform(0.7, 1.4) * max(1.0, h / 60)))
        reach = 0.6 * max(width, height)
        cx, cy = width / 2, height / 2
        if page == "ruled":
            ys = top + h + rng.uniform(0.0, 0.05) * h + ruled_pitch * np.arange(-40, 41)
            xs: np.ndarray = np.array([])
        else:
            line_colour = np.array([165, 175, 190], float) + rng.normal(0, 8, 3)
            cell = h / rng.uniform(0.8, 1.8)
            ys = rng.uniform(0, cell) + cell * np.arange(-80, 81)
            xs = rng.uniform(0, cell) + cell * np.arange(-80, 81)
        for y in ys[np.abs(ys - cy) < reach]:
            a, b = _turn(np.array([[cx - reach, y], [cx + reach, y]]), angle, (width, height)) * s
            ldraw.line((*a, *b), fill=int(rng.uniform(170, 255)), width=line_w)
        for x in xs[np.abs(xs - cx) < reach]:
            a, b = _turn(np.array([[x, cy - reach], [x, cy + reach]]), angle, (width, height)) * s
            ldraw.line((*a, *b), fill=int(rng.uniform(170, 255)), width=line_w)
        margin_x = min(band[0] for band in bands) - rng.uniform(0.2, 0.6) * h
        if page == "ruled" and rng.random() < 0.5 and margin_x > 0.03 * width:
            a, b = _turn(np.array([[margin_x, cy - reach], [margin_x, cy + reach]]), angle, (width, height)) * s
            red = Image.new("L", big, 0)
            ImageDraw.Draw(red).line((*a, *b), fill=220, width=line_w)
        else:
            red = None
    else:
        red = None

    def shrink(mask: Image.Image) -> np.ndarray:
        return np.asarray(mask.reduce(s), dtype=np.float32)[..., None] / 255.0

    # The page, lit.
    paper = {
        "white": (246, 246, 244),
        "cream": (243, 233, 205),
        "ruled": (248, 248, 246),
        "squared": (247, 247, 247),
    }[page]
    image = np.ones((height, width, 3), np.float32) * (np.array(paper, np.float32) + rng.normal(0, 3, 3))
    image += 3.0 * _smooth_noise(rng, (height, width), 12)[..., None]
    if page in ("ruled", "squared"):
        a = shrink(lines)
        image = image * (1 - a) + line_colour * a
        if red is not None:
            a = shrink(red)
            image = image * (1 - a) + np.array([225, 120, 130], np.float32) * a
    a = shrink(ink_mask)
    if ink != "marker":  # ballpoint ink lies unevenly
        a = a * (1.0 - 0.25 * rng.random((height, width, 1), dtype=np.float32))
    image = image * (1 - a) + colour.astype(np.float32) * a
    yy, xx = np.mgrid[-1 : 1 : height * 1j, -1 : 1 : width * 1j].astype(np.float32)
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    light = rng.uniform(0.82, 1.0) * (1 + gx * xx + gy * yy - rng.uniform(0.0, 0.12) * (xx**2 + yy**2))
    light += 0.05 * _smooth_noise(rng, (height, width), 3)
    tint = 1.0 + np.array([1.0, 0.0, -1.0], np.float32) * rng.uniform(-0.03, 0.05)
    image = image * light[..., None] * tint
    photo = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    noisy = np.asarray(photo, np.float32) + rng.normal(0.0, rng.uniform(1.0, 3.5), (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(60, 91)))
    return Photo(
        jpeg=buffer.getvalue(),
        size=(width, height),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        rows=np.array(rows, dtype=np.int64),
        texts=texts,
        bands=bands,
        angle=angle,
        ink=ink,
        page=page,
        size_bucket=size,
        digit_height=h,
        conditions={"ink": ink, "page": page, "size": size},
    )


def photos(n: int, seed: int = 0) -> list[Photo]:
    """``n`` photos; ink, page and size bucket run through all 36 combinations in turn."""
    sizes = list(SIZES)
    return [photograph(seed * 100_000 + i, INKS[i % 3], PAGES[(i // 3) % 4], sizes[(i // 12) % 3]) for i in range(n)]


def contact_sheet(shots: list[Photo], columns: int = 4, cell: int = 400, boxes: bool = True) -> Image.Image:
    """The photos side by side, each fitted in a ``cell`` square, truth boxes and labels in red."""
    rows = math.ceil(len(shots) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), (60, 60, 60))
    for i, shot in enumerate(shots):
        image = shot.image()
        scale = cell / max(shot.size)
        image = image.resize((round(shot.size[0] * scale), round(shot.size[1] * scale)), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(image)
        if boxes:
            for box, label in zip(shot.boxes * scale, shot.labels, strict=True):
                draw.rectangle(tuple(box), outline=(230, 0, 0))
                draw.text((box[0], box[1] - 10), str(label), fill=(230, 0, 0))
        draw.text((4, 4), f"{shot.ink} {shot.page} {shot.size_bucket} {' '.join(shot.texts)}", fill=(0, 140, 0))
        sheet.paste(image, ((i % columns) * cell, (i // columns) * cell))
    return sheet


if __name__ == "__main__":
    import sys

    count = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    contact_sheet(photos(count)).save(sys.argv[1] if len(sys.argv) > 1 else "/tmp/handwriting.png")

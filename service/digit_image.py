"""A photo of a handwritten digit to an MNIST-style 28x28 digit: find the digit, then do what MNIST did.

MNIST's digits are light ink on black, cropped to the ink, fitted in a 20x20 box keeping the aspect
ratio, and placed in 28x28 with the centre of mass at the centre. A user's photo is a digit on a page:
dark ink on paper that is lit unevenly, often ruled or squared, with an underline, a page edge, the
table or a shadow in the frame. The first version took the page's level from the image's border and
cropped to every pixel darker than it: on digits of MNIST's test set written on generated pages and
cropped as a phone would (``python -m bench.accuracy --style paper``), 63 % were read right, against
99.5 % of the same digits as clean photos. What fails there is finding the digit, not reading it:

1. **Polarity**: the page's level is guessed twice, from the border's median and from the whole
   image's (the ink a minority), and the more decisive guess wins (dark ink on a grey page with the
   table along the border fooled the first alone; a digit cropped to its ink, the second).
2. **The page's own light is removed**: a grey-level opening (a minimum then a maximum filter) with a
   window a third of the image's shorter side, which is wider than any stroke of a digit that fits in
   the frame, estimates the page at every pixel (gradients, shadows, vignetting); the ink is what
   stands out from it.
3. **Ruled and squared lines are subtracted**: thin straight lines (within 10 degrees of horizontal or
   vertical) that cross at least three quarters of the image, spread over all of its width, lose
   their own level (the median along them), so a stroke that crosses a line keeps most of its ink
   and the line itself goes. A run of bins whose median is strong ink is a stroke, not a line.
4. **The digit is a group of connected pieces**: pieces of ink (8-connected, at a quarter of the
   analysis resolution) are scored by their ink, less for a piece touching the border (the page edge,
   the table, a photo behind) or three times wider than tall (an underline); the best one and the
   pieces near it (within 30 % of the group's size; a piece on the border only if it overlaps) are
   the digit, without specks (under 3 % of the best's ink), faint pieces or underlines below it.

Then MNIST's steps, on the digit's ink alone. Steps 2-4 took that 63 % to 91 % (dev set; the
figure reported in the README is on other scenes), and clean photos keep their 99.5 %. About 4-5 ms
per photo through HTTP (``python -m bench.accuracy``: it reports the time). Two guards keep a digit
cropped to its ink whole: no line is looked for in an image under ``LINE_MIN_SIDE`` (its strokes
are as thin as lines), and the page's level rises at most ``PAGE_RISE`` above its darkest tenth (a
stroke as wide as the window is not page).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Analysis side for the page, the lines and the pieces: the image is pooled down to about this.
ANALYSIS_SIDE = 128
# The page's opening window, as a share of the image's shorter side (wider than a stroke of any
# digit that fits in the frame: a marker's stroke is at most about a fifth of the digit's height).
PAGE_WINDOW = 1 / 3
PAGE_RISE = 0.4  # how far the page's level may rise above its darkest tenth (uneven light, shadows)
# Ink (relative to the image's strongest) that makes a pixel part of a piece, and that a piece must
# reach somewhere to count (weaker pieces are paper texture, noise, faint lines).
PIECE_INK, STRONG_INK = 0.2, 0.4
# A ruled line crosses this share of the image, is at most this many analysis pixels thick, and has a
# median below this (above, the bins are mostly a stroke's ink).
LINE_COVER, LINE_THICKNESS, LINE_MAX_LEVEL = 0.75, 3, 0.6
LINE_ANGLES = range(-10, 11, 2)
LINE_MIN_SIDE = 48  # analysis pixels of the shorter side below which no line is looked for
# Images no larger than this (MNIST's own 28 x 28, thumbnails) have a flat page.
FLAT_SIDE = 64
# Pieces within this share of the group's size join it.
GROUP_GAP = 0.3
# Relative ink below which a pixel is background noise (JPEG ringing), and above which it bounds the crop.
NOISE_FLOOR, CROP_INK = 0.1, 0.2


def border(gray: np.ndarray) -> np.ndarray:
    """The pixels of the image's edges (a twentieth of its shorter side deep)."""
    h, w = gray.shape
    k = max(1, min(h, w) // 20)
    return np.concatenate([gray[:k].ravel(), gray[-k:].ravel(), gray[:, :k].ravel(), gray[:, -k:].ravel()])


def _slide(a: np.ndarray, k: int, op) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``op`` (``np.minimum``/``np.maximum``) over windows of ``k`` rows of ``a`` (``len(a) - k + 1``
    of them), by doubling: windows of 1, 2, 4, ... rows, then two overlapping ones of the largest."""
    table, width = a, 1
    while width * 2 <= k:
        table = op(table[:-width], table[width:])
        width *= 2
    n = a.shape[0] - k + 1
    return op(table[:n], table[k - width : k - width + n])


def _window(a: np.ndarray, k: int, op) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Separable minimum or maximum filter of odd size ``k``, edges repeated."""
    r = k // 2
    a = _slide(np.pad(a, ((r, r), (0, 0)), mode="edge"), k, op)
    return _slide(np.pad(a, ((0, 0), (r, r)), mode="edge").T, k, op).T


def _pool(a: np.ndarray, f: int, op) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``op`` (``np.minimum``/``np.maximum``) over ``f`` x ``f`` blocks (edges repeated), as strided
    element-wise steps (a reduction over a reshaped array's inner axes took 3 ms at 512 x 384)."""
    h, w = a.shape
    lh, lw = -(-h // f), -(-w // f)
    a = np.pad(a, ((0, lh * f - h), (0, lw * f - w)), mode="edge")
    rows = a[0::f]
    for i in range(1, f):
        rows = op(rows, a[i::f])
    out = rows[:, 0::f]
    for i in range(1, f):
        out = op(out, rows[:, i::f])
    return out


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    image = Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def label_pieces(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected pieces of a boolean mask, by runs of each row joined with the runs they touch in
    the row above (a union-find over runs: a few hundred for a digit). ``(labels, count)``, 0 outside."""
    h, w = mask.shape
    parent: list[int] = []

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    run_rows, starts = np.nonzero(edges == 1)  # row-major: the runs of each row in order
    ends = np.nonzero(edges == -1)[1]
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(h)]
    for run, (y, start, end) in enumerate(zip(run_rows.tolist(), starts.tolist(), ends.tolist(), strict=True)):
        parent.append(run)
        if y:
            for s, e, other in rows[y - 1]:
                if s <= end and e >= start:  # touching, diagonals included
                    a, b = root(run), root(other)
                    if a != b:
                        parent[b] = a
        rows[y].append((start, end, run))
    labels = np.zeros((h, w), np.int32)
    names: dict[int, int] = {}
    for y, here in enumerate(rows):
        for start, end, run in here:
            labels[y, start:end] = names.setdefault(root(run), len(names) + 1)
    return labels, len(names)


def _line_bins(low: np.ndarray) -> list[tuple[bool, float, int, int]]:
    """Thin straight lines across the image: ``(vertical, slope, first bin, end bin)`` each, the bins
    being offsets along the slope in analysis pixels."""
    found = []
    for vertical in (False, True):
        m = low.T if vertical else low
        w = m.shape[1]
        ys, xs = np.nonzero(m >= 0.1)
        if len(ys) < LINE_COVER * w:
            continue
        thirds = [(xs >= w * i / 3) & (xs < w * (i + 1) / 3) for i in range(3)]
        for degrees in LINE_ANGLES:
            slope = float(np.tan(np.radians(degrees)))
            offsets = np.rint(ys - (xs - w / 2) * slope).astype(np.int64)
            lo = int(offsets.min())
            counts = np.bincount(offsets - lo)
            full = counts >= LINE_COVER * w
            if not full.any():
                continue
            for third in thirds:  # spread over the width, not one wide stroke
                full &= np.bincount(offsets[third] - lo, minlength=len(counts)) >= 0.5 * w / 3
            edges = np.diff(np.concatenate([[0], full.astype(np.int8), [0]]))
            for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
                if end - start <= LINE_THICKNESS:
                    found.append((vertical, slope, int(start) + lo - 1, int(end) + lo + 1))
    return found


def _subtract_lines(ink: np.ndarray, lines: list[tuple[bool, float, int, int]], f: int) -> np.ndarray:
    """Each line's median level taken off along it; ``ink`` is at ``f`` times the analysis resolution.
    Only the band of rows (columns) a line can cross is computed: a tenth of the image or less."""
    out = ink.copy()
    for vertical, slope, first, end in lines:
        m = out.T if vertical else out
        h, w = m.shape
        centre = w / f / 2
        reach = centre * abs(slope)  # how far the line rises or falls from the middle to an edge
        top, bottom = max(0, int((first - reach) * f) - 1), min(h, int((end + reach) * f) + 2)
        if top >= bottom:
            continue
        ys, xs = np.mgrid[top:bottom, 0:w].astype(np.float32)
        offsets = np.rint(ys / f - (xs / f - centre) * slope)
        on = (offsets >= first) & (offsets < end)
        band = m[top:bottom]
        if not on.any():
            continue
        level = float(np.median(band[on]))
        if level > LINE_MAX_LEVEL:
            continue
        band[on] = np.maximum(band[on] - level, 0.0)
    return out


def _digit_pieces(low: np.ndarray) -> np.ndarray:
    """The analysis-resolution mask of the pieces that make the digit (all False if there is none)."""
    labels, n = label_pieces(low >= PIECE_INK)
    if n == 0:
        return np.zeros(low.shape, bool)
    flat = labels.ravel()
    ink = np.bincount(flat, weights=low.ravel(), minlength=n + 1)[1:]
    peak = np.zeros(n + 1)
    np.maximum.at(peak, flat, low.ravel())
    strong = peak[1:] >= STRONG_INK
    ys, xs = np.indices(labels.shape)
    top, left = np.full(n + 1, labels.size), np.full(n + 1, labels.size)
    bottom, right = np.full(n + 1, -1), np.full(n + 1, -1)
    np.minimum.at(top, flat, ys.ravel())
    np.maximum.at(bottom, flat, ys.ravel())
    np.minimum.at(left, flat, xs.ravel())
    np.maximum.at(right, flat, xs.ravel())
    top, bottom, left, right = top[1:], bottom[1:] + 1, left[1:], right[1:] + 1
    height, width = bottom - top, right - left
    lh, lw = labels.shape
    on_border = (top == 0) | (left == 0) | (bottom == lh) | (right == lw)
    wide = width >= 3 * height
    score = ink * np.where(on_border, 0.25, 1.0) * np.where(wide, 0.2, 1.0) * strong
    best = int(score.argmax())
    underline = (width >= 4 * height) & (top >= bottom[best] - 0.1 * height[best])
    speck = (ink < 0.03 * ink[best]) | ~strong
    keep = np.zeros(n, bool)
    keep[best] = True
    while True:
        y0, y1, x0, x1 = top[keep].min(), bottom[keep].max(), left[keep].min(), right[keep].max()
        gap = np.where(on_border, 0.0, GROUP_GAP * max(y1 - y0, x1 - x0))
        near = (top < y1 + gap) & (bottom > y0 - gap) & (left < x1 + gap) & (right > x0 - gap)
        near &= ~underline & ~speck & ~keep
        if not near.any():
            return np.concatenate([[False], keep])[labels]
        keep |= near


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """A grey image in [0, 1] (any size, either polarity) to a 28x28 MNIST-style digit in [0, 1];
    all zeros when there is no ink."""
    out = np.zeros((28, 28), dtype=np.float32)
    step = max(1, min(gray.shape) // 128)  # the levels of a sample of about 128 x 128 pixels
    darkest, middle, brightest = np.percentile(gray[::step, ::step], [1, 50, 99])
    edge = float(np.median(border(gray)))
    # Two guesses at the page's level: the border's median (the page around a digit; fooled by the
    # table or a shadow along the edges) and the image's (the ink a minority; fooled by a digit
    # cropped so tight that it is half the pixels). The one farther from the middle of the range
    # decides: the ink lies on the other side of it.
    votes = [(page - darkest) - (brightest - page) for page in (edge, middle)]
    if max(votes, key=abs) > 0:  # the page is nearer the bright end: dark ink, made light
        gray, edge = 1.0 - gray, 1.0 - edge
    h, w = gray.shape
    f = max(1, -(-max(h, w) // ANALYSIS_SIDE))
    if max(h, w) > FLAT_SIDE:
        low_page = _pool(gray, f, np.minimum)
        k = max(3, int(min(low_page.shape) * PAGE_WINDOW) | 1)
        page_level = _window(_window(low_page, k, np.minimum), k, np.maximum)
        # Never more than PAGE_RISE above the image's darkest tenth (the page at its darkest, ink made
        # light): a digit cropped so tight that a stroke is as wide as the window was taken for page
        # (a "1" cut to its ink, 30 px wide, vanished), while light falling across a page stays.
        floor = float(np.percentile(gray[::step, ::step], 10))
        ink = np.clip(gray - _resize(np.minimum(page_level, floor + PAGE_RISE), w, h), 0.0, None)
    else:  # a thumbnail or a scan as small as MNIST's: the page is flat, and a fat stroke as wide as the window
        ink = np.clip(gray - edge, 0.0, None)
    peak = float(np.percentile(ink[::step, ::step], 99.9))
    if peak < 0.05:
        return out  # blank: nothing to classify, the model sees an empty field
    ink = np.clip(ink / peak, 0.0, 1.0)
    # Pooled by the maximum (a thin stroke survives), after a 2x2 mean (a lone noisy pixel does not).
    smooth = ink
    if f > 1:
        smooth = ink.copy()
        smooth[:-1] = (smooth[:-1] + smooth[1:]) / 2
        smooth[:, :-1] = (smooth[:, :-1] + smooth[:, 1:]) / 2
    low = _pool(smooth, f, np.maximum)
    # Ruled lines only on a page: in a thumbnail or a digit cropped to its ink, a stroke across it is
    # as thin as a line (a tight 20 x 16 "3" lost its strokes as 24 "lines").
    lines = _line_bins(low) if min(low.shape) >= LINE_MIN_SIDE else []
    if lines:
        low, ink = _subtract_lines(low, lines, 1), _subtract_lines(ink, lines, f)
    pieces = _window(_digit_pieces(low).astype(np.uint8), 3, np.maximum).astype(bool)  # and the strokes' edges
    keep = np.repeat(np.repeat(pieces, f, axis=0), f, axis=1)[:h, :w]
    ink = np.where(keep, ink, 0.0)
    ink[ink < NOISE_FLOOR] = 0.0
    rows, cols = np.flatnonzero((ink >= CROP_INK).any(axis=1)), np.flatnonzero((ink >= CROP_INK).any(axis=0))
    if len(rows) == 0:
        return out
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    # Fit in 20x20 keeping the aspect ratio (Pillow's resize antialiases when shrinking).
    dh, dw = digit.shape
    scale = 20.0 / max(dh, dw)
    new_h, new_w = max(1, round(dh * scale)), max(1, round(dw * scale))
    patch = np.clip(_resize(digit, new_w, new_h), 0.0, None)
    patch /= max(float(patch.max()), 1e-6)

    # Centre of mass to the field's centre (MNIST's convention: pixel index 14 on both axes).
    total = float(patch.sum())
    ys, xs = np.indices(patch.shape)
    cy, cx = float((ys * patch).sum() / total), float((xs * patch).sum() / total)
    y0 = int(np.clip(round(14 - cy), 0, 28 - new_h))
    x0 = int(np.clip(round(14 - cx), 0, 28 - new_w))
    out[y0 : y0 + new_h, x0 : x0 + new_w] = patch
    return out

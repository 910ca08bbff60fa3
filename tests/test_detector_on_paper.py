"""The digit detector on photos of numbers handwritten on paper, drawn by tests/handwriting.py: pen
strokes from hand-made skeletons, on white, cream, ruled and squared pages, photographed (turned,
unevenly lit, blurred, JPEG). Nothing of it comes from the detector's training scenes (MNIST digits
pasted into photos), so this stands in for what users send: "4179" in marker on a white page, "2026"
on ruled paper, a phone number on squared paper.

Posted through /v1/object-detection at the model's default operating point, it measures digit
recall (a truth digit is found by a detection of its label with IoU >= 0.5, each detection used
once), the precision of the detections, and the numbers read exactly (a row's detections sorted left
to right spell its number), overall and per ink, page and digit size.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.handwriting import INKS, PAGES, SIZES, Photo, photograph, photos

URL = "/v1/object-detection"
PHOTOS = 36  # each of the 3 inks x 4 pages x 3 digit sizes once
SEED = 7
BATCH = 8

# Floors for the model served as "digit-detector" (its newest version), at its default operating
# point, on these 36 photos (247 digits, 57 numbers). Version 3 gets recall 0.721, precision 0.860
# and reads 27 of 57 numbers (0.474); it is weakest on large digits (recall 0.451), marker ink
# (0.529) and squared pages (0.557). Version 2 (the first fine-tuned with paper scenes) got recall
# 0.737, precision 0.867 and read 23 of 57. Version 1 got recall 0.174,
# precision 0.478 and read 4 of 57: it found small marker digits and almost nothing else.
MIN_RECALL = 0.70
MIN_PRECISION = 0.82
MIN_NUMBERS_READ = 0.35


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4]."""
    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def detect(client: TestClient, shots: list[Photo]) -> tuple[list[list[dict]], str]:
    """The detections of each photo, at the model's default operating point, and the version that
    answered."""
    files = [("files", (f"{i}.jpg", shot.jpeg, "image/jpeg")) for i, shot in enumerate(shots)]
    response = client.post(URL, files=files, data={"model": "digit-detector"})
    assert response.status_code == 200, response.text
    body = response.json()
    return [image["detections"] for image in body["images"]], body["version"]


def score(shot: Photo, found: list[dict]) -> tuple[dict[str, int], np.ndarray]:
    """Counts for one photo (digits, found digits, detections, numbers, numbers read, and why the
    digits not found were missed), and which truth digits were found."""
    boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found], np.float32).reshape(-1, 4)
    labels = np.array([d["class_id"] for d in found], np.int64)
    overlap = iou(shot.boxes, boxes)
    same = overlap * (shot.labels[:, None] == labels[None, :])
    hit = np.zeros(len(shot.boxes), bool)
    used = np.zeros(len(boxes), bool)
    for t, d in sorted(np.argwhere(same >= 0.5), key=lambda td: -same[td[0], td[1]]):
        if not hit[t] and not used[d]:
            hit[t] = used[d] = True
    best = overlap.max(axis=1) if len(boxes) else np.zeros(len(shot.boxes))
    missed = ~hit
    counts = {
        "digits": len(shot.boxes),
        "found": int(hit.sum()),
        "detections": len(boxes),
        "numbers": len(shot.texts),
        "read": 0,
        "wrong_label": int((missed & (best >= 0.5)).sum()),  # boxed right, called another digit
        "loose_box": int((missed & (best >= 0.2) & (best < 0.5)).sum()),  # overlapped, but IoU < 0.5
        "not_found": int((missed & (best < 0.2)).sum()),
    }
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    rows, along = shot.row_of(centres), shot.to_page(centres)[:, 0]
    for r, text in enumerate(shot.texts):
        mine = np.flatnonzero(rows == r)
        read = "".join(str(labels[i]) for i in mine[np.argsort(along[mine])])
        counts["read"] += read == text
    return counts, hit


def add(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def figures(c: dict[str, int]) -> tuple[float, float, float]:
    return c["found"] / max(c["digits"], 1), c["found"] / max(c["detections"], 1), c["read"] / max(c["numbers"], 1)


@pytest.fixture(scope="module")
def shots() -> list[Photo]:
    return photos(PHOTOS, SEED)


def test_photos_are_reproducible_and_their_truth_is_sane(shots: list[Photo]) -> None:
    again = photograph(SEED * 100_000 + 5, shots[5].ink, shots[5].page, shots[5].size_bucket)
    assert again.jpeg == shots[5].jpeg and np.array_equal(again.boxes, shots[5].boxes)
    assert {s.ink for s in shots} == set(INKS) and {s.page for s in shots} == set(PAGES)
    assert {s.size_bucket for s in shots} == set(SIZES)
    for shot in shots:
        w, h = shot.size
        b = shot.boxes
        assert len(b) == len(shot.labels) == len(shot.rows) == sum(len(t) for t in shot.texts)
        assert all(2 <= len(t) <= 8 for t in shot.texts)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        centres = (b[:, :2] + b[:, 2:]) / 2
        assert np.array_equal(shot.row_of(centres), shot.rows)  # every digit lies in its own row's band


def test_handwritten_numbers_on_paper_are_found_and_read(client: TestClient, shots: list[Photo]) -> None:
    start = time.perf_counter()
    answers = [detect(client, shots[i : i + BATCH]) for i in range(0, len(shots), BATCH)]
    elapsed = time.perf_counter() - start
    found = [d for dets, _ in answers for d in dets]
    versions = sorted({version for _, version in answers})
    groups: dict[str, dict[str, int]] = defaultdict(dict)
    per_digit = np.zeros((10, 2), int)
    for shot, dets in zip(shots, found, strict=True):
        counts, hits = score(shot, dets)
        for key in ("all", f"ink {shot.ink}", f"page {shot.page}", f"size {shot.size_bucket}"):
            add(groups[key], counts)
        np.add.at(per_digit, (shot.labels, 0), 1)
        np.add.at(per_digit, (shot.labels, 1), hits)
    order = ["all"] + [f"ink {k}" for k in INKS] + [f"page {k}" for k in PAGES] + [f"size {k}" for k in SIZES]
    print(f"\ndigit-detector version {', '.join(versions)}: {len(shots)} photos posted in {elapsed:.1f} s")
    print(f"{'':22} {'photos':>6} {'digits':>6} {'recall':>6} {'prec':>6} {'read':>9}  missed: label/box/none")
    for key in order:
        c = groups[key]
        recall, precision, read = figures(c)
        n = sum(1 for s in shots if key == "all" or key.split(" ", 1)[1] in (s.ink, s.page, s.size_bucket))
        print(
            f"{key:22} {n:6d} {c['digits']:6d} {recall:6.3f} {precision:6.3f} {read:6.3f} ({c['read']}/"
            f"{c['numbers']})  {c['wrong_label']}/{c['loose_box']}/{c['not_found']}"
        )
    print("recall per digit: " + " ".join(f"{d}:{h / max(n, 1):.2f}" for d, (n, h) in enumerate(per_digit)))
    recall, precision, read = figures(groups["all"])
    assert recall >= MIN_RECALL and precision >= MIN_PRECISION and read >= MIN_NUMBERS_READ, (recall, precision, read)

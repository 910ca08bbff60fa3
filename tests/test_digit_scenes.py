"""The generated detection scenes: reproducible, exact boxes inside the image, YOLO files that
round-trip, train and test drawn from different digits and photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.digit_scenes import CLASSES, makers, write_yolo


def test_scenes_are_reproducible_and_boxes_are_exact(data_dir: Path) -> None:
    a, b = makers(data_dir, seed=4), makers(data_dir, seed=4)
    for i in range(5):
        image, boxes, classes = a["train"].scene(i)
        again = b["train"].scene(i)
        assert np.array_equal(image, again[0]) and np.array_equal(boxes, again[1])
        h, w = image.shape[:2]
        assert 1 <= len(boxes) == len(classes) <= 12
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 3] <= h).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert set(classes.tolist()) <= set(range(10))
    other = makers(data_dir, seed=5)["train"].scene(0)[0]
    assert not np.array_equal(other, a["train"].scene(0)[0])
    assert a["train"].photos.paths[0].parent.name == "train2017"
    assert a["test"].photos.paths[0].parent.name == "val2017"


def test_yolo_files_round_trip(data_dir: Path, tmp_path: Path) -> None:
    maker = makers(data_dir, seed=1)["test"]
    write_yolo(maker, tmp_path, "test", 3)
    assert (tmp_path / "classes.txt").read_text().split() == CLASSES
    for i in range(3):
        image, boxes, classes = maker.scene(i)
        with Image.open(tmp_path / "images" / "test" / f"{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), image)  # PNG is lossless
        rows = np.loadtxt(tmp_path / "labels" / "test" / f"{i:06d}.txt", ndmin=2)
        h, w = image.shape[:2]
        xc, yc, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        back = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], axis=1)
        assert np.allclose(back, boxes, atol=0.01)
        assert rows[:, 0].astype(int).tolist() == classes.tolist()

"""The committed digit detector through /v1/object-detection, on both kinds of held-out generated
scene its mAP was measured on (MNIST test digits pasted into coco128 val2017 photos; numbers of
MNIST test digits written on photographed paper): boxes overlap the truth with the right labels,
mAP through HTTP matches the offline figure on the same scenes, and an EXIF-rotated phone photo
gives the same boxes as the upright one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import ROOT
from training import paper_scenes
from training.digit_scenes import makers
from training.object_detection import Config, Samples, coco_map, detect_onnx

URL = "/v1/object-detection"
MODEL = ROOT / "models" / "digit-detector"
VERSION = "3"
SCENES = 48
SEED = 1  # the seed the committed model's test scenes were made with (its metadata says so)
# Floors for the committed version, from its metadata (1,000 held-out scenes of each kind) and from
# these 48 scenes of each kind through HTTP (v3, measured 2026-12-03, figures in the comments). The
# paper scenes are v3's generator's (digits may touch); v2 scored 0.8927 on them.
PHOTO_MAP_50 = 0.90  # metadata: 0.9040 (v2 0.8968, v1 0.9025)
PAPER_MAP_50 = 0.91  # metadata: 0.9129 (v2 0.8927)
# Recall, precision at the default operating point: photo 0.780, 0.883; paper 0.834, 0.920.
FLOORS = {"photo": (0.75, 0.85), "paper": (0.80, 0.88)}
HTTP_MAP_50 = {"photo": 0.86, "paper": 0.91}  # mAP@0.5 per class through HTTP: 0.8890, 0.9369
ONE_LABEL_MAP_50 = {"photo": 0.80, "paper": 0.85}  # the default, class-agnostic suppression: 0.8262, 0.8729


@pytest.fixture(scope="module")
def scenes(data_dir: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    maker = makers(data_dir, SEED)["test"]
    return [maker.scene(i) for i in range(SCENES)]


@pytest.fixture(scope="module")
def paper(data_dir: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    maker = paper_scenes.makers(data_dir, SEED)["test"]
    return [maker.scene(i) for i in range(SCENES)]


@pytest.fixture(params=["photo", "paper"])
def held_out(request: pytest.FixtureRequest) -> tuple[str, list]:
    """Each kind of held-out scene: digits pasted into photos, numbers written on paper."""
    return request.param, request.getfixturevalue("scenes" if request.param == "photo" else "paper")


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def detect(client: TestClient, blobs: list[bytes], **fields) -> list[list[dict]]:
    files = [("files", (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    response = client.post(URL, files=files, data={"model": "digit-detector", **{k: str(v) for k, v in fields.items()}})
    assert response.status_code == 200, response.text
    return [image["detections"] for image in response.json()["images"]]


def as_arrays(found: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found], dtype=np.float32)
    return boxes.reshape(-1, 4), np.array([d["score"] for d in found]), np.array([d["class_id"] for d in found])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4]."""
    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def matches(found: list[dict], boxes: np.ndarray, classes: np.ndarray) -> int:
    """Truth boxes found with the right label at IoU >= 0.5 (each detection used once)."""
    det_boxes, _, det_classes = as_arrays(found)
    if len(det_boxes) == 0 or len(boxes) == 0:
        return 0
    overlap = iou(boxes, det_boxes)
    used, hits = set(), 0
    for t in range(len(boxes)):
        for d in np.argsort(-overlap[t]):
            if overlap[t, d] < 0.5:
                break
            if d not in used and det_classes[d] == classes[t]:
                used.add(d)
                hits += 1
                break
    return hits


def test_model_metadata_records_the_measured_map() -> None:
    import json

    meta = json.loads((MODEL / VERSION / "metadata.json").read_text())
    assert meta["metrics"]["map_50"] >= PHOTO_MAP_50 and meta["metrics"]["map_50_95"] >= 0.60
    assert meta["metrics"]["paper"]["map_50"] >= PAPER_MAP_50
    assert meta["metrics"]["test_images"] >= 1000 and meta["metrics"]["paper"]["test_images"] >= 1000
    assert "pycocotools" in meta["metrics"]["evaluator"]
    assert "training.object_detection" in meta["training"]["command"]


def test_digits_are_found_where_they_are_with_the_right_labels(client: TestClient, held_out) -> None:
    kind, scenes = held_out
    blobs = [encode(Image.fromarray(image)) for image, _, _ in scenes]
    found = [d for start in range(0, len(blobs), 8) for d in detect(client, blobs[start : start + 8])]
    truths = sum(len(b) for _, b, _ in scenes)
    hits = sum(matches(f, b, c) for f, (_, b, c) in zip(found, scenes, strict=True))
    detections = sum(len(f) for f in found)
    recall, precision = hits / truths, hits / max(detections, 1)
    print(f"\n{SCENES} held-out {kind} scenes, {truths} digits: recall {recall:.3f}, precision {precision:.3f}")
    # At the model's default operating point (0.4, from its model.json).
    least_recall, least_precision = FLOORS[kind]
    assert recall >= least_recall and precision >= least_precision, (recall, precision)
    for f, (image, _, _) in zip(found, scenes, strict=True):  # boxes lie in the image's own pixels
        h, w = image.shape[:2]
        assert all(0 <= d["box"]["x1"] < d["box"]["x2"] <= w and 0 <= d["box"]["y1"] < d["box"]["y2"] <= h for d in f)
        assert all(d["label"] == str(d["class_id"]) for d in f)


def test_map_through_http_matches_the_graph_decoded_offline(client: TestClient, held_out) -> None:
    """pycocotools on the endpoint's answers equals pycocotools on the graph's own output for the
    same scenes: the service's letterbox, inverse mapping and suppression lose nothing."""
    kind, scenes = held_out
    blobs = [encode(Image.fromarray(image)) for image, _, _ in scenes]
    found = [
        as_arrays(d)
        for start in range(0, len(blobs), 8)
        for d in detect(
            client, blobs[start : start + 8], score_threshold=0.05, max_detections=100, class_agnostic="false"
        )
    ]
    truths = [(b, c) for _, b, c in scenes]
    served = coco_map(found, truths, 10)
    samples = Samples(scenes.__getitem__, len(scenes))
    offline_dets, _ = detect_onnx(MODEL / VERSION / "model.onnx", samples, Config(input_size=384))
    offline = coco_map(offline_dets, truths, 10)
    print(
        f"\n{kind}: mAP@0.5 {served['map_50']:.4f} through HTTP, {offline['map_50']:.4f} offline; "
        f"mAP@0.5:0.95 {served['map_50_95']:.4f} / {offline['map_50_95']:.4f}"
    )
    assert served["map_50"] >= HTTP_MAP_50[kind]
    assert abs(served["map_50"] - offline["map_50"]) <= 0.01
    assert abs(served["map_50_95"] - offline["map_50_95"]) <= 0.01
    # The default, one label per place: a second guess at a place no longer counts.
    agnostic = [
        as_arrays(d)
        for start in range(0, len(blobs), 8)
        for d in detect(client, blobs[start : start + 8], score_threshold=0.05, max_detections=100)
    ]
    one_label = coco_map(agnostic, truths, 10)
    print(f"mAP@0.5 {one_label['map_50']:.4f} through HTTP with one label per place")
    assert ONE_LABEL_MAP_50[kind] <= one_label["map_50"] <= served["map_50"] + 0.005


def test_a_phone_photo_stored_rotated_gives_the_upright_boxes(client: TestClient, scenes) -> None:
    # A scene the model reads upright (all digits but at most one), so that a rotation handled wrong shows.
    for image, boxes, classes in scenes[1:]:
        if len(boxes) < 3:
            continue
        (straight,) = detect(client, [encode(Image.fromarray(image))])
        if matches(straight, boxes, classes) >= len(boxes) - 1:
            break
    else:
        pytest.fail("no held-out scene of 3 or more digits is read upright")
    upright = Image.fromarray(image)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to view": the sensor wrote the picture turned clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_270)
    assert stored.size == upright.size[::-1]
    (rotated,) = detect(client, [encode(stored, "JPEG", quality=95, exif=exif)])
    assert matches(rotated, boxes, classes) >= len(boxes) - 1
    assert matches(rotated, boxes, classes) >= matches(straight, boxes, classes) - 1
    b_rot, _, _ = as_arrays(rotated)
    b_up, _, _ = as_arrays(straight)
    assert (iou(b_up, b_rot).max(axis=1) > 0.8).mean() >= 0.8  # the same boxes, in the same pixels


def test_thresholds_of_the_request_are_honoured(client: TestClient, scenes) -> None:
    blob = encode(Image.fromarray(scenes[2][0]))
    (loose,) = detect(client, [blob], score_threshold=0.05)
    (strict,) = detect(client, [blob], score_threshold=0.6)
    (few,) = detect(client, [blob], score_threshold=0.05, max_detections=3)
    assert all(d["score"] >= 0.6 for d in strict) and all(d["score"] >= 0.05 for d in loose)
    assert len(strict) < len(loose) and len(few) == 3
    assert [d["score"] for d in few] == [d["score"] for d in loose[:3]]  # the best three, best first

"""/v1/object-detection with a stand-in detector whose answer is exact (the box of the bright red
pixels of the letterboxed input), so that letterboxing, the mapping back to each image's pixels
(non-square, EXIF-rotated), thresholds, rendering and every bad input are checked for real; plus
the numpy post-processing (score threshold, class-wise suppression) on its own."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.tasks import object_detection as task
from tests.conftest import make_client, wait_ready
from tests.onnx_models import bright_box_detector

URL = "/v1/object-detection"
SIZE = 64


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    root = tmp_path_factory.mktemp("repo")
    bright_box_detector(root / "bright-box" / "1" / "model.onnx", SIZE)
    spec = {
        "name": "bright-box",
        "task": "object-detection",
        "default": True,
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}],
        "outputs": [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, 1, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "classes", "datatype": "INT64", "shape": [-1, 1]},
        ],
        "max_batch_size": 8,
        "labels": ["red thing"],
        "parameters": {"input_size": SIZE, "pad_value": 0.45},
    }
    (root / "bright-box" / "model.json").write_text(json.dumps(spec))
    with make_client(repository=root) as c:
        wait_ready(c)
        yield c


def scene(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A dark image with a red rectangle at ``box`` (x1, y1, x2, y2, end exclusive)."""
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = (255, 0, 0)
    return Image.fromarray(pixels)


def png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if not save else "JPEG", **save)
    return buffer.getvalue()


def detect(client: TestClient, blobs: list[bytes], **fields) -> dict:
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    response = client.post(URL, files=files, data={k: str(v) for k, v in fields.items()})
    assert response.status_code == 200, response.text
    return response.json()


def assert_box_near(found: dict, want: tuple[int, int, int, int], tolerance: float) -> None:
    got = [found["box"][k] for k in ("x1", "y1", "x2", "y2")]
    assert np.allclose(got, want, atol=tolerance), (got, want)


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [(640, 480, (100, 50, 300, 200)), (300, 900, (20, 600, 280, 880)), (64, 64, (8, 8, 40, 24))],
)
def test_boxes_come_back_in_the_images_own_pixels(client: TestClient, width: int, height: int, box) -> None:
    body = detect(client, [png(scene(width, height, box))])
    (image,) = body["images"]
    assert (image["width"], image["height"]) == (width, height)
    (found,) = image["detections"]
    assert found["label"] == "red thing" and found["class_id"] == 0 and found["score"] == 1.0
    # One input pixel of the letterbox is max(width, height) / 64 image pixels: that is the precision.
    assert_box_near(found, box, tolerance=max(width, height) / SIZE + 1)


def test_several_images_of_different_shapes_in_one_request(client: TestClient) -> None:
    cases = [(640, 480, (100, 50, 300, 200)), (200, 500, (10, 10, 100, 400)), (128, 128, (0, 0, 128, 64))]
    response = client.post(URL, json={"images": [base64.b64encode(png(scene(w, h, b))).decode() for w, h, b in cases]})
    assert response.status_code == 200, response.text
    assert int(response.headers["x-batch-size"]) >= 3  # one batch for the request
    for (w, h, b), image in zip(cases, response.json()["images"], strict=True):
        assert_box_near(image["detections"][0], b, tolerance=max(w, h) / SIZE + 1)


def test_exif_orientation_is_applied_before_detecting(client: TestClient) -> None:
    # The upright picture is 300 wide, 200 high with the rectangle top-left; stored rotated by 90
    # degrees with EXIF orientation 6 ("rotate 90 CW to view"), as a phone does.
    upright = scene(300, 200, (10, 20, 110, 60))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote: 200 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6
    body = detect(client, [png(stored, exif=exif, quality=95)])
    (image,) = body["images"]
    assert (image["width"], image["height"]) == (300, 200)
    assert_box_near(image["detections"][0], (10, 20, 110, 60), tolerance=300 / SIZE + 2)


def test_score_threshold_is_honoured(client: TestClient) -> None:
    empty = png(scene(100, 100, (0, 0, 0, 0)))  # nothing red: the stand-in scores 0
    assert detect(client, [empty])["images"][0]["detections"] == []
    assert len(detect(client, [empty], score_threshold=0.0)["images"][0]["detections"]) == 1
    red = png(scene(100, 100, (10, 10, 50, 50)))
    assert len(detect(client, [red], score_threshold=1.0)["images"][0]["detections"]) == 1


def test_render_returns_the_image_with_its_boxes(client: TestClient) -> None:
    image = scene(320, 240, (40, 40, 200, 120))
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8")):
        files = [("files", ("a.png", png(image), "image/png"))]
        response = client.post(URL, files=files, data={"render": fmt})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == f"image/{fmt}" and response.content.startswith(magic)
        drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        assert drawn.shape == (240, 320, 3)
        assert not np.array_equal(drawn, np.asarray(image))  # boxes were drawn


def test_render_of_an_image_wider_than_jpeg_allows_is_scaled_to_fit(client: TestClient) -> None:
    # JPEG's sides stop at 65,535 pixels: a 100,000 x 2 image rendered as JPEG was a 500.
    wide = Image.new("RGB", (100_000, 2), "white")
    response = client.post(URL, files=[("files", ("w.png", png(wide), "image/png"))], data={"render": "jpeg"})
    assert response.status_code == 200, response.text
    assert max(Image.open(io.BytesIO(response.content)).size) <= 65_500
    response = client.post(URL, files=[("files", ("w.png", png(wide), "image/png"))], data={"render": "png"})
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (100_000, 2)


def test_render_labels_grow_with_the_picture() -> None:
    # A label's band above its box is about a fortieth of the picture's longer side: readable when a
    # phone photo is shown at screen size (it was 10 px whatever the size).
    bands = []
    for side in (400, 2400):
        image = Image.fromarray(np.full((side * 3 // 4, side, 3), 30, np.uint8))
        top = side // 4
        box = {"x1": side / 4, "y1": top, "x2": side / 2, "y2": side / 2}
        drawn = task.render(image, [{"box": box, "class_id": 0, "label": "7", "score": 0.9}], "png")
        changed = (np.abs(np.asarray(Image.open(io.BytesIO(drawn))).astype(int) - 30).sum(axis=2) > 0)[:top]
        bands.append(len(np.flatnonzero(changed.any(axis=1))))
    assert bands[1] >= 2400 / 40 * 0.6 and bands[1] >= 4 * bands[0], bands  # digits are 0.7 of the font's size


@pytest.mark.parametrize(
    ("fields", "status", "error_type"),
    [
        ({"score_threshold": "1.5"}, 422, "schema_error"),
        ({"iou_threshold": "-0.1"}, 422, "schema_error"),
        ({"max_detections": "0"}, 422, "schema_error"),
        ({"max_detections": "2"}, 422, "schema_error"),  # the stand-in returns at most 1
        ({"render": "gif"}, 422, "schema_error"),
        ({"model": "nope"}, 404, "model_not_found"),
        ({"unknown": "1"}, 422, "schema_error"),
    ],
)
def test_bad_parameters(client: TestClient, fields: dict, status: int, error_type: str) -> None:
    files = [("files", ("a.png", png(scene(50, 50, (1, 1, 9, 9))), "image/png"))]
    response = client.post(URL, files=files, data=fields)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type


def test_bad_images_and_bodies(client: TestClient) -> None:
    ok = png(scene(50, 50, (1, 1, 9, 9)))
    cases = [
        ([("files", ("a.png", ok[: len(ok) // 2], "image/png"))], {}, 400, "invalid_image"),
        ([("files", ("a.txt", b"hello, not an image", "text/plain"))], {}, 415, "unsupported_image_format"),
        ([("files", ("a.png", ok, "image/png"))] * 2, {"render": "png"}, 422, "schema_error"),
        ([("files", ("a.png", ok, "image/png"))] * 65, {}, 413, "too_many_items"),
    ]
    for files, data, status, error_type in cases:
        response = client.post(URL, files=files, data=data)
        assert response.status_code == status, response.text
        assert response.json()["error_type"] == error_type
    for raw, ctype, status in (
        (b"{not json", "application/json", 400),
        (b'{"images": []}', "application/json", 422),
        (b'{"images": ["!!!"]}', "application/json", 400),
        (b"x", "text/plain", 415),
    ):
        response = client.post(URL, content=raw, headers={"content-type": ctype})
        assert response.status_code == status, response.text


def test_postprocessing_thresholds_and_one_label_per_place() -> None:
    boxes = np.array(
        [[10, 10, 50, 50], [12, 12, 52, 52], [11, 11, 51, 51], [100, 100, 140, 140], [0, 0, 5, 5]], np.float32
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2], np.float32)
    classes = np.array([1, 1, 2, 1, 1])
    identity = task.Letterbox(1.0, 0, 0, 200, 200)
    found = task.detections(
        boxes, scores, classes, identity, ["a", "b", "c"], score_threshold=0.3, iou_threshold=0.5, max_detections=10
    )
    # Boxes 1 and 2 overlap box 0 and go, whatever their class: one place, one label, the best;
    # box 2's other label is kept as an alternative. Box 4 is under the score threshold.
    assert [(d["label"], d["score"]) for d in found] == [("b", 0.9), ("b", 0.6)]
    assert found[0]["alternatives"] == [{"label": "c", "class_id": 2, "score": pytest.approx(0.7)}]
    assert found[1]["alternatives"] == []
    loose = task.detections(
        boxes, scores, classes, identity, ["a", "b", "c"], score_threshold=0.0, iou_threshold=1.0, max_detections=2
    )
    assert [d["score"] for d in loose] == pytest.approx([0.9, 0.8])


def test_the_strongest_label_is_drawn_last_on_top() -> None:
    image = Image.new("RGB", (60, 60), "white")
    box = {"x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 50.0}
    strong = {"label": "8", "class_id": 0, "score": 0.9, "box": box}
    weak = {"label": "9", "class_id": 1, "score": 0.4, "box": box}
    drawn = Image.open(io.BytesIO(task.render(image, [strong, weak], "png"))).convert("RGB")
    alone = Image.open(io.BytesIO(task.render(image, [strong], "png"))).convert("RGB")
    assert drawn.tobytes() == alone.tobytes()  # the weak label lies under the strong one


def test_letterbox_inverse_is_exact() -> None:
    rng = np.random.default_rng(0)
    for w, h in ((640, 480), (123, 457), (64, 64), (1000, 10)):
        _, box = task.letterbox(Image.new("RGB", (w, h)), 320, 0.45)
        original = np.sort(rng.uniform(0, [w, h, w, h], size=(5, 4)).reshape(5, 2, 2), axis=1).reshape(5, 4)
        original = original[:, [0, 1, 2, 3]]
        forward = original * box.scale + np.array([box.left, box.top, box.left, box.top])
        assert np.allclose(box.to_image(forward.astype(np.float32)), np.clip(original, 0, [w, h, w, h]), atol=1e-3)

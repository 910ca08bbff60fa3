"""/v1/image-classification with the committed MNIST model: real digits through HTTP, the image
formats and modes real clients send, and every kind of bad input."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import make_client, wait_ready

URL = "/v1/image-classification"


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def client_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """What an app sends: dark ink on light paper, scaled up to a few hundred pixels, off centre on a
    larger canvas, JPEG-compressed."""
    side = int(rng.integers(200, 360))
    ink = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (side + int(rng.integers(40, 160)), side + int(rng.integers(40, 160))), 255)
    canvas.paste(ink, (int(rng.integers(0, canvas.width - side)), int(rng.integers(0, canvas.height - side))))
    return encode(canvas.convert("RGB"), "JPEG", quality=80)


def classify_files(client: TestClient, blobs: list[bytes], mime: str = "image/png", **form) -> list[str]:
    files = [("files", (f"digit{i}", blob, mime)) for i, blob in enumerate(blobs)]
    response = client.post(URL, files=files, data=form)
    assert response.status_code == 200, response.text
    return [ranked[0]["label"] for ranked in response.json()["predictions"]]


def accuracy(client: TestClient, blobs: list[bytes], labels: np.ndarray, mime: str) -> float:
    predicted = []
    for start in range(0, len(blobs), 50):
        predicted += classify_files(client, blobs[start : start + 50], mime)
    return float(np.mean([p == str(y) for p, y in zip(predicted, labels, strict=True)]))


@pytest.fixture(scope="module")
def sample(mnist_test) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test
    idx = np.random.default_rng(0).choice(len(images), 500, replace=False)
    return images[idx], labels[idx]


def test_image_classification_500_mnist_test_pngs_at_least_98_percent(client: TestClient, sample) -> None:
    images, labels = sample
    acc = accuracy(client, [encode(Image.fromarray(d)) for d in images], labels, "image/png")
    print(f"\nMNIST test PNGs through HTTP: {acc:.1%}")
    assert acc >= 0.98


def test_image_classification_client_style_jpegs_at_least_98_percent(client: TestClient, sample) -> None:
    images, labels = sample
    rng = np.random.default_rng(1)
    acc = accuracy(client, [client_photo(d, rng) for d in images], labels, "image/jpeg")
    print(f"\nblack-on-white, upscaled, JPEG digits through HTTP: {acc:.1%}")
    assert acc >= 0.98


def test_digits_written_on_photographed_pages_at_least_85_percent(client: TestClient) -> None:
    # MNIST test digits on generated pages (ruled, squared, cream, recycled; pen or marker; uneven
    # light, shadows, underlines, a table or photo behind), framed as a phone would: 60.95 % with
    # the border-median crop this replaced, 90.00 % after (bench.accuracy --style paper, 2,000 scenes
    # of seed 1); these are 192 scenes of another seed.
    from bench.accuracy import paper_photos

    files, labels = paper_photos(192, seed=3)
    acc = accuracy(client, [blob for blob, _ in files], np.asarray(labels), "image/jpeg")
    print(f"\nMNIST test digits on photographed pages through HTTP: {acc:.1%}")
    assert acc >= 0.85


def test_digits_cropped_to_their_ink_are_read_at_their_size_and_scaled(client: TestClient, sample) -> None:
    # A first version of the page finder read such crops at 77 % (its size) and 95 % (x6): their
    # strokes were taken for ruled lines, and a stroke as wide as the page window for page.
    images, labels = sample
    for scale in (1, 6):
        blobs = []
        for digit in images[:200]:
            ys, xs = np.nonzero(digit > 25)
            ink = Image.fromarray(255 - digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
            blobs.append(encode(ink.resize((ink.width * scale, ink.height * scale), Image.Resampling.BICUBIC)))
        acc = accuracy(client, blobs, labels[:200], "image/png")
        assert acc >= 0.97, (scale, acc)


def test_ruled_lines_a_gradient_and_the_table_are_not_taken_for_the_digit() -> None:
    # A "1" (a vertical bar) on a page whose light falls by half from left to right, with ruled
    # lines across it, a dark table along the bottom and a short underline: what reaches the model
    # is the bar alone, centred.
    from service.digit_image import mnist_like

    h, w = 480, 360
    page = np.tile(np.linspace(0.95, 0.5, w, dtype=np.float32), (h, 1))
    for y in range(40, h, 36):
        page[y : y + 2] *= 0.75  # ruled lines, fainter than ink
    page[h - 40 :] = 0.15  # the table
    page[140:340, 170:186] = 0.1  # the digit: a bar 200 px tall
    page[352:356, 150:210] = 0.1  # an underline below it
    digit = mnist_like(page)
    columns = digit.sum(axis=0)
    assert digit.max() == pytest.approx(1.0)
    assert columns[:10].sum() + columns[18:].sum() < 0.02 * columns.sum()  # nothing but the bar
    rows = np.flatnonzero(digit.sum(axis=1) > 0.5)
    assert len(rows) == 20 and rows[-1] - rows[0] == 19  # the bar alone, 20 px tall, whole: no line cut it


def test_pieces_touching_at_a_corner_are_one_piece() -> None:
    from service.digit_image import label_pieces

    mask = np.zeros((6, 8), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal: one piece
    mask[0, 5:8] = mask[4:6, 4] = True  # two more
    labels, count = label_pieces(mask)
    assert count == 3
    assert labels[0, 0] == labels[1, 1] == labels[2, 2] != 0
    assert len({labels[0, 5], labels[4, 4], labels[0, 0]}) == 3


@pytest.fixture(scope="module")
def clear_digits(client: TestClient, mnist_test) -> list[tuple[np.ndarray, str]]:
    """A few test digits (one per class) that the model gets right as plain PNGs."""
    images, labels = mnist_test
    chosen = {}
    for image, label in zip(images[:300], labels[:300], strict=True):
        if str(label) not in chosen and classify_files(client, [encode(Image.fromarray(image))]) == [str(label)]:
            chosen[str(label)] = image
    assert len(chosen) == 10
    return [(chosen[k], k) for k in sorted(chosen)]


def _variants(digit: np.ndarray) -> dict[str, tuple[bytes, str]]:
    big = Image.fromarray(255 - digit).resize((140, 140), Image.Resampling.BICUBIC)  # dark on light
    rgba = Image.new("RGBA", big.size, (0, 0, 0, 0))
    rgba.putalpha(Image.fromarray(255 - np.asarray(big)))  # black strokes on a transparent canvas
    sixteen = Image.fromarray((np.asarray(big, dtype=np.uint16) * 257).astype(np.uint16))
    gif_frames = [big.convert("P"), Image.new("P", big.size, 0)]
    gif = io.BytesIO()
    gif_frames[0].save(gif, "GIF", save_all=True, append_images=gif_frames[1:], duration=100)
    # EXIF orientation 6: the stored pixels are rotated 90 degrees counter-clockwise; viewers turn them back.
    rotated = big.convert("RGB").rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png_rgb": (encode(big.convert("RGB")), "image/png"),
        "png_rgba_transparent": (encode(rgba), "image/png"),
        "png_palette": (encode(big.convert("P", palette=Image.Palette.ADAPTIVE)), "image/png"),
        "png_16bit": (encode(sixteen), "image/png"),
        "gif_animated": (gif.getvalue(), "image/gif"),
        "webp": (encode(big, "WEBP", quality=90), "image/webp"),
        "bmp": (encode(big, "BMP"), "image/bmp"),
        "jpeg_exif_rotated": (encode(rotated, "JPEG", quality=90, exif=exif), "image/jpeg"),
        "light_on_dark_large": (encode(Image.fromarray(digit).resize((300, 300))), "image/png"),
    }


@pytest.mark.parametrize("variant", list(_variants(np.zeros((28, 28), np.uint8))))
def test_image_classification_accepts_formats_modes_and_orientation(
    client: TestClient, clear_digits, variant: str
) -> None:
    blobs, mimes, expected = [], set(), []
    for digit, label in clear_digits:
        blob, mime = _variants(digit)[variant]
        blobs.append(blob)
        mimes.add(mime)
        expected.append(label)
    predicted = classify_files(client, blobs, mimes.pop())
    correct = sum(p == e for p, e in zip(predicted, expected, strict=True))
    assert correct >= 9, f"{variant}: predicted {predicted}, expected {expected}"


def test_image_classification_base64_json_keeps_request_order_and_top_k(client: TestClient, clear_digits) -> None:
    order = [3, 1, 4, 1, 5, 9, 2, 6]
    digits = dict((label, digit) for digit, label in clear_digits)
    images = [base64.b64encode(encode(Image.fromarray(digits[str(d)]))).decode() for d in order]
    images[1] = "data:image/png;base64," + images[1]
    response = client.post(URL, json={"images": images, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "mnist" and body["version"] == "1"
    assert [p[0]["label"] for p in body["predictions"]] == [str(d) for d in order]
    for ranked in body["predictions"]:
        scores = [r["score"] for r in ranked]
        assert len(ranked) == 3 and scores == sorted(scores, reverse=True)
        assert len({r["label"] for r in ranked}) == 3 and sum(scores) <= 1.0001
    for header in ("x-queue-time-ms", "x-inference-time-ms", "x-batch-size"):
        assert float(response.headers[header]) >= 0
    assert int(response.headers["x-batch-size"]) >= len(order)


def test_image_classification_multipart_top_k_and_model_fields(client: TestClient, clear_digits) -> None:
    digit, label = clear_digits[7]
    files = [("files", ("seven.png", encode(Image.fromarray(digit)), "image/png"))]
    response = client.post(URL, files=files, data={"top_k": "10", "model": "mnist"})
    assert response.status_code == 200
    ranked = response.json()["predictions"][0]
    assert len(ranked) == 10 and ranked[0]["label"] == label
    assert sorted(r["label"] for r in ranked) == [str(d) for d in range(10)]


def test_blank_image_gets_an_answer_not_an_error(client: TestClient) -> None:
    blank = encode(Image.new("L", (64, 64), 255))
    response = client.post(URL, files=[("files", ("blank.png", blank, "image/png"))])
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]) == 5


# -- bad input ---------------------------------------------------------------------------------


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims an enormous image (a decompression bomb)."""
    raw = zlib.compress(b"\x00" * 16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _post_file(client: TestClient, blob: bytes, mime: str = "image/png"):
    return client.post(URL, files=[("files", ("upload", blob, mime))])


@pytest.mark.parametrize(
    ("blob", "status", "error_type"),
    [
        (b"this is a text file, not a picture", 415, "unsupported_image_format"),
        (b"%PDF-1.4 fake pdf", 415, "unsupported_image_format"),
        (b"", 400, "invalid_image"),
        ("truncated", 400, "invalid_image"),
        ("bomb", 413, "image_too_large"),
        ("tiff", 415, "unsupported_image_format"),
    ],
)
def test_image_classification_bad_files_get_clear_4xx(client: TestClient, blob, status: int, error_type: str) -> None:
    if blob == "truncated":
        full = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
        blob = full[: len(full) // 2]
    elif blob == "bomb":
        blob = png_with_header_size(200_000, 200_000)
    elif blob == "tiff":
        blob = encode(Image.new("L", (28, 28)), "TIFF")
    response = _post_file(client, blob)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    assert "upload" in body["error"]  # names the offending file


def test_image_over_pixel_and_byte_limits_is_413() -> None:
    with make_client(
        max_image_pixels=250_000,
        max_image_bytes=20_000,
        max_images_per_request=3,
        max_request_bytes=200_000,
        warmup=False,  # limits are under test here, not warm-up
    ) as c:
        wait_ready(c)
        big = encode(Image.new("L", (600, 600), 255))
        response = _post_file(c, big)
        assert (response.status_code, response.json()["error_type"]) == (413, "image_too_large")
        assert "600x600" in response.json()["error"]
        noisy = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)))
        assert len(noisy) > 20_000
        response = _post_file(c, noisy)
        assert (response.status_code, response.json()["error_type"]) == (413, "image_too_large")
        # Reading stops one byte past the limit, so the message states the limit, not a size it never read.
        assert "larger than the limit of 20000 bytes" in response.json()["error"]
        small = encode(Image.new("L", (28, 28)))
        response = c.post(URL, files=[("files", (f"f{i}", small, "image/png")) for i in range(4)])
        assert (response.status_code, response.json()["error_type"]) == (413, "too_many_items")
        response = c.post(URL, json={"images": [base64.b64encode(small).decode()] * 4})
        assert (response.status_code, response.json()["error_type"]) == (413, "too_many_items")
        response = c.post(URL, content=b"x" * 300_000, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["error_type"]) == (413, "payload_too_large")
        # A chunked body has no Content-Length: the limit is enforced as the bytes arrive.
        for content_type in ("application/json", "multipart/form-data; boundary=abc"):
            chunks = (b"x" * 100_000 for _ in range(5))
            response = c.post(URL, content=chunks, headers={"content-type": content_type})
            assert (response.status_code, response.json()["error_type"]) == (413, "payload_too_large")


@pytest.mark.parametrize(
    ("kwargs", "status", "error_type"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": {"images": "abc"}}, 422, "schema_error"),
        ({"json": {"images": []}}, 422, "schema_error"),
        ({"json": {"pictures": ["abc"]}}, 422, "schema_error"),
        ({"json": {"images": [123]}}, 422, "schema_error"),
        ({"json": {"images": ["@@@not base64@@@"]}}, 400, "invalid_image"),
        ({"json": {"images": ["aGVsbG8="], "top_k": 0}}, 422, "schema_error"),
        ({"json": {"images": ["aGVsbG8="], "top_k": 1000}}, 422, "schema_error"),
        ({"json": {"images": ["aGVsbG8="], "model": "no-such-model"}}, 404, "model_not_found"),
        ({"json": [1, 2, 3]}, 422, "schema_error"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"data": {"top_k": "3"}, "files": [("other", ("x.txt", b"x", "text/plain"))]}, 422, "schema_error"),
        ({"data": {"top_k": "many"}, "files": [("files", ("x.png", b"x", "image/png"))]}, 422, "schema_error"),
        ({"data": {"files": "not a file"}, "files": [("other", ("x", b"x", "text/plain"))]}, 422, "schema_error"),
    ],
)
def test_image_classification_bad_requests_get_clear_4xx(
    client: TestClient, kwargs, status: int, error_type: str
) -> None:
    response = client.post(URL, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    assert isinstance(body["error"], str) and body["error"]


def test_image_classification_rejects_model_of_another_task(tmp_path) -> None:
    from tests.onnx_models import write_model

    write_model(tmp_path, "double")
    with make_client(repository=tmp_path) as c:
        wait_ready(c)
        small = base64.b64encode(encode(Image.new("L", (28, 28)))).decode()
        response = c.post(URL, json={"images": [small], "model": "double"})
        assert (response.status_code, response.json()["error_type"]) == (404, "model_not_found")
        response = c.post(URL, json={"images": [small]})
        assert (response.status_code, response.json()["error_type"]) == (404, "model_not_found")
        assert "no model for task" in response.json()["error"]

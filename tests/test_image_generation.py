"""/v1/image-generation with the committed generator: numbers that read back as asked (by the
served digit classifier, which the generator never trained against), seeds that say what an image
is whatever shares its batch, both polarities, the PNG itself, and bad input."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

URL = "/v1/image-generation"
ROOT = Path(__file__).resolve().parents[1]
TRIM = 3  # columns each 28 px tile loses on either side when digits are joined (the task's _TRIM)


def pixels(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["png"]))))


def tiles(image: np.ndarray, count: int) -> np.ndarray:
    """A generated number (light on dark, scale 1) back into ``count`` 28x28 MNIST-style tiles."""
    width = image.shape[1] // count
    parts = [np.pad(image[:, i * width : (i + 1) * width], ((0, 0), (TRIM, TRIM))) for i in range(count)]
    return np.stack(parts).astype(np.float32)[:, None] / 255.0


def read_back(client: TestClient, batch: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [{"name": "image", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}]
    }
    response = client.post("/v2/models/mnist/infer", json=body)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"][0]["data"]).reshape(len(batch), 10).argmax(axis=1)


def test_every_digit_drawn_reads_back_as_the_digit_asked_for(client: TestClient) -> None:
    # 16 images of 0123456789: 160 digits, each read by the classifier.
    response = client.post(URL, json={"digits": "0123456789", "n": 16, "seed": 2026})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "digit-generator" and len(body["images"]) == 16
    read = np.concatenate([read_back(client, tiles(pixels(im), 10)) for im in body["images"]])
    asked = np.tile(np.arange(10), 16)
    assert (read == asked).mean() >= 0.95, (read == asked).mean()
    metrics = json.loads((ROOT / "models" / "digit-generator" / "1" / "metadata.json").read_text())["metrics"]
    assert metrics["readback_accuracy"] >= 0.97  # the offline figure over 10,000 digits


def test_a_seed_gives_the_same_images_whatever_shares_the_batch(client: TestClient) -> None:
    request = {"digits": "2026", "n": 3, "seed": 7}
    alone = client.post(URL, json=request).json()["images"]
    # The same request among others, sent at once so that the batcher mixes them.
    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(client.post, URL, json={"digits": "9" * (i + 1), "n": 4}) for i in range(8)]
        again = pool.submit(client.post, URL, json=request)
        assert all(f.result().status_code == 200 for f in others)
        crowded = again.result().json()["images"]
    assert [im["png"] for im in crowded] == [im["png"] for im in alone]
    assert [im["seed"] for im in alone] == [7, 8, 9]
    # Image i is seed + i: redrawn alone with that seed and n 1.
    third = client.post(URL, json={"digits": "2026", "seed": 9}).json()["images"][0]
    assert third["png"] == alone[2]["png"]
    assert client.post(URL, json={"digits": "2026", "seed": 8}).json()["images"][0]["png"] != alone[2]["png"]


def test_without_a_seed_each_request_draws_anew_and_says_its_seed(client: TestClient) -> None:
    many = client.post(URL, json={"digits": "5", "n": 16}).json()["images"]
    assert all(0 <= im["seed"] <= 2**32 - 1 for im in many)  # each one can be sent back
    first, second = (client.post(URL, json={"digits": "5"}).json()["images"][0] for _ in range(2))
    assert first["seed"] != second["seed"] and first["png"] != second["png"]
    redrawn = client.post(URL, json={"digits": "5", "seed": first["seed"]}).json()["images"][0]
    assert redrawn["png"] == first["png"]


def test_polarity_scale_and_the_png_itself(client: TestClient) -> None:
    base = {"digits": "31", "seed": 11}
    light = client.post(URL, json=base).json()["images"][0]
    dark = client.post(URL, json={**base, "polarity": "dark-on-light", "scale": 3}).json()["images"][0]
    light_px, dark_px = pixels(light), pixels(dark)
    assert light_px.shape == (28, 2 * (28 - 2 * TRIM)) and (light["height"], light["width"]) == light_px.shape
    assert dark_px.shape == (84, 3 * light_px.shape[1])
    assert np.array_equal(255 - light_px, dark_px[::3, ::3])
    assert light_px.mean() < 100 < dark_px.mean()  # ink on a black page, ink on a white one
    raw = client.post(URL, json={**base, "format": "png"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert raw.headers["x-seed"] == "11" and base64.b64encode(raw.content).decode() == light["png"]


def test_bad_requests_are_4xx_with_the_reason(client: TestClient) -> None:
    cases = [
        ({"digits": "12a"}, 422, "digits"),
        ({"digits": "٣"}, 422, "digits"),  # an Arabic-Indic three: only 0-9
        ({"digits": "1\n"}, 422, "digits"),
        ({"digits": ""}, 422, "digits"),
        ({"digits": "1" * 17}, 413, "at most 16 digits"),
        ({"digits": 12}, 422, "digits"),
        ({"digits": "1", "n": 0}, 422, "n"),
        ({"digits": "1", "n": 17}, 413, "at most 16 images"),
        ({"digits": "1", "n": 2, "seed": 2**32 - 1}, 422, "seed"),  # image 1's seed could not be sent back
        ({"digits": "1", "n": 2, "format": "png"}, 422, "n must be 1"),
        ({"digits": "1", "seed": -1}, 422, "seed"),
        ({"digits": "1", "seed": 2**32}, 422, "seed"),
        ({"digits": "1", "seed": "7"}, 422, "seed"),
        ({"digits": "1", "scale": 9}, 422, "scale"),
        ({"digits": "1", "polarity": "inverted"}, 422, "polarity"),
        ({"digits": "1", "model": "mnist"}, 404, "not 'image-generation'"),
        ({"digits": "1", "model": "nope"}, 404, "unknown model"),
        ({"digits": "1", "extra": True}, 422, "extra"),
    ]
    for body, status, words in cases:
        response = client.post(URL, json=body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"] and response.json()["error_type"], (body, response.json())
    assert client.post(URL, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def test_the_generator_is_served_on_the_open_inference_protocol_too(client: TestClient) -> None:
    meta = client.get("/v2/models/digit-generator").json()
    assert {t["name"] for t in meta["inputs"]} == {"z", "digit"}
    z = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "z", "shape": [2, 100], "datatype": "FP32", "data": z.ravel().tolist()},
            {"name": "digit", "shape": [2], "datatype": "INT64", "data": [4, 7]},
        ]
    }
    response = client.post("/v2/models/digit-generator/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["shape"] == [2, 1, 28, 28]
    images = np.asarray(out["data"], dtype=np.float32).reshape(2, 1, 28, 28)
    assert list(read_back(client, images)) == [4, 7]
    # A class the generator has no row for is the client's mistake, told before it is queued.
    bad = {**body, "inputs": [body["inputs"][0], {**body["inputs"][1], "data": [4, 12]}]}
    refused = client.post("/v2/models/digit-generator/infer", json=bad)
    assert refused.status_code == 400 and "digit" in refused.json()["error"], refused.text


def test_the_openapi_document_states_the_generation_limits(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"][URL]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = (
        body["properties"]
        if "properties" in body
        else schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    )
    assert props["digits"]["maxLength"] == 16 and props["n"]["maximum"] == 16

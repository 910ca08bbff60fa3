"""Hostile and heavy clients: one client's mistake fails only that client, and a request cannot
queue more than the model can take. Traffic stays in-process (127.0.0.1 at most)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, make_client, wait_ready


def infer(client: TestClient, model: str, *tensors: dict):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": list(tensors)})


def ints(name: str, values: list, shape: list[int]) -> dict:
    return {"name": name, "datatype": "INT64", "shape": shape, "data": values}


@pytest.mark.parametrize(
    ("model", "tensors", "problem"),
    [
        ("rating", [ints("user", [10**12], [1]), ints("item", [1], [1])], "out of the model's range [0, 609]"),
        ("rating", [ints("user", [0], [1]), ints("item", [-1], [1])], "out of the model's range [0, 9741]"),
        ("sentiment", [ints("input_ids", [], [1, 0]), ints("attention_mask", [], [1, 0])], "axis 1 is empty"),
        (
            "sentiment",
            [ints("input_ids", [5, 16000], [1, 2]), ints("attention_mask", [1, 1], [1, 2])],
            "value 16000 is out of the model's range [0, 15999]",
        ),
        (
            "sentiment",
            [ints("input_ids", [5] * 300, [1, 300]), ints("attention_mask", [1] * 300, [1, 300])],
            "axis 1 is 300, the model takes at most 256",
        ),
        (
            "translation-en-fr",
            [
                ints("tgt_ids", [1] * 128, [1, 128]),
                {"name": "memory", "datatype": "FP32", "shape": [1, 3, 256], "data": [0.0] * 768},
                ints("src_ids", [5, 6, 7], [1, 3]),
            ],
            "axis 1 is 128, the model takes at most 65",
        ),
    ],
)
def test_v2_tensors_the_graph_cannot_take_are_a_400_before_they_are_queued(
    client: TestClient, model: str, tensors: list[dict], problem: str
) -> None:
    response = infer(client, model, *tensors)
    assert response.status_code == 400, response.text
    assert response.json()["error_type"] == "invalid_tensor" and problem in response.json()["error"]


def test_a_huge_declared_tensor_is_refused_before_it_is_built(client: TestClient) -> None:
    tensor = {"name": "image", "datatype": "FP32", "shape": [20_000, 1, 28, 28], "data": [0.0]}
    response = infer(client, "mnist", tensor)
    assert response.status_code == 413 and response.json()["error_type"] == "too_many_items"


def test_a_poisoned_request_the_checks_miss_fails_alone_never_its_batch(tmp_path: Path) -> None:
    # The rating model without its declared ranges: a bad index reaches onnxruntime inside a batch
    # shared with innocent recommendations. Only the poisoned requests may fail.
    shutil.copytree(ROOT / "models" / "rating", tmp_path / "rating")
    spec = json.loads((tmp_path / "rating" / "model.json").read_text())
    for tensor in spec["inputs"]:
        tensor.pop("value_range")
    (tmp_path / "rating" / "model.json").write_text(json.dumps(spec))
    with make_client(repository=tmp_path) as client:
        wait_ready(client)

        def poison(_: int):
            return infer(client, "rating", ints("user", [10**12, 1], [2]), ints("item", [1, 1], [2]))

        def innocent(i: int):
            return client.post("/v1/recommendations", json={"user_id": str(1 + i % 50), "k": 5})

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(poison if i % 4 == 0 else innocent, i) for i in range(48)]
            responses = [f.result() for f in futures]
    poisoned = responses[::4]
    innocents = [r for i, r in enumerate(responses) if i % 4]
    assert all(r.status_code == 200 for r in innocents), [r.text for r in innocents if r.status_code != 200][:2]
    assert all(r.status_code == 500 and r.json()["error_type"] == "inference_failed" for r in poisoned)
    assert all("Gather" not in r.text and "indices" not in r.text for r in poisoned)  # no runtime internals

"""Open Inference Protocol endpoints, health, metrics and docs, with the committed MNIST model."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

INFER = "/v2/models/mnist/infer"


def tensor(images: np.ndarray) -> dict:
    x = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["models"]["mnist"] == "READY"
    meta = client.get("/v2").json()
    assert meta["name"] == "neuroserve" and meta["version"]


def test_model_metadata_shows_provider_quality_and_batching(client: TestClient) -> None:
    meta = client.get("/v2/models/mnist").json()
    assert meta["name"] == "mnist" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    params = meta["parameters"]
    assert params["execution_provider"] == "CPUExecutionProvider"
    assert params["metrics"]["test_accuracy"] >= 0.992
    assert "training.image_classification" in params["training_command"]
    assert params["max_batch_size"] == 64
    assert client.get("/v2/models/mnist/versions/1").json()["name"] == "mnist"
    assert client.get("/v2/models/mnist/ready").json() == {"name": "mnist", "version": "1", "ready": True}
    assert client.get("/v2/models/mnist/versions/1/ready").status_code == 200
    index = client.post("/v2/repository/index").json()
    assert {"name": "mnist", "version": "1", "state": "READY", "task": "image-classification", "default": True} in index


def test_v2_infer_classifies_real_digits_in_order(client: TestClient, mnist_test) -> None:
    images, labels = mnist_test
    idx = np.random.default_rng(3).choice(len(images), 32, replace=False)
    body = {"id": "req-42", "inputs": [tensor(images[idx])]}
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model_name"] == "mnist" and out["model_version"] == "1" and out["id"] == "req-42"
    (probs,) = out["outputs"]
    assert probs["name"] == "probabilities" and probs["datatype"] == "FP32" and probs["shape"] == [32, 10]
    p = np.array(probs["data"]).reshape(32, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
    assert (p.argmax(axis=1) == labels[idx]).mean() >= 0.95
    assert int(response.headers["x-batch-size"]) >= 32
    version = client.post("/v2/models/mnist/versions/1/infer", json=body).json()
    np.testing.assert_allclose(np.array(version["outputs"][0]["data"]), p.ravel(), atol=1e-6)


def test_v2_infer_accepts_nested_data_and_output_selection(client: TestClient, mnist_test) -> None:
    images, labels = mnist_test
    x = (images[:2].astype(np.float32) / 255.0).reshape(2, 1, 28, 28)
    body = {
        "inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    out = client.post(INFER, json=body).json()
    assert np.array(out["outputs"][0]["data"]).reshape(2, 10).argmax(1).tolist() == labels[:2].tolist()


GOOD = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}


@pytest.mark.parametrize(
    ("url", "kwargs", "status", "error_type"),
    [
        ("/v2/models/nope/infer", {"json": {"inputs": [GOOD]}}, 404, "model_not_found"),
        ("/v2/models/mnist/versions/7/infer", {"json": {"inputs": [GOOD]}}, 404, "model_not_found"),
        ("/v2/models/mnist/versions/x/infer", {"json": {"inputs": [GOOD]}}, 404, "model_not_found"),
        (INFER, {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        (
            INFER,
            {"content": b'{"inputs": [NaN]}', "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (INFER, {"json": {}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": []}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": ["x"]}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": [{**GOOD, "name": 5}]}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": [{**GOOD, "name": "pixels"}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [GOOD, GOOD]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "datatype": "INT64"}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "datatype": "FLOAT"}]}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": [{**GOOD, "shape": [1, 28, 28]}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "shape": [1, 1, 32, 32]}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "shape": [2, 1, 28, 28]}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "shape": [0, 1, 28, 28], "data": []}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "shape": [-1, 1, 28, 28]}]}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": [{**GOOD, "data": ["a"] * 784}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{**GOOD, "data": [[0.0, 1.0], [0.0]]}]}}, 400, "invalid_tensor"),
        (
            INFER,
            {
                "content": (
                    '{"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ['
                    + ", ".join(["1e39"] * 784)
                    + "]}]}"
                ).encode(),
                "headers": {"content-type": "application/json"},
            },
            400,
            "invalid_tensor",
        ),
        (INFER, {"json": {"inputs": [{**GOOD, "data": [1e39] * 784}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}}, 400, "schema_error"),
        (INFER, {"json": {"inputs": [GOOD], "outputs": [{"name": "logits"}]}}, 400, "invalid_tensor"),
        (INFER, {"json": {"inputs": [GOOD], "outputs": "all"}}, 400, "schema_error"),
        ("/v2/models/mnist/infer", {"content": b"", "headers": {}}, 400, "invalid_json"),
    ],
)
@pytest.mark.parametrize("encoding", ["gzip", "identity"])  # identity: the fast path (v2.fast_path)
def test_v2_bad_requests_get_clear_4xx(
    client: TestClient, url: str, kwargs: dict, status: int, error_type: str, encoding: str
) -> None:
    headers = {**kwargs.get("headers", {}), "accept-encoding": encoding}
    response = client.post(url, **{**kwargs, "headers": headers})
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
    assert response.json()["error"]


def test_inputs_that_overflow_the_model_get_400_not_nulls_and_binary_outputs_carry_the_raw_values(
    client: TestClient,
) -> None:
    """3e38 is a finite FP32, but the model's arithmetic overflows: JSON cannot carry NaN or
    infinity, and orjson wrote null in a 200."""
    huge = {**GOOD, "data": [3e38] * 784}
    r = client.post(INFER, json={"inputs": [huge]})
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_tensor", r.text
    assert "not finite" in r.json()["error"] and "binary" in r.json()["error"]
    r = client.post(
        INFER, json={"inputs": [huge], "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    )
    assert r.status_code == 200, r.text
    header = int(r.headers["inference-header-content-length"])
    raw = np.frombuffer(r.content[header:], dtype="<f4")
    assert raw.shape == (10,) and not np.isfinite(raw).all()
    assert client.post(INFER, json={"inputs": [GOOD]}).status_code == 200  # the next request is served as usual


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/mnist", "/metrics", "/"])
def test_head_answers_every_get_route_as_get_would_without_the_body(client: TestClient, path: str) -> None:
    get, head = client.get(path), client.head(path)
    assert get.status_code == 200 and head.status_code == 200, head.text
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert client.head(INFER).status_code == 405  # a POST route is still not a GET one
    assert 'method="HEAD"' in client.get("/metrics").text  # counted as what it was


def test_unknown_routes_and_methods_use_the_error_shape(client: TestClient) -> None:
    response = client.get("/v3/whatever")
    assert response.status_code == 404 and response.json()["error_type"] == "not_found"
    response = client.get(INFER)
    assert response.status_code == 405 and response.json()["error_type"] == "method_not_allowed"
    response = client.get("/v2/models/nope")
    assert response.status_code == 404 and response.json()["error_type"] == "model_not_found"


def test_metrics_expose_per_model_series(client: TestClient) -> None:
    client.post(INFER, json={"inputs": [GOOD]})
    client.post(INFER, json={"inputs": [{**GOOD, "datatype": "INT64"}]})
    text = client.get("/metrics").text
    for series in (
        'neuroserve_model_requests_total{model="mnist",outcome="ok"}',
        'neuroserve_model_request_duration_seconds_bucket{le="0.001",model="mnist"}',
        'neuroserve_queue_duration_seconds_count{model="mnist"}',
        'neuroserve_compute_duration_seconds_count{model="mnist"}',
        'neuroserve_batch_size_bucket{le="1.0",model="mnist"}',
        'neuroserve_queue_depth{model="mnist"}',
        'neuroserve_model_ready{model="mnist",version="1"} 1.0',
        'neuroserve_http_requests_total{method="POST",route="/v2/models/{model}/infer",status="400"}',
    ):
        assert series in text, series


def test_openapi_documents_every_endpoint_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{model}",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
        "/v1/image-classification",
        "/metrics",
    ):
        assert path in paths, path
    body = paths["/v1/image-classification"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert body["application/json"]["schema"]["examples"][0]["images"]
    assert paths["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert client.get("/docs").status_code == 200


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    from service.config import Settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`NEUROSERVE_{name.upper()}`" in readme, name


def test_text_models_are_warmed_at_every_length_bucket(client: TestClient) -> None:
    served = client.app.state.registry.get("sentiment")
    assert served.warmed_lengths == served.spec.parameters["length_buckets"] == [16, 32, 64, 128, 256]
    assert served.warmed_batch_sizes == [1, 2, 4, 8, 16, 32, 64]
    assert client.app.state.registry.get("mnist").warmed_lengths == [1]  # no dynamic axis but the batch

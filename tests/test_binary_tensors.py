"""The Open Inference Protocol's binary tensor extension, checked with NVIDIA's own client
(tritonclient.http, which sends binary tensors by default) against a real server, and by hand."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.harness import neuroserve

pytestmark = pytest.mark.slow
INFER = "/v2/models/mnist/infer"


def binary_body(header: dict, *arrays: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    body = head + b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays)
    return body, {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}


def test_binary_request_and_response_match_json(client: TestClient, mnist_test) -> None:
    images, labels = mnist_test
    x = (images[:8].astype(np.float32) / 255.0).reshape(8, 1, 28, 28)
    as_json = client.post(
        INFER,
        json={"inputs": [{"name": "image", "shape": [8, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]},
    ).json()
    header = {
        "inputs": [
            {"name": "image", "shape": [8, 1, 28, 28], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    body, headers = binary_body(header, x)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    size = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:size])
    (output,) = meta["outputs"]
    assert output["shape"] == [8, 10] and output["parameters"]["binary_data_size"] == 8 * 10 * 4
    probs = np.frombuffer(response.content[size:], dtype="<f4").reshape(8, 10)
    np.testing.assert_allclose(probs, np.array(as_json["outputs"][0]["data"]).reshape(8, 10), atol=1e-6)
    assert (probs.argmax(1) == labels[:8]).mean() >= 0.85
    # Binary input, JSON output (binary_data_output not asked for).
    header.pop("outputs")
    body, headers = binary_body(header, x)
    plain = client.post(INFER, content=body, headers=headers)
    assert plain.headers["content-type"] == "application/json"
    np.testing.assert_allclose(np.array(plain.json()["outputs"][0]["data"]).reshape(8, 10), probs, atol=1e-6)


def test_binary_and_json_inputs_mix_in_one_request(client: TestClient) -> None:
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    header = {
        "inputs": [
            {"name": "input_ids", "shape": [2, 4], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
            {"name": "attention_mask", "shape": [2, 4], "datatype": "INT64", "data": mask.ravel().tolist()},
        ],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_body(header, ids)
    response = client.post("/v2/models/sentiment/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    size = int(response.headers["inference-header-content-length"])
    probs = np.frombuffer(response.content[size:], dtype="<f4").reshape(2, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "status", "error_type"),
    [
        ({"header_length": "999999"}, 400, "invalid_json"),
        ({"header_length": "abc"}, 400, "invalid_json"),
        ({"size": 3136 - 4}, 400, "invalid_tensor"),
        ({"size": 3136 + 4}, 400, "invalid_tensor"),
        ({"extra": b"\x00" * 8}, 400, "invalid_tensor"),
        ({"size": -1}, 400, "schema_error"),
        ({"data_too": True}, 400, "schema_error"),
    ],
)
def test_bad_binary_requests_get_clear_4xx(client: TestClient, change: dict, status: int, error_type: str) -> None:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    tensor = {
        "name": "image",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "parameters": {"binary_data_size": change.get("size", x.nbytes)},
    }
    if change.get("data_too"):
        tensor["data"] = [0.0] * 784
    body, headers = binary_body({"inputs": [tensor]}, x)
    body += change.get("extra", b"")
    if "header_length" in change:
        headers["inference-header-content-length"] = change["header_length"]
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type


def test_nvidia_triton_client_talks_to_neuroserve(mnist_test, tmp_path) -> None:
    import tritonclient.http as triton

    from tests.conftest import ROOT

    images, labels = mnist_test
    (tmp_path / "mnist").symlink_to(ROOT / "models" / "mnist")  # only the model it talks to: fast start
    with neuroserve(tmp_path, NEUROSERVE_INTRA_OP_THREADS="1") as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.is_server_ready() and client.is_model_ready("mnist")
        assert client.get_model_metadata("mnist")["inputs"][0]["name"] == "image"
        x = (images[:16].astype(np.float32) / 255.0).reshape(16, 1, 28, 28)
        for binary in (True, False):
            tensor = triton.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer("mnist", [tensor], outputs=[wanted], request_id="r1")
            probs = result.as_numpy("probabilities")
            assert probs.shape == (16, 10)
            assert (probs.argmax(1) == labels[:16]).mean() >= 0.9
            assert result.get_response()["id"] == "r1"
        client.close()
        server.stop_cleanly()


def test_binary_header_length_must_be_positive(client: TestClient) -> None:
    response = client.post(INFER, content=struct.pack("<f", 1.0), headers={"inference-header-content-length": "0"})
    assert (response.status_code, response.json()["error_type"]) == (400, "invalid_json")

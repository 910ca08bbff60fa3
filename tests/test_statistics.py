"""Per-model statistics in the shape of Triton's statistics extension: successes and failures with
their time, time queued, executions by batch size; for every serving version, one model or one
version; operators' figures, behind the metrics scope when keys are configured."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from service.api.auth import add_key
from service.errors import InferenceFailed
from tests.conftest import make_client, wait_ready


def mnist_stats(client: TestClient) -> dict:
    response = client.get("/v2/models/mnist/stats")
    assert response.status_code == 200, response.text
    (stat,) = response.json()["model_stats"]
    return stat


def infer(client: TestClient, rows: int) -> int:
    body = {"inputs": [{"name": "image", "shape": [rows, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784 * rows}]}
    return client.post("/v2/models/mnist/infer", json=body).status_code


def test_successes_rows_batches_and_times_add_up_per_model_version(client: TestClient) -> None:
    before = mnist_stats(client)
    assert [infer(client, rows) for rows in (1, 3, 5)] == [200, 200, 200]
    after = mnist_stats(client)
    assert (after["name"], after["version"]) == ("mnist", "1")
    done, was = after["inference_stats"], before["inference_stats"]
    assert done["success"]["count"] - was["success"]["count"] == 3
    assert done["success"]["ns"] > was["success"]["ns"]
    assert after["inference_count"] - before["inference_count"] == 9
    assert after["execution_count"] - before["execution_count"] == 3  # one at a time: a batch each
    assert done["queue"]["count"] - was["queue"]["count"] == 3
    assert done["compute_infer"]["count"] == after["execution_count"]
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    sizes = {b["batch_size"] for b in after["batch_stats"]}
    assert {1, 3, 5} <= sizes
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0


def test_a_failed_request_counts_as_a_failure(client: TestClient, monkeypatch) -> None:
    served = client.app.state.registry.get("mnist")

    async def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise InferenceFailed("the graph failed")

    before = mnist_stats(client)["inference_stats"]["fail"]["count"]
    monkeypatch.setattr(served.batcher, "submit", failing)
    assert infer(client, 1) == 500
    monkeypatch.undo()
    assert mnist_stats(client)["inference_stats"]["fail"]["count"] == before + 1


def test_every_version_one_model_or_one_version_and_unknowns_are_404(client: TestClient) -> None:
    everything = client.get("/v2/models/stats").json()["model_stats"]
    serving = {
        (s.name, str(s.version)) for st in client.app.state.registry.models.values() for s in st.versions.values()
    }
    assert {(s["name"], s["version"]) for s in everything} == serving
    assert {"mnist", "translation-en-fr", "digit-generator"} <= {s["name"] for s in everything}
    one = client.get("/v2/models/mnist/versions/1/stats").json()["model_stats"]
    assert [(s["name"], s["version"]) for s in one] == [("mnist", "1")]
    assert client.get("/v2/models/nope/stats").status_code == 404
    assert client.get("/v2/models/mnist/versions/7/stats").status_code == 404
    assert "statistics" in client.get("/v2").json()["extensions"]
    # A decoding model counts its decoder steps as executions, by rows.
    client.post("/v1/translation", json={"texts": ["Good morning!"]})
    (translation,) = client.get("/v2/models/translation-en-fr/stats").json()["model_stats"]
    assert translation["execution_count"] >= 3 and translation["inference_stats"]["success"]["count"] >= 1
    assert np.all([b["batch_size"] >= 1 for b in translation["batch_stats"]])


def test_statistics_need_the_metrics_scope_when_keys_are_configured(tmp_path) -> None:
    keys = tmp_path / "keys.json"
    app_key = add_key(keys, "app", ["infer"], None)
    ops_key = add_key(keys, "ops", ["metrics"], None)
    with make_client(api_keys_file=keys) as client:
        wait_ready(client)
        assert client.get("/v2/models/mnist/stats", headers={"x-api-key": app_key}).status_code == 403
        assert client.get("/v2/models/stats").status_code == 401
        assert client.get("/v2/models/stats", headers={"x-api-key": ops_key}).status_code == 200

"""Model repository: layout validation, clear errors naming the file, isolation of broken models."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from service.repository import scan
from tests.conftest import make_client, wait_loaded
from tests.onnx_models import model_json, write_model


def scan_one(root: Path):
    (entry,) = scan(root)
    return entry


def test_repository_scan_reads_good_model(tmp_path: Path) -> None:
    write_model(tmp_path, "double")
    entry = scan_one(tmp_path)
    assert entry.error is None
    assert entry.spec.name == "double"
    assert [v.version for v in entry.versions] == [1]


def test_repository_serves_newest_version_by_default_and_specific_on_request(tmp_path: Path) -> None:
    write_model(tmp_path, "m", version=1)
    write_model(tmp_path, "m", version=3)
    write_model(tmp_path, "m", version=2)
    assert [v.version for v in scan_one(tmp_path).versions] == [3]
    spec = model_json("m", version_policy={"specific": [1, 2]})
    (tmp_path / "m" / "model.json").write_text(json.dumps(spec))
    assert [v.version for v in scan_one(tmp_path).versions] == [1, 2]


@pytest.mark.parametrize(
    ("breakage", "file", "problem"),
    [
        ("missing_json", "model.json", "file is missing"),
        ("invalid_json", "model.json", "invalid JSON at line 1"),
        ("unknown_field", "model.json", "extra_thing"),
        ("wrong_name", "model.json", "does not match its folder"),
        ("bad_datatype", "model.json", "datatype"),
        ("no_batch_axis", "model.json", "first axis must be -1"),
        ("no_version", "broken", "no numbered version folder"),
        ("missing_onnx", "model.onnx", "file is missing"),
        ("sha_mismatch", "model.onnx", "sha256 differs"),
        ("bad_metadata", "metadata.json", "invalid JSON"),
    ],
)
def test_repository_scan_names_file_and_problem(tmp_path: Path, breakage: str, file: str, problem: str) -> None:
    model_dir = write_model(tmp_path, "broken")
    spec = model_json("broken")
    if breakage == "missing_json":
        (model_dir / "model.json").unlink()
    elif breakage == "invalid_json":
        (model_dir / "model.json").write_text("{not json")
    elif breakage == "unknown_field":
        (model_dir / "model.json").write_text(json.dumps({**spec, "extra_thing": 1}))
    elif breakage == "wrong_name":
        (model_dir / "model.json").write_text(json.dumps({**spec, "name": "other"}))
    elif breakage == "bad_datatype":
        spec["inputs"][0]["datatype"] = "FLOAT"
        (model_dir / "model.json").write_text(json.dumps(spec))
    elif breakage == "no_batch_axis":
        spec["inputs"][0]["shape"] = [1, 4]
        (model_dir / "model.json").write_text(json.dumps(spec))
    elif breakage == "no_version":
        for path in sorted((model_dir / "1").iterdir()):
            path.unlink()
        (model_dir / "1").rmdir()
    elif breakage == "missing_onnx":
        (model_dir / "1" / "model.onnx").unlink()
    elif breakage == "sha_mismatch":
        (model_dir / "1" / "model.onnx").write_bytes(b"tampered")
    elif breakage == "bad_metadata":
        (model_dir / "1" / "metadata.json").write_text("[")
    entry = scan_one(tmp_path)
    assert entry.error is not None
    message = entry.error.message
    assert file in message, message
    assert problem in message, message


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 4]}]}, "graph inputs are ['x']"),
        ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 4]}]}, "is FP32 in the graph, INT64"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 5]}]}, "axis 1 is 4 in the graph, 5"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4, 1]}]}, "rank 2 in the graph, 3"),
        ({"labels": ["a", "b"]}, "2 labels for an output of width 4"),
    ],
)
def test_registry_checks_graph_against_model_json(tmp_path: Path, change: dict, problem: str) -> None:
    write_model(tmp_path, "good")
    write_model(tmp_path, "bad", spec={**model_json("bad"), **change})
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        index = {row["name"]: row for row in client.get("/v2/models").json()}
        assert index["good"]["state"] == "READY"
        assert index["bad"]["state"] == "FAILED"
        assert problem in index["bad"]["reason"], index["bad"]["reason"]
        assert "model" in index["bad"]["reason"]  # names the file


def test_broken_model_does_not_stop_the_others(tmp_path: Path) -> None:
    write_model(tmp_path, "good")
    broken = write_model(tmp_path, "corrupt", with_sha=False)
    (broken / "1" / "model.onnx").write_bytes(b"\x08\x01garbage that is not a protobuf graph")
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)  # ready: every model was tried and one serves
        ready = client.get("/v2/health/ready").json()
        assert ready["models"] == {"corrupt": "FAILED", "good": "READY"}
        response = client.get("/v2/models/corrupt/ready")
        assert response.status_code == 503
        assert response.json()["error_type"] == "model_not_ready"
        assert "onnxruntime cannot load the graph" in response.json()["error"]
        infer = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        failed = client.post("/v2/models/corrupt/infer", json=infer)
        assert failed.status_code == 503
        assert failed.json()["error_type"] == "model_not_ready"
        ok = client.post("/v2/models/good/infer", json=infer)
        assert ok.status_code == 200
        assert ok.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]


def test_require_all_models_keeps_server_unready_when_one_fails(tmp_path: Path) -> None:
    write_model(tmp_path, "good")
    (tmp_path / "empty").mkdir()
    with make_client(repository=tmp_path, require_all_models=True) as client:
        registry = client.app.state.registry
        deadline = time.monotonic() + 30
        while not registry.loading_done.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        response = client.get("/v2/health/ready")
        assert response.status_code == 503
        assert response.json()["models"] == {"empty": "FAILED", "good": "READY"}


def test_missing_repository_is_reported_not_ready(tmp_path: Path) -> None:
    with make_client(repository=tmp_path / "nowhere") as client:
        assert client.get("/v2/health/live").status_code == 200
        response = client.get("/v2/health/ready")
        assert response.status_code == 503
        assert "does not exist" in response.json()["error"]


def test_every_served_batch_size_is_warmed_before_ready(tmp_path: Path) -> None:
    write_model(tmp_path, "double")
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        served = client.app.state.registry.get("double")
        assert served.max_batch_size == 8
        assert served.warmed_batch_sizes == [1, 2, 4, 8]
        data = np.arange(12, dtype=np.float32)
        body = {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": data.tolist()}]}
        response = client.post("/v2/models/double/infer", json=body)
        assert response.json()["outputs"][0]["data"] == (data * 2).tolist()
        assert response.headers["x-batch-size"] == "3"

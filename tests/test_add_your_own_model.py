"""The README's "Add your own model", done as it says: its model.json files (read from the README)
written beside an existing model in a copy of the repository, the server started on it, then
called on v2 and on the task endpoint; the existing model still answers requests that name none."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from bench.harness import neuroserve
from service.api.schemas import SEVEN_PNG_BASE64
from tests.conftest import ROOT
from tests.onnx_models import scale_model

pytestmark = pytest.mark.slow


def readme_model_json(marker: str) -> dict:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- model.json: {marker} -->\n```json\n(.*?)\n```", readme, flags=re.S)
    assert found, f"README has no model.json block marked {marker!r}"
    return json.loads(found.group(1))


def graph_for(spec: dict, path: Path) -> None:
    """An ONNX graph with the tensors ``spec`` declares: ``scores`` = each channel's mean."""
    image, scores = spec["inputs"][0], spec["outputs"][0]
    node = helper.make_node("ReduceMean", [image["name"]], [scores["name"]], axes=[2, 3], keepdims=0)
    graph = helper.make_graph(
        [node],
        "colours",
        [helper.make_tensor_value_info(image["name"], TensorProto.FLOAT, ["batch", *image["shape"][1:]])],
        [helper.make_tensor_value_info(scores["name"], TensorProto.FLOAT, ["batch", *scores["shape"][1:]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def test_add_your_own_model_as_the_readme_says(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "mnist", repo / "mnist")
    doubler, colours = readme_model_json("v2 only"), readme_model_json("task endpoint")
    for spec in (doubler, colours):
        (repo / spec["name"]).mkdir()
        (repo / spec["name"] / "model.json").write_text(json.dumps(spec))
    scale_model(repo / "doubler" / "1" / "model.onnx", width=4, factor=2.0)
    graph_for(colours, repo / "colours" / "1" / "model.onnx")

    with neuroserve(repo) as server:
        status, index, _ = server.request("GET", "/v2/models")
        assert status == 200 and {row["name"]: row["state"] for row in index} == {
            "colours": "READY",
            "doubler": "READY",
            "mnist": "READY",
        }
        tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
        status, body, _ = server.request("POST", "/v2/models/doubler/infer", {"inputs": [tensor]})
        assert status == 200 and body["outputs"][0]["data"] == [2, 4, 6, 8]

        buffer = io.BytesIO()
        Image.new("RGB", (50, 40), (0, 200, 0)).save(buffer, "PNG")
        photo = base64.b64encode(buffer.getvalue()).decode()
        status, body, _ = server.request("POST", "/v1/image-classification", {"images": [photo], "model": "colours"})
        assert status == 200 and body["model"] == "colours", body
        assert body["predictions"][0][0]["label"] == "green"
        mean, std = np.array(colours["parameters"]["mean"]), np.array(colours["parameters"]["std"])
        expected = (np.array([0, 200 / 255, 0]) - mean) / std
        assert {p["label"]: p["score"] for p in body["predictions"][0]} == pytest.approx(
            dict(zip(colours["labels"], expected.tolist(), strict=True)), abs=1e-4
        )

        # The model already there still answers requests that name none.
        status, body, _ = server.request("POST", "/v1/image-classification", {"images": [SEVEN_PNG_BASE64]})
        assert status == 200 and body["model"] == "mnist" and body["predictions"][0][0]["label"] == "7"

"""Tiny ONNX graphs and repository folders built in tests, so repository and serving behaviour can
be checked without the trained models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.repository import sha256_file


def scale_model(
    path: Path, width: int = 4, factor: float = 2.0, input_name: str = "x", elem_type: int = TensorProto.FLOAT
) -> None:
    """y = x * factor, input [batch, width]."""
    const = numpy_helper.from_array(
        np.array(factor, dtype=np.float32 if elem_type == TensorProto.FLOAT else np.float64), "factor"
    )
    graph = helper.make_graph(
        [helper.make_node("Mul", [input_name, "factor"], ["y"])],
        "scale",
        [helper.make_tensor_value_info(input_name, elem_type, ["batch", width])],
        [helper.make_tensor_value_info("y", elem_type, ["batch", width])],
        initializer=[const],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def slow_model(path: Path, width: int = 256, layers: int = 40) -> None:
    """A chain of MatMul+Tanh: heavy enough per row that queues build up under concurrent load."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def model_json(name: str, width: int = 4, **extra) -> dict:
    spec = {
        "name": name,
        "task": "none",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, width]}],
        "max_batch_size": 8,
    }
    spec.update(extra)
    return spec


def write_model(
    root: Path,
    name: str,
    *,
    version: int = 1,
    spec: dict | None = None,
    width: int = 4,
    factor: float = 2.0,
    slow: bool = False,
    with_sha: bool = True,
) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps(spec if spec is not None else model_json(name, width)))
    onnx_path = model_dir / str(version) / "model.onnx"
    if slow:
        slow_model(onnx_path, width)
    else:
        scale_model(onnx_path, width, factor)
    meta = {"metrics": {"note": "test model"}}
    if with_sha:
        meta["sha256"] = sha256_file(onnx_path)
    (onnx_path.parent / "metadata.json").write_text(json.dumps(meta))
    return model_dir

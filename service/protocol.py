"""Open Inference Protocol (KServe v2) JSON tensors: request parsing and response building.

Parsing is hand-written over orjson rather than a pydantic model: a tensor is a long list of
numbers and validating it element by element in Python would cost more than the inference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidJSON, InvalidTensor, SchemaError
from service.repository import TensorSpec
from service.runtime import V2_TO_NUMPY


def parse_json(body: bytes) -> Any:
    if not body:
        raise InvalidJSON("request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None


def _tensor(raw: Any, index: int, spec: TensorSpec | None, batched: bool) -> np.ndarray:
    if not isinstance(raw, dict):
        raise SchemaError(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = raw.get("name")
    shape, datatype, data = raw.get("shape"), raw.get("datatype"), raw.get("data")
    if spec is None:
        raise InvalidTensor(f"inputs[{index}]: the model has no input named {name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SchemaError(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype not in V2_TO_NUMPY:
        raise SchemaError(f"input {name!r}: datatype {datatype!r} is not one of {sorted(V2_TO_NUMPY)}")
    if datatype != spec.datatype:
        raise InvalidTensor(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
    if data is None:
        raise SchemaError(f"input {name!r}: 'data' is missing (binary tensors are not supported)")
    if len(shape) != len(spec.shape):
        raise InvalidTensor(
            f"input {name!r}: shape {shape} has rank {len(shape)}, the model expects {len(spec.shape)} ({spec.shape})"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want != -1 and got != want:
            raise InvalidTensor(f"input {name!r}: axis {axis} is {got}, the model expects {want} ({spec.shape})")
    if batched and shape[0] == 0:
        raise InvalidTensor(f"input {name!r}: batch of size 0")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are caught below
            array = np.asarray(data, dtype=V2_TO_NUMPY[datatype])
    except (ValueError, TypeError, OverflowError):
        raise InvalidTensor(f"input {name!r}: data must be {datatype} numbers in a flat or nested list") from None
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidTensor(f"input {name!r}: {array.size} values for shape {shape} ({expected} expected)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidTensor(f"input {name!r}: data contains NaN or infinity (or values out of {datatype} range)")
    return array.reshape(shape)


def parse_infer_request(
    payload: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], batched: bool
) -> tuple[dict[str, np.ndarray], list[str], Any]:
    """Validate a v2 request against the model: returns (feeds, requested output names, id)."""
    if not isinstance(payload, dict):
        raise SchemaError("request body must be a JSON object with an 'inputs' list")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise SchemaError("'inputs' must be a non-empty list of tensors")
    by_name = {t.name: t for t in inputs}
    feeds: dict[str, np.ndarray] = {}
    for index, raw in enumerate(raw_inputs):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            raise SchemaError(f"inputs[{index}] must be an object with a string 'name'")
        if name in feeds:
            raise InvalidTensor(f"input {name!r} is given twice")
        feeds[name] = _tensor(raw, index, by_name.get(name), batched)
    missing = sorted(set(by_name) - set(feeds))
    if missing:
        raise InvalidTensor(f"missing inputs {missing}; the model takes {sorted(by_name)}")
    wanted = [t.name for t in outputs]
    raw_outputs = payload.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or not all(isinstance(o, dict) for o in raw_outputs):
            raise SchemaError("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in raw_outputs]
        unknown = [n for n in names if not isinstance(n, str) or n not in wanted]
        if unknown:
            raise InvalidTensor(f"unknown outputs {unknown}; the model gives {wanted}")
        wanted = names
    return feeds, wanted, payload.get("id")


def infer_response(
    model: str,
    version: int,
    outputs: dict[str, np.ndarray],
    wanted: list[str],
    datatypes: dict[str, str],
    request_id: Any = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = [
        {
            "name": name,
            "datatype": datatypes[name],
            "shape": list(outputs[name].shape),
            "data": np.ascontiguousarray(outputs[name]).ravel(),
        }
        for name in wanted
    ]
    return body

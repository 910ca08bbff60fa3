"""Open Inference Protocol (KServe v2) JSON tensors: request parsing and response building.

Parsing is hand-written over orjson rather than a pydantic model: a tensor is a long list of
numbers and validating it element by element in Python would cost more than the inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidJSON, InvalidTensor, SchemaError, TooManyItems
from service.repository import TensorSpec
from service.runtime import V2_TO_NUMPY

# Every datatype of the protocol's table; a model takes some of them (V2_TO_NUMPY's).
PROTOCOL_DATATYPES = frozenset(
    ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES")
)


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_OR_32_BOMS = (b"\x00\x00\xfe\xff", b"\xff\xfe", b"\xfe\xff")


def without_bom(body: bytes) -> bytes:
    """``body`` without one leading UTF-8 byte-order mark: RFC 8259 lets a parser ignore it, and
    Windows and .NET clients send one (orjson refuses it: it was a 400 invalid_json)."""
    return body[len(_UTF8_BOM) :] if body.startswith(_UTF8_BOM) else body


def parse_json(body: bytes) -> Any:
    body = without_bom(body)
    if not body:
        raise InvalidJSON("request body is empty; expected a JSON object")
    if body.startswith(_UTF8_BOM):
        raise InvalidJSON("request body starts with more than one byte-order mark; send at most one")
    if body.startswith(_UTF16_OR_32_BOMS):
        raise InvalidJSON("request body is UTF-16 or UTF-32 (it starts with that byte-order mark); send JSON as UTF-8")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None


class _BinaryReader:
    """Consumes the bytes after the JSON header, tensor by tensor, in the order of ``inputs``."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: Any, name: str) -> memoryview:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SchemaError(f"input {name!r}: parameters.binary_data_size must be a non-negative integer")
        if self.offset + size > len(self.data):
            raise InvalidTensor(f"input {name!r}: binary_data_size {size} runs past the end of the request body")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise InvalidTensor(f"{len(self.data) - self.offset} bytes after the last binary tensor belong to no input")


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """Triton's binary tensor extension: the first ``Inference-Header-Content-Length`` bytes are the
    JSON header, the rest are the tensors' raw little-endian bytes."""
    if header_length is None:
        return body, b""
    if not header_length.isascii() or not header_length.isdigit():
        raise InvalidJSON(f"Inference-Header-Content-Length {header_length!r} is not a number of bytes")
    size = int(header_length)
    if not 0 < size <= len(body):
        raise InvalidJSON(f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes")
    return body[:size], body[size:]


def check_bounds(name: str, array: np.ndarray, spec: TensorSpec, batched: bool) -> None:
    """What the graph can take beyond its declared shape: no empty axis, dynamic axes within the
    model's ``max_shape``, values within its ``value_range``. Checked per request, before it is
    queued: a value the graph cannot take would fail every request of the batch it joined."""
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if got == 0:
            raise InvalidTensor(f"input {name!r}: axis {axis} is empty ({list(array.shape)})")
        limit = spec.max_shape[axis] if spec.max_shape is not None else -1
        if want == -1 and limit > 0 and got > limit and not (batched and axis == 0):
            raise InvalidTensor(f"input {name!r}: axis {axis} is {got}, the model takes at most {limit}")
    if spec.value_range is not None and array.size:
        low, high = spec.value_range
        least, most = array.min(), array.max()
        if least < low or most > high:
            bad = least if least < low else most
            raise InvalidTensor(f"input {name!r}: value {bad.item()} is out of the model's range [{low:g}, {high:g}]")


def _json_array(name: str, data: Any, datatype: str, dtype: np.dtype) -> np.ndarray:
    """JSON numbers as ``dtype``, refusing what would change them: a fraction for an integer
    tensor (5.7 is not 5), a boolean for a number, a number for a boolean."""
    if type(data) is list and dtype.kind == "f":
        # The usual request: a flat list of numbers for a float tensor. The element types are
        # read in C (a Python loop over 784 values took 4 % of the event loop at 64 clients).
        kinds = set(map(type, data))
        if kinds <= _FLOAT_KINDS and data:
            with np.errstate(over="ignore"):  # an overflow becomes infinity, refused by the caller
                return np.array(data, dtype=dtype)
        if bool in kinds:
            raise InvalidTensor(f"input {name!r}: {datatype} data must be numbers, not booleans")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are caught below
            given = np.asarray(data)
            if given.dtype.kind == "f" and dtype.kind in "iu" and not np.array_equal(given, np.trunc(given)):
                raise InvalidTensor(f"input {name!r}: {datatype} data has fractional values")
            if (given.dtype.kind == "b") != (dtype.kind == "b") and given.size:
                raise InvalidTensor(
                    f"input {name!r}: {datatype} data must be {'booleans' if dtype.kind == 'b' else 'numbers'}"
                )
            if given.dtype.kind not in "biuf" and given.size:
                raise ValueError(given.dtype)
            # numpy reads [true, 2] as [1, 2]: every innermost list is checked for booleans.
            if dtype.kind != "b" and given.ndim >= 1 and given.size and _has_bool(data, given.ndim):
                raise InvalidTensor(f"input {name!r}: {datatype} data must be numbers, not booleans")
            if dtype.kind in "iu" and given.size:
                info = np.iinfo(dtype)
                # Against floats, the bounds as floats: float(2**63 - 1) is 2**63, which passed a
                # "> max" test and wrapped to -2**63 in the cast.
                high = info.max if given.dtype.kind != "f" else float(info.max) + 1.0
                # The JSON parser reads an integer beyond 64 bits as a float: -2**63 - 1 arrived as
                # -2.0**63, in range, and was served as -2**63. Past 2**53 a float names no one integer.
                if given.dtype.kind == "f" and info.bits > 53 and np.abs(given).max() >= 2.0**53:
                    raise InvalidTensor(
                        f"input {name!r}: values out of the {datatype} range as written: from 2**53 on, send "
                        "exact integers (a float, or an integer past 64 bits, names no one integer)"
                    )
                if given.min() < info.min or (given.max() >= high if given.dtype.kind == "f" else given.max() > high):
                    raise InvalidTensor(f"input {name!r}: values out of the {datatype} range")
            return given.astype(dtype) if given.size else np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidTensor(f"input {name!r}: data must be {datatype} numbers in a flat or nested list") from None


_FLOAT_KINDS = frozenset((float, int))


def _has_bool(data: Any, depth: int) -> bool:
    """Whether a list nested ``depth`` deep (as numpy read it: regular) holds a boolean."""
    if depth <= 1:
        return bool in set(map(type, data))
    return any(_has_bool(part, depth - 1) for part in data)


def _tensor(
    raw: Any, index: int, spec: TensorSpec | None, batched: bool, binary: _BinaryReader, max_elements: int
) -> np.ndarray:
    if not isinstance(raw, dict):
        raise SchemaError(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = raw.get("name")
    shape, datatype, data = raw.get("shape"), raw.get("datatype"), raw.get("data")
    if spec is None:
        raise InvalidTensor(f"inputs[{index}]: the model has no input named {name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SchemaError(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype not in PROTOCOL_DATATYPES:
        raise SchemaError(f"input {name!r}: datatype {datatype!r} is not one of {sorted(PROTOCOL_DATATYPES)}")
    if datatype != spec.datatype:
        raise InvalidTensor(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
    parameters = raw.get("parameters") or {}
    binary_size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if data is None and binary_size is None:
        raise SchemaError(f"input {name!r}: 'data' is missing (or parameters.binary_data_size for binary data)")
    if data is not None and binary_size is not None:
        raise SchemaError(f"input {name!r}: give either 'data' or parameters.binary_data_size, not both")
    if len(shape) != len(spec.shape):
        raise InvalidTensor(
            f"input {name!r}: shape {shape} has rank {len(shape)}, the model expects {len(spec.shape)} ({spec.shape})"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want != -1 and got != want:
            raise InvalidTensor(f"input {name!r}: axis {axis} is {got}, the model expects {want} ({spec.shape})")
    if batched and shape[0] == 0:
        raise InvalidTensor(f"input {name!r}: batch of size 0")
    expected = math.prod(shape)
    if expected > max_elements:
        raise TooManyItems(f"input {name!r}: {expected} values; at most {max_elements} per tensor")
    dtype = V2_TO_NUMPY[datatype]
    if binary_size is not None:
        chunk = binary.take(binary_size, name)
        if len(chunk) != expected * dtype.itemsize:
            raise InvalidTensor(
                f"input {name!r}: {len(chunk)} bytes for shape {shape} of {datatype} "
                f"({expected * dtype.itemsize} expected)"
            )
        array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype)  # a copy, native order
    else:
        array = _json_array(name, data, datatype, dtype)
    if array.size != expected:
        raise InvalidTensor(f"input {name!r}: {array.size} values for shape {shape} ({expected} expected)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidTensor(f"input {name!r}: data contains NaN or infinity (or values out of {datatype} range)")
    array = array.reshape(shape)
    check_bounds(name, array, spec, batched)
    return array


@dataclass(frozen=True)
class InferRequest:
    feeds: dict[str, np.ndarray]
    outputs: list[str]  # requested output names, in order
    binary_outputs: frozenset[str]  # outputs to return as raw bytes after the JSON header
    id: Any = None


def _wants_binary(parameters: Any, default: bool) -> bool:
    if isinstance(parameters, dict) and "binary_data" in parameters:
        return bool(parameters["binary_data"])
    return default


def parse_infer_request(
    payload: Any,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batched: bool,
    binary: bytes = b"",
    max_elements: int = 1 << 22,
) -> InferRequest:
    """Validate a v2 request (JSON tensors, or binary ones after the JSON header) against the model."""
    if not isinstance(payload, dict):
        raise SchemaError("request body must be a JSON object with an 'inputs' list")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise SchemaError(f"'id' must be a string (it is echoed in the response), not {type(request_id).__name__}")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise SchemaError("'inputs' must be a non-empty list of tensors")
    by_name = {t.name: t for t in inputs}
    reader = _BinaryReader(binary)
    feeds: dict[str, np.ndarray] = {}
    for index, raw in enumerate(raw_inputs):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            raise SchemaError(f"inputs[{index}] must be an object with a string 'name'")
        if name in feeds:
            raise InvalidTensor(f"input {name!r} is given twice")
        feeds[name] = _tensor(raw, index, by_name.get(name), batched, reader, max_elements)
    reader.finish()
    missing = sorted(set(by_name) - set(feeds))
    if missing:
        raise InvalidTensor(f"missing inputs {missing}; the model takes {sorted(by_name)}")
    parameters = payload.get("parameters")
    binary_default = isinstance(parameters, dict) and bool(parameters.get("binary_data_output", False))
    wanted = [t.name for t in outputs]
    binary_outputs = set(wanted) if binary_default else set()
    raw_outputs = payload.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or not all(isinstance(o, dict) for o in raw_outputs):
            raise SchemaError("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in raw_outputs]
        unknown = [n for n in names if not isinstance(n, str) or n not in wanted]
        if unknown:
            raise InvalidTensor(f"unknown outputs {unknown}; the model gives {wanted}")
        wanted = names
        binary_outputs = {o["name"] for o in raw_outputs if _wants_binary(o.get("parameters"), binary_default)}
    return InferRequest(feeds, wanted, frozenset(binary_outputs), request_id)


def infer_response(
    model: str, version: int, outputs: dict[str, np.ndarray], request: InferRequest, datatypes: dict[str, str]
) -> tuple[dict[str, Any], list[bytes]]:
    """The v2 response body and, for outputs asked for as binary, their raw little-endian bytes in order."""
    body: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        body["id"] = request.id
    tensors, blobs = [], []
    for name in request.outputs:
        array = np.ascontiguousarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
        if name in request.binary_outputs:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # JSON has no NaN or infinity (orjson writes null, with a 200): inputs far outside the
            # model's range (3e38 into MNIST) overflow. The raw values still go as binary data.
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidTensor(
                    f"output {name!r} is not finite (NaN or infinity) for these inputs, and JSON cannot carry "
                    "that: the inputs are far outside what the model takes (ask for the output as binary "
                    "data to get the raw values)"
                )
            tensor["data"] = array.ravel()
        tensors.append(tensor)
    body["outputs"] = tensors
    return body, blobs

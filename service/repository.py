"""The model repository on disk, in Triton's layout::

    models/<name>/model.json            what the model is: task, tensors, batching, labels
    models/<name>/<version>/model.onnx  the graph
    models/<name>/<version>/metadata.json  metrics, dataset, training command, sha256

Scanning checks the folder and ``model.json`` without loading any graph; :func:`check_graph`
compares a loaded graph with its ``model.json``. Every problem is a :class:`ModelLoadError` that
names the file and what is wrong with it, and it is kept per model so that one broken model does
not stop the others.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelLoadError, describe_validation
from service.runtime import V2_TO_NUMPY, TensorInfo

V2_ONLY = "none"  # the task of a model served on the Open Inference Protocol only

Datatype = Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
assert set(Datatype.__args__) == set(V2_TO_NUMPY)  # type: ignore[attr-defined]


# A version in a path: what the folder is called, no sign, padding or non-ASCII digit.
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
MAX_BATCH_SIZE = 65_536


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a dynamic axis; the first is the batch axis when batching")
    max_shape: list[int] | None = Field(
        None,
        description="Largest size a request may give each dynamic axis (same rank as shape; -1: no bound). "
        "A sequence axis beyond what the graph was built for would fail the whole batch it joined.",
    )
    value_range: tuple[float, float] | None = Field(
        None,
        description="Smallest and largest value a request may send (inclusive): the rows of an embedding "
        "table, a vocabulary's token ids. Out of range would fail the whole batch in onnxruntime.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> TensorSpec:
        if self.max_shape is not None and len(self.max_shape) != len(self.shape):
            raise ValueError(f"max_shape {self.max_shape} must have the rank of shape {self.shape}")
        if self.value_range is not None and self.value_range[0] > self.value_range[1]:
            raise ValueError(f"value_range {list(self.value_range)} is empty")
        return self

    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.datatype, tuple(self.shape))


class DynamicBatchingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    timeout_ms: float | None = Field(None, gt=0)


class VersionPolicy(BaseModel):
    """Triton's policies: the newest ``latest`` versions (default 1), or a ``specific`` list."""

    model_config = ConfigDict(extra="forbid")
    latest: int | None = Field(None, ge=1)
    specific: list[int] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> VersionPolicy:
        if self.latest is not None and self.specific is not None:
            raise ValueError("give either 'latest' or 'specific', not both")
        return self

    def select(self, available: list[int]) -> list[int]:
        if self.specific is not None:
            return sorted(v for v in available if v in set(self.specific))
        return sorted(available)[-(self.latest or 1) :]


class ModelSpec(BaseModel):
    """The contents of ``model.json``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: str = Field(description="The registered task that serves it (e.g. image-classification); 'none' for v2 only")
    default: bool = Field(
        False,
        description="The model that answers its task's requests that name none (one per task, or per "
        "task scope such as a sentiment model's language)",
    )
    description: str = ""
    platform: Literal["onnx_onnxv1", "onnxruntime"] = Field(
        "onnx_onnxv1", description="The protocol's platform name (onnx_onnxv1); 'onnxruntime' is read as the same"
    )
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    # Warm-up runs a batch of this size: 10^8 rows of an MNIST image asked for 314 GB (a config
    # override did, and the kernel killed the server).
    max_batch_size: int = Field(
        0, ge=0, le=MAX_BATCH_SIZE, description="0: the model takes no batch axis and is never batched"
    )
    dynamic_batching: DynamicBatchingSpec = Field(default_factory=DynamicBatchingSpec)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    labels: list[str] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _batch_axis(self) -> ModelSpec:
        if self.max_batch_size > 0:
            for t in (*self.inputs, *self.outputs):
                if not t.shape or t.shape[0] != -1:
                    raise ValueError(f"tensor {t.name!r}: with max_batch_size > 0 the first axis must be -1 (batch)")
        return self


@dataclass
class VersionEntry:
    version: int
    path: Path  # the version folder
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"


@dataclass
class ModelEntry:
    name: str
    path: Path
    spec: ModelSpec | None = None
    versions: list[VersionEntry] = field(default_factory=list)  # those the policy serves
    error: ModelLoadError | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(path, "file is missing") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(path, f"cannot be read: {exc}") from None


def load_spec(model_dir: Path, override: dict[str, Any] | None = None) -> ModelSpec:
    """``model_dir/model.json``; ``override``: fields that replace the file's (a load request's
    configuration, Triton's ``config`` parameter)."""
    path = model_dir / "model.json"
    raw = _read_json(path)
    if override:
        if not isinstance(raw, dict):
            raise ModelLoadError(path, "must hold a JSON object")
        raw = {**raw, **override}
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(path, describe_validation(exc.errors())) from None
    if spec.name != model_dir.name:
        raise ModelLoadError(path, f"name {spec.name!r} does not match its folder {model_dir.name!r}")
    return spec


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_version(name: str) -> bool:
    """A version folder's name: ASCII digits, no sign or leading zero (str.isdigit() takes "²")."""
    return VERSION_PATTERN.fullmatch(name) is not None


def _scan_versions(model_dir: Path, spec: ModelSpec) -> list[VersionEntry]:
    found = []
    for child in model_dir.iterdir():
        if child.is_dir() and is_version(child.name):
            found.append(int(child.name))
    if not found:
        raise ModelLoadError(model_dir, "no numbered version folder (expected e.g. 1/model.onnx)")
    chosen = spec.version_policy.select(found)
    if not chosen:
        raise ModelLoadError(model_dir / "model.json", f"version_policy selects none of the versions {sorted(found)}")
    entries = []
    for version in chosen:
        vdir = model_dir / str(version)
        onnx_path = vdir / "model.onnx"
        if not onnx_path.is_file():
            raise ModelLoadError(onnx_path, "file is missing")
        meta_path = vdir / "metadata.json"
        metadata = _read_json(meta_path) if meta_path.exists() else {}
        if not isinstance(metadata, dict):
            raise ModelLoadError(meta_path, "must hold a JSON object")
        expected = metadata.get("sha256")
        if expected and sha256_file(onnx_path) != expected:
            raise ModelLoadError(onnx_path, "sha256 differs from metadata.json (corrupt or replaced artefact)")
        entries.append(VersionEntry(version, vdir, metadata))
    return entries


def scan(root: Path) -> list[ModelEntry]:
    """Every model folder under ``root``; a broken one carries its error instead of a spec."""
    if not root.is_dir():
        raise ModelLoadError(root, "model repository folder does not exist")
    return [scan_model(model_dir) for model_dir in model_dirs(root)]


def model_dirs(root: Path) -> list[Path]:
    """The model folders of a repository, by name (hidden ones skipped)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_model(model_dir: Path, override: dict[str, Any] | None = None) -> ModelEntry:
    """One model folder; a broken one carries its error instead of a spec."""
    entry = ModelEntry(model_dir.name, model_dir)
    try:
        entry.spec = load_spec(model_dir, override)
        entry.versions = _scan_versions(model_dir, entry.spec)
    except ModelLoadError as exc:
        entry.error = exc
    return entry


def fingerprint(model_dir: Path) -> tuple | None:
    """What a model folder holds, as far as polling can tell: model.json and every file of its
    numbered version folders, with sizes and modification times (None: the folder is gone)."""
    try:
        files = [model_dir / "model.json"]
        for child in model_dir.iterdir():
            if child.is_dir() and is_version(child.name):
                files.extend(sorted(f for f in child.iterdir() if f.is_file()))
        out = []
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            out.append((str(f.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_tensors(kind: str, declared: list[TensorSpec], actual: list[TensorInfo], path: Path) -> None:
    by_name = {t.name: t for t in actual}
    declared_names = [t.name for t in declared]
    if sorted(declared_names) != sorted(by_name):
        raise ModelLoadError(path, f"graph {kind} are {sorted(by_name)}, model.json declares {sorted(declared_names)}")
    for spec in declared:
        graph = by_name[spec.name]
        if spec.datatype != graph.datatype:
            raise ModelLoadError(
                path, f"{kind[:-1]} {spec.name!r} is {graph.datatype} in the graph, {spec.datatype} in model.json"
            )
        if len(spec.shape) != len(graph.shape):
            raise ModelLoadError(
                path,
                f"{kind[:-1]} {spec.name!r} has rank {len(graph.shape)} in the graph, {len(spec.shape)} in model.json",
            )
        for axis, (want, have) in enumerate(zip(spec.shape, graph.shape, strict=True)):
            if have != -1 and want != have:
                raise ModelLoadError(
                    path, f"{kind[:-1]} {spec.name!r} axis {axis} is {have} in the graph, {want} in model.json"
                )


def check_graph(spec: ModelSpec, onnx_path: Path, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
    """The loaded graph must have the tensors ``model.json`` declares, with compatible shapes."""
    _check_tensors("inputs", spec.inputs, inputs, onnx_path)
    _check_tensors("outputs", spec.outputs, outputs, onnx_path)

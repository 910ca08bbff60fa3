"""Pieces every training script shares: seeding, ONNX export with a parity check, and writing
the model repository layout (``models/<name>/model.json`` + ``models/<name>/<version>/``).

Kept free of task knowledge so that each ``training/<task>.py`` stays a short, readable script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import random
import shlex
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch

from service.repository import sha256_file

C = typing.TypeVar("C")


def _argument(annotation: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field of this type: bool, Literal, ``X | None``, ``tuple[X, ...]``,
    or anything callable on a string (int, float, str, Path)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (annotation,) = [a for a in args if a is not type(None)]
        return _argument(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin is tuple:
        return {"type": args[0], "nargs": "+"}
    return {"type": annotation}


def config_parser(config: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with one ``--field-name`` per field of the ``config`` dataclass: its type from the
    annotation, its default from the field, its help (and extra ``add_argument`` keywords) from the
    field's metadata: ``field(default=..., metadata={"help": ...})``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kwargs = {**_argument(hints[f.name]), "default": f.default, **f.metadata}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def parse_config(config: type[C], argv: list[str] | None, description: str, prog: str | None = None) -> C:
    """``config`` filled from the command line (see :func:`config_parser`)."""
    args = vars(config_parser(config, description, prog).parse_args(argv))
    return config(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def command_line(module: str, argv: list[str]) -> str:
    """The command that produced an artefact, as a user would retype it."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *argv])


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = 17,
) -> None:
    """Export with the TorchScript exporter: it gives stable, small graphs with named dynamic axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is the legacy one; it is chosen on purpose (above).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        # The tracer warns where an LSTM compares sizes; the test suite turns warnings into errors, and
        # an error raised inside that comparison surfaces as a SystemError from torch.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            example_inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )


def half_embeddings(model: Any, min_elements: int = 100_000) -> int:
    """Embedding tables of ``model`` (an ``onnx.ModelProto``, changed in place) stored as float16: a
    float32 initializer of at least ``min_elements`` numbers read only by ``Gather`` nodes becomes
    float16, and each lookup's rows are cast back to float32, so that everything after the lookup
    computes as before (a cast of the whole table per call would cost more than the model). Returns
    how many tables were converted."""
    import onnx
    from onnx import numpy_helper

    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    converted, nodes = set(), []
    for init in model.graph.initializer:
        users = readers.get(init.name, [])
        big = init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements
        if big and users and all(n.op_type == "Gather" and n.input[0] == init.name for n in users):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
            converted.add(init.name)
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == "Gather" and node.input[0] in converted:
            rows = node.output[0]
            node.output[0] = rows + "/float16"
            nodes.append(onnx.helper.make_node("Cast", [node.output[0]], [rows], to=onnx.TensorProto.FLOAT))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(converted)


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: dict[str, torch.Tensor],
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Run the same batch (batch > 1) through torch and onnxruntime; raise if they disagree.

    Returns the largest absolute difference seen, which goes into the metadata.
    """
    first = next(iter(inputs.values()))
    if first.shape[0] < 2:
        raise ValueError("parity must be checked at batch > 1 to exercise the dynamic batch axis")
    model.eval()
    with torch.no_grad():
        expected = model(*[t.cpu() for t in inputs.values()])
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.cpu().numpy() for k, v in inputs.items()})
    worst = 0.0
    for want, have in zip(expected, got, strict=True):
        want_np = want.numpy()
        if want_np.shape != have.shape:
            raise AssertionError(f"onnx output shape {have.shape} != torch {want_np.shape}")
        worst = max(worst, float(np.max(np.abs(want_np - have))))
        if not np.allclose(want_np, have, atol=atol, rtol=rtol):
            raise AssertionError(f"onnxruntime disagrees with torch: max |diff| = {worst:.3g}")
    return worst


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights on the CPU, to keep the best checkpoint while training goes on."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_json(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``model.json`` through the service's own spec and task: what the server will load is checked
    here (the schema, the task's parameters, that the task can feed the declared tensors) and
    written as the spec model serialises it."""
    from service.repository import V2_ONLY, ModelSpec
    from service.tasks import TASKS

    spec = ModelSpec.model_validate(config)
    if spec.task != V2_ONLY:
        task = TASKS[spec.task]
        task.check(spec, task.parameters(spec))
    data = spec.model_dump(mode="json", exclude_unset=True)
    write_json(model_dir / "model.json", data)
    return data


def write_version_metadata(
    version_dir: Path, *, metrics: dict[str, Any], dataset: dict[str, Any], training: dict[str, Any], command: str
) -> dict[str, Any]:
    """``metadata.json`` beside ``model.onnx``: what the artefact is, how well it does, how it was made."""
    onnx_path = version_dir / "model.onnx"
    meta = {
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "sha256": sha256_file(onnx_path),
        "metrics": metrics,
        "dataset": dataset,
        "training": {**training, "command": command, "environment": environment()},
    }
    write_json(version_dir / "metadata.json", meta)
    return meta


def token_batches(lengths: list[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length (little padding), about ``batch_tokens`` each, shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest = max(longest, lengths[i])
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], lengths[i]
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches

"""Tiny ONNX graphs and repository folders built in tests, so repository and serving behaviour can
be checked without the trained models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.repository import sha256_file
from training import prefill_graph


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
    layers: int = 40,
    with_sha: bool = True,
) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps(spec if spec is not None else model_json(name, width)))
    onnx_path = model_dir / str(version) / "model.onnx"
    if slow:
        slow_model(onnx_path, width, layers)
    else:
        scale_model(onnx_path, width, factor)
    meta = {"metrics": {"note": "test model"}}
    if with_sha:
        meta["sha256"] = sha256_file(onnx_path)
    (onnx_path.parent / "metadata.json").write_text(json.dumps(meta))
    return model_dir


def bright_box_detector(path: Path, size: int = 64) -> None:
    """A stand-in detector with the real one's interface: ``images [B, 3, size, size]`` -> the box of
    the pixels whose red channel is above 0.9 (``boxes [B, 1, 4]`` in input pixels), score 1 when
    there are such pixels and 0 otherwise, class 0. Exact, so coordinate mapping can be tested."""
    idx = numpy_helper.from_array(np.arange(size, dtype=np.float32), "idx")
    big = numpy_helper.from_array(np.array(1e6, dtype=np.float32), "big")
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    thr = numpy_helper.from_array(np.array(0.9, dtype=np.float32), "thr")
    starts, ends, axes = (
        numpy_helper.from_array(np.array([v], dtype=np.int64), n) for v, n in ((0, "s0"), (1, "e1"), (1, "a1"))
    )
    n = helper.make_node
    nodes = [
        n("Slice", ["images", "s0", "e1", "a1"], ["red4"]),  # [B, 1, S, S]
        n("Squeeze", ["red4", "a1"], ["red"]),  # [B, S, S]
        n("Greater", ["red", "thr"], ["hot_b"]),
        n("Cast", ["hot_b"], ["hot"], to=TensorProto.FLOAT),
        n("ReduceMax", ["hot"], ["rows"], axes=[2], keepdims=0),  # [B, S]: row has a hot pixel
        n("ReduceMax", ["hot"], ["cols"], axes=[1], keepdims=0),
    ]
    for name in ("rows", "cols"):
        # first hot index: min over (idx if hot else big); last: max over (idx if hot else -1)
        nodes += [
            n("Sub", ["one", name], [f"{name}_cold"]),
            n("Mul", [f"{name}_cold", "big"], [f"{name}_pen"]),
            n("Add", ["idx", f"{name}_pen"], [f"{name}_lo_in"]),
            n("ReduceMin", [f"{name}_lo_in"], [f"{name}_lo"], axes=[1], keepdims=1),
            n("Mul", ["idx", name], [f"{name}_hi_in"]),
            n("ReduceMax", [f"{name}_hi_in"], [f"{name}_hi0"], axes=[1], keepdims=1),
            n("Add", [f"{name}_hi0", "one"], [f"{name}_hi"]),
        ]
    nodes += [
        n("Concat", ["cols_lo", "rows_lo", "cols_hi", "rows_hi"], ["flat"], axis=1),  # [B, 4]
        n("Unsqueeze", ["flat", "a1"], ["boxes"]),  # [B, 1, 4]
        n("ReduceMax", ["rows"], ["scores"], axes=[1], keepdims=1),  # [B, 1]
        n("Cast", ["scores"], ["scores_i"], to=TensorProto.INT64),
        n("Mul", ["scores_i", "zero_i"], ["classes"]),
    ]
    zero_i = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero_i")
    graph = helper.make_graph(
        nodes,
        "bright_box",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 1, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, ["batch", 1]),
        ],
        initializer=[idx, big, one, thr, starts, ends, axes, zero_i],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def channel_mean_model(path: Path, channels: int = 3, size: int = 8) -> None:
    """``image [batch, channels, size, size]`` -> ``scores [batch, channels]``, each channel's mean:
    a stand-in image classifier whose output shows exactly what the task fed it."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["scores"], axes=[2, 3], keepdims=0)],
        "channel_mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", channels])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def text_classifier(path: Path, classes: int = 2, length: int | str = "length") -> None:
    """``input_ids, attention_mask [batch, length]`` (INT64) -> ``scores [batch, classes]``, each
    the number of tokens: a stand-in text classifier with the sentiment task's interface."""
    n = helper.make_node
    nodes = [
        n("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        n("ReduceSum", ["mask_f", "axes"], ["count"], keepdims=1),  # [B, 1]
        n("Tile", ["count", "reps"], ["scores"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1, classes], dtype=np.int64), "reps"),
    ]
    graph = helper.make_graph(
        nodes,
        "text_classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", length]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", length]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


LM_SENTENCES = [
    "Tom is tired.",
    "Tom is here.",
    "I think that Tom is right.",
    "Can you help me?",
    "The weather is nice today.",
    "My favourite colour is blue.",
    "I'm hungry.",
    "Where is the station?",
]


def lstm_language_model(root: Path, name: str = "tiny-lm", *, hidden: int = 16, seed: int = 0, **parameters) -> Path:
    """A one-layer LSTM language model with random weights in the text-generation task's two graphs
    (the ONNX LSTM operator, as torch exports it), over a byte-level BPE trained on a few
    sentences: ``model.onnx`` (token, h, c -> log_probs, h_next, c_next) and ``prefill.onnx``
    (ids, lengths, positions -> log_probs at those positions, h, c; built as torch exports it, then
    rewritten by ``training.prefill_graph`` as training does). Both share the weights, so a prefill followed by
    steps must agree with a prefill of the whole sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<bos>", "<eos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(LM_SENTENCES, trainer)
    vocab = tokenizer.get_vocab_size()
    rng = np.random.default_rng(seed)
    h = hidden

    def weights(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inits = [
        numpy_helper.from_array(weights(vocab, h), "embedding"),
        numpy_helper.from_array(weights(1, 4 * h, h), "W"),
        numpy_helper.from_array(weights(1, 4 * h, h), "R"),
        numpy_helper.from_array(weights(1, 8 * h, scale=0.1), "B"),
        numpy_helper.from_array(weights(h, vocab, scale=2.0), "out"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
    ]
    n = helper.make_node
    fp, i64 = TensorProto.FLOAT, TensorProto.INT64
    step = helper.make_graph(
        [
            n("Gather", ["embedding", "token"], ["emb"]),  # [rows, h]
            n("Unsqueeze", ["emb", "zero"], ["x"]),  # [1, rows, h]
            n("Transpose", ["h"], ["h0"], perm=[1, 0, 2]),  # [1, rows, h]
            n("Transpose", ["c"], ["c0"], perm=[1, 0, 2]),
            n("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["", "hn", "cn"], hidden_size=h),
            n("Squeeze", ["hn", "zero"], ["top"]),  # [rows, h]
            n("MatMul", ["top", "out"], ["logits"]),
            n("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
            n("Transpose", ["hn"], ["h_next"], perm=[1, 0, 2]),
            n("Transpose", ["cn"], ["c_next"], perm=[1, 0, 2]),
        ],
        "lm_step",
        [
            helper.make_tensor_value_info("token", i64, ["rows"]),
            helper.make_tensor_value_info("h", fp, ["rows", 1, h]),
            helper.make_tensor_value_info("c", fp, ["rows", 1, h]),
        ],
        [
            helper.make_tensor_value_info("log_probs", fp, ["rows", vocab]),
            helper.make_tensor_value_info("h_next", fp, ["rows", 1, h]),
            helper.make_tensor_value_info("c_next", fp, ["rows", 1, h]),
        ],
        initializer=inits,
    )
    prefill = helper.make_graph(
        [
            n("Gather", ["embedding", "ids"], ["emb"]),  # [rows, T, h]
            n("Transpose", ["emb"], ["x"], perm=[1, 0, 2]),  # [T, rows, h]
            n("LSTM", ["x", "W", "R", "B"], ["y", "hn", "cn"], hidden_size=h),  # y [T, 1, rows, h]
            n("Squeeze", ["y", "one"], ["y3"]),
            n("Transpose", ["y3"], ["seq"], perm=[1, 0, 2]),  # [rows, T, h]
            n("MatMul", ["seq", "out"], ["logits"]),
            n("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
            n("Transpose", ["hn"], ["h_out"], perm=[1, 0, 2]),
            n("Transpose", ["cn"], ["c_out"], perm=[1, 0, 2]),
            n("Identity", ["h_out"], ["h"]),
            n("Identity", ["c_out"], ["c"]),
        ],
        "lm_prefill",
        [helper.make_tensor_value_info("ids", i64, ["rows", "length"])],
        [
            helper.make_tensor_value_info("log_probs", fp, ["rows", "length", vocab]),
            helper.make_tensor_value_info("h", fp, ["rows", 1, h]),
            helper.make_tensor_value_info("c", fp, ["rows", 1, h]),
        ],
        initializer=inits,
    )
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    for graph, filename in ((step, "model.onnx"), (prefill, "prefill.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        if filename == "prefill.onnx":  # as training does after torch's export: any lengths, chosen positions
            model = prefill_graph.ragged(model)
        onnx.save(model, str(version_dir / filename))
    tokenizer.save(str(version_dir / "tokenizer.json"))
    spec = {
        "name": name,
        "task": "text-generation",
        "max_batch_size": 16,
        "inputs": [
            {"name": "token", "datatype": "INT64", "shape": [-1], "value_range": [0, vocab - 1]},
            {"name": "h", "datatype": "FP32", "shape": [-1, 1, h]},
            {"name": "c", "datatype": "FP32", "shape": [-1, 1, h]},
        ],
        "outputs": [
            {"name": "log_probs", "datatype": "FP32", "shape": [-1, vocab]},
            {"name": "h_next", "datatype": "FP32", "shape": [-1, 1, h]},
            {"name": "c_next", "datatype": "FP32", "shape": [-1, 1, h]},
        ],
        "parameters": {
            "special_tokens": {"pad": 0, "bos": 1, "eos": 2, "unk": 3},
            "max_context_tokens": 64,
            "max_new_tokens": 48,
            **parameters,
        },
    }
    (root / name / "model.json").write_text(json.dumps(spec))
    (version_dir / "metadata.json").write_text(json.dumps({"metrics": {"note": "random weights"}}))
    return root / name

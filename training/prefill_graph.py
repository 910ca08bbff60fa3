"""The prefill graph of a recurrent language model, rewritten to take prompts of different lengths in
one call and to project only the positions asked for.

torch exports the prefill as ``ids [rows, T] -> log_probs [rows, T, vocab], h, c``: every row as
long as the others, and the output layer applied at every position. Serving needs neither. It
generates from the last position of each prompt, and its prompts have every length: grouped by
length, 64 new prompts of 1-12 words cost 10-20 calls; projected at every position, a prompt of T
tokens costs T times the output layer (8,000 x 512 multiply-adds a position, as much as both LSTM
layers) for one row of log-probabilities. The rewrite:

- ``lengths [rows]`` (int64): each row's own length (its prompt is ``ids[row, :length]``, the rest
  padding), wired into the ONNX LSTM operator's ``sequence_lens``, so ``h`` and ``c`` are the state
  after each row's last real token (the operator stops each row there);
- ``positions [rows, P]`` (int64, each in ``[0, length)``): where to project; ``log_probs`` becomes
  ``[rows, P, vocab]``. Generation asks for ``[[length - 1]]``; scoring a prompt asks for all of them.

The output layer's input is found by walking back from ``log_probs`` through the output layer's
``MatMul``/``Gemm``/``Add`` nodes (and the ``LogSoftmax``), and gathered before them.

    python -m training.prefill_graph models/text-generator/1   # rewrite a version in place, checked
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The positions and padding the service feeds the rewritten graph (one definition, the service's).
from service.prefill_rows import every_position, last_positions, pad_rows

OUTPUT_LAYER_OPS = {"LogSoftmax", "Add", "MatMul", "Gemm"}


def is_ragged(model: onnx.ModelProto) -> bool:
    return [i.name for i in model.graph.input] == ["ids", "lengths", "positions"]


def ragged(model: onnx.ModelProto) -> onnx.ModelProto:
    """``ids -> log_probs, h, c`` rewritten as ``ids, lengths, positions -> log_probs [rows, P, vocab], h, c``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if [i.name for i in graph.input] != ["ids"]:
        raise ValueError(f"expected a prefill graph taking ids only, got {[i.name for i in graph.input]}")
    nodes = list(graph.node)
    produced_by = {out: node for node in nodes for out in node.output}
    initialisers = {init.name for init in graph.initializer}
    lstms = [node for node in nodes if node.op_type == "LSTM"]
    if not lstms:
        raise ValueError("no LSTM operator in the graph")

    # the output layer: from log_probs back to the first tensor it reads that it did not compute
    node = produced_by["log_probs"]
    if node.op_type != "LogSoftmax":
        raise ValueError(f"log_probs comes from {node.op_type}, expected LogSoftmax")
    while True:
        computed = [t for t in node.input if t and t not in initialisers and t in produced_by]
        if len(computed) != 1:
            raise ValueError(f"{node.op_type} {node.name!r} reads {len(computed)} computed tensors, expected 1")
        producer = produced_by[computed[0]]
        if producer.op_type not in OUTPUT_LAYER_OPS:
            hidden, first = computed[0], node
            break
        node = producer

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, np.int64), name)
        )

    for lstm in lstms:
        inputs = list(lstm.input) + [""] * (5 - len(lstm.input))
        inputs[4] = "prefill_sequence_lens"
        del lstm.input[:]
        lstm.input.extend(inputs)
    select = [
        const("prefill_minus_one", [-1]),
        const("prefill_one_one", [1, 1]),
        const("prefill_two", [2]),
        const("prefill_three", [3]),
        helper.make_node("Unsqueeze", ["positions", "prefill_minus_one"], ["prefill_positions_3d"]),
        helper.make_node("Shape", [hidden], ["prefill_hidden_shape"]),
        helper.make_node("Slice", ["prefill_hidden_shape", "prefill_two", "prefill_three"], ["prefill_width"]),
        helper.make_node("Concat", ["prefill_one_one", "prefill_width"], ["prefill_index_shape"], axis=0),
        helper.make_node("Expand", ["prefill_positions_3d", "prefill_index_shape"], ["prefill_index"]),
        helper.make_node("GatherElements", [hidden, "prefill_index"], ["prefill_hidden_at"], axis=1),
    ]
    for i, name in enumerate(first.input):
        if name == hidden:
            first.input[i] = "prefill_hidden_at"
    at = nodes.index(first)
    cast = helper.make_node("Cast", ["lengths"], ["prefill_sequence_lens"], to=TensorProto.INT32)
    del graph.node[:]
    graph.node.extend([cast, *nodes[:at], *select, *nodes[at:]])

    graph.input.extend(
        [
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["rows"]),
            helper.make_tensor_value_info("positions", TensorProto.INT64, ["rows", "positions"]),
        ]
    )
    log_probs = next(o for o in graph.output if o.name == "log_probs")
    dims = log_probs.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].ClearField("dim_value")
        dims[1].dim_param = "positions"
    onnx.checker.check_model(model)
    return model


def check_against(old_path: Path, new_path: Path, step_path: Path, vocab: int, seed: int = 0) -> dict[str, float]:
    """The rewritten graph against the original, row by row at each row's own length (one ragged call
    of 6 rows of 1-13 tokens, every position and the last), and the chain ragged prefill -> one step
    against the original prefill of the longer prompt. Largest absolute differences."""
    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    old, new, step = session(old_path), session(new_path), session(step_path)
    rng = np.random.default_rng(seed)
    rows = [[1, *rng.integers(4, vocab, size=n - 1).tolist()] for n in (1, 13, 5, 8, 2, 13)]
    ids, lengths = pad_rows(rows, 0)
    every, h, c = new.run(None, {"ids": ids, "lengths": lengths, "positions": every_position(lengths, ids.shape[1])})
    last, h_last, c_last = new.run(None, {"ids": ids, "lengths": lengths, "positions": last_positions(lengths)})
    diffs = {"every_position": 0.0, "last_position": 0.0, "state": 0.0, "chain_log_probs": 0.0, "chain_state": 0.0}
    tokens = rng.integers(4, vocab, size=len(rows))
    after, h_next, c_next = step.run(None, {"token": tokens, "h": h_last, "c": c_last})
    for i, row in enumerate(rows):
        want, want_h, want_c = old.run(None, {"ids": np.asarray([row], np.int64)})
        n = len(row)
        diffs["every_position"] = max(diffs["every_position"], float(np.abs(every[i, :n] - want[0]).max()))
        diffs["last_position"] = max(diffs["last_position"], float(np.abs(last[i, 0] - want[0, -1]).max()))
        diffs["state"] = max(
            diffs["state"],
            float(np.abs(h[i] - want_h[0]).max()),
            float(np.abs(c[i] - want_c[0]).max()),
            float(np.abs(h_last[i] - h[i]).max()),
        )
        longer, longer_h, longer_c = old.run(None, {"ids": np.asarray([[*row, int(tokens[i])]], np.int64)})
        diffs["chain_log_probs"] = max(diffs["chain_log_probs"], float(np.abs(after[i] - longer[0, -1]).max()))
        diffs["chain_state"] = max(
            diffs["chain_state"],
            float(np.abs(h_next[i] - longer_h[0]).max()),
            float(np.abs(c_next[i] - longer_c[0]).max()),
        )
    if max(diffs.values()) > 1e-4:
        raise AssertionError(f"the rewritten prefill disagrees with the original: {diffs}")
    return diffs


def rewrite_version(version_dir: Path, command: str = "") -> dict[str, float]:
    """Rewrite ``version_dir/prefill.onnx`` in place (checked against the original first) and record
    it in ``metadata.json``."""
    path = version_dir / "prefill.onnx"
    original = onnx.load(str(path))
    if is_ragged(original):
        raise SystemExit(f"{path} takes ids, lengths, positions already")
    vocab = json.loads((version_dir / "tokenizer.json").read_text())["model"]["vocab"]
    candidate = path.with_suffix(".ragged.onnx")
    onnx.save(ragged(original), str(candidate))
    try:
        diffs = check_against(path, candidate, version_dir / "model.onnx", len(vocab))
    except Exception:
        candidate.unlink()
        raise
    candidate.replace(path)
    meta_path = version_dir / "metadata.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta.setdefault("metrics", {})["prefill_rewrite_max_abs_diff"] = diffs
        meta["prefill_rewrite"] = {
            "what": "prefill.onnx rewritten to ids, lengths, positions -> log_probs at the positions asked for "
            "(training/prefill_graph.py); checked against the exported graph row by row",
            "command": command,
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return diffs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m training.prefill_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("version_dir", type=Path, help="a text-generation model version (prefill.onnx, model.onnx)")
    args = parser.parse_args(argv)
    diffs = rewrite_version(args.version_dir, command="python -m training.prefill_graph " + " ".join(argv))
    print(f"rewrote {args.version_dir / 'prefill.onnx'}: largest differences {diffs}")


if __name__ == "__main__":
    main()

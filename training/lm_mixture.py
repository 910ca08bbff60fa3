"""Several exported language models of one tokenizer and one split, served as one: a pair of graphs
(step and prefill) whose next-token distribution is the weighted mean of the members', with the
inputs, outputs and per-row state the service already serves, so nothing in the service changes.

    python -m training.lm_mixture --data-dir ../shared/data/translation --output-dir models --version 2 \\
        models/text-generator/1 /tmp/tg-m2/text-generator/2

Each member is a version folder written by ``python -m training.text_generation`` (directly, or with
``--from-checkpoint`` from a GPU run's checkpoint): ``model.onnx``, the ragged ``prefill.onnx``,
``tokenizer.json`` and ``metadata.json``. They must share the tokenizer (the same ids for the same
text) and the split (so that no member trained on a sentence the mixture is scored on).

- **State.** Member ``i``'s ``h``, ``c`` are ``[rows, layers_i, hidden_i]``; the mixture's are
  ``[rows, sum of layers, largest hidden]``, member ``i`` owning layers ``offset_i .. offset_i +
  layers_i`` and its first ``hidden_i`` units (a narrower member's last units are zeros). Still fixed
  in size per row, so rows join and leave the batch at any step as before.
- **Weights.** ``log p(token) = logsumexp_i(log w_i + log p_i(token))``, the weights fitted by EM on
  the validation sentences' tokens (the test sentences only report). The n-gram baseline is the
  members' own (the same split gives the same baseline; they must agree).
- **Checks.** Step and prefill against the members' own graphs mixed in numpy (rows > 1, prompts of
  different lengths in one call), and the chain prefill(prompt) + step against prefill of the longer
  prompt; the figures are measured on the written prefill graph in onnxruntime, as a single model's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import compose, helper, numpy_helper
from tokenizers import Tokenizer

from training import common, prefill_graph
from training.text_generation import (
    PAD_ID,
    PROMPTS,
    encode,
    greedy_continuations,
    held_out_metrics,
    lm_metrics,
    model_config,
    onnx_token_log_probs,
    read_sentences,
    run_prefill,
    session,
    smoke_sized,
    split_sentences,
    trained_config,
)
from training.text_generation import Config as LMConfig

# The settings that decide a member's held-out sentences (``split_seed`` was ``seed`` before it existed).
SPLIT_FIELDS = ("validation_fraction", "test_fraction", "smoke", "max_train_sentences")
STATE = ("h", "c")


def split_of(meta: dict) -> tuple:
    config = {k: _typed(v) for k, v in meta["training"]["config"].items()}
    return (config.get("split_seed", config["seed"]), *(config[k] for k in SPLIT_FIELDS))


def state_shape(model: onnx.ModelProto, name: str = "h") -> tuple[int, int]:
    """``(layers, hidden)`` of a graph input ``[rows, layers, hidden]``."""
    tensor = next(i for i in model.graph.input if i.name == name)
    dims = tensor.type.tensor_type.shape.dim
    return dims[1].dim_value, dims[2].dim_value


def fit_weights(per_member: list[np.ndarray], iterations: int = 200) -> np.ndarray:
    """Mixture weights maximising the likelihood of the tokens whose per-member log-probabilities are
    given (EM: each weight becomes the mean responsibility of its member)."""
    logs = np.stack(per_member)  # [members, tokens]
    weights = np.full(len(per_member), 1 / len(per_member))
    for _ in range(iterations):
        joint = logs + np.log(weights)[:, None]
        responsibility = np.exp(joint - np.logaddexp.reduce(joint, axis=0))
        weights = responsibility.mean(axis=1)
    return weights


def mixture_nats(per_member: list[np.ndarray], weights: np.ndarray) -> float:
    joint = np.stack(per_member) + np.log(weights)[:, None]
    return -float(np.logaddexp.reduce(joint, axis=0).sum())


def _const(name: str, values, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype), name))


def merge(
    members: list[onnx.ModelProto],
    weights: np.ndarray,
    shared_inputs: list[str],
    outputs: tuple[str, str, str],
    shapes: list[tuple[int, int]],
) -> onnx.ModelProto:
    """One graph running every member on the same ``shared_inputs`` and its slice of the state inputs
    ``h``, ``c`` (absent from a prefill graph, which starts from zeros), mixing their first output
    (log-probabilities, over the last axis) with ``weights`` and putting their state outputs side by
    side along the layer axis, padded to the widest."""
    widest = max(hidden for _, hidden in shapes)
    log_probs_name, h_name, c_name = outputs
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    mixed, states = [], {h_name: [], c_name: []}
    offset = 0
    graph_inputs = {i.name: i for i in members[0].graph.input}
    for k, (model, (layers, hidden)) in enumerate(zip(members, shapes, strict=True)):
        prefix = f"member{k}/"
        model = compose.add_prefix(model, prefix)
        own_inputs = {i.name[len(prefix) :] for i in model.graph.input}
        for name in shared_inputs:
            nodes.append(helper.make_node("Identity", [name], [prefix + name]))
        for name in STATE:
            if name in own_inputs:  # the step graph: this member's layers and units of the mixture's state
                nodes += [
                    _const(f"{prefix}mix_{name}_starts", [offset, 0]),
                    _const(f"{prefix}mix_{name}_ends", [offset + layers, hidden]),
                    _const(f"{prefix}mix_{name}_axes", [1, 2]),
                    helper.make_node(
                        "Slice",
                        [name, f"{prefix}mix_{name}_starts", f"{prefix}mix_{name}_ends", f"{prefix}mix_{name}_axes"],
                        [prefix + name],
                    ),
                ]
        nodes += list(model.graph.node)
        initializers += list(model.graph.initializer)
        value_info += list(model.graph.value_info)
        nodes += [
            _const(f"{prefix}mix_log_weight", math.log(weights[k]), np.float32),
            helper.make_node("Add", [prefix + log_probs_name, f"{prefix}mix_log_weight"], [f"{prefix}mix_weighted"]),
            _const(f"{prefix}mix_axis0", [0]),
            helper.make_node("Unsqueeze", [f"{prefix}mix_weighted", f"{prefix}mix_axis0"], [f"{prefix}mix_stacked"]),
        ]
        mixed.append(f"{prefix}mix_stacked")
        for name in (h_name, c_name):
            out = prefix + name
            if hidden < widest:
                nodes += [
                    _const(f"{prefix}mix_{name}_pads", [0, 0, 0, 0, 0, widest - hidden]),
                    helper.make_node("Pad", [out, f"{prefix}mix_{name}_pads"], [f"{prefix}mix_{name}_padded"]),
                ]
                out = f"{prefix}mix_{name}_padded"
            states[name].append(out)
        offset += layers
    nodes += [
        helper.make_node("Concat", mixed, ["mix_all"], axis=0),
        # onnxruntime's ReduceLogSumExp subtracts the maximum first (tests compare it with numpy's
        # logaddexp at log-probabilities near -1e4)
        helper.make_node("ReduceLogSumExp", ["mix_all"], [log_probs_name], axes=[0], keepdims=0),
        helper.make_node("Concat", states[h_name], [h_name], axis=1),
        helper.make_node("Concat", states[c_name], [c_name], axis=1),
    ]
    inputs = [graph_inputs[n] for n in shared_inputs]
    state_dims = ["rows", offset, widest]
    inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, state_dims) for n in STATE if n in graph_inputs]
    first = members[0].graph.output
    log_probs = next(o for o in first if o.name == log_probs_name)
    outputs_info = [
        log_probs,
        helper.make_tensor_value_info(h_name, onnx.TensorProto.FLOAT, state_dims),
        helper.make_tensor_value_info(c_name, onnx.TensorProto.FLOAT, state_dims),
    ]
    graph = helper.make_graph(nodes, "lm_mixture", inputs, outputs_info, initializers, value_info=value_info)
    model = helper.make_model(graph, opset_imports=list(members[0].opset_import), ir_version=members[0].ir_version)
    onnx.checker.check_model(model)
    return model


def check(version_dir: Path, member_dirs: list[Path], weights: np.ndarray, held: list[list[int]]) -> dict[str, float]:
    """The written graphs against the members' own, mixed in numpy: largest absolute differences."""
    pre, one = session(version_dir / "prefill.onnx"), session(version_dir / "model.onnx")
    members = [(session(d / "prefill.onnx"), session(d / "model.onnx")) for d in member_dirs]
    shapes = [state_shape(onnx.load(str(d / "model.onnx"), load_external_data=False)) for d in member_dirs]
    widest = max(h for _, h in shapes)
    log_w = np.log(weights)[:, None, None]

    def mix(parts: list[np.ndarray]) -> np.ndarray:
        return np.logaddexp.reduce(np.stack(parts).astype(np.float64) + log_w.reshape((-1,) + (1,) * parts[0].ndim), 0)

    def side_by_side(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.pad(p, ((0, 0), (0, 0), (0, widest - p.shape[2]))) for p in parts], axis=1)

    rows = [s[:n] for s, n in zip(held, (5, 12, 3, 9), strict=False)]
    ids, lengths = prefill_graph.pad_rows(rows, PAD_ID)
    feeds = {"ids": ids, "lengths": lengths, "positions": prefill_graph.every_position(lengths, ids.shape[1])}
    got = pre.run(None, feeds)
    theirs = [p.run(None, feeds) for p, _ in members]
    parity = {
        "prefill_log_probs": float(np.abs(got[0] - mix([t[0] for t in theirs])).max()),
        "prefill_state": float(max(np.abs(got[i] - side_by_side([t[i] for t in theirs])).max() for i in (1, 2))),
    }
    rng = np.random.default_rng(0)
    token = np.array([s[-1] for s in rows], np.int64)
    state = [rng.standard_normal(got[1].shape).astype(np.float32) * 0.5 for _ in STATE]
    for array in state:  # a narrower member's padding units are zeros, as the graphs write them
        offset = 0
        for layers, hidden in shapes:
            array[:, offset : offset + layers, hidden:] = 0
            offset += layers
    got = one.run(None, {"token": token, "h": state[0], "c": state[1]})
    theirs, offset = [], 0
    for (_, step), (layers, hidden) in zip(members, shapes, strict=True):
        own = {n: a[:, offset : offset + layers, :hidden] for n, a in zip(STATE, state, strict=True)}
        theirs.append(step.run(None, {"token": token, **own}))
        offset += layers
    parity["step_log_probs"] = float(np.abs(got[0] - mix([t[0] for t in theirs])).max())
    parity["step_state"] = float(max(np.abs(got[i] - side_by_side([t[i] for t in theirs])).max() for i in (1, 2)))
    full = np.array([s[:12] for s in held if len(s) >= 12][:3], np.int64)
    _, h, c = run_prefill(pre, full[:, :-1])
    log_probs, h_next, c_next = one.run(None, {"token": full[:, -1], "h": h, "c": c})
    want, want_h, want_c = run_prefill(pre, full)
    parity["chain_log_probs"] = float(np.abs(log_probs - want[:, -1]).max())
    parity["chain_state"] = float(max(np.abs(h_next - want_h).max(), np.abs(c_next - want_c).max()))
    if max(parity.values()) > 1e-4:
        raise AssertionError(f"the mixture's graphs disagree with their members: {parity}")
    return parity


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m training.lm_mixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("members", type=Path, nargs="+", help="version folders of text_generation")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/translation"))
    parser.add_argument("--output-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", default="text-generator")
    parser.add_argument("--version", type=int, required=True)
    args = parser.parse_args(argv)
    if len(args.members) < 2:
        parser.error("a mixture needs at least two members")
    metas = [json.loads((d / "metadata.json").read_text()) for d in args.members]
    splits_of = {str(d): split_of(m) for d, m in zip(args.members, metas, strict=True)}
    if len(set(splits_of.values())) != 1:
        raise SystemExit(f"the members were trained on different splits: {splits_of}")
    tokenizers = [Tokenizer.from_file(str(d / "tokenizer.json")) for d in args.members]
    if any(t.to_str() != tokenizers[0].to_str() for t in tokenizers):
        raise SystemExit("the members do not share one tokenizer")
    baselines = {json.dumps(m["metrics"]["ngram_baseline"]["bits_per_character"], sort_keys=True) for m in metas}
    if len(baselines) != 1:
        raise SystemExit("the members' n-gram baselines differ, so their data differ")
    tokenizer = tokenizers[0]
    cfg = trained_config(LMConfig(), {k: _typed(v) for k, v in metas[0]["training"]["config"].items()})
    splits = split_sentences(
        read_sentences(args.data_dir), cfg.validation_fraction, cfg.test_fraction, split_of(metas[0])[0]
    )
    if cfg.smoke:
        _, splits = smoke_sized(cfg, splits)
    held = {k: splits[k] for k in ("validation", "test")}
    seqs = {k: encode(tokenizer, v) for k, v in held.items()}
    per_member = {k: [onnx_token_log_probs(d / "prefill.onnx", seqs[k]) for d in args.members] for k in held}
    weights = fit_weights(per_member["validation"])
    chars = {k: sum(len(t) + 1 for t in v) for k, v in held.items()}
    numpy_bpc = {k: mixture_nats(per_member[k], weights) / math.log(2) / chars[k] for k in held}

    version_dir = args.output_dir / args.name / str(args.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    steps = [onnx.load(str(d / "model.onnx")) for d in args.members]
    prefills = [onnx.load(str(d / "prefill.onnx")) for d in args.members]
    if not all(prefill_graph.is_ragged(p) for p in prefills):
        raise SystemExit(
            "every member's prefill.onnx must take ids, lengths, positions (python -m training.prefill_graph)"
        )
    shapes = [state_shape(s) for s in steps]
    onnx.save(
        merge(steps, weights, ["token"], ("log_probs", "h_next", "c_next"), shapes), str(version_dir / "model.onnx")
    )
    onnx.save(
        merge(prefills, weights, ["ids", "lengths", "positions"], ("log_probs", "h", "c"), shapes),
        str(version_dir / "prefill.onnx"),
    )
    tokenizer.save(str(version_dir / "tokenizer.json"))
    parity = check(version_dir, args.members, weights, seqs["validation"])
    scores = {k: lm_metrics(version_dir / "prefill.onnx", seqs[k], held[k]) for k in held}
    baseline = metas[0]["metrics"]["ngram_baseline"]
    ratio = scores["test"]["bits_per_character"] / baseline["test_bits_per_character"]
    layers, widest = sum(n for n, _ in shapes), max(h for _, h in shapes)
    config = model_config(cfg, tokenizer.get_vocab_size())
    for tensor in config["inputs"][1:] + config["outputs"][1:]:
        tensor["shape"] = [-1, layers, widest]
    config["description"] = (
        f"English sentences (Tatoeba): a mixture of {len(steps)} LSTM language models over one byte-level BPE "
        f"(weights {', '.join(f'{w:.3f}' for w in weights)}, fitted on validation), as one pair of graphs. "
        "This graph is one decode step (token, state h, c -> log_probs of the next token, next state; the "
        "members' states side by side along the layer axis); prefill.onnx reads whole prompts of any lengths "
        "(ids, lengths, positions -> log_probs at those positions, state after each row's last token)."
    )
    common.write_json(args.output_dir / args.name / "model.json", config)
    members = [
        {
            "folder": str(d),
            "sha256": m.get("sha256"),
            "weight": round(float(w), 4),
            "state": {"layers": s[0], "hidden": s[1]},
            "validation_bits_per_character": m["metrics"]["validation_bits_per_character"],
            "test_bits_per_character": m["metrics"]["test_bits_per_character"],
            "command": m.get("command") or m["training"].get("command"),
        }
        for d, m, w, s in zip(args.members, metas, weights, shapes, strict=True)
    ]
    metrics = {
        **held_out_metrics(scores, baseline),
        "numpy_mixture_bits_per_character": {k: round(v, 4) for k, v in numpy_bpc.items()},
        "mixture_vs_members_max_abs_diff": parity,
        "greedy_examples": greedy_continuations(version_dir, tokenizer, PROMPTS),
    }
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset=metas[0]["dataset"],
        command=common.command_line("training.lm_mixture", argv),
        training={"mixture": members, "weights_fitted_on": "validation tokens (EM)"},
    )
    print(
        f"wrote {version_dir}: weights {[round(float(w), 3) for w in weights]}; "
        f"test {scores['test']['bits_per_character']:.4f} "
        f"bits per character (members {[m['test_bits_per_character'] for m in members]}), n-gram "
        f"{baseline['test_bits_per_character']:.4f}: ratio {ratio:.3f}; parity {parity}"
    )
    return meta


def _typed(value: str):
    """A member's config as metadata records it (every value a string) back to Python values."""
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        if value in ("True", "False"):
            return value == "True"
        return value


if __name__ == "__main__":
    main()

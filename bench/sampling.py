"""What a text-generation step costs besides the step graph: drawing the next token for every row
(``service.sampling.sample_rows``) and the prefill of newcomers by how many share a call.

    python -m bench.sampling [--rows 54] [--repeats 200] [--baseline COMMIT]

Sampling: ``--rows`` rows of the committed model's vocabulary, temperature 0.8, a seed and a
``logit_bias`` per row (the text-generation benchmark's requests); with ``--baseline``, also
``service/sampling.py`` as it was at that commit, on the same inputs (and whether it draws the
same tokens). Prefill: ``prefill.onnx`` of
the committed model, one onnxruntime thread (the service's default on 2 cores), 1, 2, 4 and 8
prompts of 8 tokens in one call, against one step of the step graph at ``--rows`` rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.harness import ROOT, write_results
from service.sampling import Sampler, SamplingParams, sample_rows

VERSION = ROOT / "models" / "text-generator" / "1"


def baseline_module(commit: str):  # type: ignore[no-untyped-def]
    """``service/sampling.py`` as it was at ``commit``, imported on its own."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(
        ["git", "show", f"{commit}:service/sampling.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_sampling.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["baseline_sampling"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def timed(call, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=54)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--baseline", default=None, help="also time service/sampling.py of this commit")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    step = ort.InferenceSession(str(VERSION / "model.onnx"), options, providers=["CPUExecutionProvider"])
    prefill = ort.InferenceSession(str(VERSION / "prefill.onnx"), options, providers=["CPUExecutionProvider"])
    vocab = step.get_outputs()[0].shape[-1]
    _, layers, hidden = step.get_inputs()[1].shape

    state = np.zeros((args.rows, layers, hidden), np.float32)
    feeds = {"token": rng.integers(4, vocab, args.rows), "h": state, "c": state}
    log_probs = step.run(None, feeds)[0]
    samplers = [Sampler(SamplingParams(temperature=0.8, seed=i, logit_bias={2: -100.0})) for i in range(args.rows)]
    result = {
        "command": "python -m bench.sampling " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows,
        "vocabulary": vocab,
        "sample_rows_ms": timed(lambda: sample_rows(log_probs, samplers, banned=[0, 1, 3]), args.repeats),
        "step_ms": timed(lambda: step.run(None, feeds), args.repeats // 4),
        "prefill_ms_by_prompts": {},
    }
    if args.baseline:
        old = baseline_module(args.baseline)
        old_samplers = lambda: [  # noqa: E731
            old.Sampler(old.SamplingParams(temperature=0.8, seed=i, logit_bias={2: -100.0})) for i in range(args.rows)
        ]
        kept = old_samplers()
        result["baseline"] = args.baseline
        result["baseline_sample_rows_ms"] = timed(
            lambda: old.sample_rows(log_probs, kept, banned=[0, 1, 3]), args.repeats
        )
        fresh_new = [Sampler(SamplingParams(temperature=0.8, seed=i, logit_bias={2: -100.0})) for i in range(args.rows)]
        now_tokens = sample_rows(log_probs, fresh_new, banned=[0, 1, 3])
        same = np.array_equal(now_tokens, old.sample_rows(log_probs, old_samplers(), banned=[0, 1, 3]))
        result["same_tokens_as_baseline"] = bool(same)
        print(f"baseline {args.baseline}: {result['baseline_sample_rows_ms']:.2f} ms (same tokens: {same})")
    for prompts in (1, 2, 4, 8):
        lengths = np.full(prompts, 8, np.int64)
        call = {"ids": rng.integers(4, vocab, (prompts, 8)), "lengths": lengths, "positions": (lengths - 1)[:, None]}
        result["prefill_ms_by_prompts"][prompts] = timed(lambda call=call: prefill.run(None, call), args.repeats // 4)
    print(
        f"sample_rows at {args.rows} rows x {vocab} tokens: {result['sample_rows_ms']:.2f} ms; "
        f"step graph at {args.rows} rows: {result['step_ms']:.2f} ms"
    )
    for prompts, ms in result["prefill_ms_by_prompts"].items():
        print(f"prefill of {prompts} prompt(s) of 8 tokens: {ms:.2f} ms")
    write_results(args.output, "sampling", result)
    return result


if __name__ == "__main__":
    main()

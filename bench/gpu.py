"""Raw onnxruntime ceilings on a GPU against the same machine's CPU, in one run: the digit detector
and the MNIST classifier by batch size, and the translator's cached decoder step by rows (the cost
that decides how much step-level batching gains). Needs ``onnxruntime-gpu`` (CUDAExecutionProvider);
see ``../shared/gpu/README.md`` for bringing it to the GPU machine.

    python -m bench.gpu --models models [--output bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})


def session(path: Path, device: str) -> ort.InferenceSession:
    providers = [CUDA, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    made = ort.InferenceSession(str(path), providers=providers)
    if device == "cuda" and made.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"CUDAExecutionProvider unavailable: {made.get_providers()}")
    return made


def timed(run, seconds: float = 0.5) -> float:
    for _ in range(3):
        run()
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 5:
        run()
        runs += 1
    return 1000 * elapsed / runs


def images(path: Path, device: str, batches: list[int]) -> list[dict]:
    s = session(path, device)
    name, shape = s.get_inputs()[0].name, s.get_inputs()[0].shape[1:]
    rows = []
    for b in batches:
        x = np.random.default_rng(0).random((b, *shape), dtype=np.float32)
        ms = timed(lambda x=x: s.run(None, {name: x}))
        rows.append({"device": device, "batch": b, "ms": ms, "per_s": b * 1000 / ms})
    return rows


def decoder_step(folder: Path, device: str, batches: list[int], src_len: int = 12, past: int = 10) -> list[dict]:
    encoder = session(folder / "encoder_kv.onnx", device)
    decoder = session(folder / "decoder_cached.onnx", device)
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        src = rng.integers(4, 8000, size=(b, src_len), dtype=np.int64)
        mem = dict(zip(("mem_k", "mem_v"), encoder.run(None, {"src_ids": src}), strict=True))
        layers, _, heads, _, dim = mem["mem_k"].shape
        feeds = {
            "token": rng.integers(4, 8000, size=(b, 1), dtype=np.int64),
            "position": np.full(b, past, np.int64),
            "past_k": rng.standard_normal((layers, b, heads, past, dim), dtype=np.float32),
            "past_v": rng.standard_normal((layers, b, heads, past, dim), dtype=np.float32),
            "past_mask": np.ones((b, past), np.int64),
            **mem,
            "src_ids": src,
        }
        ms = timed(lambda feeds=feeds: decoder.run(None, feeds))
        rows.append({"device": device, "rows": b, "ms": ms, "tokens_per_s": b * 1000 / ms})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path("models"), help="a repository, or a folder of the files")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--devices", nargs="+", default=["cuda", "cpu"], choices=["cuda", "cpu"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    args = p.parse_args(argv)
    batches = args.batches
    result: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
    }

    def find(*names: str) -> Path | None:
        for name in names:
            hits = sorted(args.models.rglob(name))
            if hits:
                return hits[-1]
        return None

    for device in args.devices:
        detector = find("digit-detector.onnx") or max(
            (args.models / "digit-detector").glob("*/model.onnx"), key=lambda p: int(p.parent.name), default=Path("-")
        )
        if detector.is_file():
            result.setdefault("detector", []).extend(images(detector, device, batches))
        mnist = find("mnist.onnx") or (args.models / "mnist" / "1" / "model.onnx")
        if mnist.is_file():
            result.setdefault("mnist", []).extend(images(mnist, device, batches))
        cached = find("decoder_cached.onnx")
        if cached is not None:
            result.setdefault("decoder_step", []).extend(decoder_step(cached.parent, device, batches))
    for key, unit in (("detector", "images/s"), ("mnist", "images/s"), ("decoder_step", "tokens/s")):
        if key not in result:
            continue
        rate = "per_s" if key != "decoder_step" else "tokens_per_s"
        head = " | ".join(f"{d} ms | {d} {unit}" for d in args.devices)
        print(f"\n### {key}\n\n| batch | {head} |\n|---:|" + "---:|---:|" * len(args.devices))
        by = {(r["device"], r.get("batch", r.get("rows"))): r for r in result[key]}
        for b in args.batches:
            cells = " | ".join(f"{by[(d, b)]['ms']:.3f} | {by[(d, b)][rate]:.0f}" for d in args.devices)
            print(f"| {b} | {cells} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

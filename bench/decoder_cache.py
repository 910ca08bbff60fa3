"""Decoder step with and without a key/value cache, timed in onnxruntime.

The full-prefix step (``model.onnx``) recomputes every target token so far at each step; the cached
step (``decoder_cached.onnx``) takes each row's last token plus the keys and values of the earlier
ones (and the cross-attention keys and values computed once per source by ``encoder_kv.onnx``), and
returns the new token's keys and values to append. Both graphs of the committed model are timed at
batch 1, 16 and 64 and prefixes of 4 to 32 tokens, with sources of 12 tokens (Tatoeba's sentences
are short: 7 source and 10 target tokens on average). That they decode the same tokens is checked
at export (``training/translation.py``) and by ``tests/test_translation.py``.

The cached graph's time does not include what a step-level batcher adds around it: gathering every
row's cache into one padded tensor before the step and scattering the new keys and values after it
(``service/tasks/translation.py``); ``bench/translation.py`` measures the whole server both ways.

    python -m bench.decoder_cache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.harness import ROOT

MODEL = "translation-en-fr"


def timed(session: ort.InferenceSession, feeds: dict, seconds: float) -> float:
    for _ in range(3):
        session.run(None, feeds)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 5:
        session.run(None, feeds)
        runs += 1
    return 1000 * elapsed / runs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=0.5, help="timing per cell")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    version_dir = args.repository / MODEL / "1"
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(version_dir / name), options, providers=["CPUExecutionProvider"])

    encoder, encoder_kv = session("encoder.onnx"), session("encoder_kv.onnx")
    full, cached = session("model.onnx"), session("decoder_cached.onnx")
    vocab = full.get_outputs()[0].shape[1]
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 16, 64):
        src = rng.integers(4, vocab, size=(batch, 12), dtype=np.int64)
        memory = encoder.run(None, {"src_ids": src})[0]
        mem_k, mem_v = encoder_kv.run(None, {"src_ids": src})
        layers, _, heads, _, dim = mem_k.shape
        for length in (4, 8, 16, 32):
            tgt = rng.integers(4, vocab, size=(batch, length), dtype=np.int64)
            full_ms = timed(full, {"tgt_ids": tgt, "memory": memory, "src_ids": src}, args.seconds)
            past = rng.standard_normal((layers, batch, heads, length - 1, dim), dtype=np.float32)
            feeds = {
                "token": tgt[:, -1:],
                "position": np.full(batch, length - 1, dtype=np.int64),
                "past_k": past,
                "past_v": past,
                "past_mask": np.ones((batch, length - 1), dtype=np.int64),
                "mem_k": mem_k,
                "mem_v": mem_v,
                "src_ids": src,
            }
            cached_ms = timed(cached, feeds, args.seconds)
            rows.append({"batch": batch, "prefix": length, "full_ms": full_ms, "cached_ms": cached_ms})
            print(f"  batch {batch:>2} prefix {length:>2}: full {full_ms:7.2f} ms  cached {cached_ms:7.2f} ms")
    table = [
        "| batch | prefix tokens | full prefix ms/step | KV cache ms/step | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = r["full_ms"] / r["cached_ms"]
        table.append(f"| {r['batch']} | {r['prefix']} | {r['full_ms']:.2f} | {r['cached_ms']:.2f} | {speedup:.2f}x |")
    print("\n" + "\n".join(table))
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"decoder-cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()

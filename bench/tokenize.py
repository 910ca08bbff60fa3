"""Tokenising one short text: ``Tokenizer.encode`` against ``encode_batch`` (the tokenizers' own
thread pool), with the cores idle and with every core busy (one spinning process per core), in
interleaved rounds. Alone they cost the same (``bench/results/tokenize-*.json``); in the server,
under load, ``encode_batch`` cost the event loop ten times more (see
``service.tasks.assets.encode_each``): the difference is in the hand-over, not the work.

    python -m bench.tokenize [--calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from tokenizers import Tokenizer

from bench.harness import ROOT, write_results

TEXT = "Where is the train station?"


def per_call_us(fn, calls: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    tokenizer = Tokenizer.from_file(str(ROOT / "models" / "translation-en-fr" / "1" / "tokenizer.json"))
    ways = {"encode": lambda: tokenizer.encode(TEXT), "encode_batch": lambda: tokenizer.encode_batch([TEXT])}
    found: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for load in ("idle", "busy"):
            spinners = []
            if load == "busy":
                spin = [sys.executable, "-c", "while True: pass"]
                spinners = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 1)]
                time.sleep(0.5)
            try:
                for name, fn in ways.items():
                    found.setdefault(f"{name}, cores {load}", []).append(per_call_us(fn, args.calls))
            finally:
                for s in spinners:
                    s.kill()
                    s.wait()
    summary = {k: round(median(v), 2) for k, v in found.items()}
    for k, v in summary.items():
        print(f"{k:>26}: {v:8.2f} us a call (median of {args.rounds} rounds of {args.calls})")
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.tokenize " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "text": TEXT,
        "median_us_per_call": summary,
        "rounds_us_per_call": found,
    }
    write_results(args.output, "tokenize", results)
    return results


if __name__ == "__main__":
    main()

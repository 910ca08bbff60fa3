"""Start-up: seconds from launching ``python -m service serve`` on the committed models to
``GET /v2/health/ready`` answering 200 (every model loaded and warm), in interleaved rounds, for
this tree and optionally an earlier commit's (``--baseline REF``, its own ``models/``).

    python -m bench.startup [--rounds 3] [--baseline REF]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import time
from pathlib import Path
from statistics import median

from bench.harness import ROOT, Server, free_port, write_results
from bench.translation import compared_trees


def ready_after(tree: Path) -> float:
    port = free_port()
    env = {"NEUROSERVE_REPOSITORY": str(tree / "models"), "NEUROSERVE_PORT": str(port), "PYTHONPATH": str(tree)}
    server = Server([sys.executable, "-m", "service", "serve"], env, label=str(tree), port=port, cwd=tree)
    started = time.perf_counter()
    with server:  # returns once ready answers 200 (polled every 0.1 s)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", default=None, help="also time the server of this git commit, interleaved")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        sides = compared_trees(stack, args.baseline)
        for rnd in range(args.rounds):
            for label, tree in sides:
                seconds = ready_after(tree)
                times.setdefault(label, []).append(round(seconds, 2))
                print(f"  round {rnd} {label:>14}: ready after {seconds:5.2f} s", flush=True)
    summary = {label: median(v) for label, v in times.items()}
    for label, v in summary.items():
        print(f"{label:>14}: ready after {v:.2f} s (median of {args.rounds})")
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.startup " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "median_ready_s": summary,
        "rounds_ready_s": times,
    }
    write_results(args.output, "startup", results)
    return results


if __name__ == "__main__":
    main()

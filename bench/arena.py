"""onnxruntime's CPU memory arena: what a replica holds and what a run costs, per setting of
``NEUROSERVE_CPU_MEMORY_ARENA`` (``shared``, ``per-model``, ``off``).

1. resident memory of a server once ready (every model loaded and warmed), the committed
   repository whole and each model alone;
2. in-process onnxruntime time per run, one intra-op thread as served on 2 cores, with the
   session's own arena, the shared one and none, alternating (MNIST at batch 64, the detector at
   batch 1 and 8).

    python -m bench.arena [--seconds 2] [--skip-each]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.harness import ROOT, neuroserve, write_results
from service.memory import configure_allocator
from service.runtime import OnnxModel, RuntimeOptions

MODES = ("shared", "per-model", "off")


def rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def ready_rss(repository: Path) -> dict[str, float]:
    out = {}
    for mode in MODES:
        with neuroserve(repository, NEUROSERVE_CPU_MEMORY_ARENA=mode) as server:
            out[mode] = round(rss_mib(server.proc.pid), 1)
    return out


def session(path: Path, mode: str) -> ort.InferenceSession:
    """The service's own session for ``path`` with this arena setting, one intra-op thread."""
    options = RuntimeOptions(providers=["CPUExecutionProvider"], intra_op_threads=1, cpu_memory_arena=mode)
    return OnnxModel(path, options).session


def run_times(seconds: float) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    cases = {
        "mnist batch 64": (ROOT / "models/mnist/1/model.onnx", (64, 1, 28, 28)),
        "digit-detector batch 1": (ROOT / "models/digit-detector/3/model.onnx", (1, 3, 384, 384)),
        "digit-detector batch 8": (ROOT / "models/digit-detector/3/model.onnx", (8, 3, 384, 384)),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (path, shape) in cases.items():
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for mode in MODES * 2:  # alternating, twice
            s = session(path, mode)
            feeds = {s.get_inputs()[0].name: rng.random(shape, dtype=np.float32)}
            for _ in range(3):
                s.run(None, feeds)
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                s.run(None, feeds)
                n += 1
            times[mode].append((time.perf_counter() - started) / n * 1000)
        out[name] = {m: round(min(v), 2) for m, v in times.items()}
        print(f"  {name:24} " + ", ".join(f"{m} {v:.1f} ms" for m, v in out[name].items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per timing")
    p.add_argument("--skip-each", action="store_true", help="only the whole repository, not each model alone")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    configure_allocator()  # as the server does: blocks of 1 MiB and more from mmap
    results: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.arena " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results["ready_rss_mib"] = {"every model": ready_rss(ROOT / "models")}
    print("  every model: " + ", ".join(f"{m} {v:.0f} MiB" for m, v in results["ready_rss_mib"]["every model"].items()))
    if not args.skip_each:
        for model in sorted(p.name for p in (ROOT / "models").iterdir() if (p / "model.json").exists()):
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copytree(ROOT / "models" / model, Path(tmp) / model)
                results["ready_rss_mib"][model] = ready_rss(Path(tmp))
            print(f"  {model}: " + ", ".join(f"{m} {v:.0f} MiB" for m, v in results["ready_rss_mib"][model].items()))
    results["ms_per_run"] = run_times(args.seconds)
    write_results(args.output, "arena", results)
    return results


if __name__ == "__main__":
    main()

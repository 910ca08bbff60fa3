"""MNIST serving benchmark, every configuration in one run (absolute figures drift on shared machines;
compare within a run):

1. the raw in-process onnxruntime ceiling, batch 1 to 64;
2. over HTTP with wrk at each concurrency, on the v2 JSON endpoint: a plain FastAPI app running
   onnxruntime once per request on the event loop, neuroserve with batching off
   (``max_batch_size`` 1) and on, and Triton (PyTriton) when ``--triton`` points at its Python;
3. the image endpoint (multipart PNG) with batching off and on.

For neuroserve runs the server-side split (mean queue time per request, mean compute time per
batch, mean batch size) comes from its own Prometheus metrics, scraped before and after each run.

    python -m bench.run [--duration 10] [--concurrency 1 16 64] [--triton .peers/triton/bin/python]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import (
    ROOT,
    Server,
    format_table,
    free_port,
    load_arguments,
    measure,
    neuroserve,
    raw_ceiling,
    write_multipart,
)
from training.idx import load_mnist

NEUROSERVE_CONFIGS = (
    ("neuroserve, batching off", {"NEUROSERVE_MAX_BATCH_SIZE": "1"}),
    ("neuroserve, batching on, delay 0", {"NEUROSERVE_MAX_QUEUE_DELAY_MS": "0"}),
    ("neuroserve, batching on, delay 2 ms", {"NEUROSERVE_MAX_QUEUE_DELAY_MS": "2"}),
)
JSON = "application/json"


@dataclass
class Bodies:
    """One MNIST test digit as each request the benchmark sends, written to files for wrk."""

    v2_json: Path
    v2_binary: Path
    binary_header_length: str
    image: Path
    image_type: str


def write_bodies(digit: np.ndarray, folder: Path) -> Bodies:
    x = (digit.astype(np.float32) / 255.0).reshape(1, 1, 28, 28)
    v2_json = folder / "v2.json"
    v2_json.write_text(
        json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
        )
    )
    # The same request with the tensor as raw bytes after the JSON header (binary tensor extension).
    binary_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    v2_binary = folder / "v2.bin"
    v2_binary.write_bytes(binary_header + x.astype("<f4").tobytes())
    png = io.BytesIO()
    Image.fromarray(digit).save(png, "PNG")
    image = folder / "image.multipart"
    image_type = write_multipart(image, [("digit.png", png.getvalue())])
    return Bodies(v2_json, v2_binary, str(len(binary_header)), image, image_type)


def ceiling_phase(onnx_path: Path, threads: int) -> list[dict]:
    """1. The raw in-process onnxruntime ceiling, batch 1 to 64."""
    print(f"raw onnxruntime ceiling ({onnx_path}, {threads} intra-op thread(s)):", flush=True)
    ceiling = raw_ceiling(onnx_path, threads)
    for row in ceiling:
        print(f"  batch {row['batch']:>3}: {row['ms_per_batch']:7.3f} ms/batch  {row['images_per_s']:9.0f} images/s")
    return ceiling


def plain_runs(args: argparse.Namespace, onnx_path: Path, bodies: Bodies) -> list[dict]:
    """The baseline: a plain FastAPI app, onnxruntime once per request, on the v2 JSON endpoint."""
    port = free_port()
    uvicorn = ["-m", "uvicorn", "bench.plain_app:app", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = Server(
        [sys.executable, *uvicorn],
        {"MODEL": str(onnx_path), "THREADS": str(args.threads)},
        label="plain FastAPI + ORT per request",
        port=port,
        ready_path="/docs",
    )
    with server:
        return measure(server, v2_path(args), bodies.v2_json, JSON, args.concurrency, args.duration, None)


def json_runs(server: Server, args: argparse.Namespace, bodies: Bodies) -> list[dict]:
    """One neuroserve configuration on the v2 endpoint: JSON, and for delay 0 binary tensors too."""
    rows = measure(server, v2_path(args), bodies.v2_json, JSON, args.concurrency, args.duration, args.model)
    if "delay 0" in server.label:
        rows += measure(
            server,
            v2_path(args),
            bodies.v2_binary,
            "application/octet-stream",
            args.concurrency,
            args.duration,
            args.model,
            header_length=bodies.binary_header_length,
            label=server.label + ", binary tensors",
        )
    return rows


def image_runs(server: Server, args: argparse.Namespace, bodies: Bodies) -> list[dict]:
    """3. One neuroserve configuration on the image endpoint (multipart PNG)."""
    return measure(
        server, "/v1/image-classification", bodies.image, bodies.image_type, args.concurrency, args.duration, args.model
    )


def triton_runs(args: argparse.Namespace, onnx_path: Path, bodies: Bodies) -> list[dict]:
    """Triton (PyTriton) with its dynamic batcher on the v2 JSON endpoint, if its Python is there."""
    if not args.triton.exists():
        print(f"(Triton skipped: {args.triton} not found; see ../shared/peers/install-triton.sh)")
        return []
    port = free_port()
    cmd = [
        str(args.triton),
        "../shared/peers/triton_onnx.py",
        str(onnx_path),
        "--name",
        args.model,
        "--port",
        str(port),
    ]
    cmd += ["--threads", str(args.threads), "--max-batch", "64", "--delay-ms", "2"]
    triton = Server(
        cmd,
        {"LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") or ""},
        label="Triton (PyTriton) dynamic batcher",
        port=port,
        ready_path=f"/v2/models/{args.model}/ready",
        stop_signal=signal.SIGINT,
    )
    with triton:
        return measure(triton, v2_path(args), bodies.v2_json, JSON, args.concurrency, args.duration, None)


def http_phase(args: argparse.Namespace, onnx_path: Path, bodies: Bodies) -> tuple[list[dict], list[dict]]:
    """2. and 3. Every server over HTTP: the rows of the v2 JSON endpoint and of the image endpoint
    (each neuroserve configuration serves both from one process)."""
    print("\nv2 JSON endpoint, one 28x28 image per request:", flush=True)
    v2_rows, image_rows = plain_runs(args, onnx_path, bodies), []
    for label, env in NEUROSERVE_CONFIGS:
        with neuroserve(args.repository, label=label, NEUROSERVE_INTRA_OP_THREADS=str(args.threads), **env) as server:
            v2_rows += json_runs(server, args, bodies)
            if not args.skip_image:
                image_rows += image_runs(server, args, bodies)
    v2_rows += triton_runs(args, onnx_path, bodies)
    return v2_rows, image_rows


def report(results: dict, output: Path, model: str) -> Path:
    """The tables, and the results as JSON in ``output``."""
    print("\n### raw onnxruntime (in-process)\n")
    print("| batch | ms/batch | images/s |\n|---:|---:|---:|")
    for row in results["raw_onnxruntime"]:
        print(f"| {row['batch']} | {row['ms_per_batch']:.3f} | {row['images_per_s']:.0f} |")
    print("\n### v2 JSON endpoint\n")
    print(format_table(results["v2_json"], server_side=True))
    if results["image_multipart"]:
        print("\n### /v1/image-classification (multipart PNG)\n")
        print(format_table(results["image_multipart"], server_side=True))
    output.mkdir(parents=True, exist_ok=True)
    out = output / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return out


def v2_path(args: argparse.Namespace) -> str:
    return f"/v2/models/{args.model}/infer"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = load_arguments(__doc__)
    p.add_argument("--model", default="mnist")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, same for every server")
    p.add_argument(
        "--triton",
        type=Path,
        default=ROOT / ".peers" / "triton" / "bin" / "python",
        help="Python of a PyTriton venv (../shared/peers/install-triton.sh); skipped if missing",
    )
    p.add_argument("--skip-image", action="store_true", help="only the v2 JSON endpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    onnx_path = args.repository / args.model / "1" / "model.onnx"
    digit = load_mnist(args.data_dir / "image_classification" / "mnist", "test")[0][0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    bodies = write_bodies(digit, tmp)
    results: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "model": str(onnx_path),
        "raw_onnxruntime": ceiling_phase(onnx_path, args.threads),
    }
    results["v2_json"], results["image_multipart"] = http_phase(args, onnx_path, bodies)
    report(results, args.output, args.model)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()

"""MNIST serving benchmark: neuroserve as users run it (no settings at all) beside a tuned
configuration and its peers, in one interleaved run (absolute figures drift on a shared machine:
every server is started once and the rounds alternate between them, so drift touches them alike).

1. ceilings: raw in-process onnxruntime, batch 1 to 64; the image endpoint's own decoding ceiling
   (multipart parsing, PNG decoding and preprocessing of the same request, in-process, one thread);
2. the v2 JSON endpoint with wrk, ``--rounds`` rounds of every server at each concurrency:
   neuroserve as shipped, tuned (access log off), with batching off; Triton's dynamic batcher
   (PyTriton), LitServe (batch 64, 1 ms) and a plain FastAPI app running onnxruntime once per request
   on its event loop (``bench/plain_app.py``), each peer with one intra-op thread;
3. the image endpoint (multipart PNG): neuroserve as shipped and tuned, interleaved the same way.

For neuroserve the server-side split (queue ms per request, compute ms per batch, mean batch) of
each run comes from its own Prometheus metrics. The summary is the median of the rounds with their
spread, and the ratios of neuroserve as shipped to Triton and to the plain app.

    python -m bench.run [--duration 10] [--rounds 3] [--concurrency 1 64] [--skip-image] [--baseline REF]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import shutil
import signal
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import (
    ROOT,
    Server,
    free_port,
    load_arguments,
    raw_ceiling,
    run_wrk,
    scrape,
    write_multipart,
    write_results,
)
from bench.translation import baseline_checkout
from training.idx import load_mnist

JSON = "application/json"
SHIPPED = "neuroserve as shipped"
TUNED = "neuroserve tuned (access log off)"
BATCHING_OFF = "neuroserve, batching off"
TRITON = "Triton (PyTriton) dynamic batcher"
LITSERVE = "LitServe (batch 64, 1 ms)"
PLAIN = "plain FastAPI + ORT per request"


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


# -- ceilings ---------------------------------------------------------------------------------


def image_ceiling(body: bytes, content_type: str, model_dir: Path, seconds: float = 2.0) -> dict:
    """The image endpoint's own work for one request, in-process on one thread: Starlette's
    multipart parser, then the service's decoding (``decode_each``) and the preprocessing that
    ``model_dir``'s model.json asks for (MNIST's: find, crop and centre the digit)."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    from service.api.images import decode_each
    from service.config import Settings
    from service.tasks import image_classification as task

    settings = Settings()
    spec = json.loads((model_dir / "model.json").read_text())
    parameters = task.ImageClassificationParameters(**spec.get("parameters", {}))
    shape = [1, 1, 28, 28]
    slots = threading.BoundedSemaphore(1)
    headers = Headers({"content-type": content_type, "content-length": str(len(body))})

    async def parse() -> list[tuple[str, bytes]]:
        async def stream():  # type: ignore[no-untyped-def]
            yield body

        form = await MultiPartParser(headers, stream()).parse()
        return [(f.filename or "file", await f.read()) for f in form.getlist("files")]

    def decode(blobs: list[tuple[str, bytes]]) -> None:
        decode_each(
            blobs,
            settings,
            slots,
            lambda decoded: task.prepare(decoded.image, shape, parameters),
            reduce_to=task.decode_size(shape, parameters),
        )

    async def timed() -> tuple[int, float, float]:
        parse_s = decode_s = 0.0
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or n < 50:
            t0 = time.perf_counter()
            blobs = await parse()
            t1 = time.perf_counter()
            decode(blobs)
            parse_s, decode_s, n = parse_s + t1 - t0, decode_s + time.perf_counter() - t1, n + 1
        return n, parse_s, decode_s

    asyncio.run(timed())  # warm-up
    n, parse_s, decode_s = asyncio.run(timed())
    return {
        "requests_per_s": n / (parse_s + decode_s),
        "parse_ms": 1000 * parse_s / n,
        "decode_and_prepare_ms": 1000 * decode_s / n,
    }


# -- servers ----------------------------------------------------------------------------------


def neuroserve_server(args: argparse.Namespace, label: str, checkout: Path = ROOT, **env: str) -> Server:
    """``python -m service serve`` with only the repository and port set (and ``env``): the
    defaults users get, access log included (written to the harness's log file); ``checkout``:
    another working tree's service (an earlier commit's)."""
    port = free_port()
    settings = {"NEUROSERVE_REPOSITORY": str(args.repository), "NEUROSERVE_PORT": str(port), **env}
    return Server([sys.executable, "-m", "service", "serve"], settings, label=label, port=port, cwd=checkout)


def peer_servers(args: argparse.Namespace, onnx_path: Path) -> list[Server]:
    servers = []
    if args.triton.exists():
        port = free_port()
        cmd = [str(args.triton), "../shared/peers/triton_onnx.py", str(onnx_path), "--name", args.model]
        cmd += ["--port", str(port), "--threads", "1", "--max-batch", "64", "--delay-ms", "0"]
        servers.append(
            Server(
                cmd,
                {"LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") or ""},
                label=TRITON,
                port=port,
                ready_path=f"/v2/models/{args.model}/ready",
                stop_signal=signal.SIGINT,
            )
        )
    else:
        print(f"(Triton skipped: {args.triton} not found; see ../shared/peers/install-triton.sh)")
    if args.litserve.exists():
        port = free_port()
        script = ROOT.parent / "shared" / "peers" / "litserve_onnx.py"
        cmd = [str(args.litserve), str(script), str(onnx_path.resolve()), args.model, str(port), "64", "0.001", "1"]
        # In a folder of its own: LitServe writes a client.py into its working directory.
        scratch = Path(tempfile.mkdtemp(prefix="bench-litserve-"))
        servers.append(Server(cmd, label=LITSERVE, port=port, ready_path="/health", cwd=scratch))
    else:
        print(f"(LitServe skipped: {args.litserve} not found; see ../shared/peers/install-litserve.sh)")
    port = free_port()
    uvicorn = ["-m", "uvicorn", "bench.plain_app:app", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    servers.append(
        Server(
            [sys.executable, *uvicorn],
            {"MODEL": str(onnx_path), "THREADS": "1"},
            label=PLAIN,
            port=port,
            ready_path="/docs",
        )
    )
    return servers


# -- interleaved rounds -------------------------------------------------------------------------


def one_run(server: Server, path: str, body: Path, ctype: str, c: int, seconds: float, model: str | None) -> dict:
    """One wrk run; for neuroserve (``model`` given) with the server-side split from its metrics."""
    before = scrape(server.port, model) if model else None
    result = run_wrk(server.port, path, body, ctype, c, seconds)
    if model and before is not None:
        after = scrape(server.port, model)
        d = {k: after[k] - before[k] for k in after}
        result["queue_ms"] = 1000 * d["queue_duration_seconds_sum"] / max(d["queue_duration_seconds_count"], 1)
        result["compute_ms"] = 1000 * d["compute_duration_seconds_sum"] / max(d["compute_duration_seconds_count"], 1)
        result["mean_batch"] = d["batch_size_sum"] / max(d["batch_size_count"], 1)
    return result


def interleaved(
    servers: list[Server],
    path: str,
    body: Path,
    ctype: str,
    args: argparse.Namespace,
    is_neuroserve: Callable[[Server], bool],
) -> list[dict]:
    """A warm-up of each, then ``args.rounds`` rounds; in each, every concurrency, every server."""
    for server in servers:
        run_wrk(server.port, path, body, ctype, max(args.concurrency), min(2.0, args.duration))
    rows = []
    for r in range(args.rounds):
        for c in args.concurrency:
            for server in servers:
                model = args.model if is_neuroserve(server) else None
                result = one_run(server, path, body, ctype, c, args.duration, model)
                rows.append({"server": server.label, "round": r, "concurrency": c, **result})
                print(
                    f"  round {r} {server.label:<36} c={c:<3} {result['rps']:7.0f} req/s  "
                    f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  errors {result['errors']}",
                    flush=True,
                )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per server and concurrency: the median of the rounds, their spread, the errors summed."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["concurrency"]), []).append(row)
    out = []
    for (server, c), runs in groups.items():
        summary = {
            "server": server,
            "concurrency": c,
            "rounds": len(runs),
            "rps": statistics.median(r["rps"] for r in runs),
            "rps_min": min(r["rps"] for r in runs),
            "rps_max": max(r["rps"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "p99_min_ms": min(r["p99_ms"] for r in runs),
            "p99_max_ms": max(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
        if "mean_batch" in runs[0]:
            for key in ("queue_ms", "compute_ms", "mean_batch"):
                summary[key] = statistics.median(r[key] for r in runs)
        out.append(summary)
    return out


def verdicts(summary: list[dict], c: int) -> list[str]:
    """neuroserve as shipped against Triton (>= 1.3x throughput, p99 <= 1.1x) and the plain app
    (>= 1.5x throughput, p99 no worse), at concurrency ``c``."""
    at = {row["server"]: row for row in summary if row["concurrency"] == c}
    shipped = at.get(SHIPPED)
    lines = []
    for peer, throughput, tail in ((TRITON, 1.3, 1.1), (PLAIN, 1.5, 1.0)):
        if shipped is None or peer not in at:
            continue
        rps, p99 = shipped["rps"] / at[peer]["rps"], shipped["p99_ms"] / at[peer]["p99_ms"]
        ok = rps >= throughput and p99 <= tail and shipped["errors"] == 0
        lines.append(
            f"c={c}: as shipped / {peer}: throughput {rps:.2f}x (target >= {throughput}x), "
            f"p99 {p99:.2f}x (target <= {tail}x), errors {shipped['errors']}: {'met' if ok else 'NOT met'}"
        )
    return lines


def format_summary(summary: list[dict]) -> str:
    lines = [
        "| server | concurrency | req/s (median) | req/s min-max | p50 ms | p99 ms (median) | p99 min-max "
        "| errors | queue ms/req | compute ms/batch | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        side = (
            f"{r['queue_ms']:.2f} | {r['compute_ms']:.2f} | {r['mean_batch']:.1f}" if "mean_batch" in r else "- | - | -"
        )
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['rps']:.0f} | {r['rps_min']:.0f}-{r['rps_max']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_min_ms']:.1f}-{r['p99_max_ms']:.1f} "
            f"| {r['errors']} | {side} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = load_arguments(__doc__)
    p.set_defaults(concurrency=[1, 64])
    p.add_argument("--rounds", type=int, default=3, help="rounds of every server, alternating")
    p.add_argument("--model", default="mnist")
    p.add_argument(
        "--triton",
        type=Path,
        default=ROOT / ".peers" / "triton" / "bin" / "python",
        help="Python of a PyTriton venv (../shared/peers/install-triton.sh); skipped if missing",
    )
    p.add_argument(
        "--litserve",
        type=Path,
        default=ROOT / ".peers" / "litserve" / "bin" / "python",
        help="Python of a LitServe venv (../shared/peers/install-litserve.sh); skipped if missing",
    )
    p.add_argument("--skip-image", action="store_true", help="only the v2 JSON endpoint")
    p.add_argument("--baseline", default=None, help="also serve neuroserve as shipped from this git commit")
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
    }
    print(f"raw onnxruntime ceiling ({onnx_path}, 1 intra-op thread):", flush=True)
    results["raw_onnxruntime"] = raw_ceiling(onnx_path, 1)
    for row in results["raw_onnxruntime"]:
        print(f"  batch {row['batch']:>3}: {row['ms_per_batch']:7.3f} ms/batch  {row['images_per_s']:9.0f} images/s")
    results["image_ceiling"] = image_ceiling(bodies.image.read_bytes(), bodies.image_type, args.repository / args.model)
    print(f"image endpoint's decoding ceiling (one thread): {results['image_ceiling']}", flush=True)

    running = contextlib.ExitStack()
    neuroserves = [
        neuroserve_server(args, SHIPPED),
        neuroserve_server(args, TUNED, NEUROSERVE_ACCESS_LOG="false"),
        neuroserve_server(args, BATCHING_OFF, NEUROSERVE_MAX_BATCH_SIZE="1"),
    ]
    with_image = neuroserves[:2]
    if args.baseline:
        tree = running.enter_context(baseline_checkout(args.baseline))
        before = neuroserve_server(args, f"{SHIPPED} @{args.baseline}", checkout=tree)
        neuroserves.insert(1, before)
        with_image.insert(1, before)
    servers = [*neuroserves, *peer_servers(args, onnx_path)]
    ours = {id(s) for s in neuroserves}
    try:
        for server in servers:
            server.start()
        print("\nv2 JSON endpoint, one 28x28 image per request:", flush=True)
        path = f"/v2/models/{args.model}/infer"
        results["v2_json_runs"] = interleaved(servers, path, bodies.v2_json, JSON, args, lambda s: id(s) in ours)
        results["image_multipart_runs"] = []
        if not args.skip_image:
            print("\n/v1/image-classification, one PNG per multipart request:", flush=True)
            results["image_multipart_runs"] = interleaved(
                with_image, "/v1/image-classification", bodies.image, bodies.image_type, args, lambda s: True
            )
    finally:
        for server in servers:
            server.stop()
        running.close()
    report(results, args)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def report(results: dict, args: argparse.Namespace) -> Path:
    results["v2_json"] = summarise(results["v2_json_runs"])
    results["image_multipart"] = summarise(results["image_multipart_runs"])
    # The targets are set at 64 clients (issue 19); other levels are reported, not judged.
    results["verdicts"] = verdicts(results["v2_json"], 64)
    print("\n### raw onnxruntime (in-process, 1 intra-op thread)\n")
    print("| batch | ms/batch | images/s |\n|---:|---:|---:|")
    for row in results["raw_onnxruntime"]:
        print(f"| {row['batch']} | {row['ms_per_batch']:.3f} | {row['images_per_s']:.0f} |")
    print(f"\n### v2 JSON endpoint (median of {args.rounds} interleaved rounds of {args.duration:.0f} s)\n")
    print(format_summary(results["v2_json"]))
    if results["image_multipart"]:
        ceiling = results["image_ceiling"]
        print(
            f"\n### /v1/image-classification (multipart PNG); its decoding ceiling on one thread: "
            f"{ceiling['requests_per_s']:.0f} requests/s (parse {ceiling['parse_ms']:.3f} ms, "
            f"decode and prepare {ceiling['decode_and_prepare_ms']:.3f} ms)\n"
        )
        print(format_summary(results["image_multipart"]))
    print()
    for line in results["verdicts"]:
        print(line)
    out = write_results(args.output, args.model, results)
    return out


if __name__ == "__main__":
    main()

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
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from training.idx import load_mnist

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "post.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_multipart(path: Path, files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> str:
    """A multipart/form-data body (PNG ``files`` plus form ``fields``) written to ``path``; its type."""
    boundary = "neuroservebenchboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    for name, blob in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + blob + b"\r\n")
    path.write_bytes(b"".join(parts) + f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}"


def raw_ceiling(
    model: Path, threads: int, seconds: float = 1.0, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
) -> list[dict]:
    """In-process onnxruntime, one FP32 input (its non-batch dimensions fixed), by batch size."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name, shape = session.get_inputs()[0].name, session.get_inputs()[0].shape[1:]
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
        for _ in range(5):
            session.run(None, {name: x})
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or runs < 10:
            session.run(None, {name: x})
            runs += 1
        rows.append({"batch": batch, "ms_per_batch": 1000 * elapsed / runs, "images_per_s": batch * runs / elapsed})
    return rows


class Server:
    def __init__(
        self,
        label: str,
        cmd: list[str],
        env: dict[str, str],
        ready_path: str,
        port: int,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.label, self.port, self.stop_signal = label, port, stop_signal
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.log.seek(0)
        raise RuntimeError(f"{label} did not start:\n{self.log.read().decode()[-3000:]}")

    def stop(self) -> None:
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def scrape(port: int, model: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for metric in ("queue_duration_seconds", "compute_duration_seconds", "batch_size"):
        for part in ("sum", "count"):
            m = re.search(rf'^neuroserve_{metric}_{part}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
            values[f"{metric}_{part}"] = float(m.group(1)) if m else 0.0
    return values


def run_wrk(
    port: int, path: str, body_file: Path, content_type: str, concurrency: int, seconds: float, header_length: str = ""
) -> dict:
    cmd = [
        "wrk",
        f"-t{min(2, concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}{path}",
    ]
    env = {**os.environ, "BODY_FILE": str(body_file), "CONTENT_TYPE": content_type, "HEADER_LENGTH": header_length}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRK_JSON "))
    raw = json.loads(line[len("WRK_JSON ") :])
    errors = sum(v for k, v in raw.items() if k.startswith("errors_"))
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "requests": raw["requests"],
        "errors": errors,
        "non_2xx": raw["errors_status"],
    }


def measure(
    server: Server,
    path: str,
    body: Path,
    ctype: str,
    levels: list[int],
    seconds: float,
    model: str | None,
    header_length: str = "",
    label: str | None = None,
) -> list[dict]:
    run_wrk(server.port, path, body, ctype, max(levels), min(2.0, seconds), header_length)  # warm up
    rows = []
    for c in levels:
        before = scrape(server.port, model) if model else None
        result = run_wrk(server.port, path, body, ctype, c, seconds, header_length)
        if model:
            after = scrape(server.port, model)
            d = {k: after[k] - before[k] for k in after}
            result["queue_ms"] = 1000 * d["queue_duration_seconds_sum"] / max(d["queue_duration_seconds_count"], 1)
            result["compute_ms"] = (
                1000 * d["compute_duration_seconds_sum"] / max(d["compute_duration_seconds_count"], 1)
            )
            result["mean_batch"] = d["batch_size_sum"] / max(d["batch_size_count"], 1)
        name = label or server.label
        rows.append({"server": name, "concurrency": c, **result})
        print(
            f"  {name:<34} c={c:<3} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:7.1f} ms  "
            f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}",
            flush=True,
        )
    return rows


def neuroserve(label: str, port: int, model_repo: Path, **env: str) -> Server:
    settings = {
        "NEUROSERVE_REPOSITORY": str(model_repo),
        "NEUROSERVE_PORT": str(port),
        "NEUROSERVE_ACCESS_LOG": "false",
        "NEUROSERVE_LOG_LEVEL": "warning",
        **env,
    }
    return Server(label, [sys.executable, "-m", "service", "serve"], settings, "/v2/health/ready", port)


def format_table(rows: list[dict], server_side: bool) -> str:
    head = "| server | concurrency | req/s | p50 ms | p99 ms | errors |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if server_side:
        head += " queue ms/req | compute ms/batch | mean batch |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['server']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['errors']} |"
        )
        if server_side:
            if "queue_ms" in r:
                line += f" {r['queue_ms']:.2f} | {r['compute_ms']:.2f} | {r['mean_batch']:.1f} |"
            else:
                line += " - | - | - |"
        lines.append(line)
    return "\n".join(lines)


def load_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every HTTP benchmark takes: wrk duration, concurrency levels, repository, data."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("NEUROSERVE_TEST_DATA", ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    return p


def main(argv: list[str] | None = None) -> dict:
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
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")

    onnx_path = args.repository / args.model / "1" / "model.onnx"
    digit = load_mnist(args.data_dir / "image_classification" / "mnist", "test")[0][0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    x = (digit.astype(np.float32) / 255.0).reshape(1, 1, 28, 28)
    v2_body = tmp / "v2.json"
    v2_body.write_text(
        json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
        )
    )
    png = io.BytesIO()
    Image.fromarray(digit).save(png, "PNG")
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
    v2_binary = tmp / "v2.bin"
    v2_binary.write_bytes(binary_header + x.astype("<f4").tobytes())
    image_body = tmp / "image.multipart"
    image_ctype = write_multipart(image_body, [("digit.png", png.getvalue())])
    json_ctype = "application/json"
    threads = str(args.threads)
    v2_path = f"/v2/models/{args.model}/infer"

    print(f"raw onnxruntime ceiling ({onnx_path}, {threads} intra-op thread(s)):", flush=True)
    ceiling = raw_ceiling(onnx_path, args.threads)
    for row in ceiling:
        print(f"  batch {row['batch']:>3}: {row['ms_per_batch']:7.3f} ms/batch  {row['images_per_s']:9.0f} images/s")

    results: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "model": str(onnx_path),
        "raw_onnxruntime": ceiling,
        "v2_json": [],
        "image_multipart": [],
    }
    print("\nv2 JSON endpoint, one 28x28 image per request:", flush=True)
    plain_port = free_port()
    plain = Server(
        "plain FastAPI + ORT per request",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.plain_app:app",
            "--port",
            str(plain_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        {"MODEL": str(onnx_path), "THREADS": threads},
        "/docs",
        plain_port,
    )
    try:
        results["v2_json"] += measure(plain, v2_path, v2_body, json_ctype, args.concurrency, args.duration, None)
    finally:
        plain.stop()
    for label, env in (
        ("neuroserve, batching off", {"NEUROSERVE_MAX_BATCH_SIZE": "1"}),
        ("neuroserve, batching on, delay 0", {"NEUROSERVE_MAX_QUEUE_DELAY_MS": "0"}),
        ("neuroserve, batching on, delay 2 ms", {"NEUROSERVE_MAX_QUEUE_DELAY_MS": "2"}),
    ):
        server = neuroserve(label, free_port(), args.repository, NEUROSERVE_INTRA_OP_THREADS=threads, **env)
        try:
            results["v2_json"] += measure(
                server, v2_path, v2_body, json_ctype, args.concurrency, args.duration, args.model
            )
            if "delay 0" in label:
                results["v2_json"] += measure(
                    server,
                    v2_path,
                    v2_binary,
                    "application/octet-stream",
                    args.concurrency,
                    args.duration,
                    args.model,
                    header_length=str(len(binary_header)),
                    label=label + ", binary tensors",
                )
            if not args.skip_image:
                results["image_multipart"] += measure(
                    server,
                    "/v1/image-classification",
                    image_body,
                    image_ctype,
                    args.concurrency,
                    args.duration,
                    args.model,
                )
        finally:
            server.stop()
    if args.triton.exists():
        port = free_port()
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        triton = Server(
            "Triton (PyTriton) dynamic batcher",
            [
                str(args.triton),
                "../shared/peers/triton_onnx.py",
                str(onnx_path),
                "--name",
                args.model,
                "--port",
                str(port),
                "--threads",
                threads,
                "--max-batch",
                "64",
                "--delay-ms",
                "2",
            ],
            {"LD_LIBRARY_PATH": libdir},
            f"/v2/models/{args.model}/ready",
            port,
            signal.SIGINT,
        )
        try:
            results["v2_json"] += measure(triton, v2_path, v2_body, json_ctype, args.concurrency, args.duration, None)
        finally:
            triton.stop()
    else:
        print(f"(Triton skipped: {args.triton} not found; see ../shared/peers/install-triton.sh)")

    print("\n### raw onnxruntime (in-process)\n")
    print("| batch | ms/batch | images/s |\n|---:|---:|---:|")
    for row in ceiling:
        print(f"| {row['batch']} | {row['ms_per_batch']:.3f} | {row['images_per_s']:.0f} |")
    print("\n### v2 JSON endpoint\n")
    print(format_table(results["v2_json"], server_side=True))
    if results["image_multipart"]:
        print("\n### /v1/image-classification (multipart PNG)\n")
        print(format_table(results["image_multipart"], server_side=True))
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()

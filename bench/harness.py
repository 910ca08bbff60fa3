"""What every benchmark and every test that needs a real server process share: a server on a free
port, ready or killed (``Server``, ``neuroserve``), request bodies (``multipart``,
``write_multipart``), load with wrk (``run_wrk``, ``measure``, ``format_table``), the server's own
Prometheus figures (``scrape``, ``metric``), the in-process onnxruntime ceiling (``raw_ceiling``)
and the HTTP benchmarks' shared options (``load_arguments``).

    with neuroserve(repository, NEUROSERVE_MAX_BATCH_SIZE="1") as server:
        rows = measure(server, "/v2/models/mnist/infer", body, "application/json", [1, 16], 10, "mnist")
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "post.lua"
DATA = Path(os.environ.get("NEUROSERVE_TEST_DATA", ROOT.parent / "shared" / "data"))
READY_TIMEOUT_S = 120.0  # loading and warming every model on two busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server exited or never became ready (its process group is gone by then)."""


class Server:
    """``cmd`` (with ``env`` over this process's environment) run from the repository root in a
    process group of its own, on ``port`` (a free one unless given; ``cmd`` must listen on it).

    ``start()`` (or ``with``) returns once ``GET ready_path`` answers 200; a server that exits first,
    or is not ready within ``ready_timeout`` seconds, has its whole process group killed and raises
    ``ServerError`` with the tail of its log. ``stop()`` (or leaving the ``with``) sends
    ``stop_signal`` (a graceful shutdown), kills the group after ``stop_timeout`` seconds, and in any
    case kills whatever the server left behind in its group."""

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str] | None = None,
        *,
        label: str = "server",
        port: int | None = None,
        ready_path: str = "/v2/health/ready",
        ready_timeout: float = READY_TIMEOUT_S,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 30.0,
        cwd: Path = ROOT,
    ) -> None:
        self.cmd, self.env, self.label, self.cwd = cmd, env or {}, label, cwd
        self.port = port if port is not None else free_port()
        self.ready_path, self.ready_timeout = ready_path, ready_timeout
        self.stop_signal, self.stop_timeout = stop_signal, stop_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._closed_log = ""

    def start(self) -> Server:
        if self.proc is not None:
            return self
        self.proc = subprocess.Popen(
            self.cmd,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:  # not ready, or interrupted: never leave a server behind
            if self.proc.returncode is None:
                self._kill()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url(self.ready_path), timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if not self._running():
                raise ServerError(f"{self.label} exited with {self._kill()}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise ServerError(f"{self.label} was not ready within {self.ready_timeout:.0f} s:\n{self.output()[-3000:]}")

    def stop(self) -> int | None:
        """Stop the server (if it still runs) and return its exit code (None if it never started)."""
        if self.proc is None:
            return None
        if self._running():
            self.proc.send_signal(self.stop_signal)
            deadline = time.monotonic() + self.stop_timeout
            while self._running() and time.monotonic() < deadline:
                time.sleep(0.05)
        return self._kill()

    def stop_cleanly(self) -> str:
        """``stop()``, and the server's log; ``ServerError`` unless it exited with 0 or by the stop
        signal (uvicorn re-raises SIGTERM after its graceful shutdown)."""
        code = self.stop()
        log = self.output()
        if code not in (0, -self.stop_signal):
            raise ServerError(f"{self.label} exited with {code}:\n{log[-2000:]}")
        return log

    def _running(self) -> bool:
        """Whether the server runs, found without reaping it: until it is reaped, its pid (its group's
        id) cannot go to another process, so that ``_kill`` hits only what the server left behind."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return False
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def _kill(self) -> int:
        """SIGKILL the process group (the server and anything it started), then reap the server."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait()

    def output(self) -> str:
        """What the server has written so far (stdout and stderr together)."""
        if self._log.closed:
            return self._closed_log
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the log file (``output()`` still answers)."""
        if not self._log.closed:
            self._closed_log = self.output()
            self._log.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
        """One JSON request: the status, the parsed JSON body ({} if not JSON) and the headers (lower case)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            parsed = json.loads(raw) if headers.get("content-type", "").startswith("application/json") else {}
            return response.status, parsed, headers
        finally:
            conn.close()

    def metrics(self) -> str:
        return metrics_text(self.port)

    def metric(self, name: str) -> float:
        """One sample of the server's Prometheus metrics, by its full name with labels (0 if absent)."""
        return metric(self.metrics(), name)


def neuroserve(
    repository: Path, *, label: str = "neuroserve", port: int | None = None, checkout: Path = ROOT, **env: str
) -> Server:
    """``python -m service serve`` on ``repository``, access log off, log level warning (``env``,
    NEUROSERVE_* settings, goes over these); ``checkout``: another working tree's service (an
    earlier commit's, to compare with in one run)."""
    port = port if port is not None else free_port()
    settings = {
        "NEUROSERVE_REPOSITORY": str(repository),
        "NEUROSERVE_PORT": str(port),
        "NEUROSERVE_ACCESS_LOG": "false",
        "NEUROSERVE_LOG_LEVEL": "warning",
        **env,
    }
    return Server([sys.executable, "-m", "service", "serve"], settings, label=label, port=port, cwd=checkout)


def multipart(
    files: list[tuple[str, bytes]], fields: dict[str, str] | None = None, mime: str = "image/png"
) -> tuple[bytes, str]:
    """A multipart/form-data body: ``files`` (name, content) as form field ``files``, plus form
    ``fields``; the body and its content type."""
    boundary = "neuroservebenchboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    for name, blob in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        parts.append(head.encode() + f"Content-Type: {mime}\r\n\r\n".encode() + blob + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def write_multipart(path: Path, files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> str:
    """A multipart/form-data body (PNG ``files`` plus form ``fields``) written to ``path``; its type."""
    body, content_type = multipart(files, fields)
    path.write_bytes(body)
    return content_type


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    """The value of sample ``name`` (full name with labels) in Prometheus text, 0 if absent."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def scrape(port: int, model: str) -> dict[str, float]:
    """The batching histograms' sums and counts for ``model``: queue and compute time, batch size."""
    text = metrics_text(port)
    return {
        f"{name}_{part}": metric(text, f'neuroserve_{name}_{part}{{model="{model}"}}')
        for name in ("queue_duration_seconds", "compute_duration_seconds", "batch_size")
        for part in ("sum", "count")
    }


def run_wrk(
    port: int,
    path: str,
    body_file: Path,
    content_type: str,
    concurrency: int,
    seconds: float,
    header_length: str = "",
    headers: dict[str, str] | None = None,
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
    env["EXTRA_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())
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
    """A wrk warm-up, then a wrk run at each concurrency in ``levels``; with ``model``, the
    server-side split (queue ms per request, compute ms per batch, mean batch) of each run from
    the server's metrics. Prints a line per run."""
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


def load_arguments(doc: str, duration_help: str = "seconds per wrk run") -> argparse.ArgumentParser:
    """The options every HTTP benchmark takes: duration, concurrency levels, repository, data, output."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help=duration_help)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    return p


def write_results(folder: Path, prefix: str, results: dict) -> Path:
    """``results`` as ``folder/<prefix>-<time>.json``; prints and returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return out

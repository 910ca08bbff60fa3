"""Behaviour that needs a real server process: load shedding, graceful shutdown, client disconnects;
and the harness that starts one (``bench.harness``) never leaves a process behind."""

from __future__ import annotations

import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

from bench.harness import Server, ServerError, free_port, neuroserve
from tests.onnx_models import model_json, write_model

pytestmark = pytest.mark.slow
WIDTH = 512


def serve(repository: Path, **env: str) -> Server:
    """neuroserve on ``repository``, one intra-op thread, logging at info (the shutdown's "drained")."""
    return neuroserve(repository, NEUROSERVE_INTRA_OP_THREADS="1", NEUROSERVE_LOG_LEVEL="info", **env)


@pytest.fixture
def slow_repo(tmp_path: Path) -> Path:
    write_model(
        tmp_path,
        "slow",
        slow=True,
        width=WIDTH,
        spec=model_json("slow", width=WIDTH, max_batch_size=4, dynamic_batching={"max_queue_delay_ms": 0}),
    )
    return tmp_path


def body(seed: int) -> dict:
    data = np.random.default_rng(seed).standard_normal(WIDTH).astype(np.float32)
    return {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": data.tolist()}]}


def test_overload_is_shed_fast_with_429_and_retry_after(slow_repo: Path) -> None:
    with serve(slow_repo, NEUROSERVE_MAX_QUEUE_SIZE="4", NEUROSERVE_MAX_BATCH_SIZE="1") as server:

        def call(i: int) -> tuple[int, dict, dict, float]:
            status, parsed, headers = server.request("POST", "/v2/models/slow/infer", body(i))
            return status, parsed, headers, time.monotonic()

        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(call, range(96)))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 429}, statuses
        shed = [r for r in results if r[0] == 429]
        served = [r for r in results if r[0] == 200]
        assert shed, "no request was shed under a queue limit of 4"
        assert served, "nothing was served"
        for _, parsed, headers, _ in shed:
            assert parsed["error_type"] == "overloaded"
            assert headers["retry-after"] == "1"
        # Rejections are immediate, not queued: the median rejection comes before the last success.
        assert np.median([r[3] for r in shed]) < max(r[3] for r in served)
        assert server.metric('neuroserve_model_requests_total{model="slow",outcome="overloaded"}') == len(shed)
        assert server.metric('neuroserve_model_requests_total{model="slow",outcome="ok"}') == len(served)
        server.stop_cleanly()


def test_sigterm_finishes_every_accepted_request_then_exits(slow_repo: Path) -> None:
    n = 24
    with serve(slow_repo, NEUROSERVE_MAX_BATCH_SIZE="1", NEUROSERVE_MAX_QUEUE_SIZE="256") as server:
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(server.request, "POST", "/v2/models/slow/infer", body(i)) for i in range(n)]
            deadline = time.monotonic() + 20
            while server.metric('neuroserve_queue_depth{model="slow"}') < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert server.metric('neuroserve_queue_depth{model="slow"}') >= 8, "requests never queued up"
            server.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        assert [r[0] for r in results] == [200] * n, [r[:2] for r in results if r[0] != 200]
        for i, (_, parsed, _) in enumerate(results):
            x = np.asarray(body(i)["inputs"][0]["data"], dtype=np.float32)
            assert parsed["outputs"][0]["shape"] == [1, WIDTH]
            assert not np.allclose(parsed["outputs"][0]["data"], x)  # a real answer, its own
        server.proc.wait(30)
        assert "drained" in server.stop_cleanly()


def test_client_that_disconnects_is_dropped_before_inference(tmp_path: Path) -> None:
    # Ten times the slow model's layers: the queue must build up faster than the model drains it,
    # even when the client side is slowed (a whole test session's threads in the same process).
    spec = model_json("slow", width=WIDTH, max_batch_size=4, dynamic_batching={"max_queue_delay_ms": 0})
    write_model(tmp_path, "slow", slow=True, width=WIDTH, layers=400, spec=spec)
    busy_n = 60
    with serve(tmp_path, NEUROSERVE_MAX_BATCH_SIZE="1") as server:
        with ThreadPoolExecutor(busy_n + 2) as pool:
            # Keep the model busy so that the impatient requests are still queued when they give up.
            busy = [pool.submit(server.request, "POST", "/v2/models/slow/infer", body(i)) for i in range(busy_n)]
            deadline = time.monotonic() + 20
            while server.metric('neuroserve_queue_depth{model="slow"}') < 40 and time.monotonic() < deadline:
                time.sleep(0.002)
            impatient = [
                pool.submit(server.request, "POST", "/v2/models/slow/infer", body(100 + i), 0.03) for i in range(2)
            ]
            for future in impatient:
                with pytest.raises((TimeoutError, OSError)):
                    future.result()
            assert all(f.result()[0] == 200 for f in busy)
        deadline = time.monotonic() + 10
        metric = 'neuroserve_model_requests_total{model="slow",outcome="client_disconnected"}'
        while server.metric(metric) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric(metric) == 2
        # Only the patient requests were computed: one row per batch.
        assert server.metric('neuroserve_batch_size_count{model="slow"}') == busy_n
        server.stop_cleanly()


def test_a_client_gone_with_pipelined_requests_is_dropped_and_nothing_is_written_to_its_socket(tmp_path: Path) -> None:
    """Two requests in one write, then the client goes. uvicorn marked only the newest request
    (the pipelined one, not yet started) as disconnected: the running one was computed, logged an
    error writing to the closed socket, and counted as a 200."""
    spec = model_json("slow", width=WIDTH, max_batch_size=4, dynamic_batching={"max_queue_delay_ms": 0})
    write_model(tmp_path, "slow", slow=True, width=WIDTH, layers=400, spec=spec)
    busy_n = 60
    raw = orjson.dumps(body(7))
    one = b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    one += b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
    with serve(tmp_path, NEUROSERVE_MAX_BATCH_SIZE="1") as server:
        with ThreadPoolExecutor(busy_n) as pool:
            busy = [pool.submit(server.request, "POST", "/v2/models/slow/infer", body(i)) for i in range(busy_n)]
            deadline = time.monotonic() + 20
            while server.metric('neuroserve_queue_depth{model="slow"}') < 40 and time.monotonic() < deadline:
                time.sleep(0.002)
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(one + one)
                time.sleep(0.2)  # the first is read and queued, the second waits behind it
            assert all(f.result()[0] == 200 for f in busy)
        metric = 'neuroserve_model_requests_total{model="slow",outcome="client_disconnected"}'
        deadline = time.monotonic() + 10
        while server.metric(metric) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric(metric) == 1
        assert server.metric('neuroserve_batch_size_count{model="slow"}') == busy_n  # it was never computed
        log = server.stop_cleanly()
    assert "Traceback" not in log and "closed" not in log.lower(), log[-3000:]


# The harness itself, on stand-in servers (a second or two each).

# Starts a child (and prints its pid) in the same process group, then, once the file READY names
# exists (at once without READY), answers 200 to every GET until it is stopped.
STAND_IN = """
import http.server, os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(f"child {child.pid}", flush=True)
while os.environ.get("READY") and not os.path.exists(os.environ["READY"]):
    time.sleep(0.05)

class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


def stand_in(tmp_path: Path, **kwargs) -> Server:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    port = free_port()
    return Server([sys.executable, str(script), str(port)], kwargs.pop("env", {}), port=port, **kwargs)


def child_of(server: Server) -> int:
    deadline = time.monotonic() + 10
    while "child " not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(server.output().split("child ")[1].split()[0])


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` has ended (a zombie, or reaped), waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_harness_stops_the_server_and_what_it_started(tmp_path: Path) -> None:
    with stand_in(tmp_path) as server:
        status, _, _ = server.request("GET", "/v2/health/ready")
        assert status == 200
        child = child_of(server)
        assert not gone(child, timeout=0)
    assert server.proc.returncode == -signal.SIGTERM
    assert gone(child)


def test_harness_kills_a_server_that_never_becomes_ready(tmp_path: Path) -> None:
    server = stand_in(tmp_path, env={"READY": str(tmp_path / "never")}, ready_timeout=3)
    with pytest.raises(ServerError, match="not ready within 3 s"), server:
        pass
    assert server.proc.returncode == -signal.SIGKILL
    assert gone(child_of(server))


def test_harness_reports_a_server_that_exits_before_it_is_ready() -> None:
    server = Server([sys.executable, "-c", "print('no model repository'); raise SystemExit(3)"])
    with pytest.raises(ServerError, match=r"exited with 3:\nno model repository"), server:
        pass


def test_overload_is_refused_before_the_body_is_read(slow_repo: Path) -> None:
    import socket
    import threading

    def probe(port: int) -> bytes | None:
        """Headers of a large body and not one byte of it: the answer, if one comes within a second."""
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(
                b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000000\r\n\r\n"
            )
            reply = b""
            try:
                while b"\r\n\r\n" not in reply:
                    reply += sock.recv(65536)
            except TimeoutError:
                return None  # the server is waiting for the body: it was not refused up front
            return reply

    with serve(slow_repo, NEUROSERVE_MAX_QUEUE_SIZE="2", NEUROSERVE_MAX_BATCH_SIZE="1") as server:
        stop = threading.Event()

        def keep_busy(seed: int) -> None:  # resubmits at once: the queue stays full
            while not stop.is_set():
                server.request("POST", "/v2/models/slow/infer", body(seed))

        with ThreadPoolExecutor(8) as pool:
            busy = [pool.submit(keep_busy, i) for i in range(8)]
            deadline = time.monotonic() + 20
            while server.metric('neuroserve_queue_depth{model="slow"}') < 2 and time.monotonic() < deadline:
                time.sleep(0.002)
            # The queue can be one short for an instant between two requests: a few tries.
            replies = [probe(server.port) for _ in range(5)]
            stop.set()
            for future in busy:
                future.result()
        refused = [r for r in replies if r is not None and r.startswith(b"HTTP/1.1 429")]
        assert refused, replies
        server.stop_cleanly()


def test_an_upload_the_client_abandons_is_counted_499_not_logged_as_an_unhandled_500(tmp_path: Path) -> None:
    """Issue 13, finding 8: an aborted upload was logged as an unhandled error with a traceback and
    counted as HTTP 500."""
    from bench.harness import metrics_text

    repo = tmp_path / "models"
    repo.mkdir()
    (repo / "mnist").symlink_to(Path(__file__).resolve().parents[1] / "models" / "mnist")
    with neuroserve(repo) as server:
        head = (
            "POST /v1/image-classification HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 200000\r\n\r\n"
        )
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(
                    head.encode() + b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
                )
                sock.sendall(b"Content-Type: image/png\r\n\r\n" + b"\x89PNG" + b"\0" * 70_000)
                time.sleep(0.3)  # the route is reading the body when the client goes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = metrics_text(server.port)
            counted = [line for line in text.splitlines() if line.startswith("neuroserve_http_requests_total{")]
            if sum('status="499"' in line for line in counted):
                break
            time.sleep(0.2)
        assert any('route="/v1/image-classification"' in line and 'status="499"' in line for line in counted), counted
        assert not any('status="500"' in line for line in counted), counted
        log = server.output()
        assert "unhandled error" not in log and "Traceback" not in log, log[-2000:]

"""Behaviour that needs a real server process: load shedding, graceful shutdown, client disconnects."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.onnx_models import model_json, write_model

pytestmark = pytest.mark.slow
WIDTH = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, repository: Path, **env: str) -> None:
        self.port = free_port()
        environ = {
            **os.environ,
            "NEUROSERVE_REPOSITORY": str(repository),
            "NEUROSERVE_PORT": str(self.port),
            "NEUROSERVE_ACCESS_LOG": "false",
            "NEUROSERVE_INTRA_OP_THREADS": "1",
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120  # loading and warming models on 2 busy cores
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read()}")
            time.sleep(0.1)
        self.proc.kill()  # never leave a server behind to slow the tests after this one
        self.proc.wait()
        raise AssertionError(f"server never became ready:\n{self.proc.stdout.read()[-2000:]}")

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
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

    def metric(self, name: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> str:
        """SIGTERM, wait, and return the log; uvicorn re-raises SIGTERM after its graceful shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        log = self.proc.stdout.read()
        self.proc.stdout.close()
        assert code in (0, -signal.SIGTERM), f"server exited with {code}:\n{log[-2000:]}"
        return log


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
    server = Server(slow_repo, NEUROSERVE_MAX_QUEUE_SIZE="4", NEUROSERVE_MAX_BATCH_SIZE="1")
    try:

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
    finally:
        server.stop()


def test_sigterm_finishes_every_accepted_request_then_exits(slow_repo: Path) -> None:
    server = Server(slow_repo, NEUROSERVE_MAX_BATCH_SIZE="1", NEUROSERVE_MAX_QUEUE_SIZE="256")
    n = 24
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
    assert "drained" in server.stop()


def test_client_that_disconnects_is_dropped_before_inference(slow_repo: Path) -> None:
    server = Server(slow_repo, NEUROSERVE_MAX_BATCH_SIZE="1")
    busy_n = 60
    try:
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
    finally:
        server.stop()

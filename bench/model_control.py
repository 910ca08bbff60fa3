"""Model control under load: a new MNIST version loaded while clients keep sending requests.

A server process serves a copy of the committed ``mnist`` (version 1) while ``--clients`` threads
post one MNIST test digit each to ``/v2/models/mnist/infer``, back to back, recording when each
request began, its status and the version that answered. Three scenarios, one after the other:

1. ``explicit``: version 2 (the same graph, copied into ``mnist/2``) is copied in and
   ``POST /v2/repository/models/mnist/load`` asks for it (``NEUROSERVE_MODEL_CONTROL=explicit``);
2. ``unload``: ``/unload`` then, a second later, ``/load`` again: in between, mnist answers 503
   (by design: it is not served), and nothing else fails;
3. ``poll``: a fresh server with ``NEUROSERVE_MODEL_CONTROL=poll`` (interval 0.5 s) finds
   version 3 copied in by itself;
4. ``wrk``: ``--wrk-connections`` wrk connections on the same route for ``--wrk-seconds`` while
   version 4 is copied in and loaded (explicit) halfway through: wrk's count of failed and non-2xx
   answers (wrk cannot tell versions apart; the scenarios above do).

Reported per scenario: requests, answers by status, requests begun after the switch that an old
version answered (must be 0), and request latency p50/p99 before and around the switch.

    python -m bench.model_control [--clients 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.harness import DATA, ROOT, neuroserve, run_wrk, write_results


def digit_body(data_dir: Path) -> bytes:
    """One MNIST test digit as a v2 request (scaled as the classifier takes it)."""
    import gzip

    with gzip.open(data_dir / "image_classification" / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        pixels = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)[: 28 * 28].astype(np.float32) / 255.0
    tensor = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": pixels.tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


class Clients:
    def __init__(self, port: int, body: bytes, n: int) -> None:
        self.port, self.body = port, body
        self.records: list[tuple[float, float, int, str | None]] = []  # began, seconds, status, version
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                conn.request("POST", "/v2/models/mnist/infer", self.body, {"content-type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                status = response.status
                version = json.loads(payload).get("model_version") if status == 200 else None
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                status, version = -1, None
            self.records.append((began, time.monotonic() - began, status, version))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def post(port: int, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def summary(records: list, switched: float, old: set[str], window_s: float = 1.0) -> dict:
    statuses: dict[str, int] = {}
    for _, _, status, _ in records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    before = np.array([r[1] for r in records if r[0] < switched - window_s]) * 1000
    around = np.array([r[1] for r in records if abs(r[0] - switched) <= window_s]) * 1000
    late_old = sum(1 for r in records if r[0] > switched and r[3] in old)

    def pct(values: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 2) if len(values) else None

    return {
        "requests": len(records),
        "statuses": statuses,
        "begun_after_switch_answered_by_old_version": late_old,
        "ms_before": {"p50": pct(before, 50), "p99": pct(before, 99)},
        "ms_within_1s_of_switch": {"p50": pct(around, 50), "p99": pct(around, 99)},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="steady load before and after each switch")
    parser.add_argument("--wrk-connections", type=int, default=64)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    body = digit_body(args.data_dir)
    repo = Path(tempfile.mkdtemp(prefix="bench-model-control-"))
    source = ROOT / "models" / "mnist"
    (repo / "mnist").mkdir()
    shutil.copy(source / "model.json", repo / "mnist" / "model.json")
    shutil.copytree(source / "1", repo / "mnist" / "1")
    results: dict = {"command": "python -m bench.model_control " + " ".join(argv or sys.argv[1:])}
    try:
        with neuroserve(repo, label="explicit", NEUROSERVE_MODEL_CONTROL="explicit") as server:
            with Clients(server.port, body, args.clients) as clients:
                time.sleep(args.seconds)
                shutil.copytree(source / "1", repo / "mnist" / "2")
                status, answer = post(server.port, "/v2/repository/models/mnist/load")
                switched = time.monotonic()
                time.sleep(args.seconds)
            results["explicit"] = {"load": [status, answer], **summary(clients.records, switched, {"1"})}
            with Clients(server.port, body, args.clients) as clients:
                time.sleep(args.seconds)
                unloaded = post(server.port, "/v2/repository/models/mnist/unload")
                time.sleep(1.0)
                loaded = post(server.port, "/v2/repository/models/mnist/load")
                switched = time.monotonic()
                time.sleep(args.seconds)
            results["unload"] = {"unload": unloaded, "load": loaded, **summary(clients.records, switched, set())}
        with neuroserve(
            repo, label="poll", NEUROSERVE_MODEL_CONTROL="poll", NEUROSERVE_MODEL_POLL_INTERVAL_S="0.5"
        ) as server:
            with Clients(server.port, body, args.clients) as clients:
                time.sleep(args.seconds)
                copied = time.monotonic()
                shutil.copytree(source / "1", repo / "mnist" / "3")
                switched = None
                while time.monotonic() - copied < 60:
                    seen = [r for r in clients.records if r[0] > copied and r[3] == "3"]
                    if seen:
                        switched = min(r[0] for r in seen)
                        break
                    time.sleep(0.05)
                time.sleep(args.seconds)
            assert switched is not None, "the poller never switched to version 3"
            results["poll"] = {
                "seconds_from_copy_to_first_v3_answer": round(switched - copied, 2),
                **summary(clients.records, switched, {"2"}),
            }
        body_file = repo / "digit.json"
        body_file.write_bytes(body)
        with neuroserve(repo, label="wrk", NEUROSERVE_MODEL_CONTROL="explicit") as server:
            loaded: list = []

            def switch() -> None:
                time.sleep(args.wrk_seconds / 2)
                shutil.copytree(source / "1", repo / "mnist" / "4")
                loaded.append(post(server.port, "/v2/repository/models/mnist/load"))

            switcher = threading.Thread(target=switch)
            switcher.start()
            route, connections = "/v2/models/mnist/infer", args.wrk_connections
            run = run_wrk(server.port, route, body_file, "application/json", connections, args.wrk_seconds)
            switcher.join()
            results["wrk"] = {"connections": args.wrk_connections, "load": loaded[0], **run}
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    for name in ("explicit", "unload", "poll", "wrk"):
        print(name, json.dumps(results[name]))
    write_results(args.output, "model-control", results)
    return results


if __name__ == "__main__":
    main()

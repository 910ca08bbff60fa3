"""Hostile and heavy clients, measured the same way against this tree's server and, with
``--baseline REF``, an earlier commit's (issue 13's findings 1-3 and 5-7; finding 4 is
``bench.fairness``). Every probe is bounded in time and goes to 127.0.0.1 only.

1. one client's bad tensor and others' requests: 4 clients send ``/v2/models/rating/infer`` with a
   user index of 10^12 while 8 clients ask ``/v1/recommendations``: how many innocent requests fail;
2. amplification: 64 blank 6000x6000 grey PNGs in one request: status, seconds, the server's
   resident memory before, its peak, and 10 s after;
3. connections: seconds until an idle connection is closed (capped), until a 30 MB Content-Length
   with a 16-byte body is answered (capped), and the answers to a 16 MiB header and 20,000 headers;
5. shedding: translation goodput (answers/s) with 64 and with 256 closed-loop clients (each
   pausing 0.1 s after a 429), and the median latency of a 429;
6. recommendations at saturation: 128 closed-loop clients, answers by status;
7. unbounded axes: a sentiment ``input_ids`` of [1, 100000] and a 10-million-number MNIST tensor:
   status, seconds, memory growth, and the slowest ``/v2/health/live`` answered meanwhile.

    python -m bench.hostile [--baseline REF] [--only 1 2 ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import ROOT, multipart, neuroserve
from bench.translation import baseline_checkout


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def request(port: int, method: str, path: str, body: bytes | None, content_type: str, timeout: float = 120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers={"content-type": content_type})
        response = conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started
    except OSError as exc:
        return type(exc).__name__, b"", time.perf_counter() - started
    finally:
        conn.close()


def post_json(port: int, path: str, body: dict, timeout: float = 120):
    return request(port, "POST", path, json.dumps(body).encode(), "application/json", timeout)


def closed_loop(port: int, clients: int, seconds: float, make, backoff_s: float = 0.0) -> list[tuple[object, float]]:  # type: ignore[no-untyped-def]
    """``clients`` threads posting ``make(i)`` (path, body) one after another for ``seconds``,
    pausing ``backoff_s`` after a 429."""
    results: list[tuple[object, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            path, body = make(index * 1000 + n)
            status, _, elapsed = post_json(port, path, body, timeout=60)
            with lock:
                results.append((status, elapsed))
            n += 1
            if status == 429 and backoff_s:
                time.sleep(backoff_s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def probe_cross_request(server) -> dict:  # type: ignore[no-untyped-def]
    poison = {
        "inputs": [
            {"name": "user", "datatype": "INT64", "shape": [2], "data": [10**12, 1]},
            {"name": "item", "datatype": "INT64", "shape": [2], "data": [1, 1]},
        ]
    }
    outcome: dict[str, Counter] = {"poison": Counter(), "innocent": Counter()}
    lock = threading.Lock()
    stop_at = time.monotonic() + 10

    def run(kind: str, index: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            if kind == "poison":
                status, _, _ = post_json(server.port, "/v2/models/rating/infer", poison)
            else:
                status, _, _ = post_json(server.port, "/v1/recommendations", {"user_id": str(1 + (index + n) % 600)})
            with lock:
                outcome[kind][str(status)] += 1
            n += 1

    threads = [threading.Thread(target=run, args=("poison", i)) for i in range(4)]
    threads += [threading.Thread(target=run, args=("innocent", i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    innocent_failed = sum(n for s, n in outcome["innocent"].items() if s != "200")
    return {
        "poison": dict(outcome["poison"]),
        "innocent": dict(outcome["innocent"]),
        "innocent_failed": innocent_failed,
    }


def probe_amplification(server) -> dict:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 255).save(buffer, "PNG", optimize=True)
    body, content_type = multipart([(f"{i}.png", buffer.getvalue()) for i in range(64)])
    before = memory_mb(server.proc.pid)
    status, _, seconds = request(server.port, "POST", "/v1/image-classification", body, content_type)
    after = memory_mb(server.proc.pid)
    time.sleep(10)
    later = memory_mb(server.proc.pid)
    return {
        "body_bytes": len(body),
        "status": status,
        "seconds": round(seconds, 2),
        "rss_before_mb": before["VmRSS"],
        "peak_mb": after["VmHWM"],
        "rss_after_mb": after["VmRSS"],
        "rss_10s_later_mb": later["VmRSS"],
    }


def _until_closed(port: int, payload: bytes, cap: float) -> tuple[str, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=cap) as sock:
        if payload:
            sock.sendall(payload)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    break
        except (TimeoutError, OSError):
            return "no answer", round(time.monotonic() - started, 1)
    first = data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
    return first, round(time.monotonic() - started, 1)


def probe_connections(server, cap: float = 45.0) -> dict:  # type: ignore[no-untyped-def]
    head = b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    probes = {
        "idle connection": b"",
        "30 MB declared, 16 bytes sent": head + b"Content-Length: 30000000\r\n\r\n" + b'{"inputs": [{}]}',
        "one 16 MiB header": b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nX-Big: "
        + b"a" * (16 << 20)
        + b"\r\n\r\n",
        "20,000 headers": b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(20_000))
        + b"\r\n",
    }
    out: dict[str, object] = {}

    def run(name: str, payload: bytes) -> None:
        try:
            answer, seconds = _until_closed(server.port, payload, cap)
        except OSError as exc:
            answer, seconds = type(exc).__name__, 0.0
        out[name] = {"answer": answer, "seconds": seconds}

    threads = [threading.Thread(target=run, args=item) for item in probes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def probe_shedding(server, sentences: list[str]) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for clients in (64, 256):
        # Clients pause 0.1 s after a 429 (a tenth of its Retry-After): without any pause, on 2 cores
        # the load generator's own retry storm takes the CPU the server would serve with.
        results = closed_loop(
            server.port,
            clients,
            10,
            lambda n: ("/v1/translation", {"texts": [sentences[n % len(sentences)]]}),
            backoff_s=0.1,
        )
        ok = [e for s, e in results if s == 200]
        shed = [e for s, e in results if s == 429]
        out[f"{clients} clients"] = {
            "goodput_per_s": round(len(ok) / 10, 1),
            "answers_by_status": dict(Counter(str(s) for s, _ in results)),
            "p50_429_ms": round(float(np.median(shed)) * 1000, 1) if shed else None,
        }
    return out


def probe_recommendations(server) -> dict:  # type: ignore[no-untyped-def]
    results = closed_loop(server.port, 128, 10, lambda n: ("/v1/recommendations", {"user_id": str(1 + n % 600)}))
    return {"answers_by_status": dict(Counter(str(s) for s, _ in results))}


def probe_axes(server) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    long_ids = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 100_000], "data": [5] * 100_000},
            {"name": "attention_mask", "datatype": "INT64", "shape": [1, 100_000], "data": [1] * 100_000},
        ]
    }
    image = {"name": "image", "datatype": "FP32", "shape": [12_756, 1, 28, 28], "data": [0] * 10_000_704}
    huge = {"inputs": [image]}
    for name, path, body in (
        ("sentiment input_ids [1, 100000]", "/v2/models/sentiment/infer", long_ids),
        ("MNIST tensor of 10 million numbers", "/v2/models/mnist/infer", huge),
    ):
        payload = json.dumps(body, separators=(",", ":")).encode()  # 20 MB: within the body limit
        pings: list[float] = []
        done = threading.Event()

        def ping(pings: list[float] = pings, done: threading.Event = done) -> None:
            while not done.is_set():
                _, _, elapsed = request(server.port, "GET", "/v2/health/live", None, "application/json", 30)
                pings.append(elapsed)
                time.sleep(0.01)

        before = memory_mb(server.proc.pid)
        pinger = threading.Thread(target=ping)
        pinger.start()
        status, _, seconds = request(server.port, "POST", path, payload, "application/json")
        done.set()
        pinger.join()
        after = memory_mb(server.proc.pid)
        out[name] = {
            "body_mb": round(len(payload) / 1e6, 1),
            "status": status,
            "seconds": round(seconds, 2),
            "rss_growth_mb": round(after["VmRSS"] - before["VmRSS"], 1),
            "slowest_liveness_ms": round(max(pings) * 1000, 1) if pings else None,
        }
    return out


PROBES = {
    "1": ("one client's bad tensor", lambda s, _: probe_cross_request(s)),
    "2": ("amplification", lambda s, _: probe_amplification(s)),
    "3": ("connections", lambda s, _: probe_connections(s)),
    "5": ("shedding", probe_shedding),
    "6": ("recommendations at saturation", lambda s, _: probe_recommendations(s)),
    "7": ("unbounded axes", lambda s, _: probe_axes(s)),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="also measure the server of this git commit")
    p.add_argument("--only", nargs="+", default=list(PROBES), choices=list(PROBES))
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="NEUROSERVE_* settings for both servers")
    args = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.set)
    from bench.harness import DATA
    from bench.translation import mixed_sentences

    sentences = mixed_sentences(DATA / "translation", 400)
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        sides = [("this tree", ROOT, ROOT / "models")]
        if args.baseline:
            tree = stack.enter_context(baseline_checkout(args.baseline))
            sides.append((f"@{args.baseline}", tree, tree / "models"))
        for label, checkout, models in sides:  # one server at a time: the memory figures are its own
            repo = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
            for model in models.iterdir():
                if model.is_dir():
                    (repo / model.name).symlink_to(model)
            with neuroserve(repo, label=label, checkout=checkout, **env) as server:
                results[label] = {}
                for key in args.only:
                    name, probe = PROBES[key]
                    results[label][f"{key}. {name}"] = probe(server, sentences)
                    print(f"{label} {key}. {name}: {json.dumps(results[label][f'{key}. {name}'])}", flush=True)
                    time.sleep(2)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"hostile-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"baseline": args.baseline, "settings": env, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

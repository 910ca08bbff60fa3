"""Fair step-level decoding under heavy clients: how long a short translation waits while other
clients each send 64 texts at beam 5, with the decode batch's rows shared among requests (the
default) and in pure arrival order (``NEUROSERVE_DECODE_FAIR=false``), and, with ``--baseline
REF``, the server of an earlier commit; every server in the same interleaved rounds.

A light client sends "Good morning!" (greedy) one request after another; ``--heavy`` clients each
send 64 sentences at beam 5, one request after another. Reported: the light client's latency
(p50, p99, max), its errors, and the heavy requests completed, refused (429) or timed out (504).

    python -m bench.fairness [--duration 30] [--heavy 3] [--rounds 3] [--baseline REF]
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import random
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.harness import load_arguments, neuroserve
from bench.translation import MODEL, baseline_checkout, mixed_sentences

LIGHT = "Good morning!"


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, float]:
    started = time.perf_counter()
    conn.request("POST", "/v1/translation", json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status, time.perf_counter() - started


def load_round(port: int, sentences: list[str], heavy: int, seconds: float, seed: int) -> dict:
    stop_at = time.monotonic() + seconds
    light: list[float] = []
    light_errors = 0
    outcomes: dict[int, int] = {}
    lock = threading.Lock()

    def heavy_client(index: int) -> None:
        rng = random.Random(seed * 1009 + index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            status, _ = post(conn, {"texts": rng.sample(sentences, 64), "beam_size": 5})
            with lock:
                outcomes[status] = outcomes.get(status, 0) + 1
            if status == 429:
                time.sleep(0.2)
        conn.close()

    def light_client() -> None:
        nonlocal light_errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        time.sleep(0.5)  # the heavy requests first
        while time.monotonic() < stop_at:
            status, elapsed = post(conn, {"texts": [LIGHT]})
            if status == 200:
                light.append(elapsed)
            else:
                light_errors += 1
            time.sleep(0.1)
        conn.close()

    threads = [threading.Thread(target=heavy_client, args=(i,)) for i in range(heavy)]
    threads.append(threading.Thread(target=light_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"light": light, "light_errors": light_errors, "heavy": outcomes}


def summary(rounds: list[dict]) -> dict:
    light = np.array([x for r in rounds for x in r["light"]]) * 1000
    heavy: dict[int, int] = {}
    for r in rounds:
        for status, n in r["heavy"].items():
            heavy[status] = heavy.get(status, 0) + n
    return {
        "light_requests": int(light.size),
        "light_p50_ms": round(float(np.percentile(light, 50)), 1) if light.size else None,
        "light_p99_ms": round(float(np.percentile(light, 99)), 1) if light.size else None,
        "light_max_ms": round(float(light.max()), 1) if light.size else None,
        "light_errors": sum(r["light_errors"] for r in rounds),
        "heavy_by_status": {str(k): v for k, v in sorted(heavy.items())},
    }


def main(argv: list[str] | None = None) -> dict:
    p = load_arguments(__doc__, duration_help="seconds of load per server, split into rounds")
    p.set_defaults(data_dir=p.get_default("data_dir") / "translation", duration=30.0)
    p.add_argument("--heavy", type=int, default=3, help="clients sending 64 texts at beam 5")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", default=None, help="also serve from this git commit")
    args = p.parse_args(argv)
    sentences = mixed_sentences(args.data_dir, 400)
    repo = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    (repo / MODEL).symlink_to((args.repository / MODEL).resolve())
    results = {}
    with ExitStack() as running:
        servers = [
            ("fair (default)", running.enter_context(neuroserve(repo, label="fair"))),
            ("arrival order", running.enter_context(neuroserve(repo, label="arrival", NEUROSERVE_DECODE_FAIR="false"))),
        ]
        if args.baseline:
            tree = running.enter_context(baseline_checkout(args.baseline))
            base_repo = Path(tempfile.mkdtemp(prefix="bench-fairness-base-"))
            (base_repo / MODEL).symlink_to(tree / "models" / MODEL)
            label = f"@{args.baseline}"
            servers.append((label, running.enter_context(neuroserve(base_repo, label=label, checkout=tree))))
        rounds: dict[str, list[dict]] = {label: [] for label, _ in servers}
        for r in range(args.rounds):
            for label, server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                rounds[label].append(load_round(server.port, sentences, args.heavy, args.duration / args.rounds, r))
                time.sleep(2)  # the previous load drains
        for label, _ in servers:
            results[label] = summary(rounds[label])
            print(f"{label:<20} {json.dumps(results[label])}", flush=True)
    out = args.output / f"fairness-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    args.output.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

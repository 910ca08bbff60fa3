"""Goodput under overload: answers per second at saturation and beyond it, for the translation
endpoint (one English sentence per request), with wrk as the load generator (a C client: a
Python one's own work took the CPU the server would serve with on 2 cores). Past the queue's
limit the server answers 429; each connection then pauses ``--backoff-ms`` before its next
request (``bench/backoff.lua``). Goodput is 200s per second; the ratio is against the best
goodput below overload.

    python -m bench.overload [--connections 64 256 512 1024] [--duration 10] [--backoff-ms 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import ROOT, Server, free_port, write_results

LUA = ROOT / "bench" / "backoff.lua"


def run(port: int, body: Path, connections: int, seconds: float, backoff_ms: int) -> dict:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "10s", "-s", str(LUA)]
    env = {**os.environ, "BODY_FILE": str(body), "BACKOFF_MS": str(backoff_ms)}
    out = subprocess.run([*cmd, f"http://127.0.0.1:{port}/v1/translation"], env=env, capture_output=True, text=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON "))
    raw = json.loads(line[len("WRK_JSON ") :])
    s = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "goodput_per_s": raw["ok"] / s,
        "shed_per_s": raw["shed"] / s,
        "other": raw["other"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "socket_errors": raw["errors_connect"] + raw["errors_read"] + raw["errors_timeout"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, nargs="+", default=[64, 256, 512, 1024])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--backoff-ms", type=int, default=100)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    body = Path(tempfile.mkdtemp(prefix="bench-overload-")) / "body.json"
    body.write_text(json.dumps({"texts": ["Where is the train station?"]}))
    port = free_port()
    env = {"NEUROSERVE_REPOSITORY": str(args.repository), "NEUROSERVE_PORT": str(port)}
    rows = []
    with Server([sys.executable, "-m", "service", "serve"], env, label="neuroserve as shipped", port=port):
        run(port, body, 64, 3, args.backoff_ms)  # warm-up
        for c in args.connections:
            row = run(port, body, c, args.duration, args.backoff_ms)
            rows.append(row)
            print(
                f"  {c:>5} connections: goodput {row['goodput_per_s']:6.0f}/s, 429s {row['shed_per_s']:6.0f}/s, "
                f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, other {row['other']}",
                flush=True,
            )
    best = (
        max(r["goodput_per_s"] for r in rows if r["shed_per_s"] == 0)
        if any(r["shed_per_s"] == 0 for r in rows)
        else None
    )
    for r in rows:
        r["share_of_saturation"] = r["goodput_per_s"] / best if best else None
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.overload " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    write_results(args.output, "overload", results)
    return results


if __name__ == "__main__":
    main()

"""Variants of the server as shipped, in interleaved rounds on the v2 MNIST endpoint (wrk, one 28x28
digit per request): what the choices behind the defaults were measured against.

- ``shipped``: ``python -m service serve``, no settings;
- ``no-freeze``: the same without moving the loaded heap out of the collector's reach;
- ``gc-off``: the same with the garbage collector off (the bound on what collection costs);
- ``granian``: the same application under granian instead of uvicorn (``pip install granian``;
  skipped if absent);
- ``two-processes``: two servers as shipped, each taking half of the connections (what a second
  worker process on the same cores would bring, and what it would cost in memory).

    python -m bench.variants [--rounds 3] [--duration 10] [--connections 64] [--only shipped gc-off ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from bench.harness import ROOT, Server, free_port, run_wrk, write_results
from bench.run import write_bodies
from training.idx import load_mnist

_WITHOUT_FREEZE = (
    "import service.api.app as a; a.settle_heap = lambda: None; from service.cli import main; main(['serve'])"
)
_GC_OFF = "import gc; gc.disable(); from service.cli import main; main(['serve'])"


def _server(repository: Path, label: str, cmd: list[str]) -> Server:
    port = free_port()
    env = {"NEUROSERVE_REPOSITORY": str(repository), "NEUROSERVE_PORT": str(port)}
    return Server(cmd, env, label=label, port=port)


def variants(repository: Path) -> dict[str, list[Server]]:
    python = sys.executable
    out = {
        "shipped": [_server(repository, "shipped", [python, "-m", "service", "serve"])],
        "no-freeze": [_server(repository, "no-freeze", [python, "-c", _WITHOUT_FREEZE])],
        "gc-off": [_server(repository, "gc-off", [python, "-c", _GC_OFF])],
        "two-processes": [
            _server(repository, f"two-processes ({i})", [python, "-m", "service", "serve"]) for i in (1, 2)
        ],
    }
    granian = shutil.which("granian") or str(Path(python).with_name("granian"))
    if Path(granian).exists():
        port = free_port()
        cmd = [granian, "--interface", "asgi", "--factory", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--workers", "1", "--no-ws", "--log-level", "warning", "service.api.app:create_app"]
        env = {"NEUROSERVE_REPOSITORY": str(repository)}
        out["granian"] = [Server(cmd, env, label="granian", port=port)]
    return out


def rss_mb(server: Server) -> float:
    """Resident memory of the server's processes (its process group: granian serves from a child)."""
    assert server.proc is not None
    total_kb = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != server.proc.pid:
                continue
            status = (proc / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        total_kb += next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    return total_kb / 1024


def load(servers: list[Server], body: Path, connections: int, seconds: float) -> dict:
    """wrk against each server at once, the connections split between them; totals."""
    results: list[dict] = [{} for _ in servers]

    def one(i: int) -> None:
        share = connections // len(servers)
        results[i] = run_wrk(servers[i].port, "/v2/models/mnist/infer", body, "application/json", share, seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "rps": sum(r["rps"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--only", nargs="+", default=None, help="variants to run (default: all)")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    digit = load_mnist(args.data_dir / "image_classification" / "mnist", "test")[0][0]
    body = write_bodies(digit, Path(tempfile.mkdtemp(prefix="bench-variants-"))).v2_json
    chosen = {k: v for k, v in variants(args.repository).items() if args.only is None or k in args.only}
    started = [s for servers in chosen.values() for s in servers]
    rows: list[dict] = []
    try:
        for server in started:
            server.start()
        for servers in chosen.values():
            load(servers, body, args.connections, 2)  # warm-up
        memory = {name: sum(rss_mb(s) for s in servers) for name, servers in chosen.items()}
        for r in range(args.rounds):
            for name, servers in chosen.items():
                result = load(servers, body, args.connections, args.duration)
                rows.append({"variant": name, "round": r, **result})
                print(
                    f"  round {r} {name:<14} {result['rps']:7.0f} req/s  p99 {result['p99_ms']:6.1f} ms  "
                    f"errors {result['errors']}",
                    flush=True,
                )
    finally:
        for server in started:
            server.stop()
    summary = []
    for name in chosen:
        runs = [r for r in rows if r["variant"] == name]
        summary.append(
            {
                "variant": name,
                "rps": statistics.median(r["rps"] for r in runs),
                "rps_range": [min(r["rps"] for r in runs), max(r["rps"] for r in runs)],
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "p99_range": [min(r["p99_ms"] for r in runs), max(r["p99_ms"] for r in runs)],
                "errors": sum(r["errors"] for r in runs),
                "rss_mb": round(memory[name]),
            }
        )
    print("\n| variant | req/s (median, min-max) | p99 ms (median, min-max) | errors | resident MB |")
    print("|---|---:|---:|---:|---:|")
    for s in summary:
        print(
            f"| {s['variant']} | {s['rps']:.0f} ({s['rps_range'][0]:.0f}-{s['rps_range'][1]:.0f}) "
            f"| {s['p99_ms']:.1f} ({s['p99_range'][0]:.1f}-{s['p99_range'][1]:.1f}) | {s['errors']} | {s['rss_mb']} |"
        )
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.variants " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "connections": args.connections,
        "rounds": rows,
        "summary": summary,
    }
    write_results(args.output, "variants", results)
    return results


if __name__ == "__main__":
    main()

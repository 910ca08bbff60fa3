"""Goodput under overload: answers per second at saturation and beyond it, for the translation
endpoint (one English sentence per request), with wrk as the load generator (a C client: a
Python one's own work took the CPU the server would serve with on 2 cores). Past the queue's
limit the server answers 429; each connection then pauses ``--backoff-ms`` before its next
request (``bench/backoff.lua``). Goodput is 200s per second; the ratio is against the best
goodput below overload. ``--backoff-ms 0`` means clients that honour ``Retry-After`` (the server
says 1 s). ``--baseline REF`` serves an earlier commit's tree too, in interleaved rounds (each
server serves its own tree's ``models/``); ``--variant LABEL:NAME=VALUE[,NAME=VALUE]`` serves this
tree again with those settings (``NEUROSERVE_*`` environment variables), so that configurations
compare within one run. ``--bracket`` measures the first count again after each other one and
gives each its share of the mean of the two runs around it (the machine drifts by a quarter within
minutes, so a share against one saturation figure minutes away moves with the drift).

    python -m bench.overload [--connections 64 256 512 1024] [--duration 10] [--backoff-ms 100]
                             [--baseline REF] [--variant LABEL:NAME=VALUE ...] [--rounds 1] [--bracket]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import ROOT, Server, free_port, write_results
from bench.translation import compared_trees

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
    p.add_argument("--backoff-ms", type=int, default=100, help="pause after a 429 (0: Retry-After's seconds)")
    p.add_argument("--baseline", default=None, help="also measure the server of this git commit, interleaved")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        type=_variant,
        help="LABEL:NAME=VALUE[,NAME=VALUE]: also serve this tree with these settings",
    )
    p.add_argument(
        "--bracket",
        action="store_true",
        help="measure the first count again after each other count; each one's share is against the mean of "
        "the first count's two runs around it (this machine drifts by a quarter within minutes)",
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    body = Path(tempfile.mkdtemp(prefix="bench-overload-")) / "body.json"
    body.write_text(json.dumps({"texts": ["Where is the train station?"]}))
    rows: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        sides = [(label, tree, {}) for label, tree in compared_trees(stack, args.baseline)]
        sides += [(label, ROOT, settings) for label, settings in args.variant]
        for rnd in range(args.rounds):
            for label, tree, settings in sides:
                port = free_port()
                env = {"NEUROSERVE_REPOSITORY": str(tree / "models"), "NEUROSERVE_PORT": str(port), **settings}
                cmd = [sys.executable, "-m", "service", "serve"]
                with Server(cmd, {**env, "PYTHONPATH": str(tree)}, label=label, port=port, cwd=tree):
                    run(port, body, 64, 3, args.backoff_ms)  # warm-up
                    order = _bracketed(args.connections) if args.bracket else args.connections
                    for c in order:
                        row = {"round": rnd, **run(port, body, c, args.duration, args.backoff_ms)}
                        rows.setdefault(label, []).append(row)
                        print(
                            f"  {label:>14} round {rnd} {c:>5} connections: goodput {row['goodput_per_s']:6.0f}/s, "
                            f"429s {row['shed_per_s']:6.0f}/s, p50 {row['p50_ms']:7.1f} ms, "
                            f"p99 {row['p99_ms']:7.1f} ms, other {row['other']}",
                            flush=True,
                        )
    summary = {label: _summary(side, args.connections, args.bracket) for label, side in rows.items()}
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.overload " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "backoff": f"{args.backoff_ms} ms after a 429" if args.backoff_ms else "Retry-After's seconds after a 429",
        "summary": summary,
        "rows": rows,
    }
    for label, side in summary.items():
        for c, r in side.items():
            share = f"{r['share_of_saturation']:.0%}" if r["share_of_saturation"] is not None else "-"
            print(f"{label:>14} {c:>5}: goodput {r['goodput_per_s']:6.0f}/s (median), {share} of saturation")
            if "bracketed_shares" in r:
                shares = ", ".join(f"{x:.0%}" for x in r["bracketed_shares"])
                print(f"{'':>14} {'':>5}  against the runs of {args.connections[0]} around each: {shares}")
    write_results(args.output, "overload", results)
    return results


def _variant(text: str) -> tuple[str, dict[str, str]]:
    label, sep, pairs = text.partition(":")
    settings = dict(pair.split("=", 1) for pair in pairs.split(",") if "=" in pair)
    if not sep or not label or not settings or not all(k.startswith("NEUROSERVE_") for k in settings):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL:NEUROSERVE_NAME=VALUE[,NEUROSERVE_NAME=VALUE]")
    return label, settings


def _bracketed(connections: list[int]) -> list[int]:
    """[64, 512, 1024] -> [64, 512, 64, 1024, 64]: the first count around each other one."""
    order = [connections[0]]
    for c in connections[1:]:
        order += [c, connections[0]]
    return order


def _summary(rows: list[dict], connections: list[int], bracket: bool = False) -> dict:
    """Per connection count: the median goodput over rounds; its share of the best median
    goodput among the counts where nothing was refused (saturation). Bracketed: also each run's
    goodput over the mean of the first count's runs just before and after it (same server, same
    round), and their median."""
    out = {}
    if bracket:
        for rnd in sorted({r["round"] for r in rows}):
            seq = [r for r in rows if r["round"] == rnd]
            for i in range(1, len(seq) - 1, 2):
                reference = (seq[i - 1]["goodput_per_s"] + seq[i + 1]["goodput_per_s"]) / 2
                seq[i]["bracketed_share"] = seq[i]["goodput_per_s"] / reference
    for c in connections:
        mine = sorted(r["goodput_per_s"] for r in rows if r["connections"] == c)
        shed = sorted(r["shed_per_s"] for r in rows if r["connections"] == c)
        out[c] = {"goodput_per_s": mine[len(mine) // 2], "shed_per_s": shed[len(shed) // 2]}
        shares = [r["bracketed_share"] for r in rows if r["connections"] == c and "bracketed_share" in r]
        if shares:
            out[c]["bracketed_shares"] = shares
            out[c]["bracketed_share_median"] = statistics.median(shares)
    # Unrefused: under 1 % of answers 429 (a run just after an overloaded one meets a few at first).
    unrefused = [r["goodput_per_s"] for r in out.values() if r["shed_per_s"] < 0.01 * r["goodput_per_s"]]
    best = max(unrefused) if unrefused else None
    for r in out.values():
        r["share_of_saturation"] = r["goodput_per_s"] / best if best else None
    return out


if __name__ == "__main__":
    main()

"""What the web edge costs on the hot path: the MNIST v2 JSON endpoint with wrk, on a server
without keys or CORS, and on one with an API keys file (a key sent, checked in constant time)
and an allowed origin (the request sent with that Origin), interleaved in rounds in one run.

    python -m bench.edge [--duration 10] [--concurrency 1 16 64] [--rounds 3]
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import load_arguments, neuroserve, run_wrk
from service.api.auth import add_key

ORIGIN = "https://app.example.com"


def main(argv: list[str] | None = None) -> dict:
    p = load_arguments(__doc__, duration_help="seconds per configuration and concurrency")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    shutil.copytree(args.repository / "mnist", work / "models" / "mnist")
    key = add_key(work / "keys.json", "bench", ["infer"], None)
    body = work / "body.json"
    image = np.zeros(784, dtype=np.float32).tolist()
    body.write_text(
        json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": image}]})
    )
    edge_env = {"NEUROSERVE_API_KEYS_FILE": str(work / "keys.json"), "NEUROSERVE_CORS_ALLOW_ORIGINS": ORIGIN}
    configs = [("open", {}, {}), ("key + CORS", edge_env, {"X-API-Key": key, "Origin": ORIGIN})]
    rows: dict[tuple[str, int], list[dict]] = {}
    with (
        neuroserve(work / "models", label="open") as plain,
        neuroserve(work / "models", label="edge", **edge_env) as edge,
    ):
        servers = {"open": plain, "key + CORS": edge}
        for label, _, headers in configs:  # warm up
            run_wrk(servers[label].port, "/v2/models/mnist/infer", body, "application/json", 16, 2, headers=headers)
        for r in range(args.rounds):
            for label, _, headers in configs[r % 2 :] + configs[: r % 2]:
                for c in args.concurrency:
                    result = run_wrk(
                        servers[label].port,
                        "/v2/models/mnist/infer",
                        body,
                        "application/json",
                        c,
                        args.duration / args.rounds,
                        headers=headers,
                    )
                    rows.setdefault((label, c), []).append(result)
    table = []
    for (label, c), results in rows.items():
        requests = sum(x["requests"] for x in results)
        table.append(
            {
                "server": label,
                "concurrency": c,
                "rps": round(float(np.mean([x["rps"] for x in results])), 1),
                "p50_ms": round(float(np.mean([x["p50_ms"] for x in results])), 2),
                "p99_ms": round(float(np.mean([x["p99_ms"] for x in results])), 2),
                "non_2xx": sum(x["non_2xx"] for x in results),
                "requests": requests,
            }
        )
        print(json.dumps(table[-1]), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"edge-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rows": table}, indent=2) + "\n")
    print(f"wrote {out}")
    return {"rows": table}


if __name__ == "__main__":
    main()

"""Text generation serving benchmark: one at a time, request-level and step-level batching, in one run.

Every configuration serves the same committed language model (only it, warmed up) in its own
server process, driven by the same closed-loop load: ``c`` clients, each streaming one completion
at a time from ``/v1/completions`` (OpenAI's API, ``stream: true``) as soon as its previous one has
ended. Prompts and output lengths are mixed: a prompt is the first 1-12 words of a Tatoeba
sentence, and ``max_tokens`` is drawn from 8, 16, 32, 64 and 128 with the end-of-text token
banned (``logit_bias``), so every completion is exactly as long as asked: a request-level batch
runs as long as its longest member, a step-level batch lets each leave when it is done. Sampling
at temperature 0.8 with a seed per request. The servers run at once and the load visits them in
turn, in short rounds (``--rounds``, the order rotating), so that a shared machine's drift falls on
every configuration alike. Configurations:

1. ``one at a time``: one sequence per decode step (``NEUROSERVE_DECODE_MAX_ROWS=1``);
2. ``request-level``: static batches, as FasterTransformer-style servers run them: the sequences
   waiting when the decoder is free form a batch that decodes until its last sequence ends, every
   row computed until then, finished ones as padding; later arrivals wait
   (``NEUROSERVE_DECODE_BATCHING=static``);
3. ``request-level, rows leave``: the same admission, but a finished sequence's row leaves the
   batch, so the steps shrink (``NEUROSERVE_DECODE_BATCHING=request``; kinder than most
   request-level servers, and on a CPU, where a step's cost grows nearly linearly with its rows,
   nearly as fast in tokens/s: the gain of step-level over it is in latency);
4. ``step-level``: sequences join at the next step and leave as soon as they end (the default).

Reported per configuration and concurrency: generated tokens/s, requests/s, time to first token
(the first streamed chunk) and whole-request latency (p50, p99), mean rows per decode step.
Also the raw onnxruntime step time by rows (the ceiling a step can reach).

    python -m bench.text_generation [--duration 30] [--concurrency 1 16 64] [--rounds 3]
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.harness import load_arguments, neuroserve, scrape, write_results
from service.config import Settings

MODEL = "text-generator"
OUTPUT_LENGTHS = (8, 16, 32, 64, 128)
CONFIGS = [
    ("one at a time", {"NEUROSERVE_DECODE_MAX_ROWS": "1"}),
    ("request-level", {"NEUROSERVE_DECODE_BATCHING": "static"}),
    ("request-level, rows leave", {"NEUROSERVE_DECODE_BATCHING": "request"}),
    ("step-level", {"NEUROSERVE_DECODE_BATCHING": "step"}),
]


def prompts_from(data_dir: Path, n: int, seed: int = 0) -> list[str]:
    """The first 1-12 words of ``n`` English Tatoeba sentences (seeded)."""
    import io
    import zipfile

    with zipfile.ZipFile(data_dir / "fra-eng.zip") as z:
        lines = io.TextIOWrapper(z.open("fra.txt"), encoding="utf-8").read().splitlines()
    english = sorted({line.split("\t")[0] for line in lines if "\t" in line})
    rng = random.Random(seed)
    out = []
    for sentence in rng.sample(english, n):
        words = sentence.split()
        out.append(" ".join(words[: rng.randint(1, min(12, len(words)))]))
    return out


def step_ceiling(version_dir: Path, threads: int) -> list[dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    step = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    state = {i.name: i.shape for i in step.get_inputs()}
    rows = []
    for batch in (1, 4, 16, 64):
        feeds = {
            "token": np.full(batch, 5, dtype=np.int64),
            "h": np.zeros((batch, *state["h"][1:]), dtype=np.float32),
            "c": np.zeros((batch, *state["c"][1:]), dtype=np.float32),
        }
        for _ in range(5):
            step.run(None, feeds)
        runs, started = 50, time.perf_counter()
        for _ in range(runs):
            step.run(None, feeds)
        ms = (time.perf_counter() - started) / runs * 1000
        rows.append({"rows": batch, "ms_per_step": ms, "tokens_per_s": batch / ms * 1000})
    return rows


def drive(port: int, prompts: list[str], concurrency: int, seconds: float, seed: int = 0) -> dict:
    """Closed loop of ``concurrency`` streaming clients, client ``i`` drawing the same prompts and
    lengths in the same order for a given ``seed`` whatever the server."""
    records: list[tuple[float, float, int]] = []  # (time to first token, whole request, tokens)
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal errors
        rng = random.Random(seed * 100_003 + index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            body = {
                "model": MODEL,
                "prompt": rng.choice(prompts),
                "max_tokens": rng.choice(OUTPUT_LENGTHS),
                "temperature": 0.8,
                "seed": rng.randrange(2**31),
                "logit_bias": {"2": -100},  # no end-of-text: each completion is as long as asked
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            started = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                response.read()
                with lock:
                    errors += 1
                continue
            first = None
            tokens = 0
            for line in response:  # server-sent events, one "data: ..." line per chunk
                if not line.startswith(b"data: "):
                    continue
                if first is None:
                    first = time.perf_counter() - started
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    response.read()  # the end of the chunked body, so the connection can be reused
                    break
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            elapsed = time.perf_counter() - started
            with lock:
                records.append((first or elapsed, elapsed, tokens))
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"records": records, "errors": errors, "wall": time.monotonic() - started}


def summarise(rounds: list[dict]) -> dict:
    records = [x for r in rounds for x in r["records"]]
    wall = sum(r["wall"] for r in rounds)
    ttft = np.array([r[0] for r in records]) * 1000
    whole = np.array([r[1] for r in records]) * 1000

    def pct(values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")

    return {
        "requests": len(records),
        "errors": sum(r["errors"] for r in rounds),
        "rps": len(records) / wall,
        "tokens_per_s": sum(r[2] for r in records) / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "p50_ms": pct(whole, 50),
        "p99_ms": pct(whole, 99),
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| batching | c | tokens/s | req/s | first token p50 / p99 ms | request p50 / p99 ms | rows/step | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['rps']:.1f} "
            f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} "
            f"| {r['mean_rows']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = load_arguments(__doc__, duration_help="seconds per configuration and concurrency")
    p.set_defaults(data_dir=p.get_default("data_dir") / "translation")
    p.add_argument("--rounds", type=int, default=3, help="the duration is split into this many interleaved rounds")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (unset: the service's default, one core less than the machine's; "
        "0: onnxruntime's, a spinning thread per core, which halved every configuration's tokens/s on 2 cores)",
    )
    p.add_argument(
        "--no-spinning",
        action="store_true",
        help="onnxruntime's idle intra-op threads sleep (NEUROSERVE_INTRA_OP_SPINNING=false)",
    )
    p.add_argument("--only", nargs="+", default=None, help="run only these configurations (by label)")
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "NAME=VALUE"),
        help="one more configuration: a label and its NEUROSERVE_* settings (repeatable), e.g. "
        "--variant 'admit 1' NEUROSERVE_DECODE_ADMIT_EVERY=1",
    )
    args = p.parse_args(argv)

    prompts = prompts_from(args.data_dir, 500)
    repo = Path(tempfile.mkdtemp(prefix="bench-text-generation-"))
    (repo / MODEL).symlink_to((args.repository / MODEL).resolve())
    threads = args.threads if args.threads is not None else Settings().intra_op_threads_or_default()
    ceiling = step_ceiling(args.repository / MODEL / "1", threads)
    print("raw onnxruntime decode step:")
    for r in ceiling:
        print(f"  {r['rows']:>3} rows: {r['ms_per_step']:6.2f} ms/step  {r['tokens_per_s']:7.0f} tokens/s")
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    for label, *pairs in args.variant:
        configs.append((label, dict(pair.split("=", 1) for pair in pairs)))
    rows = []
    with ExitStack() as running:
        servers = []
        for label, env in configs:
            runtime = {"NEUROSERVE_INTRA_OP_THREADS": str(threads)}
            if args.no_spinning:
                runtime["NEUROSERVE_INTRA_OP_SPINNING"] = "false"
            server = neuroserve(repo, label=label, **{**runtime, **env})
            servers.append(running.enter_context(server))
            drive(server.port, prompts, max(args.concurrency), min(2.0, args.duration))  # warm up
        for c in args.concurrency:
            rounds: dict[str, list[dict]] = {s.label: [] for s in servers}
            steps = {s.label: [0.0, 0.0] for s in servers}
            for r in range(args.rounds):
                for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                    before = scrape(server.port, MODEL)
                    rounds[server.label].append(drive(server.port, prompts, c, args.duration / args.rounds, seed=r))
                    after = scrape(server.port, MODEL)
                    steps[server.label][0] += after["batch_size_sum"] - before["batch_size_sum"]
                    steps[server.label][1] += after["batch_size_count"] - before["batch_size_count"]
            for server in servers:
                result = summarise(rounds[server.label])
                result["mean_rows"] = steps[server.label][0] / max(steps[server.label][1], 1)
                rows.append({"server": server.label, "concurrency": c, **result})
                print(
                    f"  {server.label:<26} c={c:<3} {result['tokens_per_s']:7.0f} tokens/s {result['rps']:6.1f} req/s  "
                    f"first token p50 {result['ttft_p50_ms']:6.0f} p99 {result['ttft_p99_ms']:6.0f} ms  "
                    f"request p50 {result['p50_ms']:6.0f} p99 {result['p99_ms']:6.0f} ms  "
                    f"rows/step {result['mean_rows']:5.1f}  errors {result['errors']}",
                    flush=True,
                )
    table = format_table(rows)
    print("\n" + table)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    top = max(args.concurrency)
    gain = None
    if ("step-level", top) in by and ("request-level", top) in by:
        gain = by[("step-level", top)]["tokens_per_s"] / by[("request-level", top)]["tokens_per_s"]
        print(f"\nstep-level / request-level tokens/s at c={top}: {gain:.2f}x")
    result = {
        "command": "python -m bench.text_generation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "prompts": len(prompts),
        "output_lengths": OUTPUT_LENGTHS,
        "step_ceiling": ceiling,
        "rows": rows,
        "step_over_request_at_top_concurrency": gain,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "intra_op_threads": threads,
        "intra_op_spinning": not args.no_spinning,
    }
    write_results(args.output, "text-generation", result)
    return result


if __name__ == "__main__":
    main()

"""Translation serving benchmark: request-level against step-level batching, in one run.

Every configuration serves the same committed model (only it, warmed up) in its own server
process, and is driven by the same closed-loop load: ``c`` clients, each posting one English
sentence at a time to ``/v1/translation`` (greedy) as soon as its previous answer arrives. The
sentences are drawn (seeded) from the Tatoeba data with mixed lengths: equal shares of 1-4, 5-8,
9-14 and 15+ words. All servers run at once and the load visits them in turn, in short rounds
(``--rounds`` per configuration and concurrency, the order rotating), so that a shared machine's
drift in speed falls on every configuration alike. Latency is also reported for the shortest
(1-4 words) and longest (15+ words) sentences apart. Configurations:

1. ``one at a time``: one sequence per decoder step (``NEUROSERVE_DECODE_MAX_ROWS=1``);
2. ``request-level``: static batches: the sequences waiting when the decoder is free form a batch
   that decodes until its last sequence ends; later arrivals wait (``NEUROSERVE_DECODE_BATCHING=request``);
3. ``step-level``: sequences join at the next step and leave as soon as they end (the default);
   ``step-level, boost``: sequences past 16 steps in a large batch also take up to 3 extra steps
   alone per iteration (``NEUROSERVE_DECODE_BOOST_AFTER=16``);
4. ``step-level, no KV cache``: the same with the full-prefix decoder step instead of the
   key/value-cache pair (the first three use the cache).

Also the raw onnxruntime decoder-step time by batch size (the ceiling a step can reach).

``--baseline REF`` also serves each chosen configuration from commit ``REF`` (a detached worktree,
its own committed model folder), labelled ``... @REF``, in the same interleaved rounds: how a
change compares with what it replaced, on one machine at one time.

    python -m bench.translation [--duration 10] [--concurrency 1 16 64] [--baseline REF]
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.harness import ROOT, load_arguments, neuroserve, scrape
from training.translation import read_pairs

MODEL = "translation-en-fr"
BUCKETS = ((1, 4), (5, 8), (9, 14), (15, 60))


def mixed_sentences(data_dir: Path, n: int, seed: int = 0) -> list[str]:
    english = sorted({en for en, _ in read_pairs(data_dir)})
    rng = random.Random(seed)
    out = []
    for low, high in BUCKETS:
        pool = [s for s in english if low <= len(s.split()) <= high]
        out += rng.sample(pool, n // len(BUCKETS))
    rng.shuffle(out)
    return out


def step_ceiling(version_dir: Path, threads: int) -> list[dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    encoder = ort.InferenceSession(str(version_dir / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    vocab = decoder.get_outputs()[0].shape[1]
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 4, 16, 64):
        src = rng.integers(4, vocab, size=(batch, 12), dtype=np.int64)
        memory = encoder.run(None, {"src_ids": src})[0]
        tgt = rng.integers(4, vocab, size=(batch, 10), dtype=np.int64)
        feeds = {"tgt_ids": tgt, "memory": memory, "src_ids": src}
        for _ in range(3):
            decoder.run(None, feeds)
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < 1.0 or runs < 10:
            decoder.run(None, feeds)
            runs += 1
        ms = 1000 * elapsed / runs
        rows.append({"rows": batch, "ms_per_step": ms, "tokens_per_s": batch * runs / elapsed})
    return rows


def drive(port: int, sentences: list[str], concurrency: int, seconds: float, seed: int = 0) -> dict:
    """Closed loop: ``concurrency`` clients, each with one keep-alive connection, client ``i`` drawing
    the same sentences in the same order for a given ``seed`` whatever the server. Returns the raw
    figures (``summarise`` turns rounds of them into a row)."""
    latencies: list[tuple[float, int]] = []  # (seconds, words in the sentence)
    tokens = errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal tokens, errors
        rng = random.Random(seed * 100_003 + index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop_at:
            sentence = rng.choice(sentences)
            body = json.dumps({"texts": [sentence]})
            started = time.perf_counter()
            conn.request("POST", "/v1/translation", body, {"content-type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - started
            with lock:
                if response.status == 200:
                    latencies.append((elapsed, len(sentence.split())))
                    tokens += json.loads(data)["translations"][0]["generated_tokens"]
                else:
                    errors += 1
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "tokens": tokens, "errors": errors, "wall": time.monotonic() - started}


def summarise(rounds: list[dict]) -> dict:
    """Rounds of ``drive`` (one configuration, one concurrency) as one row."""
    lat = [x for r in rounds for x in r["latencies"]]
    wall = sum(r["wall"] for r in rounds)
    ms = np.array([s for s, _ in lat]) * 1000
    short = np.array([s for s, w in lat if w <= BUCKETS[0][1]]) * 1000
    long = np.array([s for s, w in lat if w >= BUCKETS[-1][0]]) * 1000

    def pct(values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")

    return {
        "requests": len(lat),
        "errors": sum(r["errors"] for r in rounds),
        "rps": len(lat) / wall,
        "tokens_per_s": sum(r["tokens"] for r in rounds) / wall,
        "mean_ms": float(ms.mean()) if len(ms) else float("nan"),
        "p50_ms": pct(ms, 50),
        "p99_ms": pct(ms, 99),
        "short_p50_ms": pct(short, 50),
        "short_p99_ms": pct(short, 99),
        "long_p50_ms": pct(long, 50),
        "long_p99_ms": pct(long, 99),
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| batching | c | req/s | tokens/s | mean ms | p50 ms | p99 ms | 1-4 words p50 / p99 ms "
        "| 15+ words p50 / p99 ms | rows/step | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['rps']:.1f} | {r['tokens_per_s']:.0f} | {r['mean_ms']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['short_p50_ms']:.0f} / {r['short_p99_ms']:.0f} "
            f"| {r['long_p50_ms']:.0f} / {r['long_p99_ms']:.0f} | {r['mean_rows']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def baseline_checkout(ref: str) -> Iterator[Path]:
    """A detached worktree of ``ref`` (removed afterwards)."""
    tree = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def compared_trees(stack: ExitStack, baseline: str | None) -> list[tuple[str, Path]]:
    """This working tree, and ``baseline``'s worktree when given (removed when ``stack`` closes):
    (label, root) for benchmarks that compare a change with an earlier commit in one run."""
    trees = [("this tree", ROOT)]
    if baseline:
        trees.append((f"@{baseline}", stack.enter_context(baseline_checkout(baseline))))
    return trees


def main(argv: list[str] | None = None) -> dict:
    p = load_arguments(__doc__, duration_help="seconds per configuration and concurrency")
    p.set_defaults(data_dir=p.get_default("data_dir") / "translation")  # this benchmark's data only
    p.add_argument("--rounds", type=int, default=4, help="the duration is split into this many interleaved rounds")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--only", nargs="+", default=None, help="run only these configurations (by label)")
    p.add_argument("--baseline", default=None, help="also serve each configuration from this git commit")
    args = p.parse_args(argv)

    sentences = mixed_sentences(args.data_dir, 400)
    repo = Path(tempfile.mkdtemp(prefix="bench-translation-"))
    (repo / MODEL).symlink_to((args.repository / MODEL).resolve())
    ceiling = step_ceiling(args.repository / MODEL / "1", args.threads)
    print("raw onnxruntime decoder step (target length 10, source 12):")
    for r in ceiling:
        print(f"  {r['rows']:>3} rows: {r['ms_per_step']:6.2f} ms/step  {r['tokens_per_s']:7.0f} tokens/s")
    configs = [
        ("one at a time", {"NEUROSERVE_DECODE_MAX_ROWS": "1"}),
        ("request-level", {"NEUROSERVE_DECODE_BATCHING": "request"}),
        ("step-level", {"NEUROSERVE_DECODE_BATCHING": "step"}),
        ("step-level, boost", {"NEUROSERVE_DECODE_BATCHING": "step", "NEUROSERVE_DECODE_BOOST_AFTER": "16"}),
        ("step-level, 16 rows", {"NEUROSERVE_DECODE_BATCHING": "step", "NEUROSERVE_DECODE_MAX_ROWS": "16"}),
        ("step-level, no KV cache", {"NEUROSERVE_DECODE_BATCHING": "step", "NEUROSERVE_DECODE_KV_CACHE": "false"}),
    ]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    servers = []
    with ExitStack() as running:
        sides = [(repo, ROOT, "")]
        if args.baseline:
            tree = running.enter_context(baseline_checkout(args.baseline))
            base_repo = Path(tempfile.mkdtemp(prefix="bench-translation-base-"))
            (base_repo / MODEL).symlink_to(tree / "models" / MODEL)
            sides.append((base_repo, tree, f" @{args.baseline}"))
        for label, env in configs:  # all up at once; an idle one costs nothing
            for model_repo, checkout, suffix in sides:
                server = neuroserve(
                    model_repo,
                    label=label + suffix,
                    checkout=checkout,
                    NEUROSERVE_INTRA_OP_THREADS=str(args.threads),
                    **env,
                )
                servers.append(running.enter_context(server))
            drive(server.port, sentences, max(args.concurrency), min(2.0, args.duration))  # warm up
        rows = []
        for c in args.concurrency:
            rounds: dict[str, list[dict]] = {s.label: [] for s in servers}
            steps = {s.label: [0.0, 0.0] for s in servers}
            for r in range(args.rounds):
                for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                    before = scrape(server.port, MODEL)
                    rounds[server.label].append(drive(server.port, sentences, c, args.duration / args.rounds, seed=r))
                    after = scrape(server.port, MODEL)
                    steps[server.label][0] += after["batch_size_sum"] - before["batch_size_sum"]
                    steps[server.label][1] += after["batch_size_count"] - before["batch_size_count"]
            for server in servers:
                result = summarise(rounds[server.label])
                result["mean_rows"] = steps[server.label][0] / max(steps[server.label][1], 1)
                rows.append({"server": server.label, "concurrency": c, **result})
                print(
                    f"  {server.label:<24} c={c:<3} {result['rps']:6.1f} req/s {result['tokens_per_s']:7.0f} tokens/s  "
                    f"p50 {result['p50_ms']:6.0f} ms  p99 {result['p99_ms']:6.0f} ms  "
                    f"short p99 {result['short_p99_ms']:6.0f} ms  long p99 {result['long_p99_ms']:6.0f} ms  "
                    f"rows/step {result['mean_rows']:5.1f}  errors {result['errors']}",
                    flush=True,
                )
    table = format_table(rows)
    print("\n" + table)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"translation-{stamp}.json"
    result = {
        "command": "python -m bench.translation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sentences": len(sentences),
        "step_ceiling": ceiling,
        "rows": rows,
        "duration_s": args.duration,
        "rounds": args.rounds,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()

"""What a sentiment model costs per sentence on this CPU: tokenising with its ``tokenizer.json`` and
padding to its length bucket the way the service does (``service.tasks.sentiment.encode``), then its
graph in onnxruntime with the service's session options, one sentence at a time and in batches.

    python -m bench.sentiment /tmp/v2/sentiment/2 models/sentiment/6 [--repeats 3] [--threads 1]

The sentences are SST-2 full sentences (``dev.tsv``'s longest rows, the length of real reviews) and
the everyday check set (``--lang zh``: every 7th ChnSentiCorp review), in rounds that alternate the
versions, so drift on a busy machine falls on all of them alike.
The first version is the baseline each ratio is taken against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.harness import DATA, ROOT, write_results
from service.runtime import OnnxModel, RuntimeOptions
from service.tasks.assets import load_tokenizer
from service.tasks.sentiment import TextAssets, encode


def sentences(limit: int, lang: str = "en") -> list[str]:
    if lang == "zh":
        from training.sentiment import read_chnsenticorp

        reviews, _ = read_chnsenticorp(DATA / "sentiment" / "chnsenticorp" / "ChnSentiCorp_htl_all.csv")
        return reviews[::7][:limit]  # every 7th: positive and negative, short and long
    rows = (DATA / "sentiment" / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sst = sorted((r.rpartition("\t")[0].strip() for r in rows), key=len, reverse=True)[: limit // 2]
    everyday = (ROOT / "tests" / "data" / "everyday_sentiment.tsv").read_text(encoding="utf-8").splitlines()[1:]
    mixed = sst + [r.rpartition("\t")[0] for r in everyday]
    return mixed[:limit]


class Version:
    def __init__(self, folder: Path, threads: int) -> None:
        self.folder = folder
        parameters = json.loads((folder.parent / "model.json").read_text())["parameters"]
        tokenizer = load_tokenizer(parameters.get("tokenizer", "tokenizer.json"), folder)
        unk = tokenizer.token_to_id("[UNK]")
        buckets = tuple(sorted(parameters.get("length_buckets") or [parameters["max_length"]]))
        self.assets = TextAssets(tokenizer, parameters["max_length"], buckets, 1 if unk is None else unk)
        self.model = OnnxModel(folder / "model.onnx", RuntimeOptions(["CPUExecutionProvider"], threads))
        self.names = [i.name for i in self.model.session.get_inputs()]

    def classify(self, texts: list[str]) -> np.ndarray:
        encoded = encode(self.assets, texts)
        feeds = {"input_ids": encoded.ids, "attention_mask": encoded.mask}
        return self.model.session.run(None, {name: feeds[name] for name in self.names})[0]


def per_sentence_ms(version: Version, texts: list[str], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        version.classify(texts[i : i + batch])
    return (time.perf_counter() - started) * 1000 / len(texts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", type=Path, help="version folders; the first is the baseline")
    parser.add_argument(
        "--sentences", type=int, default=400, help="at most: half of it SST-2 sentences, then the everyday set"
    )
    parser.add_argument("--lang", choices=["en", "zh"], default="en", help="zh: ChnSentiCorp reviews")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    texts = sentences(args.sentences, args.lang)
    versions = [Version(folder, args.threads) for folder in args.versions]
    for version in versions:  # warm-up: first runs allocate
        per_sentence_ms(version, texts[:64], 1)
    timings: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.repeats):
        for batch in args.batches:
            for index, version in enumerate(versions):
                timings.setdefault((index, batch), []).append(per_sentence_ms(version, texts, batch))
    rows = []
    for batch in args.batches:
        base = float(np.median(timings[(0, batch)]))
        for index, version in enumerate(versions):
            ms = float(np.median(timings[(index, batch)]))
            rows.append(
                {
                    "version": str(version.folder),
                    "batch": batch,
                    "ms_per_sentence": round(ms, 4),
                    "vs_baseline": round(ms / base, 2),
                }
            )
            print(f"batch {batch:>3}  {version.folder}: {ms:.4f} ms/sentence ({ms / base:.2f}x)")
    results = {
        "command": "python -m bench.sentiment " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "sentences": len(texts),
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_results(ROOT / "bench" / "results", "sentiment", results)
    return results


if __name__ == "__main__":
    main()

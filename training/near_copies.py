"""Near copies between the written training sentences and the everyday check sets, and a model's
accuracy on each check set without them.

Sessions that write everyday sentences independently still meet on the same short phrasings ("Works
perfectly.", "wish I'd switched years ago"), so an exact-match filter is not enough: a check sentence
counts as near-copied when its word set and some training sentence's overlap by ``--jaccard`` or more
(intersection over union). Only counts and accuracies are printed, never a check set's sentences.

    python -m training.near_copies [--written FILE]... [--jaccard 0.5] [MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from training.sentiment import Config, read_everyday

# The check sets the training script reads (its Config's defaults), blind first.
CHECK_SETS = [
    str(getattr(Config(), name)) for name in ("blind2", "blind", "fresh2", "fresh", "independent", "everyday")
]


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def near_copied(texts: list[str], training: list[str], jaccard: float) -> list[bool]:
    """Whether each of ``texts`` has a training sentence whose words overlap its own by ``jaccard``."""
    pool = [words(t) for t in training]
    flags = []
    for text in texts:
        own = words(text)
        flags.append(any(len(own & other) >= jaccard * len(own | other) for other in pool if own | other))
    return flags


def accuracy(model_dir: Path, texts: list[str], labels: list[int]) -> float:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from training.sentiment import encode

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    right = 0
    for text, label in zip(texts, labels, strict=True):
        ids = np.array([encode(tokenizer, [text], 256)[0]], dtype=np.int64)
        probabilities = session.run(None, dict(zip(names, [ids, np.ones_like(ids)], strict=True)))[0][0]
        right += int(probabilities[1] > 0.5) == label
    return right / len(texts)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="saved sentiment version folders to score")
    p.add_argument(
        "--written",
        type=Path,
        action="append",
        help="a training file of written sentences; repeat for several (default: training/everyday_written.tsv)",
    )
    p.add_argument("--jaccard", type=float, default=0.5)
    args = p.parse_args(argv)
    training = [
        text for path in args.written or [Path("training/everyday_written.tsv")] for text in read_everyday(path)[0]
    ]
    report: dict = {}
    for check in CHECK_SETS:
        texts, labels = read_everyday(Path(check))
        copied = near_copied(texts, training, args.jaccard)
        kept = [i for i, c in enumerate(copied) if not c]
        row = {"sentences": len(texts), "near_copied": sum(copied)}
        for model in args.models:
            row[str(model)] = {
                "all": round(accuracy(model, texts, labels), 4),
                "without_near_copies": round(accuracy(model, [texts[i] for i in kept], [labels[i] for i in kept]), 4),
            }
        report[check] = row
        print(check, row)
    return report


if __name__ == "__main__":
    main()

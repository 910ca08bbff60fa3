"""Accuracy of a running server on the MNIST test set, sent the way clients send it.

    python -m bench.accuracy [--url http://127.0.0.1:8000] [--style png|photo|paper] [--limit 10000]

``png``: each test digit as a PNG file (MNIST's own light-on-dark 28x28). ``photo``: black ink on
white, scaled up to 200-360 px, off centre on a larger canvas, JPEG-compressed (what a phone app
sends). ``paper``: test digits written on a photographed page (``training/paper_scenes.py``: white,
cream or recycled paper, plain, ruled or squared, pen or marker, uneven light, shadows, sometimes an
underline, the page on a table or a photo; one digit per scene, at least 40 px tall) and framed as a
phone would (the digit 30-75 % of the picture's height, anywhere in it, never cut), JPEG at quality
85; ``--limit`` scenes (default 2,000) of ``--seed``. Files go in multipart requests of 64, the most
one request may carry by default.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import DATA, multipart
from training.idx import load_mnist
from training.paper_scenes import ONE_DIGIT, framed_digits, makers


def as_png(digit: np.ndarray, _: np.random.Generator) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, "PNG")
    return buffer.getvalue(), "image/png"


def as_photo(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    side = int(rng.integers(200, 360))
    ink = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (side + int(rng.integers(40, 160)), side + int(rng.integers(40, 160))), 255)
    canvas.paste(ink, (int(rng.integers(0, canvas.width - side)), int(rng.integers(0, canvas.height - side))))
    buffer = io.BytesIO()
    canvas.convert("RGB").save(buffer, "JPEG", quality=80)
    return buffer.getvalue(), "image/jpeg"


def paper_photos(n: int, seed: int, data_dir: Path = DATA) -> tuple[list[tuple[bytes, str]], list[int]]:
    """``n`` phone pictures of one MNIST test digit written on a page (JPEG), and their labels."""
    files, labels = [], []
    for picture, label in framed_digits(makers(data_dir, seed, ONE_DIGIT)["test"], n, seed):
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=85)
        files.append((buffer.getvalue(), "image/jpeg"))
        labels.append(label)
    return files, labels


def post_files(url: str, files: list[tuple[bytes, str]]) -> list[tuple[str, bool | None]]:
    """Each file's top label, and whether the "not a digit" companion flagged it (None: none serves)."""
    # One style, so one type, per run.
    body, content_type = multipart([(f"d{i}", blob) for i, (blob, _) in enumerate(files)], mime=files[0][1])
    request = urllib.request.Request(
        f"{url}/v1/image-classification", data=body, headers={"content-type": content_type}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    flags = [o["flagged"] if o else None for o in answer.get("ood") or [None] * len(answer["predictions"])]
    return [(ranked[0]["label"], flag) for ranked, flag in zip(answer["predictions"], flags, strict=True)]


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--style", choices=["png", "photo", "paper"], default="png")
    p.add_argument("--limit", type=int, default=None, help="digits (default: 10,000; paper: 2,000 scenes)")
    p.add_argument("--seed", type=int, default=1, help="paper: the scenes' seed")
    p.add_argument("--data-dir", type=Path, default=DATA)
    args = p.parse_args(argv)
    if args.style == "paper":
        files, labels = paper_photos(args.limit or 2_000, args.seed, args.data_dir)
    else:
        images, labels = load_mnist(args.data_dir / "image_classification" / "mnist", "test")
        images, labels = images[: args.limit or 10_000], labels[: args.limit or 10_000]
        encode = as_png if args.style == "png" else as_photo
        rng = np.random.default_rng(0)
        files = [encode(d, rng) for d in images]
    predicted: list[tuple[str, bool | None]] = []
    started = time.perf_counter()
    for start in range(0, len(files), 64):
        predicted += post_files(args.url, files[start : start + 64])
    seconds = time.perf_counter() - started
    accuracy = float(np.mean([p == str(y) for (p, _), y in zip(predicted, labels, strict=True)]))
    flags = [f for _, f in predicted if f is not None]
    flagged = f"; {np.mean(flags):.2%} flagged as not a digit" if flags else ""
    print(
        f"{args.style}: {accuracy:.2%} of {len(labels)} MNIST test digits classified correctly through {args.url} "
        f"({seconds / len(labels) * 1000:.1f} ms per image, requests of 64 one after another){flagged}"
    )
    return accuracy


if __name__ == "__main__":
    main()

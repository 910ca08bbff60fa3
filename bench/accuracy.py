"""Accuracy of a running server on the MNIST test set, sent the way clients send it.

    python -m bench.accuracy [--url http://127.0.0.1:8000] [--style png|photo] [--limit 10000]

``png``: each test digit as a PNG file (MNIST's own light-on-dark 28x28). ``photo``: black ink on
white, scaled up to 200-360 px, off centre on a larger canvas, JPEG-compressed (what a phone app
sends). Files go in multipart requests of 64, the most one request may carry by default.
"""

from __future__ import annotations

import argparse
import io
import json
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import DATA, multipart
from training.idx import load_mnist


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


def post_files(url: str, files: list[tuple[bytes, str]]) -> list[str]:
    # One style, so one type, per run.
    body, content_type = multipart([(f"d{i}", blob) for i, (blob, _) in enumerate(files)], mime=files[0][1])
    request = urllib.request.Request(
        f"{url}/v1/image-classification", data=body, headers={"content-type": content_type}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return [ranked[0]["label"] for ranked in json.loads(response.read())["predictions"]]


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--style", choices=["png", "photo"], default="png")
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--data-dir", type=Path, default=DATA)
    args = p.parse_args(argv)
    images, labels = load_mnist(args.data_dir / "image_classification" / "mnist", "test")
    images, labels = images[: args.limit], labels[: args.limit]
    encode = as_png if args.style == "png" else as_photo
    rng = np.random.default_rng(0)
    predicted: list[str] = []
    for start in range(0, len(images), 64):
        predicted += post_files(args.url, [encode(d, rng) for d in images[start : start + 64]])
    accuracy = float(np.mean([p == str(y) for p, y in zip(predicted, labels, strict=True)]))
    print(f"{args.style}: {accuracy:.2%} of {len(labels)} MNIST test digits classified correctly through {args.url}")
    return accuracy


if __name__ == "__main__":
    main()

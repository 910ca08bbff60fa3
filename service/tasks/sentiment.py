"""Sentiment: texts in, a label with its probability out.

Texts are tokenised with the model's own ``tokenizer.json`` (Hugging Face ``tokenizers``), cut to
the model's ``max_length`` (flagged, never silent), and padded to the smallest of the model's
``length_buckets`` that fits the longest text of the request. The bucket is the batcher key, so
requests of similar length batch together and no batch is padded to more than its bucket.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.errors import ModelLoadError
from service.repository import ModelSpec
from service.tasks import load_tokenizer


@dataclass(frozen=True)
class TextAssets:
    tokenizer: Tokenizer
    max_length: int
    buckets: tuple[int, ...]
    unk_id: int


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # [n, bucket] int64, 0 = padding
    mask: np.ndarray  # [n, bucket] int64, 1 = token
    lengths: list[int]  # tokens per text before truncation
    truncated: list[bool]


def load_assets(spec: ModelSpec, version_dir: Path) -> TextAssets:
    params = spec.parameters
    tokenizer = load_tokenizer(params.get("tokenizer", "tokenizer.json"), version_dir)
    max_length = int(params.get("max_length", 256))
    buckets = tuple(sorted(int(b) for b in params.get("length_buckets", [max_length])))
    if buckets[-1] < max_length:
        raise ModelLoadError(version_dir.parent / "model.json", "the largest length bucket is below max_length")
    unk = tokenizer.token_to_id("[UNK]")
    return TextAssets(tokenizer, max_length, buckets, unk if unk is not None else 1)


def encode(assets: TextAssets, texts: Sequence[str]) -> Encoded:
    encodings = assets.tokenizer.encode_batch(list(texts))
    lengths = [len(e.ids) for e in encodings]
    # A text that normalises to nothing (only control characters, say) becomes one unknown token.
    rows = [e.ids[: assets.max_length] or [assets.unk_id] for e in encodings]
    longest = max(len(r) for r in rows)
    width = next(b for b in assets.buckets if b >= longest)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return Encoded(ids, (ids != 0).astype(np.int64), lengths, [n > assets.max_length for n in lengths])


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF or 0xF900 <= code <= 0xFAFF
    )


def detect_language(texts: Sequence[str]) -> str:
    """'zh' when Chinese characters make up at least a third of the letters, else 'en'."""
    cjk = letters = 0
    for text in texts:
        for char in text:
            if _is_cjk(char):
                cjk += 1
                letters += 1
            elif unicodedata.category(char).startswith("L"):
                letters += 1
    return "zh" if letters and cjk * 3 >= letters else "en"


def predictions(probabilities: np.ndarray, labels: Sequence[str], encoded: Encoded) -> list[dict]:
    out = []
    for row, length, truncated in zip(probabilities, encoded.lengths, encoded.truncated, strict=True):
        best = int(row.argmax())
        out.append(
            {
                "label": labels[best],
                "score": round(float(row[best]), 6),
                "scores": {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)},
                "tokens": length,
                "truncated": truncated,
            }
        )
    return out

"""Reading a task's files beside its graph (tokenizers, id maps, second graphs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from service.errors import ModelLoadError


def find_asset(filename: str, version_dir: Path) -> Path:
    """A task file of a model version: in the version folder, else beside model.json."""
    for folder in (version_dir, version_dir.parent):
        path = folder / filename
        if path.is_file():
            return path
    raise ModelLoadError(version_dir / filename, "task asset named in model.json is missing")


def load_tokenizer(filename: str, version_dir: Path) -> Tokenizer:
    """A Hugging Face ``tokenizers`` file of a model version, with padding and truncation off."""
    path = find_asset(filename, version_dir)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ModelLoadError(path, f"not a Hugging Face tokenizers file: {exc}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode_each(tokenizer: Tokenizer, texts: Sequence[str]) -> list[Encoding]:
    """``tokenizer.encode`` per text, not ``encode_batch``: the batch call hands the work to the
    tokenizer's own thread pool, and with both cores busy decoding, waiting for one of its threads
    to be scheduled cost 32 us a call against 4.5 us for ``encode`` (one short sentence; a loop of
    300 calls beside two busy processes on 2 cores), and far more on the event loop of a server
    under load (16 % of the loop at 1,024 connections, py-spy). Same encodings."""
    return [tokenizer.encode(text) for text in texts]

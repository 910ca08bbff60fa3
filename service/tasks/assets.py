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
    # "<eos>", "[PAD]" or "<unk>" typed by a user is text, not a control token: matched as specials,
    # "<eos>" in a prompt ended its log-probabilities early and vanished from the echo, and "[PAD]"
    # in a review fed the classifier its padding id.
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_each(tokenizer: Tokenizer, texts: Sequence[str]) -> list[Encoding]:
    """``tokenizer.encode`` per text, not ``encode_batch``. In a server under load the batch call
    cost the event loop far more than the work: tokenising took 16.5 % of the loop at 1,024
    connections on the translation endpoint with ``encode_batch``, 1.6 % with ``encode`` (py-spy,
    the overload benchmark's load). Alone, the two cost the same (``python -m bench.tokenize``:
    about 5 us for one sentence, cores idle or busy), so the cost is in the hand-over, not the
    tokenising (probably: the batch call hands its work to the tokenizer's thread pool without the
    GIL, and getting the GIL back from the busy decode threads is the wait). Same encodings."""
    return [tokenizer.encode(text) for text in texts]

"""Task pre- and post-processing, one module per task.

``load_assets`` runs when a model loads (in a worker thread): a task's files (tokenizer, id maps)
are read and checked then, so a broken asset marks that model FAILED instead of failing requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from service.config import Settings
from service.errors import ModelLoadError
from service.repository import ModelSpec
from service.runtime import RuntimeOptions


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


def load_assets(spec: ModelSpec, version_dir: Path, options: RuntimeOptions) -> Any:
    from service.tasks import rating, sentiment, translation

    if spec.task == "translation":  # its encoder is a second graph, opened like the model's own
        return translation.load_assets(spec, version_dir, options)
    loaders = {"sentiment": sentiment.load_assets, "rating": rating.load_assets}
    loader = loaders.get(spec.task)
    return loader(spec, version_dir) if loader else None


def make_engine(served: Any, settings: Settings) -> Any:
    """A task's own scheduler around a loaded model (translation's step-level decoder), or None."""
    if served.spec.task != "translation":
        return None
    from service.tasks.translation import TranslationEngine

    return TranslationEngine(served.runtime, served.assets, settings, name=served.name, observer=served.observer)

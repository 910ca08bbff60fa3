"""Task pre- and post-processing, one module per task.

``load_assets`` runs when a model loads (in a worker thread): a task's files (tokenizer, id maps)
are read and checked then, so a broken asset marks that model FAILED instead of failing requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.errors import ModelLoadError
from service.repository import ModelSpec


def find_asset(filename: str, version_dir: Path) -> Path:
    """A task file of a model version: in the version folder, else beside model.json."""
    for folder in (version_dir, version_dir.parent):
        path = folder / filename
        if path.is_file():
            return path
    raise ModelLoadError(version_dir / filename, "task asset named in model.json is missing")


def load_assets(spec: ModelSpec, version_dir: Path) -> Any:
    from service.tasks import rating, sentiment

    loaders = {"sentiment": sentiment.load_assets, "rating": rating.load_assets}
    loader = loaders.get(spec.task)
    return loader(spec, version_dir) if loader else None

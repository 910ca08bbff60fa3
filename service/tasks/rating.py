"""Rating prediction and recommendations over a MovieLens-style recommender.

The model takes embedding rows; ``recommender.json`` beside it maps the dataset's own ids (strings
of digits, e.g. MovieLens userId/movieId) to rows and carries titles, the bias baseline used as the
fallback for ids the model never saw, the popular items for cold-start users, and what each user
has already rated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidId, ModelLoadError
from service.repository import ModelSpec
from service.tasks import find_asset

ID_PATTERN = re.compile(r"^[1-9][0-9]{0,11}$")  # positive integers, as MovieLens ids are


@dataclass(frozen=True)
class RecommenderAssets:
    user_rows: dict[str, int]
    item_rows: dict[str, int]
    item_ids: np.ndarray  # row -> raw id (str)
    movies: dict[str, dict]
    mean: float
    user_bias: dict[str, float]
    item_bias: dict[str, float]
    popular: list[str]
    seen: dict[str, frozenset[str]]
    rating_min: float
    rating_max: float

    def fallback(self, user_id: str, item_id: str) -> float:
        value = self.mean + self.user_bias.get(user_id, 0.0) + self.item_bias.get(item_id, 0.0)
        return float(min(max(value, self.rating_min), self.rating_max))

    def describe(self, item_id: str) -> dict[str, Any]:
        movie = self.movies.get(item_id, {})
        return {"item_id": item_id, "title": movie.get("title"), "genres": movie.get("genres", [])}


def load_assets(spec: ModelSpec, version_dir: Path) -> RecommenderAssets:
    path = find_asset(spec.parameters.get("assets", "recommender.json"), version_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        baseline = raw["baseline"]
        return RecommenderAssets(
            user_rows={u: i for i, u in enumerate(raw["users"])},
            item_rows={m: i for i, m in enumerate(raw["items"])},
            item_ids=np.array(raw["items"]),
            movies=raw.get("movies", {}),
            mean=float(baseline["mean"]),
            user_bias=baseline["user_bias"],
            item_bias=baseline["item_bias"],
            popular=list(raw.get("popular", [])),
            seen={u: frozenset(items) for u, items in raw.get("seen", {}).items()},
            rating_min=float(spec.parameters.get("rating_min", 0.5)),
            rating_max=float(spec.parameters.get("rating_max", 5.0)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(path, f"not a valid recommender asset file: {exc!r}") from None


def check_id(value: str | int, where: str) -> str:
    text = str(value)
    if isinstance(value, bool) or not ID_PATTERN.match(text):
        raise InvalidId(f'{where}: {value!r} is not an id (ids are positive integers, e.g. "42")')
    return text


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (argpartition, then sort only those)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]

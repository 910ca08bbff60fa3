"""Rating prediction and recommendations over a MovieLens-style recommender.

The model takes embedding rows; ``recommender.json`` beside it maps the dataset's own ids (strings
of digits, e.g. MovieLens userId/movieId) to rows and carries titles, the bias baseline used as the
fallback for ids the model never saw, the popular items for cold-start users, and what each user
has already rated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from service.config import Settings
from service.errors import InvalidId, ModelLoadError, describe_validation
from service.repository import ModelSpec
from service.runtime import RuntimeOptions
from service.tasks.assets import find_asset
from service.tasks.base import Parameters, Task, require

ID_PATTERN = re.compile(r"[1-9][0-9]{0,11}", re.ASCII)  # positive integers, as MovieLens ids are (whole text)


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


class Baseline(BaseModel):
    mean: float
    user_bias: dict[str, float]
    item_bias: dict[str, float]


class Movie(BaseModel):
    title: str | None = None
    genres: list[str] = Field(default_factory=list)


class RecommenderFile(BaseModel):
    """``recommender.json``: written by ``training/rating.py``, read here; one contract for both."""

    users: list[str] = Field(description="Raw user ids, by embedding row")
    items: list[str] = Field(description="Raw item ids, by embedding row")
    baseline: Baseline = Field(description="Bias baseline: the fallback for ids the model never saw")
    movies: dict[str, Movie] = Field(default_factory=dict, description="Titles and genres by item id")
    popular: list[str] = Field(default_factory=list, description="Cold-start items, best first")
    seen: dict[str, list[str]] = Field(default_factory=dict, description="Items each user has rated")


class RatingParameters(Parameters):
    assets: str = Field("recommender.json", description="The id maps and fallbacks beside the graph")
    rating_min: float = 0.5
    rating_max: float = 5.0


class Rating(Task[RatingParameters]):
    name = "rating"
    parameters_model = RatingParameters
    routes = "service.api.routes.rating"

    def check(self, spec: ModelSpec, parameters: RatingParameters) -> None:
        names = sorted(t.name for t in spec.inputs)
        require(names == ["item", "user"], f"inputs must be user and item embedding rows, not {names}")
        for t in spec.inputs:
            require(t.datatype == "INT64" and len(t.shape) == 1, f"input {t.name!r} must be INT64 [batch]")
        require(len(spec.outputs[0].shape) == 1, f"output {spec.outputs[0].name!r} must be [batch] ratings")

    def load_assets(
        self,
        spec: ModelSpec,
        parameters: RatingParameters,
        version_dir: Path,
        options: RuntimeOptions,
        settings: Settings,
    ) -> RecommenderAssets:
        path = find_asset(parameters.assets, version_dir)
        try:
            raw = RecommenderFile.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ModelLoadError(path, f"cannot be read: {exc}") from None
        except ValidationError as exc:
            raise ModelLoadError(path, f"not a valid recommender file: {describe_validation(exc.errors())}") from None
        return RecommenderAssets(
            user_rows={u: i for i, u in enumerate(raw.users)},
            item_rows={m: i for i, m in enumerate(raw.items)},
            item_ids=np.array(raw.items),
            movies={k: v.model_dump() for k, v in raw.movies.items()},
            mean=raw.baseline.mean,
            user_bias=raw.baseline.user_bias,
            item_bias=raw.baseline.item_bias,
            popular=raw.popular,
            seen={u: frozenset(items) for u, items in raw.seen.items()},
            rating_min=parameters.rating_min,
            rating_max=parameters.rating_max,
        )


TASK = Rating()


def check_id(value: str | int, where: str) -> str:
    text = str(value)
    if isinstance(value, bool) or not ID_PATTERN.fullmatch(text):
        raise InvalidId(f'{where}: {value!r} is not an id (ids are positive integers, e.g. "42")')
    return text


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (argpartition, then sort only those)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]

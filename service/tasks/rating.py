"""Rating prediction and recommendations over a MovieLens-style recommender.

The model takes embedding rows and answers, per (user, item) pair, a predicted ``rating`` (on the
rating scale but not clipped to it: the endpoints clip what they show) and, optionally, a ranking
``score`` from a model trained to rank what the user goes on to rate (recommendations sort by it; a
graph without one is ranked by its rating). ``recommender.json`` beside it maps the dataset's
own ids (strings of digits, e.g. MovieLens userId/movieId) to rows and carries titles, the bias
baseline used as the fallback for ids the model never saw, the cold-start items with their scores,
and what each user has already rated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from service.config import Settings
from service.errors import InvalidId, ModelLoadError, describe_validation
from service.repository import ModelSpec, TensorSpec
from service.runtime import RuntimeOptions
from service.tasks.assets import find_asset
from service.tasks.base import Parameters, Task, require

ID_PATTERN = re.compile(r"[1-9][0-9]{0,11}", re.ASCII)  # positive integers, as MovieLens ids are (whole text)
RATING_OUTPUT, SCORE_OUTPUT = "rating", "score"
SCORE_DECIMALS = 4  # what a response shows, and what it is sorted by


@dataclass(frozen=True)
class RecommenderAssets:
    user_rows: dict[str, int]
    item_rows: dict[str, int]
    item_ids: np.ndarray  # row -> raw id (str)
    item_numbers: np.ndarray  # row -> raw id as an integer (equal scores are ordered by it)
    movies: dict[str, dict]
    mean: float
    user_bias: dict[str, float]
    item_bias: dict[str, float]
    popular: list[str]
    popular_scores: list[float]  # empty: cold-start items are scored by their fallback rating
    seen: dict[str, frozenset[str]]
    rating_min: float
    rating_max: float

    def clip(self, rating: float) -> float:
        """A rating as shown: on the scale (the graph's own output is not clipped, so that it never ties)."""
        return float(min(max(rating, self.rating_min), self.rating_max))

    def fallback(self, user_id: str, item_id: str) -> float:
        return self.clip(self.mean + self.user_bias.get(user_id, 0.0) + self.item_bias.get(item_id, 0.0))

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
    popular_scores: list[float] = Field(
        default_factory=list,
        description="The ranking score of each cold-start item (non-increasing), shown with it; empty: none",
    )
    seen: dict[str, list[str]] = Field(default_factory=dict, description="Items each user has rated")

    @model_validator(mode="after")
    def _scores_match_items(self) -> RecommenderFile:
        if self.popular_scores and len(self.popular_scores) != len(self.popular):
            raise ValueError(f"popular_scores has {len(self.popular_scores)} entries for {len(self.popular)} items")
        return self


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
        for t in (rating_output(spec), score_output(spec)):
            if t is not None:
                require(len(t.shape) == 1, f"output {t.name!r} must be [batch], one value per pair")

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
            item_numbers=np.array([int(m) for m in raw.items], dtype=np.int64),
            popular=raw.popular,
            popular_scores=raw.popular_scores,
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


def rating_output(spec: ModelSpec) -> TensorSpec:
    """The predicted rating: the output named ``rating``, else the first."""
    return next((t for t in spec.outputs if t.name == RATING_OUTPUT), spec.outputs[0])


def score_output(spec: ModelSpec) -> TensorSpec | None:
    """The ranking score, when the graph has one (an output named ``score``)."""
    return next((t for t in spec.outputs if t.name == SCORE_OUTPUT), None)


def shown(scores: np.ndarray) -> np.ndarray:
    """Scores as a response shows them (and as recommendations are sorted)."""
    return np.round(np.asarray(scores, dtype=np.float64), SCORE_DECIMALS)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best items, best first: by the score as shown (rounded), highest first, equal
    scores by id, lowest first, so that the order is the one a reader sees and never arbitrary.
    Training evaluates the model with this same function."""
    shown_scores = shown(scores)
    k = min(k, len(shown_scores))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    # Everything that ties with the k-th score competes on id: take all of it, then sort only those.
    kth = np.partition(-shown_scores, k - 1)[k - 1]
    part = np.flatnonzero(-shown_scores <= kth)
    return part[np.lexsort((ids[part], -shown_scores[part]))][:k]

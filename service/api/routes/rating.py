"""``POST /v1/rating`` and ``POST /v1/recommendations`` over the rating model."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import ERROR_RESPONSES, json_body_doc, limit, read_json
from service.errors import SchemaError, TooManyItems
from service.responses import ModelResponse
from service.tasks import rating as task

router = APIRouter(tags=["tasks"])

Id = StrictStr | StrictInt


class RatingPair(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: Id
    item_id: Id


class RatingRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"pairs": [{"user_id": "1", "item_id": "1"}, {"user_id": "1", "item_id": "2"}]}]
        },
    )
    pairs: list[RatingPair] = Field(
        min_length=1,
        json_schema_extra=limit("max_pairs_per_request"),
        description="The dataset's own ids (MovieLens userId, movieId).",
    )
    model: str | None = None


class RatingRow(BaseModel):
    user_id: str
    item_id: str
    rating: float
    fallback: bool = Field(description="True when the user or item is unknown to the model: bias baseline used.")
    unknown: list[str] = Field(description="Which of 'user', 'item' the model has not seen.")


class RatingResponse(BaseModel):
    model: str
    version: str
    ratings: list[RatingRow]


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"user_id": "1", "k": 10, "exclude_seen": True}]}
    )
    user_id: Id
    k: int = Field(10, ge=1, json_schema_extra=limit("max_recommendations"), description="How many items to return.")
    exclude_seen: bool = Field(True, description="Leave out what the user has already rated.")
    model: str | None = None


class RecommendedItem(BaseModel):
    item_id: str
    title: str | None
    genres: list[str]
    score: float = Field(
        description="Ranking score: how strongly the model expects the user to rate this item next (a logit, "
        "comparable within one list only). Items come sorted by it, highest first; equal scores by item id, "
        "lowest first. A model without a ranking output scores by its predicted rating."
    )
    rating: float = Field(description="Predicted rating, on the rating scale.")


class RecommendationResponse(BaseModel):
    model: str
    version: str
    user_id: str
    cold_start: bool = Field(
        description="Unknown user: the items the model ranks first for anyone (scored without a history) instead "
        "of personal ones."
    )
    items: list[RecommendedItem]


@router.post(
    "/v1/rating",
    summary="Predict ratings for (user, item) pairs",
    response_model=RatingResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(RatingRequest),
)
async def predict_ratings(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    body = await read_json(request, RatingRequest)
    if len(body.pairs) > settings.max_pairs_per_request:
        raise TooManyItems(f"{len(body.pairs)} pairs; at most {settings.max_pairs_per_request} per request")
    served = registry.for_task(task.TASK.name, body.model)
    assets: task.RecommenderAssets = served.assets
    pairs = [
        (task.check_id(p.user_id, f"pairs[{i}].user_id"), task.check_id(p.item_id, f"pairs[{i}].item_id"))
        for i, p in enumerate(body.pairs)
    ]
    known = [i for i, (u, m) in enumerate(pairs) if u in assets.user_rows and m in assets.item_rows]
    ratings = [round(assets.fallback(u, m), 4) for u, m in pairs]
    headers: dict[str, str] = {}
    if known:
        users = np.array([assets.user_rows[pairs[i][0]] for i in known], dtype=np.int64)
        items = np.array([assets.item_rows[pairs[i][1]] for i in known], dtype=np.int64)
        result = await unless_disconnected(request, served.infer({"user": users, "item": items}))
        for i, value in zip(known, result.outputs[task.rating_output(served.spec).name].tolist(), strict=True):
            ratings[i] = round(assets.clip(value), 4)
        headers = result.timing_headers()
    rows = []
    for (user_id, item_id), rating in zip(pairs, ratings, strict=True):
        unknown = [
            kind
            for kind, ok in (("user", user_id in assets.user_rows), ("item", item_id in assets.item_rows))
            if not ok
        ]
        rows.append(RatingRow(user_id=user_id, item_id=item_id, rating=rating, fallback=bool(unknown), unknown=unknown))
    return ModelResponse(RatingResponse(model=served.name, version=str(served.version), ratings=rows), headers=headers)


@router.post(
    "/v1/recommendations",
    summary="Top-k items for a user",
    response_model=RecommendationResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(RecommendationRequest),
)
async def recommend(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    body = await read_json(request, RecommendationRequest)
    if body.k > settings.max_recommendations:
        raise SchemaError(f"k must be between 1 and {settings.max_recommendations}, got {body.k}")
    served = registry.for_task(task.TASK.name, body.model)
    assets: task.RecommenderAssets = served.assets
    user_id = task.check_id(body.user_id, "user_id")
    seen = assets.seen.get(user_id, frozenset()) if body.exclude_seen else frozenset()
    head = {"model": served.name, "version": str(served.version), "user_id": user_id}
    if user_id not in assets.user_rows:
        picks = [m for m in assets.popular if m not in seen]
        ratings = [assets.fallback(user_id, m) for m in picks]
        by_item = dict(zip(assets.popular, assets.popular_scores, strict=True)) if assets.popular_scores else None
        # Sorted by the score each item shows (without scores in the file: its rating, which is shown).
        scores = task.shown(np.array([by_item[m] for m in picks] if by_item else ratings, dtype=np.float64))
        items = [
            RecommendedItem(**assets.describe(picks[j]), score=float(scores[j]), rating=round(ratings[j], 4))
            for j in task.top_k(scores, np.array([int(m) for m in picks], dtype=np.int64), body.k)
        ]
        return ModelResponse(RecommendationResponse(**head, cold_start=True, items=items))
    candidates = np.array([row for m, row in assets.item_rows.items() if m not in seen], dtype=np.int64)
    if len(candidates) == 0:
        return ModelResponse(RecommendationResponse(**head, cold_start=False, items=[]))
    users = np.full(len(candidates), assets.user_rows[user_id], dtype=np.int64)
    # Thousands of rows: the batcher cuts them into max_batch_size chunks that interleave with others.
    result = await unless_disconnected(request, served.infer({"user": users, "item": candidates}))
    predicted = result.outputs[task.rating_output(served.spec).name]
    score_spec = task.score_output(served.spec)
    scores = task.shown(result.outputs[score_spec.name] if score_spec is not None else predicted)
    items = [
        RecommendedItem(
            **assets.describe(str(assets.item_ids[candidates[j]])),
            score=float(scores[j]),
            rating=round(assets.clip(float(predicted[j])), 4),
        )
        for j in task.top_k(scores, assets.item_numbers[candidates], body.k)
    ]
    out = RecommendationResponse(**head, cold_start=False, items=items)
    return ModelResponse(out, headers=result.timing_headers())

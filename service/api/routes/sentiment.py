"""``POST /v1/sentiment``: texts in, one label per text out."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.concurrency import run_in_threadpool

from service import tracing
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import ERROR_RESPONSES, check_texts, json_body_doc, limit, read_json
from service.registry import Inference, ServedModel
from service.responses import ModelResponse
from service.tasks import sentiment as task

router = APIRouter(tags=["tasks"])


class SentimentRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"texts": ["A gorgeous, witty, seductive movie.", "The plot is a mess and the jokes fall flat."]},
                {"texts": ["房间干净，服务热情，下次还会再来。"], "language": "zh"},
            ]
        },
    )
    texts: list[StrictStr] = Field(
        min_length=1,
        json_schema_extra=limit("max_texts_per_request", items="max_text_chars"),
        description="One prediction per text, in order.",
    )
    model: str | None = Field(None, description="A sentiment model by name, e.g. sentiment-zh.")
    language: str = Field(
        "auto",
        pattern=r"^(auto|[a-z]{2,3})$",
        description="Picks the default model of that language (a code such as en, zh) when 'model' is not "
        "given; 'auto' detects Chinese text by text (else English), so a request may mix languages.",
    )


class SentimentPrediction(BaseModel):
    model: str = Field(description="The model that classified this text (texts of a request may differ).")
    label: str
    score: float = Field(description="Probability of the label.")
    scores: dict[str, float]
    tokens: int = Field(description="Tokens in the text before truncation.")
    truncated: bool = Field(description="True when the text was longer than the model takes and was cut.")


class SentimentResponse(BaseModel):
    model: str = Field(description="The model of the first text; each prediction names its own.")
    version: str
    predictions: list[SentimentPrediction]


@router.post(
    "/v1/sentiment",
    summary="Sentiment of texts (English by default; Chinese detected or chosen)",
    response_model=SentimentResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(SentimentRequest),
)
async def classify_sentiment(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelResponse:
    body = await read_json(request, SentimentRequest)
    texts = body.texts
    check_texts(texts, settings.max_texts_per_request, settings.max_text_chars)
    # One model per text: the one named, else the default of the text's language (given or
    # detected), so a request that mixes English and Chinese gets each text classified by the right model.
    if body.model:
        chosen = [registry.for_task(task.TASK.name, body.model)] * len(texts)
    else:
        languages = [task.detect_language([t]) if body.language == "auto" else body.language for t in texts]
        by_language = {lang: registry.for_task(task.TASK.name, scope=lang) for lang in dict.fromkeys(languages)}
        chosen = [by_language[lang] for lang in languages]
    groups: dict[str, list[int]] = {}
    for i, served in enumerate(chosen):
        groups.setdefault(served.name, []).append(i)
    results = await asyncio.gather(
        *(_classify(request, chosen[idx[0]], [texts[i] for i in idx]) for idx in groups.values())
    )
    predictions: list[SentimentPrediction | None] = [None] * len(texts)
    inferences = []
    for idx, (group_predictions, inference) in zip(groups.values(), results, strict=True):
        inferences.append(inference)
        for i, prediction in zip(idx, group_predictions, strict=True):
            predictions[i] = prediction
    first = chosen[0]
    out = SentimentResponse(model=first.name, version=str(first.version), predictions=predictions)
    return ModelResponse(out, headers=inferences[0].timing_headers())


async def _classify(
    request: Request, served: ServedModel, texts: list[str]
) -> tuple[list[SentimentPrediction], Inference]:
    with tracing.stage("preprocess", texts=len(texts)):
        encoded = await run_in_threadpool(task.encode, served.assets, texts)
    result = await unless_disconnected(
        request, served.infer_rows({"input_ids": encoded.ids, "attention_mask": encoded.mask})
    )
    with tracing.stage("postprocess"):
        probabilities = result.outputs[served.spec.outputs[0].name]
        labels = served.spec.labels or [str(i) for i in range(probabilities.shape[1])]
        rows = task.predictions(probabilities, labels, encoded)
    return [SentimentPrediction(model=served.name, **row) for row in rows], result

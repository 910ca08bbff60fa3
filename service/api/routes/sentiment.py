"""``POST /v1/sentiment``: texts in, one label per text out."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import (
    ERROR_RESPONSES,
    SentimentRequest,
    SentimentResponse,
    check_texts,
    json_body_doc,
    parse_body,
)
from service.registry import Inference, ServedModel
from service.responses import JSONResponse
from service.tasks import sentiment as task

router = APIRouter(tags=["tasks"])
TASK = "sentiment"


@router.post(
    "/v1/sentiment",
    summary="Sentiment of texts (English by default; Chinese detected or chosen)",
    response_model=SentimentResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(SentimentRequest),
)
async def classify_sentiment(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    body = parse_body(await request.body(), SentimentRequest)
    texts = body.texts
    check_texts(texts, settings.max_texts_per_request, settings.max_text_chars)
    # One model per text: the one named, else the one of the text's language (given or detected), so
    # a request that mixes English and Chinese gets each text classified by the right model.
    if body.model:
        chosen = [registry.for_task(TASK, body.model)] * len(texts)
    else:
        languages = [task.detect_language([t]) if body.language == "auto" else body.language for t in texts]
        by_language = {lang: registry.for_task(TASK, language=lang) for lang in dict.fromkeys(languages)}
        chosen = [by_language[lang] for lang in languages]
    groups: dict[str, list[int]] = {}
    for i, served in enumerate(chosen):
        groups.setdefault(served.name, []).append(i)
    results = await asyncio.gather(
        *(_classify(request, chosen[idx[0]], [texts[i] for i in idx]) for idx in groups.values())
    )
    predictions: list[dict] = [{}] * len(texts)
    inferences = []
    for idx, (group_predictions, inference) in zip(groups.values(), results, strict=True):
        inferences.append(inference)
        for i, prediction in zip(idx, group_predictions, strict=True):
            predictions[i] = prediction
    first = chosen[0]
    body_out = {"model": first.name, "version": str(first.version), "predictions": predictions}
    return JSONResponse(body_out, headers=inferences[0].timing_headers())


async def _classify(request: Request, served: ServedModel, texts: list[str]) -> tuple[list[dict], Inference]:
    encoded = await run_in_threadpool(task.encode, served.assets, texts)
    result = await unless_disconnected(
        request, served.infer({"input_ids": encoded.ids, "attention_mask": encoded.mask})
    )
    probabilities = result.outputs[served.spec.outputs[0].name]
    predictions = task.predictions(probabilities, served.spec.labels or ["0", "1"], encoded)
    for prediction in predictions:
        prediction["model"] = served.name
    return predictions, result

"""``POST /v1/sentiment``: texts in, one label per text out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import ERROR_RESPONSES, SentimentRequest, SentimentResponse, parse_body
from service.errors import InvalidInput, TextTooLong, TooManyItems
from service.responses import JSONResponse
from service.tasks import sentiment as task

router = APIRouter(tags=["tasks"])
TASK = "sentiment"


@router.post(
    "/v1/sentiment",
    summary="Sentiment of texts (English by default; Chinese detected or chosen)",
    response_model=SentimentResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SentimentRequest.model_json_schema()}},
        }
    },
)
async def classify_sentiment(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    body = parse_body(await request.body(), SentimentRequest)
    texts = body.texts
    if len(texts) > settings.max_texts_per_request:
        raise TooManyItems(f"{len(texts)} texts; at most {settings.max_texts_per_request} per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"texts[{i}] is empty")
        if len(text) > settings.max_text_chars:
            raise TextTooLong(f"texts[{i}] has {len(text)} characters; the limit is {settings.max_text_chars}")
    if body.model:
        served = registry.for_task(TASK, body.model)
    else:
        language = task.detect_language(texts) if body.language == "auto" else body.language
        served = registry.for_task(TASK, language=language)
    encoded = await run_in_threadpool(task.encode, served.assets, texts)
    result = await unless_disconnected(
        request, served.infer({"input_ids": encoded.ids, "attention_mask": encoded.mask})
    )
    probabilities = result.outputs[served.spec.outputs[0].name]
    body_out = {
        "model": served.name,
        "version": str(served.version),
        "predictions": task.predictions(probabilities, served.spec.labels or ["0", "1"], encoded),
    }
    return JSONResponse(body_out, headers=result.timing_headers())

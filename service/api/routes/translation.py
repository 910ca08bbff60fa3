"""``POST /v1/translation``: English texts in, French out, decoded with step-level batching.

Each text is its own sequence in the model's decode loop (so the texts of one request, and of
every other request, share decoder steps); the answer comes when the last of them ends. With
``"stream": true`` the answer is a stream of server-sent events, a ``token`` event per new token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.concurrency import run_in_threadpool

from service import tracing
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.middleware import stream_failed
from service.api.schemas import ERROR_RESPONSES, check_texts, json_body_doc, limit, read_json
from service.errors import SchemaError, ServiceError, UnsupportedText
from service.responses import ModelResponse
from service.tasks import translation as task

router = APIRouter(tags=["tasks"])


class TranslationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"texts": ["I'm hungry.", "Where is the train station?"], "beam_size": 1, "max_new_tokens": 64},
                {"texts": ["Do you want to come with us tomorrow?"], "beam_size": 4},
            ]
        },
    )
    texts: list[StrictStr] = Field(
        min_length=1,
        json_schema_extra=limit("max_texts_per_request", items="max_text_chars"),
        description="English texts; one translation per text, in order.",
    )
    beam_size: int = Field(
        1,
        ge=1,
        json_schema_extra=limit("max_beam_size"),
        description="1: greedy decoding; more: beam search (up to the server's limit and the model's).",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate per text (default and ceiling: the model's)."
    )
    stream: bool = Field(
        False, description="Server-sent events: a 'token' event per new token of each text, then 'done' (greedy only)."
    )
    model: str | None = Field(None, description="A translation model by name; default: the task's default model.")


class Translation(BaseModel):
    text: str = Field(description="The translation, detokenised.")
    source_tokens: int = Field(description="Tokens in the source text before truncation.")
    generated_tokens: int
    truncated: bool = Field(description="True when the source was longer than the model takes and was cut.")
    unknown_characters: list[str] = Field(description="Characters of the source the model's vocabulary lacks.")
    finished: bool = Field(description="False when max_new_tokens cut the translation short.")


class TranslationResponse(BaseModel):
    model: str
    version: str
    translations: list[Translation]


@router.post(
    "/v1/translation",
    summary="Translate English texts into French",
    response_model=TranslationResponse,
    # "stream": true answers server-sent events (README, streaming).
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    openapi_extra=json_body_doc(TranslationRequest),
)
async def translate(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    body = await read_json(request, TranslationRequest)
    check_texts(body.texts, settings.max_texts_per_request, settings.max_text_chars)
    if body.stream and body.beam_size > 1:
        raise SchemaError("stream: token streaming needs greedy decoding (beam_size 1); a beam's best changes")
    served = registry.for_task(task.TASK.name, body.model)
    engine: task.TranslationEngine = served.engine  # type: ignore[assignment]
    max_beam = min(settings.max_beam_size, engine.config.max_beam(engine.assets.max_source_tokens))
    if body.beam_size > max_beam:
        raise SchemaError(f"beam_size: at most {max_beam} for model {served.name}, got {body.beam_size}")
    assets: task.TranslationAssets = served.assets
    max_new = body.max_new_tokens or assets.max_new_tokens
    if max_new > assets.max_new_tokens:
        raise SchemaError(f"max_new_tokens: at most {assets.max_new_tokens} for model {served.name}, got {max_new}")
    with tracing.stage("preprocess", texts=len(body.texts)):
        if sum(len(t) for t in body.texts) <= 4096:  # short: tokenising (Rust) costs less than a thread hop
            sources = task.encode_sources(assets, body.texts)
        else:
            sources = await run_in_threadpool(task.encode_sources, assets, body.texts)
    for i, source in enumerate(sources):
        if not source.readable:
            unknown = "".join(source.unknown)[:40]
            raise UnsupportedText(
                f"texts[{i}]: none of its characters are in the model's vocabulary ({unknown!r}); "
                f"model {served.name} translates {assets.source_language} to {assets.target_language}"
            )
    head = {"model": served.name, "version": str(served.version)}
    if body.stream:
        engine.scheduler.admit(len(sources))  # refused (429) here, before the stream's 200 begins
        return StreamingResponse(
            _stream(engine, sources, max_new, head, on_error=lambda exc: stream_failed(request.scope, exc)),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    work = engine.translate_all(sources, beam_size=body.beam_size, max_new_tokens=max_new)
    results = await unless_disconnected(request, work)
    translations = [_translation(engine, job) for job, _ in results]
    stats = [s for _, s in results]
    headers = {
        "x-queue-time-ms": f"{max(s.queue_s for s in stats) * 1000:.3f}",
        "x-inference-time-ms": f"{max(s.decode_s for s in stats) * 1000:.3f}",
        "x-batch-size": str(max(s.max_rows for s in stats)),
        "x-decode-steps": str(max(s.steps for s in stats)),
    }
    return ModelResponse(TranslationResponse(**head, translations=translations), headers=headers)


def _translation(engine: task.TranslationEngine, job: task.TranslationJob) -> Translation:
    ids = job.result()
    return Translation(
        text=engine.detokenize(ids),
        source_tokens=job.source.tokens,
        generated_tokens=len(ids),
        truncated=job.source.truncated,
        unknown_characters=job.source.unknown,
        finished=job.ended,
    )


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    engine: task.TranslationEngine,
    sources: list[task.Source],
    max_new: int,
    head: dict,
    on_error: Callable[[ServiceError], None] | None = None,
) -> AsyncIterator[bytes]:
    """``token`` events as the decode loop produces them, then ``done`` with the whole answer
    (or ``error`` with the usual error body). Leaving early (client gone) cancels the decoding."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    texts: list[list[int]] = [[] for _ in sources]

    def listener(index: int):
        # Called in the decode thread after each step.
        return lambda token: loop.call_soon_threadsafe(queue.put_nowait, (index, token))

    work = asyncio.ensure_future(
        engine.translate_all(sources, beam_size=1, max_new_tokens=max_new, on_token=listener, admitted=True)
    )
    getter: asyncio.Future | None = None
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait((getter, work), return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                while not queue.empty():  # tokens of the last step, queued before the work ended
                    yield _token_event(engine, texts, *queue.get_nowait())
                break
            yield _token_event(engine, texts, *getter.result())
        try:
            results = work.result()
        except ServiceError as exc:
            if on_error is not None:
                on_error(exc)
            yield _event("error", exc.to_dict())
            return
        done = TranslationResponse(**head, translations=[_translation(engine, job) for job, _ in results])
        yield _event("done", done.model_dump(mode="json"))
    finally:
        # A client gone mid-wait closes this generator there: the pending get was left behind,
        # logged as "Task was destroyed but it is pending!" (18 ERROR lines after 50 dropped streams).
        if getter is not None and not getter.done():
            getter.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


def _token_event(engine: task.TranslationEngine, texts: list[list[int]], index: int, token: int) -> bytes:
    if token == engine.assets.eos:
        return _event(
            "token", {"index": index, "token_id": token, "text": engine.detokenize(texts[index]), "end": True}
        )
    texts[index].append(token)
    return _event("token", {"index": index, "token_id": token, "text": engine.detokenize(texts[index]), "end": False})

"""Text generation over HTTP: OpenAI's completions API and the house-style ``/v1/text-generation``.

``POST /v1/completions`` and ``GET /v1/models[/{model}]`` follow OpenAI's API (requests,
responses, server-sent event chunks ending with ``data: [DONE]``, and errors as ``{"error":
{"message", "type", "param", "code"}}``), so OpenAI's client libraries work against this server
unchanged. Extensions beyond OpenAI's fields: ``top_k`` and ``repetition_penalty`` (as vLLM has
them). ``POST /v1/text-generation`` is the same generation in this service's own style.

Every prompt (and each of its ``n`` choices) is one sequence of the model's step-level decode
loop; a request's sequences are admitted (or refused, 429) together before any decodes.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from service import tracing
from service.api.deps import RegistryDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.middleware import stream_failed
from service.api.schemas import ERROR_RESPONSES, json_body_doc, limit, read_json
from service.config import Settings
from service.decoding import DecodeStats
from service.errors import (
    ContextTooLong,
    InvalidInput,
    ModelNotFound,
    SchemaError,
    ServiceError,
    TextTooLong,
    TooManyItems,
)
from service.registry import ModelRegistry, ModelState, ServedModel
from service.responses import ModelResponse
from service.sampling import SamplingParams
from service.tasks import text_generation as task

router = APIRouter()

MAX_LOGPROBS = 5  # OpenAI's limit on top alternatives per token
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries (each costs every step of its rows)
Number = StrictFloat | StrictInt


def number(**bounds: float) -> Any:
    """A JSON number (not a string or a boolean) within ``bounds``, each branch of the union bounded,
    so the schema says JSON Schema's ``minimum``/``maximum``: bounds on the union itself came out as
    ``ge``/``le`` keys that JSON Schema (and every client generator) ignores."""
    return Annotated[StrictFloat, Field(**bounds)] | Annotated[StrictInt, Field(**bounds)]


# -- OpenAI's wire shapes --------------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, ...")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str | None = Field(None, description="This service's error_type.")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def _openai_errors() -> dict[int | str, dict[str, Any]]:
    return {
        status: {**doc, "model": OpenAIError, "content": {"application/json": {}}}
        for status, doc in ERROR_RESPONSES.items()
    }


OPENAI_ERROR_RESPONSES = _openai_errors()


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = Field(False, description="A last chunk with the usage counts (and no choices).")
    include_obfuscation: bool | None = Field(None, description="Accepted for OpenAI's clients; no effect here.")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "text-generator", "prompt": "I think that", "max_tokens": 20, "temperature": 0.7, "seed": 1},
                {"model": "text-generator", "prompt": "Tom is", "max_tokens": 0, "echo": True, "logprobs": 1},
            ]
        },
    )
    model: StrictStr = Field(description="A text-generation model (GET /v1/models lists them).")
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] | None = Field(
        "", description='A text, a list of texts, a list of token ids, or a list of such lists (null: "").'
    )
    suffix: StrictStr | None = Field(None, description="Not supported (insertion); must be absent or null.")
    max_tokens: StrictInt | None = Field(16, ge=0, description="Most tokens to generate per choice (OpenAI: 16).")
    temperature: number(ge=0, le=2) | None = Field(1.0, description="0: always the most probable token.")
    top_p: number(ge=0, le=1) | None = Field(1.0, description="0: only the most probable token.")
    n: StrictInt | None = Field(1, ge=1, description="Choices per prompt.")
    best_of: StrictInt | None = Field(None, ge=1, description="Accepted only when equal to n (no re-ranking).")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Log-probability of each token and of its top alternatives."
    )
    echo: StrictBool | None = Field(False, description="Prompt + completion; with max_tokens 0, scores a prompt.")
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"Up to {MAX_STOP} stop sequences.")
    presence_penalty: number(ge=-2, le=2) | None = Field(0.0)
    frequency_penalty: number(ge=-2, le=2) | None = Field(0.0)
    logit_bias: dict[str, Number] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias in [-100, 100]."
    )
    seed: StrictInt | None = Field(None, description="The same seed and prompt give the same text.")
    user: StrictStr | None = None
    top_k: StrictInt | None = Field(None, ge=0, description="Extension: sample among the k most probable (0: off).")
    repetition_penalty: number(gt=0, le=10) | None = Field(
        None, description="Extension: > 1 discourages tokens already in the prompt or output."
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = Field(
        description="stop: the model ended the text or a stop sequence did; length: max_tokens did."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens generated, the end-of-text token included.")
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "neuroserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- the house style -------------------------------------------------------------------------------


class TextGenerationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompts": ["I think that", "Can you"], "max_new_tokens": 20, "seed": 7}]},
    )
    prompts: list[StrictStr] = Field(
        min_length=1,
        json_schema_extra=limit("max_texts_per_request", items="max_text_chars"),
        description="One generation per prompt; an empty prompt generates from nothing.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Most tokens per generation (ceiling: the model's).")
    temperature: number(ge=0, le=2) = Field(0.8, description="0: always the most probable token (greedy).")
    top_k: int = Field(0, ge=0, description="Sample among the k most probable tokens (0: off).")
    top_p: number(gt=0, le=1) = Field(0.95, description="Sample among the most probable tokens of this mass.")
    repetition_penalty: number(gt=0, le=10) = Field(1.0)
    stop: list[StrictStr] = Field([], max_length=MAX_STOP, description="Stop before any of these texts.")
    seed: int | None = Field(None, description="The same seed and prompt give the same text.")
    model: str | None = Field(None, description="A text-generation model by name; default: the task's default.")


class Generation(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = Field(description="Tokens of the prompt.")
    generated_tokens: int


class TextGenerationResponse(BaseModel):
    model: str
    version: str
    generations: list[Generation]


# -- routes ----------------------------------------------------------------------------------------


@router.get(
    "/v1/models",
    tags=["openai"],
    summary="The text-generation models (OpenAI's model list)",
    response_model=ModelList,
    responses=OPENAI_ERROR_RESPONSES,
)
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[_card(name, registry) for name in _generation_models(registry)])


@router.get(
    "/v1/models/{model}",
    tags=["openai"],
    summary="One text-generation model (OpenAI's model object)",
    response_model=ModelCard,
    responses=OPENAI_ERROR_RESPONSES,
)
async def get_model(model: Annotated[str, Path(max_length=256)], registry: RegistryDep) -> ModelCard:
    if model not in _generation_models(registry):
        raise ModelNotFound(f"the model {model!r} does not exist", param="model")
    return _card(model, registry)


@router.post(
    "/v1/completions",
    tags=["openai"],
    summary="Complete prompts (OpenAI's completions API; stream: server-sent events)",
    response_model=Completion,
    responses={
        **OPENAI_ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
    },
    openapi_extra=json_body_doc(CompletionRequest),
)
async def completions(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    body = await read_json(request, CompletionRequest)
    served = _served(registry, body.model)
    engine: task.TextGenerationEngine = served.engine  # type: ignore[assignment]
    assets: task.GenerationAssets = served.assets
    # Every check that needs no tokens first: a refused request costs no tokenising (64 prompts of
    # 20,000 characters took 0.9 s of the event loop before a 400 for "suffix").
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise SchemaError("best_of: only best_of equal to n is supported (no re-ranking)", param="best_of")
    if body.suffix:
        raise SchemaError("suffix: insertion is not supported by this model", param="suffix")
    raw = _prompt_list("" if body.prompt is None else body.prompt, settings)
    if len(raw) * n > settings.max_texts_per_request:
        raise TooManyItems(
            f"{len(raw)} prompts x n {n} = {len(raw) * n} choices; at most {settings.max_texts_per_request}",
            param="n",
        )
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens > assets.max_new_tokens:
        raise SchemaError(
            f"max_tokens: at most {assets.max_new_tokens} for model {served.name}, got {max_tokens}", param="max_tokens"
        )
    stop = _stop_sequences(body.stop)
    with tracing.stage("preprocess"):
        prompts = await _prompts(raw, engine, assets.max_context_tokens - max_tokens, served.name)
    for i, ids in enumerate(prompts):
        if len(ids) + max_tokens > assets.max_context_tokens:
            raise ContextTooLong(
                f"model {served.name}'s maximum context length is {assets.max_context_tokens} tokens; prompt "
                f"{i} has {len(ids) - 1} (plus a begin-of-text token) and max_tokens is {max_tokens}",
                param="prompt",
            )
    params = SamplingParams(
        temperature=float(1.0 if body.temperature is None else body.temperature),
        top_k=body.top_k or 0,
        top_p=float(1.0 if body.top_p is None else body.top_p),
        repetition_penalty=float(body.repetition_penalty or 1.0),
        frequency_penalty=float(body.frequency_penalty or 0.0),
        presence_penalty=float(body.presence_penalty or 0.0),
        logit_bias=_logit_bias(body.logit_bias, assets.vocab),
        seed=body.seed,
        logprobs=body.logprobs,
    )
    echo = bool(body.echo)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": served.name}
    if body.stream:
        include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
        engine.scheduler.admit(len(prompts) * n)  # refused (429) here, before the stream's 200 begins
        chunks = _stream(
            engine,
            prompts,
            n,
            params,
            max_tokens,
            stop,
            echo,
            head,
            include_usage,
            settings.stream_interval_ms / 1000,
            on_error=lambda exc: stream_failed(request.scope, exc),
        )
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )
    if body.stream_options is not None:
        raise SchemaError("stream_options: only with stream true", param="stream_options")
    jobs = [
        engine.new_job(
            ids, params, choice=j, max_new_tokens=max_tokens, stop=stop, score_prompt=echo and body.logprobs is not None
        )
        for ids in prompts
        for j in range(n)
    ]
    stats = await unless_disconnected(request, engine.generate_all(jobs))
    choices = [_choice(engine, job, i, echo) for i, job in enumerate(jobs)]
    prompt_tokens = sum(len(ids) - 1 for ids in prompts)  # the begin-of-text token is not the prompt's
    completion_tokens = sum(job.sampled for job in jobs)
    usage = Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    return ModelResponse(Completion(**head, choices=choices, usage=usage), headers=_timing(stats))


@router.post(
    "/v1/text-generation",
    tags=["tasks"],
    summary="Continue English prompts with generated text",
    response_model=TextGenerationResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(TextGenerationRequest),
)
async def text_generation(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    body = await read_json(request, TextGenerationRequest)
    _check_prompts(body.prompts, settings)
    served = registry.for_task(task.TASK.name, body.model)
    engine: task.TextGenerationEngine = served.engine  # type: ignore[assignment]
    assets: task.GenerationAssets = served.assets
    if body.max_new_tokens > assets.max_new_tokens:
        raise SchemaError(
            f"max_new_tokens: at most {assets.max_new_tokens} for model {served.name}, got {body.max_new_tokens}"
        )
    prompts = await _prompts(
        body.prompts, engine, assets.max_context_tokens, served.name, field="prompts", budget="max_new_tokens"
    )
    for i, ids in enumerate(prompts):
        room = assets.max_context_tokens - len(ids)
        if room < 1:
            raise ContextTooLong(
                f"prompts[{i}] has {len(ids)} tokens; model {served.name} takes {assets.max_context_tokens} in all"
            )
    if any(not s for s in body.stop):
        raise SchemaError("stop: a stop sequence cannot be empty")
    params = SamplingParams(
        temperature=float(body.temperature),
        top_k=body.top_k,
        top_p=float(body.top_p),
        repetition_penalty=float(body.repetition_penalty),
        seed=body.seed,
    )
    jobs = [
        engine.new_job(
            ids, params, max_new_tokens=min(body.max_new_tokens, assets.max_context_tokens - len(ids)), stop=body.stop
        )
        for ids in prompts
    ]
    stats = await unless_disconnected(request, engine.generate_all(jobs))
    generations = [
        Generation(
            text=engine.text_of(job),
            finish_reason=job.finish_reason or "length",
            prompt_tokens=len(job.prompt) - 1,
            generated_tokens=job.sampled,
        )
        for job in jobs
    ]
    response = TextGenerationResponse(model=served.name, version=str(served.version), generations=generations)
    return ModelResponse(response, headers=_timing(stats))


# -- helpers ---------------------------------------------------------------------------------------


def _generation_models(registry: ModelRegistry) -> list[str]:
    return sorted(name for name, status in registry.models.items() if status.task == task.TASK.name)


def _card(name: str, registry: ModelRegistry) -> ModelCard:
    entry = registry.models[name].entry
    created = int(entry.path.stat().st_mtime) if entry is not None and entry.path.exists() else 0
    return ModelCard(id=name, created=created)


def _served(registry: ModelRegistry, name: str) -> ServedModel:
    status = registry.models.get(name)
    if status is None or status.task != task.TASK.name:
        raise ModelNotFound(
            f"the model {name!r} does not exist; text-generation models: {_generation_models(registry)}", param="model"
        )
    if status.state is not ModelState.READY:
        registry.get(name)  # raises ModelNotReady with the reason
    return registry.for_task(task.TASK.name, name)


def _check_prompts(prompts: list[str], settings: Settings) -> None:
    if len(prompts) > settings.max_texts_per_request:
        raise TooManyItems(f"{len(prompts)} prompts; at most {settings.max_texts_per_request} per request")
    for i, text in enumerate(prompts):
        if len(text) > settings.max_text_chars:
            raise TextTooLong(f"prompts[{i}] has {len(text)} characters; the limit is {settings.max_text_chars}")


def _prompt_list(prompt: Any, settings: Settings) -> list[str] | list[list[int]]:
    """OpenAI's four prompt forms as a list of texts or of token-id lists, their sizes checked."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise SchemaError('prompt: an empty list (send "" to generate from nothing)', param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) > settings.max_texts_per_request:
        raise TooManyItems(f"{len(prompt)} prompts; at most {settings.max_texts_per_request}", param="prompt")
    for i, item in enumerate(prompt):
        if len(item) > settings.max_text_chars:
            what = "characters" if isinstance(item, str) else "tokens"
            raise TextTooLong(
                f"prompt[{i}] has {len(item)} {what}; the limit is {settings.max_text_chars}", param="prompt"
            )
    return prompt


# Characters tokenised between two turns of the event loop (tokenising holds the interpreter lock:
# about 0.7 ms per 1,000 characters here, so a turn waits a few milliseconds at most).
_CHARS_PER_TURN = 4096


async def _prompts(
    prompts: list[str] | list[list[int]],
    engine: task.TextGenerationEngine,
    room: int,
    model: str,
    *,
    field: str = "prompt",
    budget: str = "max_tokens",
):
    """Token-id lists, begin-of-text first. A text longer than ``room`` tokens of the longest piece
    cannot fit in the context and is refused untokenised; the others are tokenised a few thousand
    characters per turn of the event loop, so one request of long prompts does not stall the rest.
    ``field`` and ``budget``: the route's names for the prompts and for the tokens to generate."""
    assets = engine.assets
    if room <= 0:
        raise ContextTooLong(
            f"{budget} leaves no room for a prompt in model {model}'s context of {assets.max_context_tokens} tokens",
            param=budget,
        )
    if prompts and isinstance(prompts[0], str):
        for i, text in enumerate(prompts):
            if len(text) > room * assets.longest_token:
                raise ContextTooLong(
                    f"{field}[{i}] has {len(text)} characters, more than the {room} tokens that model {model}'s "
                    f"context of {assets.max_context_tokens} leaves it (with {budget}) can hold",
                    param=field,
                )
        out, since_turn = [], 0
        for text in prompts:
            if since_turn > _CHARS_PER_TURN:
                await asyncio.sleep(0)
                since_turn = 0
            out.append(engine.encode(text))
            since_turn += len(text)
        return out
    vocab = assets.vocab
    for i, ids in enumerate(prompts):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidInput(f"prompt[{i}]: token id {bad} is not in the vocabulary (0-{vocab - 1})", param="prompt")
    return [[assets.bos, *ids] for ids in prompts]


def _stop_sequences(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise SchemaError(f"stop: at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise SchemaError("stop: a stop sequence cannot be empty", param="stop")
    return stops


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit() or not 0 <= int(key) < vocab:
            message = f"logit_bias: {key!r} is not a token id of the vocabulary (0-{vocab - 1})"
            raise SchemaError(message, param="logit_bias")
        if not -100 <= value <= 100:
            raise SchemaError(f"logit_bias: {value} for token {key} is outside [-100, 100]", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _timing(stats: list[DecodeStats]) -> dict[str, str]:
    return {
        "x-queue-time-ms": f"{max(s.queue_s for s in stats) * 1000:.3f}",
        "x-inference-time-ms": f"{max(s.decode_s for s in stats) * 1000:.3f}",
        "x-batch-size": str(max(s.max_rows for s in stats)),
        "x-decode-steps": str(max(s.steps for s in stats)),
    }


def _logprobs(
    engine: task.TextGenerationEngine,
    records: list[task.TokenLogprob],
    pieces: list[str],
    offset: int,
    text_end: int | None = None,
    prompt_records: int = 0,
) -> CompletionLogprobs:
    """OpenAI's log-probability block for ``records`` (``pieces``: their texts, as
    :meth:`~service.tasks.text_generation.TextGenerationEngine.pieces` gives them; the end-of-text
    token has none), the first starting at ``offset``; none past ``text_end`` (a stop sequence)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for i, record in enumerate(records):
        # The generated end-of-text token has no piece (OpenAI shows none); one inside a prompt of
        # token ids does, and the records after it go on.
        if i >= len(pieces):
            break  # the end of the text
        piece = pieces[i]
        # Past a stop sequence (or text not yet released). A prompt's records all belong: one with
        # no text at the prompt's end (an end-of-text id in a prompt of ids) lost its score before.
        if i >= prompt_records and text_end is not None and offset >= text_end:
            break
        tokens.append(piece)
        logprobs.append(record.logprob)
        top: dict[str, float] = {}
        # The chosen token under the same string as in ``tokens`` (a client looks it up there): its
        # piece of the text, "" for a piece of a character or a control token in a prompt of ids,
        # whose own text ("\ufffd", "<eos>") its alternatives still show.
        for t, lp in record.top:  # best first: two tokens of one text (pieces of characters) keep the best
            top.setdefault(piece if t == record.token else engine.token_text(t), lp)
        # As OpenAI: the chosen token is always there, so there may be logprobs + 1 entries.
        top.setdefault(piece, record.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(piece)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def _choice(engine: task.TextGenerationEngine, job: task.GenerationJob, index: int, echo: bool) -> CompletionChoice:
    text = engine.text_of(job)
    prompt_text = engine.detokenize(job.prompt[1:]) if echo else ""
    logprobs = None
    if job.sampler.params.logprobs is not None:
        records = (job.prompt_logprobs if echo else []) + job.logprobs
        pieces = (engine.pieces(job.prompt[1:]) if echo else []) + engine.pieces(job.generated)
        prompt_records = len(job.prompt_logprobs) if echo else 0
        logprobs = _logprobs(engine, records, pieces, 0, len(prompt_text) + len(text), prompt_records)
    return CompletionChoice(text=prompt_text + text, index=index, logprobs=logprobs, finish_reason=job.finish_reason)


async def _stream(
    engine: task.TextGenerationEngine,
    prompts: list[list[int]],
    n: int,
    params: SamplingParams,
    max_tokens: int,
    stop: list[str],
    echo: bool,
    head: dict,
    include_usage: bool,
    interval_s: float = 0.0,
    on_error: Callable[[ServiceError], None] | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI's stream: a chunk per new piece of text of a choice (held back while it may be the
    start of a stop sequence or an unfinished character), a last chunk per choice with its
    ``finish_reason``, the usage chunk if asked, then ``[DONE]``; the same text and log-probabilities
    as without streaming. With ``echo`` a choice's first chunk carries its prompt (after the prompt's
    prefill, which scores it). A client that leaves cancels the decoding: its rows leave the batch
    at the next step. ``interval_s``: after a chunk, the stream waits this long before it looks
    again (the first chunk goes at once), so that it sends what came meanwhile as one chunk."""
    loop = asyncio.get_running_loop()
    # The decode thread marks choices that moved on and wakes this stream once until it has looked:
    # under load several tokens go out in one chunk, rather than a hand-over to the event loop per
    # token per row (64 per step), which left a step-level batch a third full at 64 streams.
    changed: set[int] = set()
    lock = threading.Lock()
    wake = asyncio.Event()
    waking = [False]

    def notify(index: int) -> Callable[[task.GenerationJob], None]:
        def on_token(_: task.GenerationJob) -> None:  # in the decode thread
            with lock:
                changed.add(index)
                if waking[0]:
                    return
                waking[0] = True
            loop.call_soon_threadsafe(wake.set)

        return on_token

    def moved() -> list[tuple[int, int, int, bool]]:
        """How far each changed choice is (its lists only grow; ``done`` is read first, and a job
        sets it last)."""
        with lock:
            indexes = sorted(changed)
            changed.clear()
            waking[0] = False
        out = []
        for index in indexes:
            job = jobs[index]
            done = job.done
            generated = len(job.generated)
            scored = len(job.logprobs) if done else min(len(job.logprobs), generated)
            out.append((index, generated, scored, done))
        return out

    jobs = [
        engine.new_job(
            ids,
            params,
            choice=j,
            max_new_tokens=max_tokens,
            stop=stop,
            score_prompt=echo and params.logprobs is not None,
            on_token=notify(p * n + j),
        )
        for p, ids in enumerate(prompts)
        for j in range(n)
    ]
    hold = max((len(s) for s in stop), default=1) - 1
    prompt_texts = [engine.detokenize(job.prompt[1:]) if echo else "" for job in jobs]
    sent = [0] * len(jobs)  # characters of each choice's completion already sent
    sent_logprobs = [0] * len(jobs)  # log-probability records of its completion already sent
    offsets = [0] * len(jobs)  # where its next log-probability record's text begins
    opened = [False] * len(jobs)  # its first chunk (with the echoed prompt) has gone
    finished = [False] * len(jobs)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        data = {**head, "object": "text_completion", "choices": choices, **usage_field}
        if usage is not None:
            data["usage"] = usage
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def emit(index: int, generated: int, scored: int, done: bool) -> bytes | None:
        job = jobs[index]
        if finished[index]:
            return None
        if done:
            text = engine.text_of(job)
        else:
            text = engine.detokenize(job.generated[:generated])
            safe = len(text) - hold
            while safe > 0 and text[safe - 1] == "\ufffd":  # an unfinished character: wait for its bytes
                safe -= 1
            text = text[: max(safe, sent[index])]
        delta = text[sent[index] :]
        prefix = "" if opened[index] else prompt_texts[index]
        logprobs = None
        if params.logprobs is not None and (scored > sent_logprobs[index] or not opened[index] or done):
            records = job.logprobs[sent_logprobs[index] : scored]
            pieces = engine.pieces(job.generated[:scored], start=sent_logprobs[index], final=done)
            if not opened[index] and echo:
                records = job.prompt_logprobs + records
                pieces = engine.pieces(job.prompt[1:]) + pieces
            echoed = len(records) - (scored - sent_logprobs[index])  # the prompt's records, first chunk only
            # Before the end, only records whose text has gone out: a token whose text is held back (an
            # unfinished character, or what may begin a stop sequence) waits, since the stop may cut it.
            released = sent[index] + len(delta) if not done else len(engine.text_of(job))
            block = _logprobs(engine, records, pieces, offsets[index], len(prompt_texts[index]) + released, echoed)
            offsets[index] += sum(len(t) for t in block.tokens)
            logprobs = block.model_dump()
            sent_logprobs[index] = scored if done else sent_logprobs[index] + max(0, len(block.tokens) - echoed)
        sent[index] += len(delta)
        finished[index] = done
        if not (prefix or delta or logprobs is not None or done):
            return None
        opened[index] = True
        reason = job.finish_reason if done else None
        return chunk([{"index": index, "text": prefix + delta, "logprobs": logprobs, "finish_reason": reason}])

    work = asyncio.ensure_future(engine.generate_all(jobs, admitted=True))
    # One event wakes the stream for new tokens and for the end of the work: a task and an
    # asyncio.wait per wake cost the event loop more than the chunk it sent.
    work.add_done_callback(lambda _: wake.set())
    try:
        while not work.done():
            await wake.wait()
            wake.clear()
            sent_any = False
            for event in moved():
                if (data := emit(*event)) is not None:
                    sent_any = True
                    yield data
            if sent_any and interval_s > 0 and not work.done():
                await asyncio.sleep(interval_s)
        try:
            work.result()
        except ServiceError as exc:
            if on_error is not None:
                on_error(exc)
            yield b"data: " + orjson.dumps(exc.to_openai_dict()) + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
        for event in moved():  # the last step's, marked before the work ended
            if (data := emit(*event)) is not None:
                yield data
        for index, job in enumerate(jobs):  # choices that ended with no event (max_tokens 0)
            if not finished[index]:
                data = emit(index, len(job.generated), len(job.logprobs), True)
                if data is not None:
                    yield data
        if include_usage:
            prompt_tokens = sum(len(job.prompt) - 1 for job in jobs[::n])
            completion_tokens = sum(job.sampled for job in jobs)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            yield chunk([], usage)
        yield b"data: [DONE]\n\n"
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)

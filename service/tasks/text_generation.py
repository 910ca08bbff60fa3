"""Text generation: a prompt in, a continuation out, token by token with step-level batching.

The model is a recurrent language model in two graphs: the version's ``model.onnx``, one decode
step (``token [rows], h, c [rows, layers, hidden] -> log_probs [rows, vocab], h_next, c_next``,
also what v2 serves), and ``prefill.onnx`` over whole prompts of any lengths in one call (``ids
[rows, T]`` right-padded, ``lengths [rows]``, ``positions [rows, P]`` -> ``log_probs [rows, P,
vocab]`` at the positions asked for, ``h, c`` after each row's last token; see
``training/prefill_graph.py``). A prompt (or one of its ``n`` choices) is a :class:`GenerationJob`: its
:class:`~service.sampling.Sampler` and its recurrent state, fixed in size, so a row joins and
leaves the step batch at any step with nothing to grow (see :mod:`service.decoding` for how the
same scheduler carries a translation's key/value cache instead).

The prefill samples each prompt's first new token (the last position predicts it), so a request's
first token is out after its prefill, in the same iteration as the step that follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from tokenizers import Tokenizer

from service.admission import Places
from service.config import Settings
from service.decoding import Decoder, DecodeStats, StepScheduler, gather_all
from service.errors import ModelLoadError
from service.metrics import ModelObserver
from service.prefill_rows import every_position, last_positions, pad_rows
from service.repository import ModelSpec
from service.runtime import OnnxModel, RuntimeOptions
from service.sampling import Sampler, SamplingParams, sample_rows, top_alternatives
from service.tasks.assets import find_asset, load_tokenizer
from service.tasks.base import Parameters, Task, require
from service.tracing import decode_span

STEP_TENSORS = (["token", "h", "c"], ["log_probs", "h_next", "c_next"])
PREFILL_TENSORS = (["ids", "lengths", "positions"], ["log_probs", "h", "c"])

# Tokens per prefill call (rows x the longest prompt of the call). Generation projects one position
# a row; scoring projects every position, rows x T x vocab floats: 64 MB at 2,048 tokens of an
# 8,000-token vocabulary, held only for the call.
PREFILL_TOKENS_PER_CALL = 2048


class SpecialTokens(Parameters):
    pad: int
    bos: int
    eos: int
    unk: int


class GenerationDecoding(Parameters):
    """How the model decodes; a ``NEUROSERVE_DECODE_<FIELD>`` setting overrides a field server-wide."""

    batching: Literal["step", "request", "static"] = Field(
        "step",
        description="step: sequences join and leave the batch at every step; request: a batch decodes to its "
        "last sequence before others join, its finished rows leaving it; static: the same, but every row the "
        "batch started with is computed until its last ends, finished ones as padding (request-level batching "
        "as a static-shape batch does it, e.g. FasterTransformer's). request and static are for comparison.",
    )
    max_rows: int = Field(64, ge=1, description="Sequences per decode step")
    max_tokens: int = Field(
        65_536, ge=16, description="Tokens (prompt + generated) the batch may hold; the state itself is fixed-size"
    )
    timeout_ms: float = Field(120_000, gt=0, description="Deadline for a whole generation: 504 beyond")
    fair: bool = Field(True, description="Requests share max_rows (else pure arrival order)")
    admit_every: int = Field(
        4,
        ge=1,
        description="Step-level batching: while a batch decodes, newcomers join at most every this many steps "
        "(their prefills in one call; at once when nothing decodes). Fewer prefill calls for up to "
        "admit_every - 1 steps more before a first token.",
    )

    def with_overrides(self, settings: Settings) -> GenerationDecoding:
        overrides = {key: getattr(settings, f"decode_{key}") for key in type(self).model_fields}
        return self.model_copy(update={k: v for k, v in overrides.items() if v is not None})


class TextGenerationParameters(Parameters):
    tokenizer: str = "tokenizer.json"
    prefill: str = Field(
        "prefill.onnx",
        description="ids [rows, T] (right-padded), lengths [rows], positions [rows, P] -> log_probs [rows, P, vocab] "
        "at those positions, h, c after each row's last token",
    )
    special_tokens: SpecialTokens
    max_context_tokens: int = Field(256, ge=2, description="Prompt (with its begin-of-text token) + generated")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens one completion may generate")
    decoding: GenerationDecoding = Field(default_factory=GenerationDecoding)


@dataclass(frozen=True)
class GenerationAssets:
    tokenizer: Tokenizer
    prefill: OnnxModel
    pad: int
    bos: int
    eos: int
    unk: int
    vocab: int
    max_context_tokens: int
    max_new_tokens: int
    decoding: GenerationDecoding
    # The most characters one token can stand for (its piece's length: a byte-level piece has a
    # symbol per byte, never fewer than the characters): a prompt longer than this times the tokens
    # it may have cannot fit, and is refused without being tokenised.
    longest_token: int = 1


def _names(infos: Sequence[Any]) -> list[str]:
    return [t.name for t in infos]


class TextGeneration(Task[TextGenerationParameters]):
    name = "text-generation"
    parameters_model = TextGenerationParameters
    routes = "service.api.routes.text_generation"

    def check(self, spec: ModelSpec, parameters: TextGenerationParameters) -> None:
        inputs, outputs = STEP_TENSORS
        require(
            sorted(_names(spec.inputs)) == sorted(inputs) and sorted(_names(spec.outputs)) == sorted(outputs),
            f"the decode step must take {inputs} and return {outputs}",
        )
        vocab = next(t for t in spec.outputs if t.name == "log_probs").shape[-1]
        special = parameters.special_tokens
        require(
            vocab == -1 or all(0 <= t < vocab for t in (special.pad, special.bos, special.eos, special.unk)),
            f"special tokens must be ids of the vocabulary ({vocab})",
        )

    def load_assets(
        self,
        spec: ModelSpec,
        parameters: TextGenerationParameters,
        version_dir: Path,
        options: RuntimeOptions,
        settings: Settings,
    ) -> GenerationAssets:
        tokenizer = load_tokenizer(parameters.tokenizer, version_dir)
        prefill = OnnxModel(find_asset(parameters.prefill, version_dir), options)
        inputs, outputs = PREFILL_TENSORS
        if _names(prefill.inputs) != inputs or sorted(_names(prefill.outputs)) != sorted(outputs):
            raise ModelLoadError(
                prefill.path,
                f"the graph takes {_names(prefill.inputs)} and returns {_names(prefill.outputs)}; "
                f"this task needs {inputs} -> {outputs} (python -m training.prefill_graph rewrites an older one)",
            )
        vocab = tokenizer.get_vocab_size()
        declared = next(t for t in spec.outputs if t.name == "log_probs").shape[-1]
        if declared not in (-1, vocab):
            raise ModelLoadError(
                version_dir / parameters.tokenizer, f"{vocab} tokens for log_probs of width {declared}"
            )
        return GenerationAssets(
            tokenizer,
            prefill,
            **parameters.special_tokens.model_dump(),
            vocab=vocab,
            max_context_tokens=parameters.max_context_tokens,
            max_new_tokens=parameters.max_new_tokens,
            decoding=parameters.decoding.with_overrides(settings),
            longest_token=max(len(piece) for piece in tokenizer.get_vocab()),
        )

    def make_engine(self, served: Any, settings: Settings) -> TextGenerationEngine:
        return TextGenerationEngine(served.runtime, served.assets, settings, name=served.name, observer=served.observer)


TASK = TextGeneration()


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most probable alternatives at that position, best first


class GenerationJob:
    """One completion being generated: its prompt, sampler, recurrent state and output so far.

    The decode thread appends to ``generated`` and sets ``done``; the event loop reads them only
    through ``on_token`` notifications and after the job ends."""

    rows = 1

    def __init__(
        self,
        prompt: list[int],
        sampler: Sampler,
        *,
        max_new_tokens: int,
        eos: int,
        stop: Sequence[str] = (),
        detokenize: Callable[[list[int]], str] | None = None,
        score_prompt: bool = False,
        on_token: Callable[[GenerationJob], None] | None = None,
        never: Sequence[int] = (),
    ) -> None:
        self.prompt = prompt  # begin-of-text first
        self.never = never  # tokens never generated: no alternative in the log-probabilities
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.stop = list(stop)
        self.detokenize = detokenize
        self.score_prompt = score_prompt
        self.on_token = on_token
        self.generated: list[int] = []
        self.sampled = 0  # tokens drawn, the end-of-text token included
        self.logprobs: list[TokenLogprob] = []  # one per generated token, when asked for
        self.prompt_logprobs: list[TokenLogprob] = []  # one per prompt token after begin-of-text
        self.finish_reason: Literal["stop", "length"] | None = None
        self.stopped_at: int | None = None  # where a stop sequence begins in the text
        self.h: np.ndarray | None = None  # the state after the prompt, until the job joins the step batch
        self.c: np.ndarray | None = None
        self.slot: int | None = None  # its row in the decoder's batch state, once it has joined
        self.done = max_new_tokens == 0 and not score_prompt  # nothing to compute at all
        if self.done:
            self.finish_reason = "length"

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def last(self) -> int:
        return self.generated[-1] if self.generated else self.prompt[-1]

    def accept(self, token: int, log_probs: np.ndarray) -> None:
        """The token drawn from ``log_probs`` (the model's distribution at this position)."""
        self.sampled += 1
        alternatives = self.sampler.params.logprobs
        if alternatives is not None:
            top = top_alternatives(log_probs, alternatives, self.never)
            self.logprobs.append(TokenLogprob(token, float(log_probs[token]), top))
        if token == self.eos:
            self.finish_reason = "stop"
            self.done = True
        else:
            self.generated.append(token)
            self.sampler.seen(token)
            if self.stop and self.detokenize is not None:
                text = self.detokenize(self.generated)
                hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
                if hits:
                    self.stopped_at = min(hits)
                    self.finish_reason = "stop"
                    self.done = True
            if not self.done and len(self.generated) >= self.max_new_tokens:
                self.finish_reason = "length"
                self.done = True
        if self.on_token is not None:
            self.on_token(self)


class RecurrentDecoder:
    """Prefill and step for recurrent state: the two graphs and the sampler, no cache to manage."""

    def __init__(
        self, step: OnnxModel, prefill: OnnxModel, *, never: list[int], pad: int, static: bool = False
    ) -> None:
        self.step_graph, self.prefill_graph = step, prefill
        self.pad = pad
        self.never = never  # ids never generated (padding, begin-of-text, unknown)
        # Static batches (for comparison only): every step computes as many rows as the batch began
        # with, finished ones as padding. The scheduler admits only into an empty batch then, so each
        # prefill call begins a batch.
        self.static = static
        self._static_rows = 0
        self._rows: list[GenerationJob] = []  # the last step's rows, in order
        self._h: np.ndarray | None = None  # their state after it, row i for _rows[i]
        self._c: np.ndarray | None = None

    def prefill(self, jobs: list[GenerationJob]) -> None:
        """The prompts through the prefill graph, then each one's first new token drawn. Prompts of
        any length share a call (shortest first, so a call pads little), in calls of at most
        PREFILL_TOKENS_PER_CALL padded tokens; prompts to score (every position projected) go
        apart from those that only generate (the last position)."""
        self._static_rows = len(jobs)
        for scoring in (False, True):
            group = sorted((job for job in jobs if job.score_prompt == scoring), key=lambda job: len(job.prompt))
            start = 0
            while start < len(group):
                end = start + 1
                while end < len(group) and (end - start + 1) * len(group[end].prompt) <= PREFILL_TOKENS_PER_CALL:
                    end += 1
                self._prefill(group[start:end], scoring)
                start = end

    def _prefill(self, jobs: list[GenerationJob], scoring: bool) -> None:
        ids, lengths = pad_rows([job.prompt for job in jobs], self.pad)
        # scoring: every position (a shorter row repeats its last); generating: the last
        positions = every_position(lengths, ids.shape[1]) if scoring else last_positions(lengths)
        out = self.prefill_graph.run({"ids": ids, "lengths": lengths, "positions": positions})
        log_probs, h, c = out["log_probs"], out["h"], out["c"]
        for i, job in enumerate(jobs):
            job.h, job.c = h[i], c[i]
            if job.score_prompt:
                k = job.sampler.params.logprobs or 0
                job.prompt_logprobs = [
                    TokenLogprob(t, float(log_probs[i, p, t]), top_alternatives(log_probs[i, p], k, self.never))
                    for p, t in enumerate(job.prompt[1:])
                ]
        waiting = [(i, job) for i, job in enumerate(jobs) if job.max_new_tokens > 0]
        for job in jobs:
            if job.max_new_tokens == 0:
                job.finish_reason, job.done = "length", True
        if waiting:
            last = log_probs[[i for i, _ in waiting], lengths[[i for i, _ in waiting]] - 1 if scoring else 0]
            self._choose([job for _, job in waiting], last)

    def step(self, jobs: list[GenerationJob]) -> None:
        live = [job for job in jobs if not job.done]  # a prefill may have ended some already
        if not live:
            self._rows, self._h, self._c = [], None, None
            return
        h, c = self._states(live)
        feeds = {"token": np.fromiter((job.last for job in live), dtype=np.int64, count=len(live)), "h": h, "c": c}
        if self.static and self._static_rows > len(live):  # finished rows, computed as padding
            extra = self._static_rows - len(live)
            feeds = {name: np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)]) for name, a in feeds.items()}
        out = self.step_graph.run(feeds)
        # The batch's state stays in the step's own output arrays, row i for live[i]: a step whose
        # rows are those of the last one feeds them back as they are (stacking every row's state
        # from its job at every step showed in py-spy profiles of the decode thread).
        self._rows, self._h, self._c = live, out["h_next"][: len(live)], out["c_next"][: len(live)]
        for i, job in enumerate(live):
            job.slot = i
        self._choose(live, out["log_probs"][: len(live)])
        if all(job.done for job in live):  # the batch emptied: hold no finished job until the next
            self._rows, self._h, self._c = [], None, None

    def _states(self, live: list[GenerationJob]) -> tuple[np.ndarray, np.ndarray]:
        """``h, c`` for ``live``: the last step's rows (gathered when rows left or joined) and the
        prefilled state of each row that joins."""
        rows = self._rows
        if self._h is not None and len(live) == len(rows) and all(a is b for a, b in zip(live, rows, strict=True)):
            return self._h, self._c
        kept: list[int] = []  # rows of the last step, by their index in live
        joined: list[int] = []  # rows new to the batch
        for i, job in enumerate(live):
            (kept if job.slot is not None and job.slot < len(rows) and rows[job.slot] is job else joined).append(i)
        shape = self._h.shape[1:] if self._h is not None else live[joined[0]].h.shape
        h = np.empty((len(live), *shape), np.float32)
        c = np.empty_like(h)
        if kept:
            slots = [live[i].slot for i in kept]
            h[kept], c[kept] = self._h[slots], self._c[slots]
        if joined:
            h[joined] = np.stack([live[i].h for i in joined])
            c[joined] = np.stack([live[i].c for i in joined])
            for i in joined:  # the state lives in the batch's arrays from now on
                live[i].h = live[i].c = None
        return h, c

    def _choose(self, jobs: list[GenerationJob], log_probs: np.ndarray) -> None:
        tokens = sample_rows(log_probs, [job.sampler for job in jobs], banned=self.never)
        for job, token, row in zip(jobs, tokens, log_probs, strict=True):
            job.accept(int(token), row)

    def close(self) -> None:
        pass


class TextGenerationEngine:
    """One generation model's scheduler, fed by the recurrent decoder's two blocking calls."""

    def __init__(
        self,
        step: OnnxModel,
        assets: GenerationAssets,
        settings: Settings,
        *,
        name: str,
        observer: ModelObserver | None = None,
    ) -> None:
        config = assets.decoding
        self.assets, self.config, self.observer, self.name = assets, config, observer, name
        self.timeout_s = config.timeout_ms / 1000.0
        self.never = [assets.pad, assets.bos, assets.unk]
        static = config.batching == "static"
        self.decoder: Decoder[GenerationJob] = RecurrentDecoder(
            step, assets.prefill, never=self.never, pad=assets.pad, static=static
        )
        self.scheduler: StepScheduler[GenerationJob] = StepScheduler(
            self.decoder.prefill,
            self.decoder.step,
            max_rows=config.max_rows,
            max_tokens=config.max_tokens,
            max_queue_size=settings.max_queue_size,
            mode="request" if config.batching == "static" else config.batching,
            name=name,
            observer=observer,
            retry_after_s=settings.retry_after_s,
            fair=config.fair,
            admit_every=config.admit_every,
        )

    def start(self) -> None:
        self.scheduler.start()

    @property
    def saturated(self) -> bool:
        return self.scheduler.saturated

    @property
    def places(self) -> Places:
        return self.scheduler.places

    async def close(self, *, drain: bool = True) -> None:
        await self.scheduler.close(drain=drain)
        self.decoder.close()

    def encode(self, text: str) -> list[int]:
        """A prompt's token ids, begin-of-text first."""
        return [self.assets.bos, *self.assets.tokenizer.encode(text, add_special_tokens=False).ids]

    def detokenize(self, ids: list[int]) -> str:
        return self.assets.tokenizer.decode(ids, skip_special_tokens=True)

    def pieces(self, ids: list[int], *, start: int = 0, final: bool = True) -> list[str]:
        """Each token's share of ``detokenize(ids)`` (from ``ids[start]`` on), so that they join into
        exactly that text: a token that ends inside a character (byte-level pieces) gets "" and the
        token that completes the character gets all of it. ``final``: the text ends here (else a
        trailing unfinished character is left for the tokens to come)."""
        out: list[str] = []
        before = self.detokenize(ids[:start]).rstrip("\ufffd") if start else ""
        for k in range(start + 1, len(ids) + 1):
            text = self.detokenize(ids[:k])
            if k < len(ids) or not final:
                text = text.rstrip("\ufffd")
            out.append(text[len(before) :] if len(text) > len(before) else "")
            before = text if len(text) > len(before) else before
        return out

    def token_text(self, token: int) -> str:
        """One token's own text (a piece of a character shows as U+FFFD)."""
        return self.assets.tokenizer.decode([token], skip_special_tokens=False)

    def new_job(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        choice: int = 0,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        score_prompt: bool = False,
        on_token: Callable[[GenerationJob], None] | None = None,
    ) -> GenerationJob:
        return GenerationJob(
            prompt,
            Sampler(params, choice=choice, prompt=prompt[1:]),
            max_new_tokens=max_new_tokens,
            eos=self.assets.eos,
            stop=stop,
            detokenize=self.detokenize,
            score_prompt=score_prompt,
            on_token=on_token,
            never=self.never,
        )

    async def generate_all(self, jobs: Sequence[GenerationJob], *, admitted: bool = False) -> list[DecodeStats]:
        """A request's jobs, admitted (or refused, 429) as one before any decodes, then decoded as
        one group that shares the batch's rows fairly with other requests; if one fails, all do.
        ``admitted``: the caller admitted them already (a stream, before its 200)."""
        if not admitted:
            self.scheduler.admit(len(jobs))
        group = object()
        return await gather_all([self._generate(job, group) for job in jobs])

    async def _generate(self, job: GenerationJob, group: object) -> DecodeStats:
        if job.done:  # max_tokens 0 without scoring: nothing to run
            return DecodeStats(0.0, 0.0, 0, 0)
        submit = self.scheduler.submit(job, timeout_s=self.timeout_s, group=group, admitted=True)
        if self.observer is None:
            stats = await submit
        else:
            try:
                with self.observer.track():
                    stats = await submit
            finally:  # a sequence cancelled or failed mid-way generated its tokens too
                self.observer.on_tokens(job.sampled)
        decode_span(self.scheduler.name, stats, tokens=job.sampled)
        return stats

    def text_of(self, job: GenerationJob) -> str:
        """The completion's text: up to a stop sequence when one ended it."""
        text = self.detokenize(job.generated)
        return text[: job.stopped_at] if job.stopped_at is not None else text

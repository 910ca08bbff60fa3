"""Translation: texts in, translated texts out, decoded with step-level batching.

The model is two graphs (or four): ``encoder.onnx`` and the decoder step (the version's
``model.onnx``, the one the repository serves on v2), and optionally the key/value-cache pair
``encoder_kv.onnx`` + ``decoder_cached.onnx``. A text becomes a :class:`TranslationJob`: its
:class:`~service.search.Search` (greedy or beam) and the per-sequence state of the decoder that
runs it. There is one decoder per graph kind, each owning its own state:

* :class:`FullPrefixDecoder` keeps each job's encoder output and re-runs the decoder over every
  token so far at each step;
* :class:`CachedDecoder` keeps each job's cross-attention keys/values and its self-attention cache,
  and runs a step from each row's last token; a step's rows run in groups of similar length, and
  the groups (and a prefill's chunks) on ``threads`` threads at once, one intra-op thread each: on
  a CPU the small matrices of one step gain little from splitting each operator across cores,
  while whole groups in parallel use every core.

A :class:`TranslationEngine` per model gives a :class:`~service.decoding.StepScheduler` the chosen
decoder's two blocking calls. How it decodes is the model's: ``parameters.decoding`` in its
``model.json`` (:class:`DecodingParameters`), each field overridable by a ``NEUROSERVE_DECODE_*``
setting for operators.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from tokenizers import Tokenizer

from service.admission import Places
from service.config import Settings
from service.decoding import DecodeStats, StepScheduler, gather_all
from service.errors import ModelLoadError
from service.metrics import ModelObserver
from service.repository import ModelSpec, load_spec
from service.runtime import OnnxModel, RuntimeOptions, TensorInfo
from service.search import Search, new_search
from service.tasks.assets import encode_each, find_asset, load_tokenizer
from service.tasks.base import Parameters, Task, require
from service.tracing import decode_span

# Rows per decoder call in a cached step: big enough to use the matrix units well on a CPU, small
# enough that a group's padding to its longest cache stays close to its members' own lengths.
STEP_GROUP_ROWS = 16

# Tensor names of each graph, checked when the model loads (inputs, outputs).
ENCODER_TENSORS = (["src_ids"], ["memory"])
DECODER_TENSORS = (["tgt_ids", "memory", "src_ids"], ["log_probs"])
ENCODER_KV_TENSORS = (["src_ids"], ["mem_k", "mem_v"])
DECODER_CACHED_TENSORS = (
    ["token", "position", "past_k", "past_v", "past_mask", "mem_k", "mem_v", "src_ids"],
    ["log_probs", "new_k", "new_v"],
)


class SpecialTokens(Parameters):
    pad: int
    bos: int
    eos: int
    unk: int


class DecodingParameters(Parameters):
    """How the model decodes; a ``NEUROSERVE_DECODE_<FIELD>`` setting overrides a field server-wide."""

    batching: Literal["step", "request"] = Field(
        "step",
        description="step: sequences join and leave the decode batch at every step; request: a batch decodes "
        "to its last sequence before others join (request-level batching, for comparison)",
    )
    max_rows: int = Field(64, ge=1, description="Decoder rows per step (a beam of 4 is 4 rows)")
    max_tokens: int = Field(4096, ge=16, description="Tokens (source + generated, per row) a batch may hold")
    timeout_ms: float = Field(30_000, gt=0, description="Deadline for a whole translation: 504 beyond")
    kv_cache: bool = Field(True, description="Use the key/value-cache graphs when the model has them")
    threads: int = Field(0, ge=0, description="Threads running a step's row groups; 0: one per CPU core")
    boost_after: int = Field(0, ge=0, description="Sequences this many steps old take extra steps (0: off)")
    boost_steps: int = Field(3, ge=0, description="Extra steps per iteration for those old sequences")
    boost_rows: int = Field(16, ge=1, description="Most rows that take extra steps in one iteration")
    fair: bool = Field(True, description="Requests share max_rows (else pure arrival order)")

    def with_overrides(self, settings: Settings) -> DecodingParameters:
        overrides = {key: getattr(settings, f"decode_{key}") for key in type(self).model_fields}
        return self.model_copy(update={k: v for k, v in overrides.items() if v is not None})

    def max_beam(self, max_source_tokens: int) -> int:
        """The widest beam any request can be admitted with: its rows, of the longest source, fit."""
        return max(1, min(self.max_rows, self.max_tokens // (max_source_tokens + 1)))

    @property
    def parallelism(self) -> int:
        return self.threads or Settings.cpu_cores()


class TranslationParameters(Parameters):
    source_language: str = "?"
    target_language: str = "?"
    tokenizer: str = "tokenizer.json"
    encoder: str = Field("encoder.onnx", description="src_ids -> memory")
    encoder_kv: str | None = Field(None, description="src_ids -> mem_k, mem_v (cross-attention keys/values)")
    decoder_cached: str | None = Field(None, description="One step from the last token with a key/value cache")
    max_source_tokens: int = Field(64, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    special_tokens: SpecialTokens
    decoding: DecodingParameters = Field(default_factory=DecodingParameters)


@dataclass(frozen=True)
class TranslationAssets:
    tokenizer: Tokenizer
    encoder: OnnxModel
    pad: int
    bos: int
    eos: int
    unk: int
    max_source_tokens: int
    max_new_tokens: int
    source_language: str
    target_language: str
    decoding: DecodingParameters
    encoder_kv: OnnxModel | None = None  # the key/value-cache pair, when the model has one
    decoder_cached: OnnxModel | None = None

    @property
    def has_kv_cache(self) -> bool:
        return self.encoder_kv is not None and self.decoder_cached is not None


def _names(infos: list[TensorInfo]) -> list[str]:
    return [t.name for t in infos]


def _open_graph(
    filename: str, version_dir: Path, options: RuntimeOptions, tensors: tuple[list[str], list[str]]
) -> OnnxModel:
    graph = OnnxModel(find_asset(filename, version_dir), options)
    inputs, outputs = tensors
    if sorted(_names(graph.inputs)) != sorted(inputs) or sorted(_names(graph.outputs)) != sorted(outputs):
        raise ModelLoadError(
            graph.path,
            f"the graph takes {_names(graph.inputs)} and returns {_names(graph.outputs)}; "
            f"this task needs {inputs} -> {outputs}",
        )
    return graph


class Translation(Task[TranslationParameters]):
    name = "translation"
    parameters_model = TranslationParameters
    routes = "service.api.routes.translation"

    def check(self, spec: ModelSpec, parameters: TranslationParameters) -> None:
        inputs, outputs = DECODER_TENSORS
        require(
            sorted(_names([t.info() for t in spec.inputs])) == sorted(inputs)
            and _names([t.info() for t in spec.outputs]) == outputs,
            f"the decoder step must take {inputs} and return {outputs}",
        )
        require(
            (parameters.encoder_kv is None) == (parameters.decoder_cached is None),
            "name both encoder_kv and decoder_cached, or neither",
        )

    def session_options(
        self, parameters: TranslationParameters, options: RuntimeOptions, settings: Settings
    ) -> RuntimeOptions:
        if parameters.decoding.with_overrides(settings).parallelism > 1:
            # Its decode steps run row groups on parallel threads: one intra-op thread per call.
            return replace(options, intra_op_threads=1)
        return options

    def load_assets(
        self,
        spec: ModelSpec,
        parameters: TranslationParameters,
        version_dir: Path,
        options: RuntimeOptions,
        settings: Settings,
    ) -> TranslationAssets:
        decoding = parameters.decoding.with_overrides(settings)
        longest = parameters.max_source_tokens + 1  # a greedy row of the longest source, at admission
        if decoding.max_tokens < longest:
            raise ModelLoadError(
                version_dir.parent / "model.json",
                f"decoding.max_tokens {decoding.max_tokens} (or NEUROSERVE_DECODE_MAX_TOKENS) cannot hold one sequence "
                f"of the longest source ({longest} tokens)",
            )
        cached = {}
        if parameters.encoder_kv and parameters.decoder_cached:
            cached = {
                "encoder_kv": _open_graph(parameters.encoder_kv, version_dir, options, ENCODER_KV_TENSORS),
                "decoder_cached": _open_graph(parameters.decoder_cached, version_dir, options, DECODER_CACHED_TENSORS),
            }
        return TranslationAssets(
            load_tokenizer(parameters.tokenizer, version_dir),
            _open_graph(parameters.encoder, version_dir, options, ENCODER_TENSORS),
            **parameters.special_tokens.model_dump(),
            max_source_tokens=parameters.max_source_tokens,
            max_new_tokens=parameters.max_new_tokens,
            source_language=parameters.source_language,
            target_language=parameters.target_language,
            decoding=decoding,
            **cached,
        )

    def make_engine(self, served: Any, settings: Settings) -> TranslationEngine:
        return TranslationEngine(served.runtime, served.assets, settings, name=served.name, observer=served.observer)


TASK = Translation()


@dataclass(frozen=True)
class Source:
    ids: list[int]  # at most max_source_tokens, then EOS-free (the model was trained without one)
    tokens: int  # before truncation
    truncated: bool
    unknown: list[str]  # characters the vocabulary cannot spell
    readable: bool  # at least one token is a known piece of text (not unknown, not a bare space)


_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([\"'«“¿¡(]*)([^\W\d_])")
_PRONOUN_I = re.compile(r"\bi\b")


def sentence_case(text: str) -> str:
    """A text written all in capitals ("WHERE IS THE BATHROOM?"), as in sentence case: the model
    learnt from ordinary sentences, and capitals split into rare pieces (19 tokens against 6) and
    came back as nonsense ("TrEEESA, j'ai le Terre ..."). Text with any small letter is unchanged."""
    cased = [c for c in text if c.isupper() or c.islower()]
    if len(cased) < 4 or any(c.islower() for c in cased) or len(text.lower()) != len(text):
        return text  # (a lower case of another length would shift the offsets unknown characters come from)
    out = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2) + m.group(3).upper(), text.lower())
    return _PRONOUN_I.sub("I", out)


def encode_sources(assets: TranslationAssets, texts: Sequence[str]) -> list[Source]:
    out = []
    cased = [sentence_case(text) for text in texts]
    for text, enc in zip(texts, encode_each(assets.tokenizer, cased), strict=True):
        # from the text as sent (a sentence-cased one has the same offsets)
        unknown = [text[a:b] for tok, (a, b) in zip(enc.ids, enc.offsets, strict=True) if tok == assets.unk]
        readable = any(tok != assets.unk and piece.strip("▁") for tok, piece in zip(enc.ids, enc.tokens, strict=True))
        ids = enc.ids[: assets.max_source_tokens]
        truncated = len(enc.ids) > assets.max_source_tokens
        out.append(Source(ids, len(enc.ids), truncated, list(dict.fromkeys(unknown)), readable))
    return out


class TranslationJob:
    """One text being decoded: its search, and the state its decoder keeps for it (``state``)."""

    def __init__(self, source: Source, search: Search) -> None:
        self.source = source
        self.src = np.asarray(source.ids, dtype=np.int64)
        self.search = search
        self.state: Any = None  # set by the decoder's prefill

    @property
    def rows(self) -> int:
        return self.search.width

    @property
    def tokens(self) -> int:
        return len(self.src) + self.search.generated + 1

    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def beams(self) -> list[list[int]]:
        return self.search.beams

    def result(self) -> list[int]:
        return self.search.result()

    @property
    def ended(self) -> bool:
        return self.search.ended


def _pad(rows: Sequence[np.ndarray], pad: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class FullPrefixDecoder:
    """The encoder output per job; every step re-runs the decoder over each row's whole prefix."""

    def __init__(self, encoder: OnnxModel, decoder: OnnxModel, *, pad: int, never: list[int]) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.pad, self.never = pad, never

    def prefill(self, jobs: list[TranslationJob]) -> None:
        src = _pad([j.src for j in jobs], self.pad)
        memory = self.encoder.run({"src_ids": src})["memory"]
        for job, row in zip(jobs, memory, strict=True):
            job.state = row[: len(job.src)]

    def step(self, jobs: list[TranslationJob]) -> None:
        rows = [(job, beam) for job in jobs for beam in job.beams]
        tgt = _pad([np.asarray(beam, dtype=np.int64) for _, beam in rows], self.pad)
        width = max(len(job.src) for job in jobs)
        dim = jobs[0].state.shape[1]
        memory = np.zeros((len(rows), width, dim), dtype=np.float32)
        src = np.full((len(rows), width), self.pad, dtype=np.int64)
        for i, (job, _) in enumerate(rows):
            memory[i, : len(job.src)] = job.state
            src[i, : len(job.src)] = job.src
        log_probs = self.decoder.run({"tgt_ids": tgt, "memory": memory, "src_ids": src})["log_probs"]
        log_probs[:, self.never] = -np.inf  # padding, BOS and unknown are never generated
        offset = 0
        for job in jobs:
            n = len(job.beams)
            job.search.advance(log_probs[offset : offset + n])
            offset += n

    def close(self) -> None:
        pass


@dataclass
class CacheState:
    """A job's cross keys/values [layers, 1, heads, S, head_dim] and each row's self-attention
    cache [layers, rows, heads, capacity, head_dim] (the first ``generated`` positions filled)."""

    mem_k: np.ndarray
    mem_v: np.ndarray
    cache_k: np.ndarray
    cache_v: np.ndarray


class CachedDecoder:
    """Key/value-cache graphs: a step runs from each row's last token, its rows in groups of
    similar length on ``threads`` threads."""

    def __init__(
        self, encoder_kv: OnnxModel, decoder: OnnxModel, *, pad: int, never: list[int], threads: int, name: str
    ) -> None:
        self.encoder_kv, self.decoder = encoder_kv, decoder
        self.pad, self.never, self.threads = pad, never, threads
        # The scheduler's worker runs one group itself; these run the others alongside it.
        self._helpers = ThreadPoolExecutor(threads - 1, thread_name_prefix=f"decode-{name}") if threads > 1 else None

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)

    def _in_parallel(self, fn: Callable[[list[TranslationJob]], None], parts: list[list[TranslationJob]]) -> None:
        """``fn`` on every part, the first here and the others on the helper threads; every part
        runs to its end, then the first error (if any) is raised. A job is in one part only, so no
        two threads touch the same job."""
        if self._helpers is None or len(parts) < 2:
            for part in parts:
                fn(part)
            return
        futures = [self._helpers.submit(fn, part) for part in parts[1:]]
        error: BaseException | None = None
        try:
            fn(parts[0])
        except Exception as exc:
            error = exc
        for future in futures:
            try:
                future.result()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def prefill(self, jobs: list[TranslationJob]) -> None:
        """The newcomers' cross-attention keys and values, in up to ``threads`` chunks at once."""
        chunks = [c for c in (jobs[i :: self.threads] for i in range(self.threads)) if c]
        self._in_parallel(self._prefill_chunk, chunks)

    def _prefill_chunk(self, jobs: list[TranslationJob]) -> None:
        src = _pad([j.src for j in jobs], self.pad)
        out = self.encoder_kv.run({"src_ids": src})
        mem_k, mem_v = out["mem_k"], out["mem_v"]  # [layers, B, heads, S, head_dim]
        layers, _, heads, _, dim = mem_k.shape
        for i, job in enumerate(jobs):
            n = len(job.src)
            shape = (layers, job.rows, heads, job.search.max_new_tokens + 1, dim)
            job.state = CacheState(
                mem_k[:, i : i + 1, :, :n].copy(),
                mem_v[:, i : i + 1, :, :n].copy(),
                np.zeros(shape, np.float32),
                np.zeros(shape, np.float32),
            )

    def step(self, jobs: list[TranslationJob]) -> None:
        """One step for every job, in groups of similar cache and source length (the cost of a call
        is its rows times its longest cache: every row's cache is gathered, padded, into one tensor,
        so one long sequence must not pad every short one), the groups on parallel threads."""
        self._in_parallel(self._step_group, row_groups(jobs, STEP_GROUP_ROWS, self.threads))

    def _step_group(self, jobs: list[TranslationJob]) -> None:
        """One step from each row's last token: caches gathered into one padded batch, new keys and
        values scattered back, and beams' caches re-ordered after their parents."""
        feeds = self._gather(jobs)
        out = self.decoder.run(feeds)
        log_probs, new_k, new_v = out["log_probs"], out["new_k"], out["new_v"]
        log_probs[:, self.never] = -np.inf
        i = 0
        for job in jobs:
            state: CacheState = job.state
            n, t = len(job.beams), len(job.beams[0]) - 1
            state.cache_k[:, :n, :, t] = new_k[:, i : i + n, :, 0]
            state.cache_v[:, :n, :, t] = new_v[:, i : i + n, :, 0]
            parents = job.search.advance(log_probs[i : i + n])
            if parents:
                state.cache_k[:, : len(parents)] = state.cache_k[:, parents]
                state.cache_v[:, : len(parents)] = state.cache_v[:, parents]
            i += n

    def _gather(self, jobs: list[TranslationJob]) -> dict[str, np.ndarray]:
        layers, _, heads, _, dim = jobs[0].state.cache_k.shape
        rows = sum(len(j.beams) for j in jobs)
        past = max(len(j.beams[0]) - 1 for j in jobs)
        width = max(len(j.src) for j in jobs)
        token = np.empty((rows, 1), np.int64)
        position = np.empty(rows, np.int64)
        past_k = np.zeros((layers, rows, heads, past, dim), np.float32)
        past_v = np.zeros_like(past_k)
        past_mask = np.zeros((rows, past), np.int64)
        mem_k = np.zeros((layers, rows, heads, width, dim), np.float32)
        mem_v = np.zeros_like(mem_k)
        src = np.full((rows, width), self.pad, np.int64)
        i = 0
        for job in jobs:
            state: CacheState = job.state
            n, t, s = len(job.beams), len(job.beams[0]) - 1, len(job.src)
            token[i : i + n, 0] = [beam[-1] for beam in job.beams]
            position[i : i + n] = t
            past_k[:, i : i + n, :, :t] = state.cache_k[:, :n, :, :t]
            past_v[:, i : i + n, :, :t] = state.cache_v[:, :n, :, :t]
            past_mask[i : i + n, :t] = 1
            mem_k[:, i : i + n, :, :s] = state.mem_k
            mem_v[:, i : i + n, :, :s] = state.mem_v
            src[i : i + n, :s] = job.src
            i += n
        return {
            "token": token,
            "position": position,
            "past_k": past_k,
            "past_v": past_v,
            "past_mask": past_mask,
            "mem_k": mem_k,
            "mem_v": mem_v,
            "src_ids": src,
        }


def make_decoder(
    decoder: OnnxModel, assets: TranslationAssets, *, kv_cache: bool, threads: int, name: str
) -> FullPrefixDecoder | CachedDecoder:
    never = [assets.pad, assets.bos, assets.unk]
    if kv_cache and assets.encoder_kv is not None and assets.decoder_cached is not None:
        return CachedDecoder(
            assets.encoder_kv, assets.decoder_cached, pad=assets.pad, never=never, threads=threads, name=name
        )
    return FullPrefixDecoder(assets.encoder, decoder, pad=assets.pad, never=never)


class TranslationEngine:
    """One translation model's scheduler, fed by its decoder's two blocking calls."""

    def __init__(
        self,
        decoder: OnnxModel,
        assets: TranslationAssets,
        settings: Settings,
        *,
        name: str,
        observer: ModelObserver | None = None,
    ) -> None:
        config = assets.decoding
        self.observer = observer
        self.assets = assets
        self.config = config
        self.timeout_s = config.timeout_ms / 1000.0
        self.decoder = make_decoder(decoder, assets, kv_cache=config.kv_cache, threads=config.parallelism, name=name)
        self.kv_cache = isinstance(self.decoder, CachedDecoder)
        self.scheduler: StepScheduler[TranslationJob] = StepScheduler(
            self.decoder.prefill,
            self.decoder.step,
            max_rows=config.max_rows,
            max_tokens=config.max_tokens,
            max_queue_size=settings.max_queue_size,
            mode=config.batching,
            name=name,
            observer=observer,
            retry_after_s=settings.retry_after_s,
            boost_after=config.boost_after,
            boost_steps=config.boost_steps,
            boost_rows=config.boost_rows,
            fair=config.fair,
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

    def new_job(
        self, source: Source, *, beam_size: int, max_new_tokens: int, on_token: Callable[[int], None] | None = None
    ) -> TranslationJob:
        search = new_search(
            beam_size, bos=self.assets.bos, eos=self.assets.eos, max_new_tokens=max_new_tokens, on_token=on_token
        )
        return TranslationJob(source, search)

    async def translate(
        self,
        source: Source,
        *,
        beam_size: int,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        group: object = None,
    ) -> tuple[TranslationJob, DecodeStats]:
        job = self.new_job(source, beam_size=beam_size, max_new_tokens=max_new_tokens, on_token=on_token)
        submit = self.scheduler.submit(job, timeout_s=self.timeout_s, group=group, admitted=group is not None)
        if self.observer is None:
            stats = await submit
        else:
            try:
                with self.observer.track():
                    stats = await submit
            finally:  # a sequence cancelled or failed mid-way generated its steps' tokens too
                self.observer.on_tokens(len(job.result()) if job.done else job.search.generated)
        decode_span(self.scheduler.name, stats, tokens=len(job.result()))
        return job, stats

    async def translate_all(
        self,
        sources: Sequence[Source],
        *,
        beam_size: int,
        max_new_tokens: int,
        on_token: Callable[[int], Callable[[int], None]] | None = None,
        admitted: bool = False,
    ) -> list[tuple[TranslationJob, DecodeStats]]:
        """A request's texts, admitted (or refused, 429) as one before any decodes, then decoded as
        one group that shares the batch's rows fairly with other requests; if one fails, all do.
        ``admitted``: the caller admitted them already (a stream, before its 200: checked again
        here, after the 200, a full line answered "200" and then an ``error`` event)."""
        if not admitted:
            self.scheduler.admit(len(sources) * beam_size)
        group = object()
        return await gather_all(
            [
                self.translate(
                    source,
                    beam_size=beam_size,
                    max_new_tokens=max_new_tokens,
                    on_token=on_token(i) if on_token is not None else None,
                    group=group,
                )
                for i, source in enumerate(sources)
            ]
        )

    def detokenize(self, ids: list[int]) -> str:
        return self.assets.tokenizer.decode(ids, skip_special_tokens=True).strip()


def decode_batch(
    version_dir: Path, sources: list[list[int]], *, beam_size: int, max_new_tokens: int, batch: int = 64
) -> list[list[int]]:
    """Translate token ids with the service's own decoding (the model folder's ``model.json``, its
    cached graphs when it has them), ``batch`` sequences at a time, without a server: what training
    uses to measure BLEU exactly as the service decodes. Token ids out, without BOS and EOS."""
    spec = load_spec(version_dir.parent)
    parameters = TASK.parameters(spec)
    options = RuntimeOptions(providers=["CPUExecutionProvider"], intra_op_threads=0, inter_op_threads=1)
    settings = Settings.model_construct()  # the defaults: nothing read from this process's environment
    assets = TASK.load_assets(spec, parameters, version_dir, options, settings)
    decoder = make_decoder(
        OnnxModel(version_dir / "model.onnx", options), assets, kv_cache=True, threads=1, name=spec.name
    )
    out: list[list[int]] = []
    for start in range(0, len(sources), batch):
        jobs = [
            TranslationJob(
                Source(ids, len(ids), False, [], True),
                new_search(beam_size, bos=assets.bos, eos=assets.eos, max_new_tokens=max_new_tokens),
            )
            for ids in sources[start : start + batch]
        ]
        decoder.prefill(jobs)
        while active := [j for j in jobs if not j.done]:
            decoder.step(active)
        out += [j.result() for j in jobs]
    decoder.close()
    return out


def row_groups(jobs: Sequence[TranslationJob], max_rows: int, threads: int) -> list[list[TranslationJob]]:
    """Jobs sorted by (generated, source) length and cut into groups of about equal rows: as few as
    keep each within ``max_rows`` where possible, and a multiple of ``threads`` so that parallel
    threads get even shares (never more groups than jobs)."""
    ordered = sorted(jobs, key=lambda j: (len(j.beams[0]), len(j.src)))
    rows = sum(len(j.beams) for j in ordered)
    count = max(1, min(len(ordered), threads * math.ceil(rows / (max_rows * threads))))
    groups: list[list[TranslationJob]] = [[]]
    filled = 0
    for job in ordered:
        if groups[-1] and len(groups) < count and filled >= rows * len(groups) / count:
            groups.append([])
        groups[-1].append(job)
        filled += len(job.beams)
    return groups

"""Translation: texts in, translated texts out, decoded with step-level batching.

The model is two graphs: ``encoder.onnx`` (an asset of the model version, loaded here) and the
decoder step (the version's ``model.onnx``, the model the repository serves). A text becomes a
:class:`TranslationJob`; a :class:`TranslationEngine` per model owns a
:class:`~service.decoding.StepScheduler` and gives it the two blocking calls it needs: ``prefill``
(encode the new jobs' sources together) and ``step`` (one decoder call on every row of every job,
rows padded to the batch's longest, each job then choosing its next token or re-ranking its beams).
With the key/value-cache graphs, a step's rows run in groups of similar length, and the groups (and
a prefill's chunks) run on ``decode_threads`` threads at once, one intra-op thread each: on a CPU the
small matrices of one step gain little from splitting each operator across cores, while whole
groups in parallel use every core.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.config import Settings
from service.decoding import DecodeStats, StepScheduler
from service.errors import ModelLoadError
from service.metrics import ModelObserver
from service.repository import ModelSpec
from service.runtime import OnnxModel, RuntimeOptions
from service.tasks import find_asset, load_tokenizer

# Rows per decoder call in a cached step: big enough to use the matrix units well on a CPU, small
# enough that a group's padding to its longest cache stays close to its members' own lengths.
STEP_GROUP_ROWS = 16


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
    encoder_kv: OnnxModel | None = None  # the key/value-cache pair, when the model has one
    decoder_cached: OnnxModel | None = None

    @property
    def has_kv_cache(self) -> bool:
        return self.encoder_kv is not None and self.decoder_cached is not None


def load_assets(spec: ModelSpec, version_dir: Path, options: RuntimeOptions) -> TranslationAssets:
    params = spec.parameters
    tokenizer = load_tokenizer(params.get("tokenizer", "tokenizer.json"), version_dir)
    encoder = OnnxModel(find_asset(params.get("encoder", "encoder.onnx"), version_dir), options)
    if [i.name for i in encoder.inputs] != ["src_ids"] or [o.name for o in encoder.outputs] != ["memory"]:
        raise ModelLoadError(encoder.path, "the encoder graph must take 'src_ids' and return 'memory'")
    specials = params.get("special_tokens", {})
    try:
        ids = {k: int(specials[k]) for k in ("pad", "bos", "eos", "unk")}
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(
            version_dir.parent / "model.json", "parameters.special_tokens needs pad, bos, eos, unk"
        ) from None
    cached: dict[str, OnnxModel] = {}
    for key in ("encoder_kv", "decoder_cached"):
        if params.get(key):
            cached[key] = OnnxModel(find_asset(params[key], version_dir), options)
    if len(cached) == 1:
        raise ModelLoadError(version_dir.parent / "model.json", "name both encoder_kv and decoder_cached, or neither")
    return TranslationAssets(
        tokenizer,
        encoder,
        **cached,
        max_source_tokens=int(params.get("max_source_tokens", 64)),
        max_new_tokens=int(params.get("max_new_tokens", 64)),
        source_language=str(params.get("source_language", "?")),
        target_language=str(params.get("target_language", "?")),
        **ids,
    )


@dataclass(frozen=True)
class Source:
    ids: list[int]  # at most max_source_tokens, then EOS-free (the model was trained without one)
    tokens: int  # before truncation
    truncated: bool
    unknown: list[str]  # characters the vocabulary cannot spell
    readable: bool  # at least one token is a known piece of text (not unknown, not a bare space)


def encode_sources(assets: TranslationAssets, texts: Sequence[str]) -> list[Source]:
    out = []
    for text, enc in zip(texts, assets.tokenizer.encode_batch(list(texts)), strict=True):
        unknown = [text[a:b] for tok, (a, b) in zip(enc.ids, enc.offsets, strict=True) if tok == assets.unk]
        readable = any(tok != assets.unk and piece.strip("▁") for tok, piece in zip(enc.ids, enc.tokens, strict=True))
        ids = enc.ids[: assets.max_source_tokens]
        truncated = len(enc.ids) > assets.max_source_tokens
        out.append(Source(ids, len(enc.ids), truncated, list(dict.fromkeys(unknown)), readable))
    return out


class TranslationJob:
    """One text being decoded: greedy (``beam_size`` 1) or beam search, with its encoder output.

    ``advance`` takes the log-probabilities of the next token for each of its rows.
    """

    def __init__(
        self,
        source: Source,
        *,
        beam_size: int,
        max_new_tokens: int,
        eos: int,
        bos: int,
        length_penalty: float = 1.0,
        on_token: Callable[[int], None] | None = None,
    ) -> None:
        self.source = source
        self.src = np.asarray(source.ids, dtype=np.int64)
        self.memory: np.ndarray | None = None  # [S, D], set by prefill
        self.beam_size = beam_size
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.length_penalty = length_penalty
        self.on_token = on_token  # streaming (greedy only): called with each new token id
        self.beams: list[list[int]] = [[bos]]
        self.scores = np.zeros(1, dtype=np.float64)
        self.finished: list[tuple[float, list[int]]] = []
        self.done = False
        # With the key/value-cache graphs: cross keys/values [layers, 1, heads, S, head_dim] and each
        # row's self-attention cache [layers, rows, heads, capacity, head_dim] (first len-1 filled).
        self.mem_k: np.ndarray | None = None
        self.mem_v: np.ndarray | None = None
        self.cache_k: np.ndarray | None = None
        self.cache_v: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.beam_size

    @property
    def tokens(self) -> int:
        return len(self.src) + self.generated + 1

    @property
    def generated(self) -> int:
        return len(self.beams[0]) - 1 if self.beams else self.max_new_tokens

    def _normalised(self, score: float, length: int) -> float:
        return score / (max(length, 1) ** self.length_penalty)

    def advance(self, log_probs: np.ndarray) -> list[int] | None:
        """``log_probs`` [len(self.beams), V]: pick the next token(s). Beam search returns, for each
        new beam, the row it grew from (its cache must follow); greedy returns None."""
        if self.beam_size == 1:
            token = int(log_probs[0].argmax())
            self.beams[0].append(token)
            self.scores[0] += float(log_probs[0, token])
            if self.on_token is not None:
                self.on_token(token)
            self.done = token == self.eos or self.generated >= self.max_new_tokens
            return None
        k = self.beam_size
        total = (self.scores[:, None] + log_probs).ravel()
        vocab = log_probs.shape[1]
        beams, scores, parents = [], [], []
        candidates = np.argpartition(-total, 2 * k)[: 2 * k] if total.size > 2 * k else np.arange(total.size)
        for flat in candidates[np.argsort(-total[candidates])]:  # 2k candidates: up to k may end here
            row, token = divmod(int(flat), vocab)
            seq = [*self.beams[row], token]
            if token == self.eos:
                self.finished.append((self._normalised(float(total[flat]), len(seq) - 1), seq))
            else:
                beams.append(seq)
                scores.append(float(total[flat]))
                parents.append(row)
            if len(beams) == k:
                break
        self.beams, self.scores = beams, np.asarray(scores)
        if self.generated >= self.max_new_tokens or not self.beams:
            self.finished.extend(
                (self._normalised(s, len(b) - 1), b) for b, s in zip(self.beams, self.scores, strict=True)
            )
            self.done = True
        elif len(self.finished) >= k:
            # Done once the best finished hypothesis beats what any live beam can still reach
            # (scores only fall as tokens are added, so a live beam's best case is its current score).
            best_done = max(s for s, _ in self.finished)
            best_alive = max(self._normalised(float(s), self.max_new_tokens) for s in self.scores)
            self.done = best_done >= best_alive
        return parents

    def _best(self) -> list[int]:
        if self.beam_size == 1 or not self.finished:
            return self.beams[0]
        return max(self.finished, key=lambda f: f[0])[1]

    def result(self) -> list[int]:
        """The chosen translation's token ids (without BOS and EOS)."""
        return [t for t in self._best()[1:] if t != self.eos]

    @property
    def ended(self) -> bool:
        """True when the chosen translation ended by itself (EOS), not at ``max_new_tokens``."""
        return self._best()[-1] == self.eos


class TranslationEngine:
    """The scheduler and the two blocking calls it runs for one translation model."""

    def __init__(
        self,
        decoder: OnnxModel,
        assets: TranslationAssets,
        settings: Settings,
        *,
        name: str,
        observer: ModelObserver | None = None,
    ) -> None:
        self.decoder = decoder
        self.observer = observer
        self.assets = assets
        self.timeout_s = settings.decode_timeout_ms / 1000.0
        self.never = [assets.pad, assets.bos, assets.unk]
        self.kv_cache = settings.decode_kv_cache and assets.has_kv_cache
        self.threads = settings.decode_parallelism
        # The scheduler's worker runs one group itself; these run the others alongside it.
        self._helpers = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix=f"decode-{name}")
            if self.kv_cache and self.threads > 1
            else None
        )
        self.scheduler: StepScheduler[TranslationJob] = StepScheduler(
            self.prefill_cached if self.kv_cache else self.prefill,
            self.step_cached if self.kv_cache else self.step,
            max_rows=settings.decode_max_rows,
            max_tokens=settings.decode_max_tokens,
            max_queue_size=settings.max_queue_size,
            mode=settings.decode_batching,
            name=name,
            observer=observer,
            retry_after_s=settings.retry_after_s,
            boost_after=settings.decode_boost_after,
            boost_steps=settings.decode_boost_steps,
            boost_rows=settings.decode_boost_rows,
        )

    def start(self) -> None:
        self.scheduler.start()

    async def close(self, *, drain: bool = True) -> None:
        await self.scheduler.close(drain=drain)
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

    # Both run in the scheduler's worker thread.
    def prefill(self, jobs: list[TranslationJob]) -> None:
        src = _pad([j.src for j in jobs], self.assets.pad)
        memory = self.encode(src)
        for job, row, n in zip(jobs, memory, (len(j.src) for j in jobs), strict=True):
            job.memory = row[:n]

    def encode(self, src: np.ndarray) -> np.ndarray:
        return self.assets.encoder.run({"src_ids": src})["memory"]

    def step(self, jobs: list[TranslationJob]) -> None:
        rows = [(job, beam) for job in jobs for beam in job.beams]
        tgt = _pad([np.asarray(beam, dtype=np.int64) for _, beam in rows], self.assets.pad)
        width = max(len(job.src) for job in jobs)
        dim = jobs[0].memory.shape[1]
        memory = np.zeros((len(rows), width, dim), dtype=np.float32)
        src = np.full((len(rows), width), self.assets.pad, dtype=np.int64)
        for i, (job, _) in enumerate(rows):
            memory[i, : len(job.src)] = job.memory
            src[i, : len(job.src)] = job.src
        log_probs = self.decoder.run({"tgt_ids": tgt, "memory": memory, "src_ids": src})["log_probs"]
        log_probs[:, self.never] = -np.inf  # padding, BOS and unknown are never generated
        offset = 0
        for job in jobs:
            n = len(job.beams)
            job.advance(log_probs[offset : offset + n])
            offset += n

    def prefill_cached(self, jobs: list[TranslationJob]) -> None:
        """The newcomers' cross-attention keys and values, in up to ``threads`` chunks at once."""
        chunks = [c for c in (jobs[i :: self.threads] for i in range(self.threads)) if c]
        self._in_parallel(self._prefill_cached_chunk, chunks)

    def _prefill_cached_chunk(self, jobs: list[TranslationJob]) -> None:
        assert self.assets.encoder_kv is not None
        src = _pad([j.src for j in jobs], self.assets.pad)
        out = self.assets.encoder_kv.run({"src_ids": src})
        mem_k, mem_v = out["mem_k"], out["mem_v"]  # [layers, B, heads, S, head_dim]
        layers, _, heads, _, dim = mem_k.shape
        for i, job in enumerate(jobs):
            n = len(job.src)
            job.mem_k, job.mem_v = mem_k[:, i : i + 1, :, :n].copy(), mem_v[:, i : i + 1, :, :n].copy()
            shape = (layers, job.beam_size, heads, job.max_new_tokens + 1, dim)
            job.cache_k, job.cache_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step_cached(self, jobs: list[TranslationJob]) -> None:
        """One step for every job, in groups of similar cache and source length (the cost of a call
        is its rows times its longest cache: every row's cache is gathered, padded, into one tensor,
        so one long sequence must not pad every short one), the groups on parallel threads."""
        self._in_parallel(self._step_cached_group, row_groups(jobs, STEP_GROUP_ROWS, self.threads))

    def _step_cached_group(self, jobs: list[TranslationJob]) -> None:
        """One step from each row's last token: caches gathered into one padded batch, new keys and
        values scattered back, and beams' caches re-ordered after their parents."""
        assert self.assets.decoder_cached is not None
        layers, _, heads, _, dim = jobs[0].cache_k.shape
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
        src = np.full((rows, width), self.assets.pad, np.int64)
        i = 0
        for job in jobs:
            n, t, s = len(job.beams), len(job.beams[0]) - 1, len(job.src)
            token[i : i + n, 0] = [beam[-1] for beam in job.beams]
            position[i : i + n] = t
            past_k[:, i : i + n, :, :t] = job.cache_k[:, :n, :, :t]
            past_v[:, i : i + n, :, :t] = job.cache_v[:, :n, :, :t]
            past_mask[i : i + n, :t] = 1
            mem_k[:, i : i + n, :, :s] = job.mem_k
            mem_v[:, i : i + n, :, :s] = job.mem_v
            src[i : i + n, :s] = job.src
            i += n
        out = self.assets.decoder_cached.run(
            {
                "token": token,
                "position": position,
                "past_k": past_k,
                "past_v": past_v,
                "past_mask": past_mask,
                "mem_k": mem_k,
                "mem_v": mem_v,
                "src_ids": src,
            }
        )
        log_probs, new_k, new_v = out["log_probs"], out["new_k"], out["new_v"]
        log_probs[:, self.never] = -np.inf
        i = 0
        for job in jobs:
            n, t = len(job.beams), len(job.beams[0]) - 1
            job.cache_k[:, :n, :, t] = new_k[:, i : i + n, :, 0]
            job.cache_v[:, :n, :, t] = new_v[:, i : i + n, :, 0]
            parents = job.advance(log_probs[i : i + n])
            if parents:
                job.cache_k[:, : len(parents)] = job.cache_k[:, parents]
                job.cache_v[:, : len(parents)] = job.cache_v[:, parents]
            i += n

    def new_job(
        self, source: Source, *, beam_size: int, max_new_tokens: int, on_token: Callable[[int], None] | None = None
    ) -> TranslationJob:
        return TranslationJob(
            source,
            beam_size=beam_size,
            max_new_tokens=max_new_tokens,
            eos=self.assets.eos,
            bos=self.assets.bos,
            on_token=on_token,
        )

    async def translate(
        self, source: Source, *, beam_size: int, max_new_tokens: int, on_token: Callable[[int], None] | None = None
    ) -> tuple[TranslationJob, DecodeStats]:
        job = self.new_job(source, beam_size=beam_size, max_new_tokens=max_new_tokens, on_token=on_token)
        if self.observer is None:
            return job, await self.scheduler.submit(job, timeout_s=self.timeout_s)
        with self.observer.track():
            stats = await self.scheduler.submit(job, timeout_s=self.timeout_s)
        self.observer.on_tokens(len(job.result()))
        return job, stats

    def detokenize(self, ids: list[int]) -> str:
        return self.assets.tokenizer.decode(ids, skip_special_tokens=True).strip()


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


def _pad(rows: Sequence[np.ndarray], pad: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


async def gather_all(coros: Sequence) -> list:
    """Run every job; if one fails, cancel the rest (their rows leave the batch) and raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

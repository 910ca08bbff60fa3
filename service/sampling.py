"""Choosing the next token of a generated text: temperature, top-k, top-p, penalties and a seed per
row, inside a batched step. Knows neither HTTP nor ONNX: a decoder hands :func:`sample_rows` the
step's next-token log-probabilities [rows, vocab] and each row's :class:`Sampler`.

Each row has its own random generator, seeded from the request's ``seed`` and the choice's
index, and draws exactly one number per token: a row's text depends on its seed, its prompt and
the model, never on which other rows share the step (the arithmetic of each row is its own).

Where each step happens, in order (the order of vLLM's and Hugging Face's logits processors):
penalties on the raw log-probabilities (repetition over prompt and output; frequency and
presence over the output, as OpenAI defines them), ``logit_bias``, then temperature (0: the
most probable token, nothing drawn), top-k, top-p over what is left, and one draw by inverse
CDF. Reported log-probabilities are the model's own, before any of this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Top-p looks at this many of the most probable tokens first and sorts only those (a whole sort of
# an 8,000-token vocabulary per row per step costs more than the model's step); rows whose nucleus
# is wider fall back to a full sort.
NUCLEUS_CANDIDATES = 256
# Below this temperature a draw is the most probable token: dividing by less overflows float32
# (a temperature of 1e-39 gave NaN weights and the padding token).
MIN_TEMPERATURE = 1e-4
DRAW_BLOCK = 64  # tokens per block of the two-level inverse-CDF search (see _inverse_cdf)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    frequency_penalty: float = 0.0  # per occurrence in the output (OpenAI)
    presence_penalty: float = 0.0  # once a token is in the output (OpenAI)
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives to report per token (None: no log-probs)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def bias_only(self) -> bool:
        """``logit_bias`` and no penalty: applied to every such row at once."""
        return (
            self.repetition_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
            and bool(self.logit_bias)
        )

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )


class Sampler:
    """One row's choices: its parameters, its random generator, the tokens it has seen."""

    __slots__ = ("bias_ids", "bias_values", "counts", "params", "prompt", "rng")

    def __init__(self, params: SamplingParams, *, choice: int = 0, prompt: list[int] | None = None) -> None:
        self.params = params
        # [seed, choice]: choice j of a prompt gives the same text whatever else the request holds.
        entropy = None if params.seed is None else [params.seed % 2**64, choice]
        self.rng = np.random.default_rng(entropy)
        self.prompt = set(prompt or ())  # for the repetition penalty
        self.counts: dict[int, int] = {}  # output tokens so far
        self.bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        self.bias_values = np.fromiter(params.logit_bias.values(), dtype=np.float64, count=len(params.logit_bias))

    def seen(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1

    def adjust(self, scores: np.ndarray) -> np.ndarray:
        """The penalties and biases on one row (a copy)."""
        p = self.params
        scores = scores.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0:
            ids = np.fromiter(self.prompt | self.counts.keys(), dtype=np.int64)
            if ids.size:
                # Log-probabilities are negative: multiplying lowers them (CTRL's rule on logits).
                values = scores[ids]
                scores[ids] = np.where(values < 0, values * p.repetition_penalty, values / p.repetition_penalty)
        if self.counts and (p.frequency_penalty or p.presence_penalty):
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            times = np.fromiter(self.counts.values(), dtype=np.float64)
            scores[ids] -= times * p.frequency_penalty + p.presence_penalty
        if self.bias_ids.size:
            scores[self.bias_ids] += self.bias_values  # ids checked against the vocabulary by the route
        return scores


def sample_rows(log_probs: np.ndarray, samplers: list[Sampler], banned: list[int] | None = None) -> np.ndarray:
    """One token per row of ``log_probs`` [rows, vocab], each by its row's sampler. ``banned``:
    token ids never chosen (padding, begin-of-text). Returns int64 [rows].

    Vectorised over rows (a Python loop per row per step cost more than the model's step at 64
    rows), in one float32 working copy changed in place, ``logit_bias`` for all rows at once:
    0.51 ms a call at 54 rows x 8,000 tokens against 0.84 ms with a copy per operation, the same
    tokens (``python -m bench.sampling --baseline a30957d``); float64 only for the cumulative sums
    that the draws search."""
    rows = len(samplers)
    scores = np.array(log_probs, dtype=np.float32, copy=True)
    if banned:
        scores[:, banned] = -np.inf
    biased: list[int] = []
    for i, sampler in enumerate(samplers):
        params = sampler.params
        if params.penalised:
            if params.bias_only:
                biased.append(i)
            else:
                scores[i] = sampler.adjust(scores[i])
    if biased:  # logit_bias alone, every such row at once
        ids = [samplers[i].bias_ids for i in biased]
        where = np.repeat(biased, [len(x) for x in ids])
        scores[where, np.concatenate(ids)] += np.concatenate([samplers[i].bias_values for i in biased]).astype(
            np.float32
        )
    chosen = np.empty(rows, dtype=np.int64)
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    if len(greedy) == rows:
        return scores.argmax(axis=1)
    if greedy:
        chosen[greedy] = scores[greedy].argmax(axis=1)
    # Rows that draw, in groups of equal (temperature, top_k, top_p): each group is one set of
    # array operations (row-wise, so no row's arithmetic depends on another's).
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, s in enumerate(samplers):
        if not s.params.greedy:
            groups.setdefault((s.params.temperature, s.params.top_k, s.params.top_p), []).append(i)
    for (temperature, top_k, top_p), members in groups.items():
        draws = np.array([samplers[i].rng.random() for i in members])
        part = scores if len(members) == rows else scores[members]  # the whole copy, or a copy of rows
        chosen[members] = _draw(part, temperature, top_k, top_p, draws)
    return chosen


def _draw(scores: np.ndarray, temperature: float, top_k: int, top_p: float, draws: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws (one uniform per row) from softmax(scores / temperature) restricted to
    top-k / top-p. ``scores`` is a working copy: it is overwritten."""
    vocab = scores.shape[1]
    if top_k and top_k < vocab:
        kth = np.partition(scores, vocab - top_k, axis=1)[:, vocab - top_k : vocab - top_k + 1]
        scores[scores < kth] = -np.inf
    weights = scores  # exp((scores - max) / temperature), in place
    np.subtract(scores, scores.max(axis=1, keepdims=True), out=weights)
    weights *= np.float32(1.0 / temperature)
    np.exp(weights, out=weights)
    if top_p < 1.0:
        weights = _nucleus(weights, top_p)
    return _inverse_cdf(weights, draws)


def _inverse_cdf(weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """For each row, the first token whose cumulative weight exceeds ``draw x total``. In two levels:
    sums of blocks of DRAW_BLOCK tokens, then the cumulative sum inside the one block the draw falls
    in (a cumulative sum over the whole vocabulary cost 2.5 ms per step at 64 rows x 6,000 tokens,
    10x the exponentials)."""
    rows, vocab = weights.shape
    blocks = -(-vocab // DRAW_BLOCK)
    if vocab % DRAW_BLOCK:
        padded = np.zeros((rows, blocks * DRAW_BLOCK), dtype=weights.dtype)
        padded[:, :vocab] = weights
    else:
        padded = np.ascontiguousarray(weights)
    tiles = padded.reshape(rows, blocks, DRAW_BLOCK)
    block_sums = np.cumsum(tiles.sum(axis=2), axis=1, dtype=np.float64)
    targets = draws * block_sums[:, -1]
    block = np.minimum((block_sums <= targets[:, None]).sum(axis=1), blocks - 1)
    before = np.where(block > 0, block_sums[np.arange(rows), block - 1], 0.0)
    inside = np.cumsum(tiles[np.arange(rows), block], axis=1, dtype=np.float64)
    offset = np.minimum((inside <= (targets - before)[:, None]).sum(axis=1), DRAW_BLOCK - 1)
    out = block * DRAW_BLOCK + offset
    for r in np.flatnonzero(padded[np.arange(rows), out] == 0):  # rounding at a boundary: the nearest token with weight
        out[r] = int(np.flatnonzero(weights[r])[-1]) if out[r] >= vocab else _nearest(weights[r], int(out[r]))
    return out.astype(np.int64)


def _nearest(weights: np.ndarray, index: int) -> int:
    nonzero = np.flatnonzero(weights)
    return int(nonzero[np.argmin(np.abs(nonzero - index))])


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Zero every weight outside the smallest set of most probable tokens whose mass reaches
    ``top_p`` (at least one token is kept). The NUCLEUS_CANDIDATES most probable tokens are sorted
    first; a row whose nucleus is wider than them sorts its whole vocabulary."""
    rows, vocab = weights.shape
    totals = weights.sum(axis=1, dtype=np.float64)
    take = min(NUCLEUS_CANDIDATES, vocab)
    if take < vocab:
        candidates = np.argpartition(-weights, take - 1, axis=1)[:, :take]
    else:
        candidates = np.broadcast_to(np.arange(vocab), (rows, vocab))
    values = np.take_along_axis(weights, candidates, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    ordered = np.take_along_axis(candidates, order, axis=1)
    mass = np.cumsum(np.take_along_axis(values, order, axis=1), axis=1, dtype=np.float64) / totals[:, None]
    # Keep tokens until the mass before them reaches top_p (the first is always kept).
    count = (mass < top_p).sum(axis=1) + 1
    keep = np.zeros(weights.shape, dtype=bool)
    for r in range(rows):
        if count[r] > take:  # a wide nucleus: sort the whole row
            full = np.argsort(-weights[r], kind="stable")
            whole = np.cumsum(weights[r, full], dtype=np.float64) / totals[r]
            keep[r, full[: int((whole < top_p).sum()) + 1]] = True
        else:
            keep[r, ordered[r, : count[r]]] = True
    return np.where(keep, weights, 0.0)


def top_alternatives(log_probs: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
    """The ``k`` most probable tokens of one row, best first, with their log-probabilities;
    ``exclude``: tokens never generated (they are no alternative)."""
    if k <= 0:
        return []
    if exclude:
        log_probs = log_probs.copy()
        log_probs[list(exclude)] = -np.inf
    k = min(k, log_probs.size)
    ids = np.argpartition(-log_probs, k - 1)[:k]
    ids = ids[np.argsort(-log_probs[ids], kind="stable")]
    return [(int(i), float(log_probs[i])) for i in ids]

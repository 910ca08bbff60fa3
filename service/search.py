"""Choosing tokens from a decoder's log-probabilities: greedy and beam search, one per class,
knowing neither HTTP nor ONNX (any step-level decoder drives them, a row per live hypothesis).

A search holds its hypotheses (``beams``: token lists starting with BOS) and takes, at each step,
the next-token log-probabilities of each of its rows. ``advance`` returns, for beam search, the
row each new hypothesis grew from, so a decoder can re-order its per-row caches; greedy never
re-orders (``None``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class Search:
    """What every search shares: its hypotheses, how many rows it reserves, when it is done."""

    def __init__(self, *, bos: int, eos: int, max_new_tokens: int, width: int) -> None:
        self.eos = eos
        self.max_new_tokens = max_new_tokens
        self.width = width  # rows it may put in a step: reserved when the sequence is admitted
        self.beams: list[list[int]] = [[bos]]
        self.done = False

    @property
    def generated(self) -> int:
        return len(self.beams[0]) - 1 if self.beams else self.max_new_tokens

    def advance(self, log_probs: np.ndarray) -> list[int] | None:
        raise NotImplementedError

    def best(self) -> list[int]:
        raise NotImplementedError

    def result(self) -> list[int]:
        """The chosen hypothesis's token ids, without BOS and EOS."""
        return [t for t in self.best()[1:] if t != self.eos]

    @property
    def ended(self) -> bool:
        """True when the chosen hypothesis ended by itself (EOS), not at ``max_new_tokens``."""
        return self.best()[-1] == self.eos


class GreedySearch(Search):
    def __init__(
        self, *, bos: int, eos: int, max_new_tokens: int, on_token: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(bos=bos, eos=eos, max_new_tokens=max_new_tokens, width=1)
        self.on_token = on_token  # streaming: called with each new token id

    def advance(self, log_probs: np.ndarray) -> None:
        token = int(log_probs[0].argmax())
        self.beams[0].append(token)
        if self.on_token is not None:
            self.on_token(token)
        self.done = token == self.eos or self.generated >= self.max_new_tokens
        return None

    def best(self) -> list[int]:
        return self.beams[0]


class BeamSearch(Search):
    """``beam_size`` hypotheses; finished ones are ranked by log-probability / length^penalty."""

    def __init__(self, *, bos: int, eos: int, max_new_tokens: int, beam_size: int, length_penalty: float = 1.0) -> None:
        super().__init__(bos=bos, eos=eos, max_new_tokens=max_new_tokens, width=beam_size)
        self.beam_size = beam_size
        self.length_penalty = length_penalty
        self.scores = np.zeros(1, dtype=np.float64)
        self.finished: list[tuple[float, list[int]]] = []

    def _normalised(self, score: float, length: int) -> float:
        return score / (max(length, 1) ** self.length_penalty)

    def advance(self, log_probs: np.ndarray) -> list[int]:
        """``log_probs`` [len(self.beams), V]: the k best continuations; returns their parent rows."""
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

    def best(self) -> list[int]:
        if not self.finished:
            return self.beams[0]
        return max(self.finished, key=lambda f: f[0])[1]


def new_search(
    beam_size: int, *, bos: int, eos: int, max_new_tokens: int, on_token: Callable[[int], None] | None = None
) -> Search:
    """Greedy for ``beam_size`` 1 (the only one that streams), else beam search."""
    if beam_size == 1:
        return GreedySearch(bos=bos, eos=eos, max_new_tokens=max_new_tokens, on_token=on_token)
    if on_token is not None:
        raise ValueError("streaming needs greedy decoding: a beam's best changes until it ends")
    return BeamSearch(bos=bos, eos=eos, max_new_tokens=max_new_tokens, beam_size=beam_size)

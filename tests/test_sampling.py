"""Sampling the next token, on made-up distributions: each option does what it says, draws follow
the distribution, and a row's draws depend on its seed alone."""

from __future__ import annotations

import numpy as np
import pytest

from service.sampling import Sampler, SamplingParams, _inverse_cdf, sample_rows, top_alternatives

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
ROW = np.log(PROBS).astype(np.float32)[None, :]


def frequencies(params: SamplingParams, draws: int = 20_000) -> np.ndarray:
    sampler = Sampler(params)
    picks = [int(sample_rows(ROW, [sampler])[0]) for _ in range(draws)]
    return np.bincount(picks, minlength=PROBS.size) / draws


def test_draws_follow_the_distribution_at_temperature_one() -> None:
    assert np.allclose(frequencies(SamplingParams(seed=1)), PROBS, atol=0.015)


def test_temperature_flattens_and_sharpens() -> None:
    hot, cold = (
        frequencies(SamplingParams(temperature=2.0, seed=2)),
        frequencies(SamplingParams(temperature=0.5, seed=2)),
    )
    want_hot = PROBS**0.5 / (PROBS**0.5).sum()
    want_cold = PROBS**2 / (PROBS**2).sum()
    assert np.allclose(hot, want_hot, atol=0.015) and np.allclose(cold, want_cold, atol=0.015)


def test_top_k_and_top_p_keep_only_the_most_probable() -> None:
    two = PROBS[:2] / PROBS[:2].sum()
    assert np.allclose(frequencies(SamplingParams(top_k=2, seed=3))[:2], two, atol=0.015)
    assert frequencies(SamplingParams(top_k=2, seed=3))[2:].sum() == 0
    # top_p 0.7: 0.5 is short of it, 0.5 + 0.3 reaches it: the first two tokens.
    assert frequencies(SamplingParams(top_p=0.7, seed=4))[2:].sum() == 0
    assert frequencies(SamplingParams(top_p=0.5, seed=4))[0] == 1.0  # 0.5 reaches 0.5 alone


def test_greedy_takes_the_best_allowed_token() -> None:
    assert sample_rows(ROW, [Sampler(SamplingParams(temperature=0))])[0] == 0
    assert sample_rows(ROW, [Sampler(SamplingParams(temperature=0))], banned=[0])[0] == 1


def test_penalties_push_seen_tokens_down() -> None:
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=2.0))
    sampler.seen(0)
    assert sample_rows(ROW, [sampler])[0] == 1
    repeated = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])
    assert sample_rows(ROW, [repeated])[0] == 1  # log 0.5 x 2 < log 0.3
    biased = Sampler(SamplingParams(temperature=0, logit_bias={3: 100.0}))
    assert sample_rows(ROW, [biased])[0] == 3


def test_a_rows_draws_depend_on_its_seed_and_choice_not_its_neighbours() -> None:
    rng = np.random.default_rng(0)
    batch = np.log(rng.dirichlet(np.ones(50), size=8)).astype(np.float32)

    def run(rows: list[int]) -> list[int]:
        samplers = [Sampler(SamplingParams(seed=11, top_p=0.9), choice=r) for r in rows]
        out = []
        for _ in range(20):
            out.append([int(t) for t in sample_rows(batch[rows], samplers)])
        return [step[rows.index(3)] for step in out]

    assert run([3]) == run([0, 1, 2, 3, 4, 5]) == run([7, 3])


@pytest.mark.parametrize("vocab", [5, 64, 65, 1000])
def test_the_two_level_search_is_the_cumulative_search(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    for _ in range(50):
        weights = (rng.random((6, vocab)) * (rng.random((6, vocab)) < 0.4)).astype(np.float32)
        weights[:, 0] += 1e-3
        draws = rng.random(6)
        cumulative = np.cumsum(weights, axis=1, dtype=np.float64)
        want = np.minimum((cumulative <= (draws * cumulative[:, -1])[:, None]).sum(axis=1), vocab - 1)
        assert (_inverse_cdf(weights, draws) == want).all()


def test_alternatives_are_the_best_first_without_excluded_tokens() -> None:
    assert [t for t, _ in top_alternatives(ROW[0], 2)] == [0, 1]
    assert [t for t, _ in top_alternatives(ROW[0], 2, exclude=[0])] == [1, 2]

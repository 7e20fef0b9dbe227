"""Sampling: distributions, each setting against transformers' own logits processors, per-row independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptoss_jax.sampling import SamplingParams, filter_logits, penalize, row_keys, sample


def params(batch, **kw):
    return SamplingParams.create(batch, **kw)


def test_sample_distribution_temperature_top_k_top_p_min_p():
    """Frequencies of 40000 draws against the renormalised target distribution of each setting."""
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    n = 40000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (n, 5))
    cases = {
        (1.0, 0, 1.0, 0.0): p,
        (0.5, 0, 1.0, 0.0): p**2 / (p**2).sum(),
        (1.0, 2, 1.0, 0.0): np.r_[p[:2], 0, 0, 0] / p[:2].sum(),
        (1.0, 0, 0.8, 0.0): np.r_[p[:3], 0, 0] / p[:3].sum(),  # smallest prefix reaching 0.8 is 0.4+0.3+0.15
        (1.0, 0, 1.0, 0.3): np.r_[p[:3], 0, 0] / p[:3].sum(),  # 0.3 * 0.4 = 0.12: 0.15 stays, 0.1 goes
    }
    for i, ((temp, k, top_p, min_p), want) in enumerate(cases.items()):
        sp = params(n, temperature=temp, top_k=k, top_p=top_p, min_p=min_p)
        draws = jax.jit(sample)(logits, row_keys(i, n), sp)
        freq = np.bincount(np.asarray(draws), minlength=5) / n
        np.testing.assert_allclose(freq, want, atol=0.012, err_msg=f"{temp=} {k=} {top_p=} {min_p=}")
    greedy = sample(logits[:3], row_keys(0, 3), params(3, temperature=1.0), greedy=True)
    assert np.asarray(greedy).tolist() == [0, 0, 0]
    zero_t = sample(logits[:3], row_keys(0, 3), params(3, temperature=0.0))  # temperature 0: argmax per row
    assert np.asarray(zero_t).tolist() == [0, 0, 0]


def hf_warped(logits: np.ndarray, *, temperature, top_k, top_p, min_p) -> np.ndarray:
    """transformers' warpers in the order its `generate` applies them."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.from_numpy(logits.copy())
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    for w in warpers:
        scores = w(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(0.7, 0, 1.0, 0.0), (1.0, 50, 1.0, 0.0),
                         (1.3, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (0.8, 40, 0.95, 0.02), (1.0, 7, 0.5, 0.2)])  # fmt: skip
def test_filters_match_transformers_warpers(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(top_k + int(100 * top_p)).standard_normal((4, 500)).astype(np.float32) * 3
    want = hf_warped(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sp = params(4, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = np.asarray(filter_logits(jnp.asarray(logits), sp))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))  # the same tokens survive
    assert 0 < np.isfinite(got).sum() < got.size or (top_k == 0 and top_p == 1.0 and min_p == 0)
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 300)).astype(np.float32) * 4
    history = [rng.integers(0, 300, 40), rng.integers(0, 300, 7)]
    seen = np.zeros((2, 300), bool)
    for b, h in enumerate(history):
        seen[b, h] = True
    for penalty in (1.3, 0.8):
        got = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(seen), jnp.full((2,), penalty)))
        for b, h in enumerate(history):
            want = RepetitionPenaltyLogitsProcessor(penalty)(torch.as_tensor(h[None]), torch.from_numpy(logits[b : b + 1]))
            np.testing.assert_allclose(got[b], want.numpy()[0], rtol=1e-6)
    assert (got != logits).any(axis=1).all()


def test_rows_sample_independently_with_their_own_settings_and_seeds():
    """A row's draw depends only on its own logits, settings and seed: mixing rows changes nothing."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((3, 200)).astype(np.float32))
    settings = [dict(temperature=0.9, top_k=20), dict(temperature=0.0), dict(temperature=1.2, top_p=0.8, min_p=0.01)]
    seeds = [11, 12, 13]
    both = params(3, **{k: [s.get(k, d) for s in settings] for k, d in
                        (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))})  # fmt: skip
    batch = np.asarray(sample(logits, row_keys(seeds, 3), both))
    for b in range(3):
        alone = sample(logits[b : b + 1], row_keys([seeds[b]], 1), params(1, **settings[b]))
        assert int(alone[0]) == int(batch[b])
    assert int(batch[1]) == int(jnp.argmax(logits[1]))


@pytest.mark.parametrize("bad, msg", [(dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
                                      (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                                      (dict(top_k=2.5), "top_k"), (dict(min_p=2.0), "min_p"),
                                      (dict(repetition_penalty=0.0), "repetition_penalty"),
                                      (dict(temperature=float("nan")), "temperature")])  # fmt: skip
def test_bad_settings_name_themselves(bad, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams.create(2, **bad)


def test_seeds():
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        row_keys(2**70, 1)
    with pytest.raises(ValueError, match="one per prompt"):
        row_keys([1, 2, 3], 2)
    assert row_keys(2**62, 2).shape == (2,)

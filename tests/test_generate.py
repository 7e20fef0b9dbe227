"""KV-cached generation against full recompute and against transformers' greedy `generate`.

The tiny checkpoint has a window of 8 and a 45-token prompt, so the prompt is longer than the window and the
sliding layers' ring of 8 slots wraps eight times over prompt + 24 new tokens. Prefill runs whole, in chunks
of 16 (longer than the window) and in chunks of 5 (shorter than it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import hf_model, our_model

import gptoss_jax

NEW = 24
PROMPT_LEN = 45


@pytest.fixture(scope="module")
def model(hf_ckpt):
    return our_model(hf_ckpt)


@pytest.fixture(scope="module")
def prompt(tiny_cfg):
    return np.random.default_rng(21).integers(0, tiny_cfg.vocab_size, PROMPT_LEN).tolist()


@pytest.fixture(scope="module")
def prompts3(prompt, tiny_cfg):
    rng = np.random.default_rng(22)
    return [prompt, rng.integers(0, tiny_cfg.vocab_size, 30).tolist(), rng.integers(0, tiny_cfg.vocab_size, 19).tolist()]


def greedy_full_recompute(model, prompt, n) -> list[int]:
    """argmax of model(tokens) step by step, no cache.

    The sequence is held in a buffer of its final length so one compiled forward serves every step; the
    filler after position t cannot reach the logits at t (causal), which the logits tests check against HF.
    """
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    for t in range(len(prompt), buf.shape[1]):
        buf[0, t] = int(np.argmax(np.asarray(model(buf))[0, t - 1]))
    return buf[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def reference(model, prompt):
    ref = greedy_full_recompute(model, prompt, NEW)
    assert len(set(ref)) > NEW // 2  # not a degenerate repeat: a wrong cache would show
    return ref


@pytest.mark.parametrize("chunk", [None, 16, 5], ids=["whole", "chunk16", "chunk5"])
def test_greedy_cache_equals_full_recompute(chunk, hf_ckpt, tiny_cfg, prompt, reference):
    m = our_model(hf_ckpt) if chunk is None else our_model(hf_ckpt, prefill_chunk=chunk)
    assert PROMPT_LEN > tiny_cfg.sliding_window and (PROMPT_LEN + NEW) // tiny_cfg.sliding_window >= 8
    if chunk is not None:
        assert m.cfg.prefill_chunk == chunk < PROMPT_LEN
    assert gptoss_jax.generate(m, prompt, max_new_tokens=NEW) == [reference]


def test_greedy_matches_hf_generate(hf_ckpt, prompt, reference):
    """transformers' own KV-cached greedy decoding (its sliding layers keep window-1 past keys: exact)."""
    hf = hf_model(hf_ckpt)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0)  # fmt: skip
    assert out[0, PROMPT_LEN:].tolist() == reference


def test_mixed_length_batch_equals_single_runs(model, prompts3):
    assert len({len(p) for p in prompts3}) == 3
    batch = gptoss_jax.generate(model, prompts3, max_new_tokens=NEW)
    singles = [gptoss_jax.generate(model, p, max_new_tokens=NEW)[0] for p in prompts3]
    assert batch == singles
    assert len({tuple(r) for r in batch}) == 3


# ------------------------------------------------------------------------------------------- sampling
def test_sampling_same_seed_same_tokens_other_seed_differs(model, prompt, reference):
    a = gptoss_jax.generate(model, prompt, max_new_tokens=NEW, temperature=1.0, seed=0)
    b = gptoss_jax.generate(model, prompt, max_new_tokens=NEW, temperature=1.0, seed=0)
    c = gptoss_jax.generate(model, prompt, max_new_tokens=NEW, temperature=1.0, seed=1)
    assert a == b
    assert a != c  # 24 draws from a random model's broad distributions: equal only by a ~0 chance
    assert a[0] != reference


def test_top_k_1_and_tiny_top_p_equal_greedy(model, prompt, reference):
    assert gptoss_jax.generate(model, prompt, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=4) == [reference]
    assert gptoss_jax.generate(model, prompt, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=4) == [reference]


# ------------------------------------------------------------------------------------------ streaming
def test_stream_yields_the_generated_tokens(model, prompt, reference):
    steps = list(gptoss_jax.stream(model, prompt, max_new_tokens=NEW))
    assert all(len(s) == 1 for s in steps)
    assert [s[0] for s in steps] == reference
    kw = dict(max_new_tokens=NEW, temperature=1.0, seed=3)
    assert [s[0] for s in gptoss_jax.stream(model, prompt, **kw)] == gptoss_jax.generate(model, prompt, **kw)[0]


def test_stream_propagates_errors(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(gptoss_jax.stream(model, [1, 2, model.cfg.vocab_size]))


# ------------------------------------------------------------------------------------------ stop tokens
def test_stop_token_ends_its_row(model, prompts3):
    full = gptoss_jax.generate(model, prompts3, max_new_tokens=NEW)
    # a token row 0 produces at step i >= 2 (not earlier), and rows 1 and 2 never produce
    i, stop = next((i, t) for i, t in enumerate(full[0]) if i >= 2 and t not in full[0][:i]
                   and t not in full[1] and t not in full[2])  # fmt: skip
    out = gptoss_jax.generate(model, prompts3, max_new_tokens=NEW, stop_tokens=[stop])
    assert out == [full[0][: i + 1], full[1], full[2]]


def test_stop_token_ends_generation_and_stream(model, prompt, reference):
    i = 5
    stop = reference[i]
    first = reference.index(stop)
    assert gptoss_jax.generate(model, prompt, max_new_tokens=NEW, stop_tokens=[stop]) == [reference[: first + 1]]
    steps = list(gptoss_jax.stream(model, prompt, max_new_tokens=NEW, stop_tokens=[stop]))
    assert [s[0] for s in steps] == reference[: first + 1]

"""The per-row KV cache: rows at different positions, reset and refilled mid-way, each exactly as alone."""

from __future__ import annotations

import functools

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import our_model

import gptoss_jax
from gptoss_jax.cache import KVCache, cache_bytes
from gptoss_jax.model import forward, logits


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(graphdef, state, tokens, cache, n_new):
    """Feeds row b its next n_new[b] tokens (0: the row idles); returns each row's logits at its last one."""
    model = nnx.merge(graphdef, state)
    h, cache = forward(model, tokens, cache.chunk_positions(n_new, tokens.shape[1]), cache)
    at = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(logits(model, at), -1), cache


class Rows:
    """Drives a KVCache row by row: each row prefills its prompt in chunks, then decodes greedily."""

    def __init__(self, model, batch, length, chunk):
        self.graphdef, self.state = nnx.split(model)
        self.cache = KVCache.create(model.cfg, batch, length)
        self.chunk = chunk
        self.todo = [[] for _ in range(batch)]  # prompt tokens not yet fed
        self.next = [None] * batch  # the token the row feeds next when decoding
        self.out = [[] for _ in range(batch)]

    def start(self, b, prompt):
        self.cache = self.cache.reset(jnp.arange(self.cache.batch) == b)
        self.todo[b], self.next[b], self.out[b] = list(prompt), None, []

    def step(self, active):
        B = self.cache.batch
        toks = np.zeros((B, self.chunk), np.int32)
        n = np.zeros(B, np.int32)
        for b in active:
            if self.todo[b]:
                take = self.todo[b][: self.chunk]
                self.todo[b] = self.todo[b][self.chunk :]
                toks[b, : len(take)], n[b] = take, len(take)
            else:
                toks[b, 0], n[b] = self.next[b], 1
        nxt, self.cache = _step(self.graphdef, self.state, jnp.asarray(toks), self.cache, jnp.asarray(n))
        for b in active:
            if not self.todo[b]:  # the row's last prompt token (or its decode token) was fed: a new token
                self.next[b] = int(nxt[b])
                self.out[b].append(self.next[b])


@pytest.mark.parametrize("chunk", [5, 16])
def test_rows_at_different_positions_each_equal_alone(hf_ckpt, tiny_cfg, chunk):
    """Row 0 starts at once, row 1 later, row 2 later still; row 1 is reset mid-decode and refilled with
    another prompt. Each row's tokens equal `generate` on its prompt alone (float32, greedy); the window of 8
    wraps many times and the chunks are shorter and longer than it."""
    model = our_model(hf_ckpt)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, tiny_cfg.vocab_size, n).tolist() for n in (23, 11, 30, 17)]
    rows = Rows(model, 3, 96, chunk)
    rows.start(0, prompts[0])
    for _ in range(3):
        rows.step([0])
    rows.start(1, prompts[1])
    for _ in range(4):
        rows.step([0, 1])
    rows.start(2, prompts[2])
    for _ in range(5):
        rows.step([0, 1, 2])
    first_of_1 = list(rows.out[1])
    rows.start(1, prompts[3])  # reset row 1 and refill it while rows 0 and 2 keep decoding
    for _ in range(12):
        rows.step([0, 1, 2])
    for b, p in ((0, prompts[0]), (1, prompts[3]), (2, prompts[2])):
        want = gptoss_jax.generate(model, p, max_new_tokens=len(rows.out[b]), stop_tokens=())[0]
        assert rows.out[b] == want, b
        assert len(rows.out[b]) >= 6
    assert first_of_1 == gptoss_jax.generate(model, prompts[1], max_new_tokens=len(first_of_1), stop_tokens=())[0]
    lengths = np.asarray(rows.cache.lengths)
    assert lengths[0] != lengths[1] != lengths[2]  # the rows really sit at different positions


def test_layout_and_bytes(tiny_cfg):
    cache = KVCache.create(tiny_cfg, 3, 50)
    R, K, H, W = tiny_cfg.layer_repeats, tiny_cfg.num_key_value_heads, tiny_cfg.head_dim, tiny_cfg.sliding_window
    assert tiny_cfg.layer_unit == (True, False)
    assert cache.k[0].shape == (R, 3, W, K, H) and cache.k[1].shape == (R, 3, 50, K, H)  # ring, then full
    assert sum(a.nbytes for a in jax.tree.leaves(cache)) == cache_bytes(tiny_cfg, 3, 50)
    assert np.asarray(cache.lengths).tolist() == [0, 0, 0] and (np.asarray(cache.full_pos) == -1).all()
    pos = cache.chunk_positions(jnp.asarray([2, 0, 3]), 4)
    assert np.asarray(pos).tolist() == [[0, 1, -1, -1], [-1] * 4, [0, 1, 2, -1]]

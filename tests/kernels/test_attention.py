"""Attention kernels vs `attention_reference` on random inputs, in Pallas interpret mode on CPU.

Both lowerings are interpreted: "tpu" (Mosaic: scalar-prefetched kv ranges drive the BlockSpecs) and "gpu"
(Triton: per-program dynamic kv loops, split-kv decode combined outside the kernel). Tiny blocks (4-16) make
short sequences span several q and kv blocks, so the range/skip logic runs: lengths shorter than, equal to
and not a multiple of the window (8) and the block sizes; GQA with K != G; large sinks (dominate the
softmax), small sinks (vanish); left padding (negative q_pos / k_pos); a decode ring buffer (unsorted k_pos
with -1 empty slots).

Tolerances (relative Frobenius norm of the difference):
- float32: both sides do f32 matmuls (Precision.HIGHEST) and an f32 softmax; only the summation order differs
  (online vs two-pass softmax), ~1e-7 relative per op -> 2e-5 leaves room and still catches any wrong mask,
  which moves an output by about one key's weight (>= 1/window ~ 0.1).
- bfloat16: the reference rounds the q.k logits to bf16 as the torch model does, the kernel keeps them in
  f32 (logits ~ 4 * 2**-9 ~ 1e-2 absolute); both round the softmax weights and the output to bf16 (2**-9
  relative each) -> 2.5e-2, still well below the ~0.1 of a masking or sink error.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import rel_err

from gptoss_jax.kernels import attention as attention_dispatch
from gptoss_jax.kernels import resolve_impl
from gptoss_jax.kernels._common import KernelNotApplicable
from gptoss_jax.kernels.attention import (
    BlockSizes,
    attention_reference,
    decode_attention,
    flash_attention,
    kv_block_ranges,
    visible,
)

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 2.5e-2}
WINDOW = 8


def jit(fn, **static):
    # One compilation per case: interpret-mode kernels run op by op otherwise, which is several times slower.
    return jax.jit(functools.partial(fn, **static))


def qkv(B, T, S, K, G, H, dtype, sink_scale, seed=0):
    kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, K, G, H), F32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), F32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), F32).astype(dtype)
    # sink_scale > 0: sinks ~ sink_scale + N(0,1) (large: the sink dominates the denominator);
    # sink_scale < 0: sinks ~ sink_scale + N(0,1) (small: the sink vanishes).
    sinks = sink_scale + jax.random.normal(ks, (K, G), F32)
    return q, k, v, sinks


def prefill_positions(B, T, pad):
    """Batch row b > 0 is left-padded by `pad` tokens (position -1), as generate() pads shorter prompts."""
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    for b in range(1, B):
        pos[b] = np.arange(T) - pad
        pos[b, :pad] = -1
    return jnp.asarray(pos)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    K: int
    G: int
    H: int
    window: int
    block_q: int
    block_k: int
    dtype: object
    sink_scale: float
    pad: int = 0

    def __str__(self):
        return (f"B{self.B}-T{self.T}-K{self.K}G{self.G}H{self.H}-w{self.window}"
                f"-bq{self.block_q}bk{self.block_k}-{jnp.dtype(self.dtype).name}"
                f"-sink{self.sink_scale:+g}-pad{self.pad}")  # fmt: skip


PREFILL = [
    # backend, case
    ("tpu", Case(1, 5, 2, 3, 16, 0, 8, 8, F32, 0.0)),  # T shorter than every block, causal only
    ("tpu", Case(2, 8, 2, 3, 16, WINDOW, 8, 8, BF16, 0.0)),  # T == window == block
    ("tpu", Case(2, 37, 2, 3, 16, WINDOW, 8, 8, F32, 6.0, pad=3)),  # sliding skip (bounded grid), large sinks
    ("tpu", Case(2, 21, 1, 4, 32, 0, 4, 8, BF16, -6.0, pad=5)),  # T no multiple of blocks; MQA; small sinks
    ("tpu", Case(1, 19, 3, 2, 16, WINDOW, 4, 16, F32, 1.0)),  # window > block_q; 3 kv heads; partial block
    ("gpu", Case(2, 37, 2, 3, 16, WINDOW, 8, 16, F32, 6.0, pad=3)),  # Triton: G=3 padded to 4, sliding
    ("gpu", Case(1, 5, 2, 3, 16, 0, 8, 16, BF16, -6.0)),  # Triton: T < block, causal
]


@pytest.mark.parametrize("backend,c", PREFILL, ids=[f"{b}-{c}" for b, c in PREFILL])
def test_flash_attention_matches_reference(backend, c: Case):
    q, k, v, sinks = qkv(c.B, c.T, c.T, c.K, c.G, c.H, c.dtype, c.sink_scale)
    pos = prefill_positions(c.B, c.T, c.pad)
    bs = BlockSizes(block_q=c.block_q, block_k=c.block_k)
    kw = dict(window=c.window, sm_scale=c.H**-0.5)
    kernel = jit(flash_attention, block_sizes=bs, backend=backend, interpret=True, **kw)
    got = kernel(q, k, v, sinks, pos, pos)
    want = jit(attention_reference, **kw)(q, k, v, sinks, pos, pos)
    assert got.shape == want.shape and got.dtype == c.dtype
    assert rel_err(got, want) < TOL[c.dtype]
    if c.pad:  # padding queries see no key: only the sink, so their output is exactly zero
        assert not np.any(np.asarray(got[1:, : c.pad], np.float32))


def ring_cache(B, W, T, index, S_extra=0):
    """k_pos of a sliding layer's attention during decode: the W-slot ring (slot = pos % W, -1 = empty)
    followed by the T new tokens, as model.cache_attend_update builds it. Row b has seen index[b] tokens."""
    rows = []
    for b in range(B):
        ring = -np.ones(W, np.int32)
        for p in range(max(0, index[b] - W), index[b]):
            ring[p % W] = p
        rows.append(np.concatenate([ring, np.arange(index[b], index[b] + T), -np.ones(S_extra, np.int32)]))
    return jnp.asarray(np.stack(rows).astype(np.int32))


def full_cache(B, S, T, index):
    """k_pos of a full layer's cache: slots [0, index+T) filled in order, the rest empty (-1)."""
    pos = -np.ones((B, S), np.int32)
    for b in range(B):
        pos[b, : index[b] + T] = np.arange(index[b] + T)
    return jnp.asarray(pos)


DECODE = [
    # backend, kernel, dtype, T (queries), layer kind, block_k_decode, num_splits
    ("tpu", "decode", F32, 1, "ring", 4, 1),  # ring buffer: unsorted positions, empty slots in row 0
    ("tpu", "decode", BF16, 3, "full", 8, 1),  # a 3-token chunk over a 21-slot cache (not a multiple of 8)
    ("gpu", "decode", F32, 1, "ring", 16, 2),  # Triton flash-decoding: 2 splits, sinks joined in the combine
    ("gpu", "decode", BF16, 2, "full", 16, 2),
    # A 10-token prefill chunk over ring + chunk (prefill_chunk < prompt): unsorted keys exceed the bounded
    # sliding grid, so the TPU kernel must take its full-length branch; Triton visits a superset range.
    ("tpu", "flash", F32, 10, "ring", 0, 1),
    ("gpu", "flash", BF16, 10, "ring", 0, 1),
]


DECODE_IDS = [f"{d[0]}-{d[1]}-{jnp.dtype(d[2]).name}-T{d[3]}-{d[4]}" for d in DECODE]


@pytest.mark.parametrize("backend,kernel,dtype,T,kind,bk,splits", DECODE, ids=DECODE_IDS)
def test_cache_attention_matches_reference(backend, kernel, dtype, T, kind, bk, splits):
    B, K, G, H = 2, 2, 3, 16
    index = [3, 13]  # row 0: ring not yet full (empty slots); row 1: wrapped around (positions unsorted)
    if kind == "ring":
        window, k_pos = WINDOW, ring_cache(B, WINDOW, T, index)
    else:
        window, k_pos = 0, full_cache(B, 21, T, index)
    S = k_pos.shape[1]
    q, k, v, sinks = qkv(B, T, S, K, G, H, dtype, sink_scale=1.0, seed=1)
    q_pos = jnp.asarray(np.stack([np.arange(i, i + T) for i in index]).astype(np.int32))
    if kernel == "decode":
        fn, bs = decode_attention, BlockSizes(block_k_decode=bk, num_splits=splits)
    else:
        fn, bs = flash_attention, BlockSizes(block_q=4, block_k=4 if backend == "tpu" else 16)
    kw = dict(window=window, sm_scale=H**-0.5)
    got = jit(fn, block_sizes=bs, backend=backend, interpret=True, **kw)(q, k, v, sinks, q_pos, k_pos)
    want = jit(attention_reference, **kw)(q, k, v, sinks, q_pos, k_pos)
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype]


def test_reference_is_the_sink_softmax():
    """The oracle itself, against a direct numpy softmax with the sink as an extra column (f32, tiny)."""
    B, T, K, G, H = 1, 6, 2, 2, 8
    q, k, v, sinks = qkv(B, T, T, K, G, H, F32, sink_scale=0.5, seed=2)
    pos = prefill_positions(B, T, 0)
    got = np.asarray(jit(attention_reference, window=3, sm_scale=0.3)(q, k, v, sinks, pos, pos))
    qn, kn, vn, sn = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    for t in range(T):
        keys = [s for s in range(T) if t - 3 < s <= t]  # window 3 including the current token
        for kh in range(K):
            for g in range(G):
                logits = np.array([qn[0, t, kh, g] @ kn[0, s, kh] * 0.3 for s in keys] + [sn[kh, g]])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                want = sum(w[i] * vn[0, s, kh] for i, s in enumerate(keys))
                np.testing.assert_allclose(got[0, t, kh, g], want, rtol=1e-5, atol=1e-6)
    assert np.asarray(visible(pos, pos, 3)).sum() == 15  # 1 + 2 + 3 + 3 + 3 + 3 visible pairs


def test_kv_block_ranges_skip_blocks_outside_the_window():
    """Sliding prefill of 64 tokens in blocks of 8: each q block visits only the <= 2 kv blocks it can see."""
    pos = prefill_positions(1, 64, 0)
    lo, cnt = kv_block_ranges(pos, pos, block_q=8, block_k=8, window=8)
    np.testing.assert_array_equal(np.asarray(lo[0]), [0, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(np.asarray(cnt[0]), [1, 2, 2, 2, 2, 2, 2, 2])
    lo, cnt = kv_block_ranges(pos, pos, block_q=8, block_k=8, window=0)  # causal: every block to the diagonal
    np.testing.assert_array_equal(np.asarray(cnt[0]), np.arange(1, 9))
    padded = prefill_positions(2, 16, 12)  # row 1: 12 pad tokens; its first q block has no valid query
    lo, cnt = kv_block_ranges(padded, padded, block_q=8, block_k=8, window=8)
    np.testing.assert_array_equal(np.asarray(cnt[1]), [0, 1])


def test_dispatcher_and_auto():
    """"auto" is XLA until a backend is validated (test_model_pallas runs impl="pallas" through it)."""
    assert resolve_impl("auto", "cpu") == resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "xla"
    assert resolve_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="unknown impl"):
        resolve_impl("triton")
    B, T, K, G, H = 1, 12, 2, 3, 16
    q, k, v, sinks = qkv(B, T, T, K, G, H, F32, sink_scale=0.0, seed=3)
    pos = prefill_positions(B, T, 0)
    kw = dict(window=WINDOW, sm_scale=0.25)
    want = jit(attention_reference, **kw)(q, k, v, sinks, pos, pos)
    np.testing.assert_array_equal(jit(attention_dispatch, impl="auto", **kw)(q, k, v, sinks, pos, pos), want)


def test_untileable_blocks_raise_for_compiled_tpu():
    """Mosaic needs kv blocks of 128 lanes; asked to compile (interpret=False) with 8 the kernel refuses at
    trace time, which is what lets the dispatcher fall back to the reference instead of failing to lower."""
    q, k, v, sinks = qkv(1, 24, 24, 2, 3, 16, F32, 0.0)
    pos = prefill_positions(1, 24, 0)
    with pytest.raises(KernelNotApplicable):
        fn = jit(flash_attention, window=0, sm_scale=0.25, block_sizes=BlockSizes(8, 8), backend="tpu",
                 interpret=False)  # fmt: skip
        jax.eval_shape(fn, q, k, v, sinks, pos, pos)

"""Ragged paged attention: the XLA path and both Pallas kernels (interpreted on CPU) against the dense
reference, over rows of different lengths, decode rows (one query) and chunks, full and sliding windows,
short sliding tables that start past page 0, pages scattered over the pool, and padding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.kernels.paged_attention import (
    BlockSizes,
    paged_attention,
    paged_attention_pallas,
    paged_attention_reference,
    paged_attention_xla,
    work_ranges,
)

R, P, PAGE, K, G, H = 2, 64, 4, 2, 3, 8  # distinct sizes: a swapped axis cannot pass


def case(T: int, window: int, dtype, seed: int = 0, short: bool = False):
    """Four rows of lengths 13, 1, 30 and 0 (padding), each fed its last min(T, length) tokens; pages drawn
    at random from the pool. short: each row's table starts at the first page its window needs."""
    rng = np.random.default_rng(seed)
    lens = np.array([13, 1, 30, 0])
    n = np.minimum(T, lens)
    q_pos = np.full((4, T), -1)
    for b in range(4):
        q_pos[b, : n[b]] = np.arange(lens[b] - n[b], lens[b])
    NB = 10
    first = np.zeros(4, np.int32)
    if short and window:
        first = np.maximum(0, lens - n - window + 1) // PAGE
    table = np.full((4, NB), P, np.int32)  # P: no page
    ids = rng.permutation(P)
    for b in range(4):
        used = -(-lens[b] // PAGE) - first[b]
        table[b, :used] = ids[b * 16 : b * 16 + used]
    pool = lambda: jnp.asarray(rng.standard_normal((R, P, PAGE, K, H)), dtype)  # noqa: E731
    return (jnp.asarray(rng.standard_normal((4, T, K, G, H)), dtype), pool(), pool(), 1,
            jnp.asarray(rng.standard_normal((K, G)), jnp.float32), jnp.asarray(q_pos, jnp.int32),
            jnp.asarray(table), jnp.asarray(lens, jnp.int32)), jnp.asarray(first), q_pos >= 0  # fmt: skip


def close(got, want, valid, dtype):
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    m = valid[..., None, None, None]
    np.testing.assert_allclose(np.where(m, np.asarray(got, np.float32), 0), np.where(m, np.asarray(want, np.float32), 0),
                               rtol=tol, atol=tol)  # fmt: skip


GRID = [(T, window, short) for T in (1, 7) for window in (0, 5) for short in (False, True) if window or not short]


@pytest.mark.parametrize("T, window, short", GRID)
@pytest.mark.parametrize("bs", [BlockSizes(block_pages=2, block_q=3, decode_items=3, prefill_items=2), BlockSizes()])
def test_xla_path_equals_reference(T, window, short, bs):
    args, first, valid = case(T, window, jnp.float32, short=short)
    want = paged_attention_reference(*args, window=window, sm_scale=0.3, first=first)
    close(paged_attention_xla(*args, window=window, sm_scale=0.3, first=first, block_sizes=bs), want, valid,
          jnp.float32)  # fmt: skip


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("T, window, short", GRID)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernels_equal_reference(backend, T, window, short, dtype):
    args, first, valid = case(T, window, dtype, seed=1, short=short)
    want = paged_attention_reference(*args, window=window, sm_scale=0.3, first=first)
    bs = BlockSizes(block_pages=2, block_q=3) if backend == "tpu" else BlockSizes(block_pages=1, block_q=4)
    got = paged_attention_pallas(*args, window=window, sm_scale=0.3, first=first, block_sizes=bs,
                                 backend=backend, interpret=True)  # fmt: skip
    close(got, want, valid, dtype)


def test_dispatcher_runs_the_kernel_or_the_xla_path():
    args, first, valid = case(7, 5, jnp.float32, seed=2, short=True)
    want = paged_attention_reference(*args, window=5, sm_scale=0.3, first=first)
    for impl in ("xla", "pallas", "auto"):
        close(paged_attention(*args, window=5, sm_scale=0.3, first=first, impl=impl), want, valid, jnp.float32)


def test_work_follows_each_rows_own_length():
    """Decode rows at 1k and 100k tokens: the 1k row visits 1k / block keys, not 100k; on a sliding layer
    of window 128 every row visits at most two 128-key blocks."""
    q_pos = jnp.asarray([[999], [99_999]], jnp.int32)
    kv_len = jnp.asarray([1000, 100_000], jnp.int32)
    zero = jnp.zeros(2, jnp.int32)
    lo, count = work_ranges(q_pos, kv_len, zero, block_q=1, block_k=128, page=16, window=0)
    assert np.asarray(count)[:, 0].tolist() == [8, 782] and np.asarray(lo).max() == 0
    lo, count = work_ranges(q_pos, kv_len, zero, block_q=1, block_k=128, page=16, window=128)
    assert np.asarray(count).max() <= 2 and np.asarray(lo)[:, 0].tolist() == [6, 780]

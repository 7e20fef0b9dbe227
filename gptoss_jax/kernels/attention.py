"""gpt-oss attention (spec §2.4): learned sinks, causal + sliding-window masks from positions, GQA.

Features
- `attention_reference`: plain jnp, dense: the numerical oracle. Logits rounded to the
  model dtype as the torch reference's matmul returns them, softmax in f32; the per-head sink is one extra
  softmax column that joins the max and the denominator but has no value vector, so the weights sum to < 1.
- `flash_attention` (prefill): FlashAttention-2 online softmax whose running max / denominator start at the
  sink (m = sink, l = exp(sink - m) = 1). The G query heads of a kv head are one tile of rows (no K/V repeat).
  Every q block visits only the kv blocks its positions can see (`kv_block_ranges`), so a sliding layer costs
  O(T * window), not O(T^2).
- `decode_attention` (few queries over a KV cache): masks by `k_pos`, never by slot order, because a sliding
  layer's cache is a ring buffer (slot = pos % window) whose positions are not sorted; empty slots (pos < 0)
  and blocks past the filled part are skipped.
- `attention_probs`: the same softmax for chosen queries, with the sink's share as a last column: what
  `inspect.Probe(attention=True)` captures.
- `attention_xla`: the model's XLA path: the reference over blocks of queries (bounded memory), and on
  sliding layers over only the keys each block can see (work O(T * window)); over many keys, an online
  softmax over only the key blocks each query block can see (`_kv_blocked`: the causal triangle of a full
  layer, the filled part of a cache).
- `attention`: the dispatcher the model calls (impl "xla" | "pallas" | "auto"), falling back to the XLA path
  where a kernel does not apply.

Two lowerings of the same math:
- TPU (Mosaic): the kv range of every q block is scalar-prefetched into SMEM and drives the K/V BlockSpec
  index maps, so skipped kv steps issue no DMA and no compute. The kv grid axis has a static length; for
  sliding layers a tight bound (contiguous positions) is used with a `lax.cond` fallback to the full length,
  so the bound is an optimisation, never an assumption.
- GPU (Triton): the Triton backend has no scalar prefetch, so each program loops over its own kv range with
  dynamic bounds and masked loads; decode splits the kv range over programs (flash-decoding) and combines the
  partial softmax states, sink included, outside the kernel.

Conventions: q (B, T, K, G, H) with query head n = k*G + g; k/v (B, S, K, H); sinks (K, G); positions (B, T)
and (B, S) int32, negative = padding. Key s is visible to query t iff
    0 <= k_pos[s] <= q_pos[t]  and  (window == 0 or k_pos[s] > q_pos[t] - window)
(window keys INCLUDING the current one, spec §8.2).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from gptoss_jax.kernels._common import (
    SQUEEZED,
    KernelNotApplicable,
    cdiv,
    is_pow2,
    kernel_platform,
    next_pow2,
    pad_axis,
    resolve_impl,
    round_up,
)
from gptoss_jax.ops import precision

# Finite "minus infinity" for masked logits: with a finite running max it gives exp(NEG - m) == 0 and never
# the NaN that (-inf) - (-inf) would.
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. `block_q` counts query TOKENS; a tile holds block_q * G query rows (all heads of a kv
    head).

    TPU: rows and keys sit on the (8, 128) tiling; key blocks must be multiples of 128 (the k_pos block is a
    lane vector) unless one block covers the whole sequence. GPU (Triton): every tile dim must be a power of
    two, and tl.dot wants >= 16 rows; G is padded to a power of two.
    """

    block_q: int = 64
    block_k: int = 128
    block_k_decode: int = 512
    decode_max_q: int = 8  # T <= this uses the decode kernel
    num_splits: int = 1  # decode: kv splits run in parallel and combined afterwards (GPU)
    num_warps: int = 4  # Triton only
    num_stages: int = 2  # Triton only

    @classmethod
    def tpu(cls) -> BlockSizes:
        # 64 tokens x G=8 heads = 512 rows per tile: s is 512x128 f32 (256 KiB), acc 512x64 f32.
        return cls(block_q=64, block_k=128, block_k_decode=512, decode_max_q=8)

    @classmethod
    def gpu(cls) -> BlockSizes:
        # 16 tokens x 8 heads = 128 rows, 64 keys: the shape of the gpt-oss triton kernel (BLOCK_M = BLOCK_N =
        # 64 over flattened rows). Decode splits the cache 16 ways so B*K programs fill an H100's SMs.
        return cls(block_q=16, block_k=64, block_k_decode=128, decode_max_q=8, num_splits=16,
                   num_warps=4, num_stages=2)

    @classmethod
    def for_backend(cls, backend: str) -> BlockSizes:
        return cls.gpu() if backend == "gpu" else cls.tpu()


# ============================================================================================== reference
def visible_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """Broadcasting positions, e.g. (..., T, 1) x (..., 1, S) -> bool visibility. Negative = empty/padding.

    The window holds `window` keys INCLUDING the current one: keys q-window+1 .. q.
    """
    vis = (k_pos >= 0) & (k_pos <= q_pos)
    if window:
        vis = vis & (k_pos > q_pos - window)
    return vis


def qk_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q (B,T,K,G,H) . k (B,S,K,H) -> float32 logits (B,K,G,T,S), unscaled, in the inputs' precision.

    The operands are put in the batched-matmul layout first (batch B,K; rows G*T; keys S): XLA:CPU runs a
    dot whose batch axes are not leading with a generic loop emitter, 2-5x slower than the same product on
    transposed operands (measured at 512 queries x 2048 keys on an Intel Xeon; docs/benchmarks.md). The
    result is bit-identical: each logit is the same 64-term dot product.
    """
    return jnp.einsum("BKGTH,BKSH->BKGTS", jnp.moveaxis(q, 1, 3), jnp.moveaxis(k, 1, 2),
                      preferred_element_type=jnp.float32, precision=precision(q.dtype))  # fmt: skip


def weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """Weights p (B,K,G,T,S) . values v (B,S,K,H) -> float32 (B,T,K,G,H), in the batched-matmul layout
    (`qk_scores`)."""
    out = jnp.einsum("BKGTS,BKSH->BKGTH", p, jnp.moveaxis(v, 1, 2), preferred_element_type=jnp.float32,
                     precision=precision(p.dtype))  # fmt: skip
    return jnp.moveaxis(out, 3, 1)


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """(B, T), (B, S) positions -> (B, T, S) bool."""
    return visible_mask(q_pos[:, :, None], k_pos[:, None, :], window)


def _sink_softmax(q, k, sinks, q_pos, k_pos, *, window: int, sm_scale: float):
    """The softmax of attention with sinks, in f32: (weights of the keys (B,K,G,T,S), the sink's share
    (B,K,G,T,1)). Logits come back in the model dtype (a bf16 matmul in the torch reference); the sink is one
    extra softmax column with no value, so the keys' weights sum to < 1."""
    dtype, f32 = q.dtype, jnp.float32
    s = qk_scores(q, k).astype(dtype).astype(f32) * sm_scale
    s = jnp.where(visible(q_pos, k_pos, window)[:, None, None], s, -jnp.inf)
    sink = jnp.broadcast_to(sinks.astype(f32)[None, :, :, None, None], s.shape[:-1] + (1,))
    m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), sink)  # finite even for a row that sees no key
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m)
    return e / denom, jnp.exp(sink - m) / denom


def attention_reference(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float) -> jax.Array:
    """Dense attention with sinks: the numerical oracle for the kernels and for `attention_xla`, which runs
    it over blocks. q (B,T,K,G,H), k/v (B,S,K,H), sinks (K,G) -> q.dtype (B,T,K,G,H).

    Rounds where the torch reference does: q.k logits in the model dtype, the softmax in f32
    (`_sink_softmax`), its weights cast to the model dtype before W.V.
    """
    dtype = q.dtype
    p, _ = _sink_softmax(q, k, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale)
    return weighted_values(p.astype(dtype), v).astype(dtype)


def attention_probs(q, k, sinks, q_pos, k_pos, *, window: int, sm_scale: float) -> jax.Array:
    """The XLA path's attention probabilities with the sink's share as a last column: q (B,Q,K,G,H) (the
    queries to look at, any subset), k (B,S,K,H) -> float32 (B,K,G,Q,S+1); each row sums to 1. The same
    softmax as `attention_reference` (a row does not depend on the other queries), for `inspect.Probe`."""
    p, sink = _sink_softmax(q, k, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale)
    return jnp.concatenate([p, sink], axis=-1)


# ============================================================================================== XLA path
# Most attention-score elements (B*K*G*queries*keys) the XLA path materializes at once: 2**28 float32 scores are
# 1 GiB (the softmax holds about two such arrays). Long caches get fewer queries per block.
SCORES_BUDGET = 2**28


def _query_blocks(fn, q, q_pos, block: int):
    """fn(q_block, q_pos_block, i) over blocks of `block` queries, sequentially (`lax.map`), so only one
    block's scores exist at a time. Padding queries (position -1) see no key and are dropped."""
    B, T = q.shape[:2]
    n = cdiv(T, block)
    if n == 1:
        return fn(q, q_pos, 0)
    qb = pad_axis(q, 1, n * block).reshape(B, n, block, *q.shape[2:]).swapaxes(0, 1)
    pb = pad_axis(q_pos, 1, n * block, -1).reshape(B, n, block).swapaxes(0, 1)
    out = lax.map(lambda a: fn(a[0], a[1], a[2]), (qb, pb, jnp.arange(n)))
    return out.swapaxes(0, 1).reshape(B, n * block, *q.shape[2:])[:, :T]


def attention_xla(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float, block: int = 512,
                  aligned: int = 0, budget: int = SCORES_BUDGET) -> jax.Array:  # fmt: skip
    """The model's XLA path: `attention_reference` over blocks of queries, with bounded memory and, on sliding
    layers, work bounded by the window.

    Queries go in blocks of at most `block`, fewer when the keys are many (at most `budget` score elements
    per block, at least 8 queries), so `model(tokens)` over a long sequence or a prefill chunk against a long
    cache never materializes all queries x keys scores.

    `aligned` = T says the last T keys are the queries' own tokens in the same order (a prefill chunk, or
    `model(tokens)`), with positions increasing by one along the sequence (padding at either end is fine: it
    is masked). Then on a sliding layer each block of queries computes only the keys it can see: the
    context keys before the chunk (a ring of `window` slots, unordered) plus the `block + window - 1` chunk
    keys that end at the block, so the layer costs O(T * window) rather than O(T^2).
    Each query row is computed as in one `attention_reference` call over all keys.

    More than 8 queries over at least 2 * `KV_BLOCK` keys otherwise (a full layer over a long prompt, a prefill
    chunk against a long cache) go through `_kv_blocked`: work follows the keys each block of queries can see
    (the causal triangle; the filled part of a cache), not the keys' shape.
    """
    B, T = q.shape[:2]
    per_key = B * q.shape[2] * q.shape[3]  # B*K*G scores per (query, key)
    ref = functools.partial(attention_reference, window=window, sm_scale=sm_scale)
    if window and aligned == T and T > window:
        C = k.shape[1] - T  # context keys before the chunk
        W = window
        bq = max(8, min(block, 2 * W, budget // (per_key * (C + 3 * W))))
        n = cdiv(T, bq)
        if n > 1:
            # chunk keys padded in front by W-1 empty slots: block i's visible keys are [i*bq, i*bq + bq + W - 1)
            kc = jnp.pad(k[:, C:], ((0, 0), (W - 1, n * bq - T)) + ((0, 0),) * (k.ndim - 2))
            vc = jnp.pad(v[:, C:], ((0, 0), (W - 1, n * bq - T)) + ((0, 0),) * (v.ndim - 2))
            pc = jnp.pad(k_pos[:, C:], ((0, 0), (W - 1, n * bq - T)), constant_values=-1)
            span = bq + W - 1

            def one(qb, pb, i):
                ks = lax.dynamic_slice_in_dim(kc, i * bq, span, 1)
                vs = lax.dynamic_slice_in_dim(vc, i * bq, span, 1)
                ps = lax.dynamic_slice_in_dim(pc, i * bq, span, 1)
                if C:
                    ks, vs = jnp.concatenate([k[:, :C], ks], 1), jnp.concatenate([v[:, :C], vs], 1)
                    ps = jnp.concatenate([k_pos[:, :C], ps], 1)
                return ref(qb, ks, vs, sinks, pb, ps)

            return _query_blocks(one, q, q_pos, bq)
    if T > 8 and k.shape[1] >= 2 * KV_BLOCK:  # (decoding over a full cache ran 1.5x slower in steps)
        return _kv_blocked(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale,
                           bq=max(8, min(block, budget // (per_key * KV_BLOCK))), bk=KV_BLOCK)  # fmt: skip
    bq = max(1, min(block, max(8, budget // (per_key * k.shape[1]))))
    return _query_blocks(lambda qb, pb, i: ref(qb, k, v, sinks, pb, k_pos), q, q_pos, bq)


# Keys per step of `_kv_blocked`. 512 x 512 scores for the 8 query heads of the CPU
# benchmark model are 8 MiB.
KV_BLOCK = 512


def _kv_blocked(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float, bq: int, bk: int):
    """Attention over many keys: each block of `bq` queries visits only the blocks of `bk` keys its
    positions can see (`kv_block_ranges`, data, not shape: the others are skipped), with the online softmax
    of FlashAttention-2 opened by the sink (m = sink, l = 1).

    So a prefill chunk against a long cache pays for the keys written so far, not the cache's capacity, and a
    full layer of `model(tokens)` pays for the causal triangle, not the square. Rounding as the reference
    where it can: logits in the model dtype, softmax in float32; the weights go into W.V before the division
    by the denominator, so the float32 result differs from `attention_reference` by reassociation only
    (about 1e-7 relative; tests/kernels/test_attention.py).
    """
    B, S = k.shape[:2]
    dtype, f32 = q.dtype, jnp.float32
    nk = cdiv(S, bk)
    kp = pad_axis(k_pos.astype(jnp.int32), 1, nk * bk, -1)
    kt = jnp.moveaxis(pad_axis(k, 1, nk * bk), 1, 2)  # (B, K, S, H): the batched-matmul layout
    vt = jnp.moveaxis(pad_axis(v, 1, nk * bk), 1, 2)

    def one(qb, pb, i):
        lo, count = kv_block_ranges(pb, kp, block_q=pb.shape[1], block_k=bk, window=window)
        start = jnp.min(jnp.where(count > 0, lo, nk))  # the union of the rows' ranges
        stop = jnp.max(jnp.where(count > 0, lo + count, 0))
        qt = jnp.moveaxis(qb, 1, 3)  # (B, K, G, bq, H)
        prec = precision(dtype)

        def step(j, carry):
            m, den, acc = carry
            at = j * bk
            kj, vj = lax.dynamic_slice_in_dim(kt, at, bk, 2), lax.dynamic_slice_in_dim(vt, at, bk, 2)
            s = jnp.einsum("BKGTH,BKSH->BKGTS", qt, kj, preferred_element_type=f32, precision=prec)
            s = s.astype(dtype).astype(f32) * sm_scale
            vis = visible(pb, lax.dynamic_slice_in_dim(kp, at, bk, 1), window)[:, None, None]
            s = jnp.where(vis, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
            pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(dtype), vj, preferred_element_type=f32, precision=prec)
            return m_new, den * alpha + jnp.sum(p, axis=-1, keepdims=True), acc * alpha + pv

        shape = qt.shape[:-1] + (1,)
        m0 = jnp.broadcast_to(sinks.astype(f32)[None, :, :, None, None], shape)
        init = (m0, jnp.ones(shape, f32), jnp.zeros(qt.shape, f32))
        # A static trip count over every key block, the invisible ones skipped by a `cond`: a loop with data
        # bounds (a while loop) has no reverse-mode derivative, and fine-tuning takes this path from 1024
        # tokens. A skipped block costs the predicate only, and the visited ones run in the same order.
        def maybe(j, carry):
            return lax.cond((j >= start) & (j < stop), step, lambda _, c: c, j, carry)

        _, den, acc = lax.fori_loop(0, nk, maybe, init)
        return jnp.moveaxis(acc / den, 3, 1).astype(dtype)

    return _query_blocks(one, q, q_pos, bq)


# ============================================================================================ block ranges
def kv_block_ranges(q_pos, k_pos, *, block_q: int, block_k: int, window: int):
    """Per (batch, q block): the first kv block that can be visible and how many blocks to visit.

    A kv block j can matter to q block i only if some valid key in j is at or before the last valid query of i
    and (sliding) after the first valid query of i minus the window. We visit [lo, lo + count) spanning the
    first to the last such block: exact for contiguous positions (prefill), a superset otherwise (masking
    inside the kernel keeps it correct). count == 0 when the q block has no valid query or sees no key.
    Inputs are (B, T) / (B, S) positions, padded here to whole blocks with -1. Returns int32 (B, nq), (B, nq).
    """
    B, T = q_pos.shape
    S = k_pos.shape[1]
    nq, nk = cdiv(T, block_q), cdiv(S, block_k)
    big = jnp.iinfo(jnp.int32).max
    qp = pad_axis(q_pos.astype(jnp.int32), 1, nq * block_q, -1).reshape(B, nq, block_q)
    kp = pad_axis(k_pos.astype(jnp.int32), 1, nk * block_k, -1).reshape(B, nk, block_k)
    q_any = jnp.any(qp >= 0, axis=-1)
    q_min = jnp.min(jnp.where(qp >= 0, qp, big), axis=-1)
    q_max = jnp.max(qp, axis=-1)
    k_any = jnp.any(kp >= 0, axis=-1)
    k_min = jnp.min(jnp.where(kp >= 0, kp, big), axis=-1)
    k_max = jnp.max(kp, axis=-1)
    need = q_any[:, :, None] & k_any[:, None, :] & (k_min[:, None, :] <= q_max[:, :, None])
    if window:
        need = need & (k_max[:, None, :] > q_min[:, :, None] - window)
    any_need = jnp.any(need, axis=-1)
    first = jnp.argmax(need, axis=-1).astype(jnp.int32)
    last = (nk - 1 - jnp.argmax(need[..., ::-1], axis=-1)).astype(jnp.int32)
    lo = jnp.where(any_need, first, 0).astype(jnp.int32)
    count = jnp.where(any_need, last - first + 1, 0).astype(jnp.int32)
    return lo, count


def window_step_bound(block_q: int, block_k: int, window: int, nk: int) -> int:
    """Most kv blocks a q block of `block_q` consecutive positions sees when keys sit in consecutive slots.

    The visible keys are block_q + window - 1 consecutive slots, which touch at most
    (block_q + window - 2) // block_k + 2 blocks of block_k.
    """
    if not window:
        return nk
    return max(1, min(nk, (block_q + window - 2) // block_k + 2))


# ======================================================================================= shared kernel math
def _online_softmax_step(q, k, v, qp, kp, m_prev, l_prev, acc_prev, *, sm_scale, window, v_valid=None):
    """One FlashAttention-2 update. q (R, H), k/v (bk, H), qp (R, 1), kp (1, bk); m/l (R, 1), acc (R, H)."""
    prec = precision(q.dtype)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec)
    s = s * sm_scale
    mask = visible_mask(qp, kp, window)
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    # The select (not just s = NEG) matters when m_new is still NEG (split decode, no sink yet).
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    if v_valid is not None:  # rows past the end of K/V hold garbage; 0 * NaN would poison acc
        v = jnp.where(v_valid, v, jnp.zeros_like(v))
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=prec)
    return m_new, l_new, alpha * acc_prev + pv


# ============================================================================================= TPU kernels
def _flash_tpu_kernel(lo_ref, cnt_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, sink_ref, o_ref,
                      m_sc, l_sc, acc_sc, *, sm_scale, window, nq, n_steps):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    cnt = cnt_ref[b * nq + i]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = sink_ref[...]  # the sink is the first "key": m = sink, l = exp(sink - m) = 1
        l_sc[...] = jnp.ones_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(j < cnt)  # steps past this q block's range were given the same kv block index: no DMA, no math
    def _step():
        m, den, acc = _online_softmax_step(
            q_ref[...], k_ref[...], v_ref[...], qpos_ref[...], kpos_ref[...],
            m_sc[...], l_sc[...], acc_sc[...], sm_scale=sm_scale, window=window)
        m_sc[...], l_sc[...], acc_sc[...] = m, den, acc

    @pl.when(j == n_steps - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _tpu_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=48 * 1024 * 1024)


def _flash_tpu(q, k, v, sinks, q_pos, k_pos, *, window, sm_scale, bs: BlockSizes, interpret):
    B, T, K, G, H = q.shape
    S = k.shape[1]
    # A block must be a multiple of 8 rows / 128 lanes or the whole array dim: one block when it all fits.
    bq = T if T <= bs.block_q else bs.block_q
    bk = round_up(S, 8) if S <= bs.block_k else bs.block_k
    # The (8, 128) rule is Mosaic's; interpret mode has none, which lets the tests use tiny blocks.
    if not interpret and ((bq != T and (bq * G) % 8) or (bk != round_up(S, 8) and bk % 128)):
        raise KernelNotApplicable(f"TPU flash attention cannot tile block_q={bq}, block_k={bk}")
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    nq, nk, R = Tp // bq, Sp // bk, bq * G

    # Rows t*G + g: the G heads sharing a kv head are consecutive, so one tile is block_q tokens x G heads.
    qt = pad_axis(q.transpose(0, 2, 1, 3, 4), 2, Tp).reshape(B, K, Tp * G, H)
    qpos_p = pad_axis(q_pos.astype(jnp.int32), 1, Tp, -1)
    qrows = jnp.repeat(qpos_p, G, axis=1)[:, :, None]  # (B, Tp*G, 1): query position of each row
    kt = pad_axis(k.transpose(0, 2, 1, 3), 2, Sp)
    vt = pad_axis(v.transpose(0, 2, 1, 3), 2, Sp)
    kpos_p = pad_axis(k_pos.astype(jnp.int32), 1, Sp, -1)
    sink_rows = jnp.tile(sinks.astype(jnp.float32), (1, bq))[:, :, None]  # (K, R, 1), row r -> head r % G
    lo, cnt = kv_block_ranges(qpos_p, kpos_p, block_q=bq, block_k=bk, window=window)
    lo, cnt = lo.reshape(-1), cnt.reshape(-1)  # 1-D: 2-D SMEM arrays pad badly

    def run(n_steps):
        def kv_map(b, h, i, j, lo_ref, cnt_ref):
            # Clamp to the last block of the range so steps past it repeat the index (Pallas skips the copy).
            c = cnt_ref[b * nq + i]
            return b, h, lo_ref[b * nq + i] + jnp.minimum(j, jnp.maximum(c - 1, 0)), 0

        def kpos_map(b, h, i, j, lo_ref, cnt_ref):
            return b, 0, kv_map(b, h, i, j, lo_ref, cnt_ref)[2]

        kernel = functools.partial(_flash_tpu_kernel, sm_scale=sm_scale, window=window, nq=nq,
                                   n_steps=n_steps)
        return pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(B, K, nq, n_steps),
                in_specs=[
                    pl.BlockSpec((SQUEEZED, R, 1), lambda b, h, i, j, *_: (b, i, 0)),
                    pl.BlockSpec((SQUEEZED, SQUEEZED, R, H), lambda b, h, i, j, *_: (b, h, i, 0)),
                    pl.BlockSpec((SQUEEZED, SQUEEZED, bk, H), kv_map),
                    pl.BlockSpec((SQUEEZED, SQUEEZED, bk, H), kv_map),
                    pl.BlockSpec((SQUEEZED, 1, bk), kpos_map),
                    pl.BlockSpec((SQUEEZED, R, 1), lambda b, h, i, j, *_: (h, 0, 0)),
                ],
                out_specs=pl.BlockSpec((SQUEEZED, SQUEEZED, R, H), lambda b, h, i, j, *_: (b, h, i, 0)),
                scratch_shapes=[pltpu.VMEM((R, 1), jnp.float32), pltpu.VMEM((R, 1), jnp.float32),
                                pltpu.VMEM((R, H), jnp.float32)],
            ),
            out_shape=jax.ShapeDtypeStruct((B, K, Tp * G, H), q.dtype),
            compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="gptoss_flash_attention",
        )(lo, cnt, qrows, qt, kt, vt, kpos_p[:, None, :], sink_rows)

    bound = window_step_bound(bq, bk, window, nk)
    if bound < nk:
        # Sliding layer: a grid of nk steps per q block would cost O(T^2) grid steps even if they do nothing.
        # Positions from prefill are contiguous and fit the bound; anything else takes the full-length grid.
        out = lax.cond(jnp.max(cnt) <= bound, lambda: run(bound), lambda: run(nk))
    else:
        out = run(nk)
    return out.reshape(B, K, Tp, G, H)[:, :, :T].transpose(0, 2, 1, 3, 4)


def _decode_tpu_kernel(lo_ref, cnt_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, sink_ref, o_ref,
                       m_sc, l_sc, acc_sc, *, sm_scale, window, n_steps, block_k, seq_len):
    b, j = pl.program_id(0), pl.program_id(1)
    cnt = cnt_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = sink_ref[...]
        l_sc[...] = jnp.ones_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(j < cnt)
    def _step():
        v_valid = None
        if seq_len % block_k:  # the last block runs past the cache end
            rows = (lo_ref[b] + j) * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v_valid = rows < seq_len
        m, den, acc = _online_softmax_step(
            q_ref[...], k_ref[...], v_ref[...], qpos_ref[...], kpos_ref[...],
            m_sc[...], l_sc[...], acc_sc[...], sm_scale=sm_scale, window=window, v_valid=v_valid)
        m_sc[...], l_sc[...], acc_sc[...] = m, den, acc

    @pl.when(j == n_steps - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _decode_tpu(q, k, v, sinks, q_pos, k_pos, *, window, sm_scale, bs: BlockSizes, interpret):
    """Decode on TPU reads the cache in its own (B, S, K*H) layout: no per-step transpose of the whole cache.

    A kv head's keys are 64 lanes of a 512-lane row, which a BlockSpec cannot cut out (blocks need 128-lane
    multiples), so all heads go through one tile: query row n only has its own head's H lanes filled
    (block-diagonal q), so q . k over all K*H lanes is exactly its own head's logit, and the output keeps only
    its head's lanes. That costs K x MXU flops, which decode (bandwidth-bound, T*N rows) has to spare.
    """
    B, T, K, G, H = q.shape
    S = k.shape[1]
    N, KH = K * G, K * H
    R = round_up(T * N, 8)
    bk = S if S <= bs.block_k_decode else bs.block_k_decode
    if not interpret and bk != S and bk % 128:
        raise KernelNotApplicable(f"TPU decode block_k must be a multiple of 128, got {bk}")
    nk = cdiv(S, bk)

    eye = jnp.eye(K, dtype=q.dtype)
    q_bd = jnp.einsum("btkgh,kj->btkgjh", q, eye).reshape(B, T * N, KH)
    q_bd = pad_axis(q_bd, 1, R)
    qrows = pad_axis(jnp.repeat(q_pos.astype(jnp.int32), N, axis=1), 1, R, -1)[:, :, None]
    sink_rows = pad_axis(jnp.tile(sinks.astype(jnp.float32).reshape(N), T), 0, R)[:, None]
    kpos_p = pad_axis(k_pos.astype(jnp.int32), 1, nk * bk, -1)
    lo, cnt = kv_block_ranges(q_pos, kpos_p, block_q=T, block_k=bk, window=window)
    lo, cnt = lo.reshape(-1), cnt.reshape(-1)

    def kv_map(b, j, lo_ref, cnt_ref):
        return b, lo_ref[b] + jnp.minimum(j, jnp.maximum(cnt_ref[b] - 1, 0)), 0

    kernel = functools.partial(_decode_tpu_kernel, sm_scale=sm_scale, window=window, n_steps=nk, block_k=bk,
                               seq_len=S)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, nk),
            in_specs=[
                pl.BlockSpec((SQUEEZED, R, 1), lambda b, j, *_: (b, 0, 0)),
                pl.BlockSpec((SQUEEZED, R, KH), lambda b, j, *_: (b, 0, 0)),
                pl.BlockSpec((SQUEEZED, bk, KH), kv_map),
                pl.BlockSpec((SQUEEZED, bk, KH), kv_map),
                pl.BlockSpec((SQUEEZED, 1, bk), lambda b, j, lo, cnt: (b, 0, kv_map(b, j, lo, cnt)[1])),
                pl.BlockSpec((R, 1), lambda b, j, *_: (0, 0)),
            ],
            out_specs=pl.BlockSpec((SQUEEZED, R, KH), lambda b, j, *_: (b, 0, 0)),
            scratch_shapes=[pltpu.VMEM((R, 1), jnp.float32), pltpu.VMEM((R, 1), jnp.float32),
                            pltpu.VMEM((R, KH), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((B, R, KH), q.dtype),
        compiler_params=_tpu_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="gptoss_decode_attention",
    )(lo, cnt, qrows, q_bd, k.reshape(B, S, KH), v.reshape(B, S, KH), kpos_p[:, None, :], sink_rows)
    out = out[:, : T * N].reshape(B, T, K, G, K, H)
    return jnp.diagonal(out, axis1=2, axis2=4).transpose(0, 1, 4, 2, 3)  # keep each row's own head's lanes


# ============================================================================================= GPU kernel
def _attn_gpu_kernel(lo_ref, cnt_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, sink_ref, *out_refs,
                     sm_scale, window, nq, num_splits, block_k, seq_len):
    b, p = pl.program_id(0), pl.program_id(2)
    i, split = p // num_splits, p % num_splits
    lo = lo_ref[b * nq + i]
    cnt = cnt_ref[b * nq + i]
    if num_splits == 1:
        start, stop = 0, cnt
    else:
        per = (cnt + num_splits - 1) // num_splits
        start = jnp.minimum(split * per, cnt)
        stop = jnp.minimum(start + per, cnt)

    q = q_ref[...]
    qp = qpos_ref[...][:, None]
    R, H = q.shape
    if num_splits == 1:  # the sink starts the running max and denominator
        m0 = sink_ref[...][:, None]
        l0 = jnp.ones((R, 1), jnp.float32)
    else:  # partial states; the sink joins when the splits are combined
        m0 = jnp.full((R, 1), NEG, jnp.float32)
        l0 = jnp.zeros((R, 1), jnp.float32)
    acc0 = jnp.zeros((R, H), jnp.float32)

    def body(jj, carry):
        off = (lo + jj) * block_k
        rows = off + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        in_bounds = jnp.broadcast_to((rows < seq_len)[:, None], (block_k, H))
        # Masked loads: the cache is read in place (B, S, K, H), and the last block may run past S.
        k = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=in_bounds, other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(off, block_k), :], mask=in_bounds, other=0.0)
        kp = kpos_ref[pl.ds(off, block_k)][None, :]
        m, den, acc = carry
        return _online_softmax_step(q, k, v, qp, kp, m, den, acc, sm_scale=sm_scale, window=window)

    m, den, acc = lax.fori_loop(start, stop, body, (m0, l0, acc0))
    if num_splits == 1:
        (o_ref,) = out_refs
        o_ref[...] = (acc / den).astype(o_ref.dtype)
    else:
        acc_ref, m_ref, l_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m[:, 0]
        l_ref[...] = den[:, 0]


def _attn_gpu(q, k, v, sinks, q_pos, k_pos, *, window, sm_scale, block_q, block_k, num_splits, num_warps,
              num_stages, interpret):
    B, T, K, G, H = q.shape
    S = k.shape[1]
    if not (is_pow2(H) and H >= 16 and is_pow2(block_q) and is_pow2(block_k) and block_k >= 16):
        raise KernelNotApplicable("Triton attention needs power-of-two head_dim/blocks >= 16")
    Gp = next_pow2(G)  # Triton tiles are powers of two; padded heads are zero queries and are dropped
    bq = min(block_q, next_pow2(T))
    bq = max(bq, cdiv(16, Gp))  # tl.dot wants at least 16 rows
    Tp = round_up(T, bq)
    nq, R = Tp // bq, bq * Gp
    nk = cdiv(S, block_k)

    qt = pad_axis(pad_axis(q, 3, Gp), 1, Tp).transpose(0, 2, 1, 3, 4).reshape(B, K, Tp * Gp, H)
    qpos_p = pad_axis(q_pos.astype(jnp.int32), 1, Tp, -1)
    qrows = jnp.repeat(qpos_p, Gp, axis=1)
    sinks_p = pad_axis(sinks.astype(jnp.float32), 1, Gp)
    sink_rows = jnp.tile(sinks_p, (1, bq))  # (K, R)
    kpos_p = pad_axis(k_pos.astype(jnp.int32), 1, nk * block_k, -1)
    lo, cnt = kv_block_ranges(qpos_p, kpos_p, block_q=bq, block_k=block_k, window=window)
    lo, cnt = lo.reshape(-1), cnt.reshape(-1)
    ns = num_splits

    whole = lambda n: pl.BlockSpec((n,), lambda b, h, p: (0,))  # noqa: E731
    in_specs = [
        whole(B * nq),
        whole(B * nq),
        pl.BlockSpec((SQUEEZED, R), lambda b, h, p: (b, p // ns)),
        pl.BlockSpec((SQUEEZED, SQUEEZED, R, H), lambda b, h, p: (b, h, p // ns, 0)),
        pl.BlockSpec((SQUEEZED, S, SQUEEZED, H), lambda b, h, p: (b, 0, h, 0)),  # the cache, in place
        pl.BlockSpec((SQUEEZED, S, SQUEEZED, H), lambda b, h, p: (b, 0, h, 0)),
        pl.BlockSpec((SQUEEZED, nk * block_k), lambda b, h, p: (b, 0)),
        pl.BlockSpec((SQUEEZED, R), lambda b, h, p: (h, 0)),
    ]
    if ns == 1:
        out_shape = jax.ShapeDtypeStruct((B, K, Tp * Gp, H), q.dtype)
        out_specs = pl.BlockSpec((SQUEEZED, SQUEEZED, R, H), lambda b, h, p: (b, h, p, 0))
    else:
        out_shape = (jax.ShapeDtypeStruct((B, K, ns, Tp * Gp, H), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, ns, Tp * Gp), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, ns, Tp * Gp), jnp.float32))
        out_specs = (
            pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, R, H), lambda b, h, p: (b, h, p % ns, p // ns, 0)),
            pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, R), lambda b, h, p: (b, h, p % ns, p // ns)),
            pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, R), lambda b, h, p: (b, h, p % ns, p // ns)),
        )
    kernel = functools.partial(_attn_gpu_kernel, sm_scale=sm_scale, window=window, nq=nq, num_splits=ns,
                               block_k=block_k, seq_len=S)
    res = pl.pallas_call(
        kernel,
        grid=(B, K, nq * ns),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gptoss_attention_gpu",
    )(lo, cnt, qrows, qt, k, v, kpos_p, sink_rows)

    if ns == 1:
        out = res
    else:  # flash-decoding combine; the sink joins the max and the denominator here
        acc, m, den = res
        sink = jnp.tile(sinks_p, (1, Tp))[None, :, None, :]  # (1, K, 1, Tp*Gp)
        m_all = jnp.maximum(jnp.max(m, axis=2, keepdims=True), sink)
        w = jnp.exp(m - m_all)
        denom = jnp.sum(w * den, axis=2) + jnp.exp(sink[:, :, 0] - m_all[:, :, 0])
        out = (jnp.sum(w[..., None] * acc, axis=2) / denom[..., None]).astype(q.dtype)
    return out.reshape(B, K, Tp, Gp, H)[:, :, :T, :G].transpose(0, 2, 1, 3, 4)


# ============================================================================================ public kernels
def _setup(block_sizes: BlockSizes | None, backend: str | None, interpret: bool | None):
    """-> (backend, block sizes, interpret): the running platform's unless given."""
    plat, interp = kernel_platform(interpret)
    backend = backend or plat
    return backend, block_sizes or BlockSizes.for_backend(backend), interp


def flash_attention(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float,
                    block_sizes: BlockSizes | None = None, backend: str | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Prefill kernel. backend "tpu" (Mosaic) or "gpu" (Triton); default from the running platform."""
    backend, bs, interp = _setup(block_sizes, backend, interpret)
    if backend == "gpu":
        return _attn_gpu(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale, block_q=bs.block_q,
                         block_k=bs.block_k, num_splits=1, num_warps=bs.num_warps, num_stages=bs.num_stages,
                         interpret=interp)
    return _flash_tpu(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale, bs=bs, interpret=interp)


def decode_attention(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float,
                     block_sizes: BlockSizes | None = None, backend: str | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Few queries over a KV cache (any slot order: masks come from k_pos)."""
    backend, bs, interp = _setup(block_sizes, backend, interpret)
    if backend == "gpu":
        return _attn_gpu(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale,
                         block_q=next_pow2(q.shape[1]), block_k=bs.block_k_decode, num_splits=bs.num_splits,
                         num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interp)
    return _decode_tpu(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale, bs=bs,
                       interpret=interp)


def attention(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float, impl: str = "xla",
              block: int = 512, aligned: int = 0, interpret: bool | None = None) -> jax.Array:
    """Attention with sinks; impl "xla" (`attention_xla`), "pallas" (kernel) or "auto" -> q.dtype (B,T,K,G,H).

    `block` and `aligned` shape the XLA path (see `attention_xla`); the kernels find the visible blocks
    from the positions themselves.
    """
    impl = resolve_impl(impl)
    xla = functools.partial(attention_xla, q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale,
                            block=block, aligned=aligned)  # fmt: skip
    if impl == "xla":
        return xla()
    backend, _ = kernel_platform(interpret)
    bs = BlockSizes.for_backend(backend)
    H = q.shape[-1]
    if backend == "gpu" and not (is_pow2(H) and H >= 16):
        return xla()
    kw = dict(window=window, sm_scale=sm_scale, block_sizes=bs, backend=backend, interpret=interpret)
    try:
        if q.shape[1] <= bs.decode_max_q:
            return decode_attention(q, k, v, sinks, q_pos, k_pos, **kw)
        return flash_attention(q, k, v, sinks, q_pos, k_pos, **kw)
    except KernelNotApplicable:  # a shape the kernel cannot tile (found at trace time): use the XLA path
        return xla()

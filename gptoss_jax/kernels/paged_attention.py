"""Ragged paged attention: every row attends over its own pages, for as long as it is (sinks, window, GQA).

The serving engine keeps every layer's keys and values in pages of `page` tokens, in pools stacked over the
layers of a kind, (R, P, page, K, H) per k and v. A row (one sequence) owns a list of pages, its page
table: entry i of `table[b]` holds the row's positions (first[b] + i) * page ... + page - 1 (`first` is 0 for
a full table, the window's first page for a sliding layer's short table). The tables, the lengths and the
query positions are data, never shapes, so one compiled program serves every mix of lengths, and each row
does work for its own length only: a row at 1k tokens beside one at 100k does not attend over 100k keys.

Features
- `paged_attention_reference`: plain jnp, dense: each row gathers its whole table and runs
  `attention.attention_reference` over it. The numerical oracle; its work follows the table's width.
- `paged_attention_xla`: the XLA path the engine runs. Queries go in blocks of `block_q` tokens (a decode
  row is one block of one token) and keys in blocks of `block_pages` pages; the host-free work list of
  (query block, key block) pairs a row needs (causal, and within the window on sliding layers, so a
  sliding layer reads only the pages that cover its window) is derived on device from the positions and
  lengths, and a loop with a data-dependent trip count runs `items` pairs per iteration with an online
  softmax (flash-decoding: each pair's max, sum and weighted values, rescaled into its query block's
  running state, the sink starting the running max). Work = the sum of the rows' own lengths.
- `paged_attention_pallas`: the same loop as Pallas kernels, one program per (row, query block): TPU
  (Mosaic) DMAs each key block's pages from the pools in HBM into VMEM, the page ids scalar-prefetched into
  SMEM; GPU (Triton) loads each page in place by its id. Tested in interpret mode against the reference and
  lowered for both platforms with `jax.export` (tests/kernels/test_paged_lowering.py); not validated on hardware
  (so `impl="auto"` keeps the XLA path, `_common.VALIDATED_PLATFORMS`).
- `paged_attention`: the dispatcher (impl "xla" | "pallas" | "auto"), falling back to the XLA path where a
  kernel does not apply.

Conventions: q (B, T, K, G, H), q_pos (B, T) int32, -1 = padding (a row's real positions increase by one);
pools (R, P, page, K, H) and `layer` the repeat to read; sinks (K, G); table (B, NB) int32 page ids, an id
outside [0, P) = no page; kv_len (B,) int32: keys at positions >= kv_len are not valid. Key s is visible to
query t iff 0 <= s <= t and (window == 0 or s > t - window), as in `attention.py`.
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
)
from gptoss_jax.kernels.attention import (
    NEG,
    _online_softmax_step,
    attention_reference,
    qk_scores,
    visible_mask,
    weighted_values,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_pages: pages per key block (a work item's keys); block_q: query tokens per block (a row of T <=
    block_q tokens is one block); decode_items / prefill_items: work items per loop iteration of the XLA
    path for one-token rows (at most one per row) and for longer ones (more: fewer iterations, more padding
    in the last)."""

    block_pages: int = 8
    block_q: int = 128
    decode_items: int = 32
    prefill_items: int = 8

    @classmethod
    def tpu(cls) -> BlockSizes:
        return cls(block_pages=8, block_q=128)

    @classmethod
    def gpu(cls) -> BlockSizes:
        # Triton: one page per key step (tl.dot needs >= 16 rows: page >= 16), 16-token query blocks
        return cls(block_pages=1, block_q=16)


# ============================================================================================== reference
def paged_attention_reference(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, *, window: int,
                              sm_scale: float, first=None) -> jax.Array:  # fmt: skip
    """Dense: each row gathers every page of its table (NB * page keys) and runs `attention_reference`."""
    B, NB = table.shape
    P, page = k_pool.shape[1], k_pool.shape[2]
    first = jnp.zeros((B,), jnp.int32) if first is None else first
    ids = jnp.clip(table, 0, P - 1)
    keys = k_pool[layer][ids].reshape(B, NB * page, *k_pool.shape[3:])
    vals = v_pool[layer][ids].reshape(B, NB * page, *v_pool.shape[3:])
    k_pos = ((first[:, None] + jnp.arange(NB, dtype=jnp.int32))[:, :, None] * page
             + jnp.arange(page, dtype=jnp.int32)).reshape(B, NB * page)  # fmt: skip
    ok = jnp.repeat((table >= 0) & (table < P), page, axis=1) & (k_pos < kv_len[:, None])
    return attention_reference(q, keys, vals, sinks, q_pos, jnp.where(ok, k_pos, -1), window=window,
                               sm_scale=sm_scale)  # fmt: skip


# ============================================================================================== work list
def work_ranges(q_pos, kv_len, first, *, block_q: int, block_k: int, page: int, window: int):
    """Per (row, query block) of `block_q` tokens: the first key block (of `block_k` tokens, counted from
    position 0) it can see and how many it visits -> (lo, count), int32 (B, nq) each. A block visits the key
    blocks from its first visible key (0, or the first query's window start, never before the table's first
    page) to its last query (never past kv_len - 1); count 0 when it has no valid query."""
    B, T = q_pos.shape
    nq = cdiv(T, block_q)
    qp = pad_axis(q_pos.astype(jnp.int32), 1, nq * block_q, -1).reshape(B, nq, block_q)
    valid = qp >= 0
    q_min = jnp.min(jnp.where(valid, qp, jnp.iinfo(jnp.int32).max), axis=-1)
    last = jnp.minimum(jnp.max(qp, axis=-1), kv_len[:, None] - 1)
    lo_pos = jnp.broadcast_to(first[:, None] * page, (B, nq))
    if window:
        lo_pos = jnp.maximum(lo_pos, q_min - window + 1)
    lo_pos = jnp.maximum(lo_pos, 0)
    lo = lo_pos // block_k
    count = jnp.where(jnp.any(valid, axis=-1) & (last >= lo_pos), last // block_k - lo + 1, 0)
    return lo.astype(jnp.int32), count.astype(jnp.int32)


# ============================================================================================== XLA path
def paged_attention_xla(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, *, window: int,
                        sm_scale: float, first=None,
                        block_sizes: BlockSizes | None = None) -> jax.Array:  # fmt: skip
    """The work list of (query block, key block) pairs, `items` at a time, online softmax (module docstring).
    Each query row's result is the reference's up to the rounding of the rescaled sums."""
    bs = block_sizes or BlockSizes()
    B, T, K, G, H = q.shape
    NB = table.shape[1]
    page = k_pool.shape[2]
    dt, f32 = q.dtype, jnp.float32
    first = jnp.zeros((B,), jnp.int32) if first is None else first.astype(jnp.int32)
    bq = min(T, bs.block_q)
    nq = cdiv(T, bq)
    bp = bs.block_pages
    bk = bp * page
    S = B * nq  # segments: (row, query block)
    # items per iteration: a decode call of short rows is one iteration of one item per row
    M = min(bs.decode_items, S) if T == 1 else bs.prefill_items
    lo, count = work_ranges(q_pos, kv_len, first, block_q=bq, block_k=bk, page=page, window=window)
    lo, count = lo.reshape(S), count.reshape(S)
    ends = jnp.cumsum(count)
    total = ends[-1]
    qs = pad_axis(q, 1, nq * bq).reshape(S, bq, K, G, H)
    qp = pad_axis(q_pos.astype(jnp.int32), 1, nq * bq, -1).reshape(S, bq)

    def body(i, carry):
        m, den, acc = carry
        j = i * M + jnp.arange(M, dtype=jnp.int32)
        ok = j < total
        seg = jnp.minimum(jnp.searchsorted(ends, j, side="right"), S - 1).astype(jnp.int32)
        kb = lo[seg] + j - (ends[seg] - count[seg])  # the item's key block
        row = seg // nq
        col = kb[:, None] * bp + jnp.arange(bp, dtype=jnp.int32) - first[row][:, None]  # (M, bp) table column
        col_ok = (col >= 0) & (col < NB)
        ids = table[row[:, None], jnp.clip(col, 0, NB - 1)]
        keys = k_pool.at[layer, ids].get(mode="clip").reshape(M, bk, K, H)
        vals = v_pool.at[layer, ids].get(mode="clip").reshape(M, bk, K, H)
        k_pos = kb[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = jnp.repeat(col_ok, page, axis=1) & (k_pos < kv_len[row][:, None]) & ok[:, None]
        s = jnp.moveaxis(qk_scores(qs[seg], keys), 3, 1)  # (M, bq, K, G, bk)
        s = s.astype(dt).astype(f32) * sm_scale  # logits in the model dtype, as the reference rounds them
        vis = visible_mask(qp[seg][:, :, None, None, None], k_pos[:, None, None, None, :], window)
        vis = vis & k_ok[:, None, None, None, :]
        s = jnp.where(vis, s, NEG)
        m_i = jnp.max(s, axis=-1)  # (M, bq, K, G); NEG for a query that sees none of these keys
        p = jnp.where(vis, jnp.exp(s - m_i[..., None]), 0.0)
        vals = jnp.where(k_ok[:, :, None, None], vals, jnp.zeros_like(vals))  # stale pages: never 0 * NaN
        a_i = weighted_values(jnp.moveaxis(p.astype(dt), 1, 3), vals)
        # fold the items into their segments' running state; an item of no segment adds exp(NEG - m) = 0
        m_new = m.at[seg].max(m_i)
        alpha = jnp.exp(m - m_new)
        beta = jnp.exp(m_i - m_new[seg])
        den = (den * alpha).at[seg].add(jnp.sum(p, axis=-1) * beta)
        acc = (acc * alpha[..., None]).at[seg].add(a_i * beta[..., None])
        return m_new, den, acc

    m0 = jnp.broadcast_to(sinks.astype(f32), (S, bq, K, G))  # the sink opens the running max: l = 1
    init = (m0, jnp.ones((S, bq, K, G), f32), jnp.zeros((S, bq, K, G, H), f32))
    _, den, acc = lax.fori_loop(0, cdiv_traced(total, M), body, init)
    out = (acc / den[..., None]).reshape(B, nq * bq, K, G, H)[:, :T]
    return out.astype(dt)


def cdiv_traced(a, b: int):
    return (a + b - 1) // b


# ============================================================================================ Pallas kernels
def _segments(q, q_pos, sinks, *, bq: int, rows_min: int = 1, pad_heads: bool = False):
    """Query blocks as kernel tiles: q (B, T, K, G, H) -> (S, K, bq * G', H) with row t * G' + g the query
    token t's head g (G' = G, or the next power of two: Triton tiles), positions per row (S, bq * G'), sinks
    per row (K, bq * G'); bq grows to give at least `rows_min` rows (tl.dot)."""
    B, T, K, G, H = q.shape
    Gp = next_pow2(G) if pad_heads else G
    bq = max(bq, cdiv(rows_min, Gp))
    if pad_heads:
        bq = next_pow2(bq)
    nq = cdiv(T, bq)
    qs = pad_axis(pad_axis(q, 3, Gp), 1, nq * bq).reshape(B * nq, bq, K, Gp, H)
    qs = qs.transpose(0, 2, 1, 3, 4).reshape(B * nq, K, bq * Gp, H)
    qp = pad_axis(q_pos.astype(jnp.int32), 1, nq * bq, -1)
    rows = jnp.repeat(qp.reshape(B * nq, bq), Gp, axis=1)
    sink_rows = jnp.tile(pad_axis(sinks.astype(jnp.float32), 1, Gp), (1, bq))
    return qs, qp, rows, sink_rows, bq, nq, Gp


def _unsegment(out, B: int, T: int, bq: int, nq: int, G: int, Gp: int):
    K, H = out.shape[1], out.shape[-1]
    out = out.reshape(B * nq, K, bq, Gp, H).transpose(0, 2, 1, 3, 4).reshape(B, nq * bq, K, Gp, H)
    return out[:, :T, :, :G]


def _tpu_kernel(lo_ref, cnt_ref, first_ref, kvlen_ref, layer_ref, table_ref, qpos_ref, q_ref, k_hbm, v_hbm,
                sink_ref, o_ref, kbuf, vbuf, sem, m_sc, l_sc, acc_sc, *, nq, NB, bp, page, K, H, window,
                sm_scale):  # fmt: skip
    s = pl.program_id(0)
    row = lax.div(s, nq)  # (lax.div: non-negative operands; floor division lowers through `sign`)
    first, kv_len, layer = first_ref[row], kvlen_ref[row], layer_ref[0]
    bk = bp * page
    m_sc[...] = sink_ref[...]  # the sink opens the running max: l = 1
    l_sc[...] = jnp.ones_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)
    n_pages = k_hbm.shape[1]

    def block(j, carry):
        kb = lo_ref[s] + j
        copies = []
        for i in range(bp):  # the key block's pages, each from wherever it lies in the pool
            col = jnp.clip(kb * bp + i - first, 0, NB - 1)
            page_id = table_ref[row * NB + col]
            page_id = jnp.where((page_id >= 0) & (page_id < n_pages), page_id, 0)
            for src, dst, k in ((k_hbm, kbuf, 0), (v_hbm, vbuf, 1)):
                c = pltpu.make_async_copy(src.at[layer, page_id], dst.at[pl.ds(i * page, page)], sem.at[k])
                c.start()
                copies.append(c)
        for c in copies:
            c.wait()
        tok = lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        col = kb * bp + lax.div(tok, page) - first
        k_pos = jnp.where((col >= 0) & (col < NB) & (kb * bk + tok < kv_len), kb * bk + tok, -1)
        tok_c = lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        col_c = kb * bp + lax.div(tok_c, page) - first
        v_ok = (col_c >= 0) & (col_c < NB) & (kb * bk + tok_c < kv_len)
        qp = qpos_ref[0]
        for h in range(K):  # the kv heads of the block, each against its G query heads
            m, den, acc = _online_softmax_step(
                q_ref[0, h], kbuf[:, h * H : (h + 1) * H], vbuf[:, h * H : (h + 1) * H], qp, k_pos,
                m_sc[h], l_sc[h], acc_sc[h], sm_scale=sm_scale, window=window, v_valid=v_ok)  # fmt: skip
            m_sc[h], l_sc[h], acc_sc[h] = m, den, acc
        return carry

    lax.fori_loop(0, cnt_ref[s], block, 0)
    o_ref[0] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _paged_tpu(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, *, window, sm_scale, first, bs,
               interpret):  # fmt: skip
    B, T, K, G, H = q.shape
    R, P, page = k_pool.shape[:3]
    NB = table.shape[1]
    bq = min(T, bs.block_q)
    qs, qp, rows, sink_rows, bq, nq, _ = _segments(q, q_pos, sinks, bq=bq)
    bp = bs.block_pages
    bk = bp * page
    if not interpret and ((bq * G) % 8 and nq > 1):
        raise KernelNotApplicable(f"TPU paged attention cannot tile {bq} x {G} query rows")
    lo, count = work_ranges(q_pos, kv_len, first, block_q=bq, block_k=bk, page=page, window=window)
    S, Rq = B * nq, bq * G
    kernel = functools.partial(_tpu_kernel, nq=nq, NB=NB, bp=bp, page=page, K=K, H=H, window=window,
                               sm_scale=sm_scale)  # fmt: skip
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(S,),
            in_specs=[
                pl.BlockSpec((1, Rq, 1), lambda s, *_: (s, 0, 0)),
                pl.BlockSpec((1, K, Rq, H), lambda s, *_: (s, 0, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),  # the pools stay in HBM: pages are DMA'd by id
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec((K, Rq, 1), lambda s, *_: (0, 0, 0)),
            ],
            out_specs=pl.BlockSpec((1, K, Rq, H), lambda s, *_: (s, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((bk, K * H), k_pool.dtype), pltpu.VMEM((bk, K * H), v_pool.dtype),
                            pltpu.SemaphoreType.DMA((2,)), pltpu.VMEM((K, Rq, 1), jnp.float32),
                            pltpu.VMEM((K, Rq, 1), jnp.float32), pltpu.VMEM((K, Rq, H), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((S, K, Rq, H), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=48 * 1024 * 1024),  # fmt: skip
        interpret=interpret,
        name="gptoss_paged_attention",
    )(lo.reshape(-1), count.reshape(-1), first, kv_len.astype(jnp.int32),
      jnp.reshape(layer, (1,)).astype(jnp.int32), table.reshape(-1).astype(jnp.int32), rows[:, :, None],
      qs, k_pool.reshape(R, P, page, K * H), v_pool.reshape(R, P, page, K * H),
      sink_rows[:, :, None])  # fmt: skip
    return _unsegment(out, B, T, bq, nq, G, G)


def _gpu_kernel(lo_ref, cnt_ref, first_ref, kvlen_ref, layer_ref, table_ref, qpos_ref, q_ref, k_ref, v_ref,
                sink_ref, o_ref, *, nq, NB, page, window, sm_scale):  # fmt: skip
    s, h = pl.program_id(0), pl.program_id(1)
    row = lax.div(s, nq)
    first, kv_len, layer = first_ref[row], kvlen_ref[row], layer_ref[0]
    n_pages = k_ref.shape[1]
    q = q_ref[...]
    qp = qpos_ref[...][:, None]
    m0 = sink_ref[...][:, None]  # the sink opens the running max: l = 1
    carry = (m0, jnp.ones_like(m0), jnp.zeros(q.shape, jnp.float32))

    def step(j, carry):  # one page per step, loaded in place by its id
        kb = lo_ref[s] + j
        col = kb - first
        page_id = table_ref[row, jnp.clip(col, 0, NB - 1)]
        page_id = jnp.where((page_id >= 0) & (page_id < n_pages), page_id, 0)
        k = k_ref[layer, page_id, :, h, :]
        v = v_ref[layer, page_id, :, h, :]
        pos = kb * page + lax.broadcasted_iota(jnp.int32, (page,), 0)
        ok = (col >= 0) & (col < NB) & (pos < kv_len)
        m, den, acc = carry
        return _online_softmax_step(q, k, v, qp, jnp.where(ok, pos, -1)[None, :], m, den, acc,
                                    sm_scale=sm_scale, window=window, v_valid=ok[:, None])  # fmt: skip

    m, den, acc = lax.fori_loop(0, cnt_ref[s], step, carry)
    o_ref[...] = (acc / den).astype(o_ref.dtype)


def _paged_gpu(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, *, window, sm_scale, first, bs,
               interpret):  # fmt: skip
    B, T, K, G, H = q.shape
    page = k_pool.shape[2]
    NB = table.shape[1]
    if not interpret and not (is_pow2(H) and H >= 16 and is_pow2(page) and page >= 16):
        raise KernelNotApplicable("Triton paged attention needs power-of-two head_dim and pages >= 16")
    qs, qp, rows, sink_rows, bq, nq, Gp = _segments(q, q_pos, sinks, bq=min(next_pow2(T), bs.block_q),
                                                    rows_min=16, pad_heads=True)  # fmt: skip
    lo, count = work_ranges(qp, kv_len, first, block_q=bq, block_k=page, page=page, window=window)
    S, Rq = B * nq, bq * Gp
    whole = lambda a: pl.BlockSpec(a.shape, lambda s, h: (0,) * a.ndim)  # noqa: E731
    args = (lo.reshape(-1), count.reshape(-1), first, kv_len.astype(jnp.int32),
            jnp.reshape(layer, (1,)).astype(jnp.int32), table.astype(jnp.int32))  # fmt: skip
    kernel = functools.partial(_gpu_kernel, nq=nq, NB=NB, page=page, window=window, sm_scale=sm_scale)
    out = pl.pallas_call(
        kernel,
        grid=(S, K),
        in_specs=[*(whole(a) for a in args),
                  pl.BlockSpec((SQUEEZED, Rq), lambda s, h: (s, 0)),
                  pl.BlockSpec((SQUEEZED, SQUEEZED, Rq, H), lambda s, h: (s, h, 0, 0)),
                  whole(k_pool), whole(v_pool),  # the pools in place: each page is loaded by its id
                  pl.BlockSpec((SQUEEZED, Rq), lambda s, h: (h, 0))],  # fmt: skip
        out_specs=pl.BlockSpec((SQUEEZED, SQUEEZED, Rq, H), lambda s, h: (s, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((S, K, Rq, H), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="gptoss_paged_attention_gpu",
    )(*args, rows, qs, k_pool, v_pool, sink_rows)
    return _unsegment(out, B, T, bq, nq, G, Gp)


def paged_attention_pallas(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, *, window: int,
                           sm_scale: float, first=None, block_sizes: BlockSizes | None = None,
                           backend: str | None = None,
                           interpret: bool | None = None) -> jax.Array:  # fmt: skip
    """The Pallas kernel: backend "tpu" (Mosaic: pages DMA'd from HBM) or "gpu" (Triton: pages loaded in
    place); default from the running platform, interpreted on CPU."""
    plat, interp = kernel_platform(interpret)
    backend = backend or plat
    bs = block_sizes or (BlockSizes.gpu() if backend == "gpu" else BlockSizes.tpu())
    first = jnp.zeros(table.shape[:1], jnp.int32) if first is None else first.astype(jnp.int32)
    fn = _paged_gpu if backend == "gpu" else _paged_tpu
    return fn(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, window=window, sm_scale=sm_scale,
              first=first, bs=bs, interpret=interp)  # fmt: skip


# ============================================================================================= dispatcher
def paged_attention(q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len, *, window: int, sm_scale: float,
                    first=None, impl: str = "xla", block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:  # fmt: skip
    """Ragged paged attention; impl "xla" (`paged_attention_xla`), "pallas" (kernel) or "auto"."""
    args = (q, k_pool, v_pool, layer, sinks, q_pos, table, kv_len)
    kw = dict(window=window, sm_scale=sm_scale, first=first)
    if resolve_impl(impl) == "xla":
        return paged_attention_xla(*args, **kw, block_sizes=block_sizes)
    try:
        return paged_attention_pallas(*args, **kw, block_sizes=block_sizes, interpret=interpret)
    except KernelNotApplicable:  # a shape the kernel cannot tile (found at trace time): the XLA path
        return paged_attention_xla(*args, **kw, block_sizes=block_sizes)



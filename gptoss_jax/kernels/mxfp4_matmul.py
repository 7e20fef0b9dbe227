"""gpt-oss MoE experts (spec §2.5) with MXFP4 weights kept packed (spec §4): grouped-matmul Pallas kernels.

Features
- `moe_experts_reference`: the oracle, plain jnp: every (token, expert) pair runs its own dequantized expert.
  h = W1 x + b1 -> clamped SwiGLU (gate <= limit only, linear in [-limit, limit], the "+1") -> o = W2 a + b2
  -> out = sum_k w_k o_k, rounding to x.dtype where the torch reference rounds (after each matmul, each bias
  add, the SwiGLU output and the combine). The kernels run the SwiGLU on float32 accumulators and round once.
  (The model's XLA path, with its adapters, stacked-layer reads and backward pass, is `gptoss_jax.moe`; its
  `local_experts` is the dispatcher that picks these kernels or that path.)
- `moe_experts_pallas`: the same math as a megablox-style grouped matmul ("gmm"): the (token, expert)
  pairs are sorted by expert and each expert's rows are padded to whole tiles of `tm`; a scalar-prefetched
  table gives each tile its expert, so only tiles that hold tokens do work (at most cdiv(T*X, tm) +
  min(E, T*X) tiles, independent of E). Weights are read as the checkpoint's uint8 blocks and E8M0 scales and
  dequantized next to the dot with integer/f32 ops only (no fp4 dtype: TPU v5e/v6e have none). mlp1 fuses
  bias + clamped SwiGLU into its epilogue; mlp2 fuses its bias; the routing weights are applied in the
  combine (which is where the reference rounds them).

Layout tricks (all free reshapes of the checkpoint arrays, never a copy of the weights):
- blocks (E, N, K/32, 16) -> (E, N, K/2): byte j of a row holds elements 2j (low nibble) and 2j+1 (high). So
  W x = W_lo . x[0::2] + W_hi . x[1::2]: we split the activations (cheap) instead of interleaving nibbles.
- W1 rows are interleaved gate/linear (2j, 2j+1). mlp2 in turn wants its input split even/odd (previous
  point), so mlp1 writes a[0::2] and a[1::2] directly: a[2i] uses W1 rows 4i (gate), 4i+1 (linear);
  a[2i+1] rows 4i+2, 4i+3.

Two lowerings:
- TPU (Mosaic): grid (column tiles, row tiles) with the row-tile axis innermost and sequential, so consecutive
  tiles of the same expert reuse both the DMA'd weight block and its dequantized copy kept in VMEM scratch
  (dequantization then costs once per expert and column tile, not once per row tile). The E8M0 scale of every
  16-byte group is broadcast along lanes with a tiny 0/1 matmul (exact: one nonzero term of a power of two)
  since lane-repeats are not a Mosaic primitive; the four W1 row classes are picked out of the mlp1 tile with
  exact 0/1 selection matmuls for the same reason (lane-strided slices).
- GPU (Triton): no scalar prefetch, so each program reads its tile's expert from the table and gathers W rows
  with pointer arithmetic (masked loads; the weights are read in place). Tiles are powers of two; the
  contraction walks one 32-element group (16 bytes) per step, which makes every group's scale a per-row
  factor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
)
from gptoss_jax.mxfp4 import BLOCK as GROUP
from gptoss_jax.mxfp4 import GROUP_BYTES, dequantize, e8m0_to_f32, fp4_to_f32
from gptoss_jax.ops import F32, einsum, group_by_expert, precision, round_add, swiglu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """tm: rows ((token, expert) pairs) per tile; tn1: W1 rows per mlp1 tile (TPU; yields tn1/4 columns of
    each half of a); tq: columns of each half of a per mlp1 tile (GPU); tn2: output columns per mlp2 tile.
    decode_tm replaces tm when T <= decode_max_tokens (few rows per expert: small tiles waste less).
    TPU: tm multiple of 8 (16 for bf16 packing), tn1 multiple of 512 and tn2 of 128 unless they cover the
    whole dimension. GPU: powers of two, tm >= 16 (tl.dot)."""

    tm: int = 128
    tn1: int = 512
    tq: int = 64
    tn2: int = 256
    decode_tm: int = 16
    decode_max_tokens: int = 32
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def tpu(cls) -> BlockSizes:
        # tn1=512 W1 rows x 1440 bytes (gpt-oss D=2880): 720 KiB packed, 2 x 1.4 MiB dequantized bf16 scratch.
        return cls(tm=128, tn1=512, tn2=256, decode_tm=16)

    @classmethod
    def gpu(cls) -> BlockSizes:
        # 4 accumulators of 64x64 f32 in mlp1 (gate/linear x even/odd) per program.
        return cls(tm=64, tq=64, tn2=64, decode_tm=16, num_warps=4, num_stages=2)

    @classmethod
    def for_backend(cls, backend: str) -> BlockSizes:
        return cls.gpu() if backend == "gpu" else cls.tpu()


# ============================================================================================ reference
def moe_experts_reference(x, expert_idx, expert_w, params, *, alpha: float, limit: float) -> jax.Array:
    """The kernels' oracle in plain jnp: x (T,D), expert_idx/expert_w (T,X), packed params -> (T,D).

    Every (token, expert) pair gathers and dequantizes its expert's weights and runs it on its own, rounding
    to x.dtype where the torch reference rounds (after each matmul, each bias add and the SwiGLU); the
    weighted sum over the k experts is accumulated in float32 and rounded once. Selections outside [0, E)
    add nothing. It holds T * X dequantized experts at once: an oracle for small shapes, not a path to run
    (the model's XLA path, `gptoss_jax.moe`, computes the same with one expert dequantized at a time).
    """
    dtype = x.dtype
    E = params["mlp1_bias"].shape[0]
    local = (expert_idx >= 0) & (expert_idx < E)
    e, w = jnp.where(local, expert_idx, 0), jnp.where(local, expert_w, 0)
    w1 = dequantize(params["mlp1_blocks"][e], params["mlp1_scales"][e], dtype)  # (T,X,2F,D)
    h = round_add(einsum("TXFD,TD->TXF", w1, x, dtype), params["mlp1_bias"][e], dtype)
    a = swiglu(h[..., 0::2], h[..., 1::2], alpha, limit)  # interleaved rows: gate 2i, linear 2i+1
    w2 = dequantize(params["mlp2_blocks"][e], params["mlp2_scales"][e], dtype)  # (T,X,D,F)
    o = round_add(einsum("TXDF,TXF->TXD", w2, a, dtype), params["mlp2_bias"][e], dtype)
    return jnp.einsum("TXD,TX->TD", o.astype(F32), w.astype(F32), precision=lax.Precision.HIGHEST).astype(dtype)

# ================================================================================================ routing
@dataclasses.dataclass(frozen=True)
class Routing:
    pair_row: jax.Array  # (T, X) int32: padded row holding pair (t, x)
    row_token: jax.Array  # (num_tiles_max * tm,) int32: token of every padded row (0 for padding rows)
    tile_expert: jax.Array  # (num_tiles_max,) int32: expert of each tile; idle tiles repeat the last busy one
    num_tiles: jax.Array  # (1,) int32: tiles that hold tokens
    tm: int
    num_tiles_max: int


def route(expert_idx: jax.Array, num_experts: int, tm: int) -> Routing:
    """Sort (token, expert) pairs by expert and pad every expert's group to whole tiles of `tm` rows.

    Non-empty tiles <= sum_e ceil(n_e / tm) <= cdiv(T*X, tm) + min(E, T*X): the static grid length, which
    grows with tokens * top-k and never with E (experts without tokens get no tile at all). Pairs whose expert
    is outside [0, E) (another device's experts under expert parallelism) get no row and contribute zero.
    """
    T, X = expert_idx.shape
    P, E = T * X, num_experts
    order, sizes, group_start = group_by_expert(expert_idx, E)
    e = expert_idx.reshape(P).astype(jnp.int32)
    e = jnp.where((e >= 0) & (e < E), e, E)  # invalid pairs sort last, into a pseudo-expert E with no tile
    tiles = (sizes + tm - 1) // tm
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    n_max = cdiv(P, tm) + min(E, P)
    se = e[order]
    sec = jnp.minimum(se, E - 1)
    row_sorted = tile_start[sec] * tm + (jnp.arange(P, dtype=jnp.int32) - group_start[sec])
    row_sorted = jnp.where(se < E, row_sorted, n_max * tm)  # out of bounds: dropped below, masked in combine
    pair_row = jnp.zeros((P,), jnp.int32).at[order].set(row_sorted)
    row_token = jnp.zeros((n_max * tm,), jnp.int32).at[pair_row].set(jnp.arange(P, dtype=jnp.int32) // X,
                                                                     mode="drop")  # fmt: skip
    num_tiles = tile_end[-1]
    t = jnp.arange(n_max, dtype=jnp.int32)
    tile_expert = jnp.searchsorted(tile_end, t, side="right").astype(jnp.int32)
    last = tile_expert[jnp.maximum(num_tiles - 1, 0)]
    # Idle tiles point at the last busy tile's expert so their (skipped) steps request the same weight block.
    tile_expert = jnp.minimum(jnp.where(t < num_tiles, tile_expert, last), E - 1)
    return Routing(pair_row.reshape(T, X), row_token, tile_expert, num_tiles.reshape(1).astype(jnp.int32), tm,
                   n_max)


def combine(o_rows: jax.Array, routing: Routing, expert_w: jax.Array, dtype) -> jax.Array:
    """out[t] = sum_x w[t, x] * o[row of (t, x)] (f32 accumulation, one rounding, as the reference)."""
    rows = routing.pair_row
    valid = rows < o_rows.shape[0]
    o = jnp.where(valid[..., None], o_rows[jnp.where(valid, rows, 0)], 0)  # (T, X, D); invalid pairs: 0
    return jnp.einsum("txd,tx->td", o, expert_w.astype(dtype), preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST).astype(dtype)


def _dot_nt(a, b, dtype):
    """a (M, K) . b (N, K)^T with f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=precision(dtype))


def _dot(a, b, dtype):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=precision(dtype))


# ============================================================================================= TPU kernels
def _dequant_tile_to_scratch(w_ref, s_ref, r_ref, lo_sc, hi_sc, chunk):
    """Packed (rows, K/2) uint8 + (rows, K/32) scales -> two (rows, K/2) tiles (low / high nibbles) in VMEM.

    Done in row chunks so the f32 temporaries stay small. The scale of byte j is scale[j // 16]; it is spread
    over the lanes by scale (chunk, K/32) @ R (K/32, K/2) with R[g, j] = (j // 16 == g): exact in bf16 because
    every product is a power of two times 0 or 1 and each output has one nonzero term.
    """
    rows = w_ref.shape[0]

    def body(c, carry):
        sl = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        codes = w_ref[sl, :].astype(jnp.int32)
        sc = e8m0_to_f32(s_ref[sl, :].astype(jnp.int32)).astype(jnp.bfloat16)
        s_exp = lax.dot_general(sc, r_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        lo_sc[sl, :] = (fp4_to_f32(codes & 15) * s_exp).astype(lo_sc.dtype)
        hi_sc[sl, :] = (fp4_to_f32(codes >> 4) * s_exp).astype(hi_sc.dtype)
        return carry

    lax.fori_loop(0, rows // chunk, body, 0)


def _row_chunk(rows: int) -> int:
    c = math.gcd(rows, 128)
    return c if c >= 32 else rows  # uint8 packs 32 rows per sublane tile


def _needs_refresh(te_ref, m):
    # Row tiles are visited in order with the same column tile; the dequantized weights stay valid until the
    # expert changes (and must be rebuilt at the first row tile of every column tile).
    return (m == 0) | (te_ref[m] != te_ref[jnp.maximum(m - 1, 0)])


def _mlp1_tpu_kernel(te_ref, nt_ref, xe_ref, xo_ref, w_ref, s_ref, b_ref, r_ref, ae_ref, ao_ref, lo_sc, hi_sc,
                     *, alpha, limit, n_rows, tn, chunk):
    n, m = pl.program_id(0), pl.program_id(1)
    active = m < nt_ref[0]
    dt = xe_ref.dtype

    @pl.when(active & _needs_refresh(te_ref, m))
    def _dequant():
        _dequant_tile_to_scratch(w_ref, s_ref, r_ref, lo_sc, hi_sc, chunk)

    @pl.when(active)
    def _compute():
        h = _dot_nt(xe_ref[...], lo_sc[...], dt) + _dot_nt(xo_ref[...], hi_sc[...], dt)
        h = round_add(h.astype(dt), b_ref[...], dt)  # matmul output rounded, then the bias add rounded
        if n_rows % tn:  # rows of W1 past 2F are garbage; they must not reach the selection matmuls below
            col = n * tn + lax.broadcasted_iota(jnp.int32, (1, tn), 1)
            h = jnp.where(col < n_rows, h, jnp.zeros_like(h))
        rr = lax.broadcasted_iota(jnp.int32, (tn, tn // 4), 0)
        cc = lax.broadcasted_iota(jnp.int32, (tn, tn // 4), 1)
        # Exact column selection (h is already rounded to dt; one 1.0 per column); f32 out, so the SwiGLU
        # below runs in f32 and rounds once.
        pick = lambda r: _dot(h, (rr == 4 * cc + r).astype(dt), dt)  # noqa: E731
        ae_ref[...] = swiglu(pick(0), pick(1), alpha, limit).astype(ae_ref.dtype)
        ao_ref[...] = swiglu(pick(2), pick(3), alpha, limit).astype(ao_ref.dtype)


def _mlp2_tpu_kernel(te_ref, nt_ref, ae_ref, ao_ref, w_ref, s_ref, b_ref, r_ref, o_ref, lo_sc, hi_sc, *,
                     chunk):
    m = pl.program_id(1)
    active = m < nt_ref[0]
    dt = ae_ref.dtype

    @pl.when(active & _needs_refresh(te_ref, m))
    def _dequant():
        _dequant_tile_to_scratch(w_ref, s_ref, r_ref, lo_sc, hi_sc, chunk)

    @pl.when(active)
    def _compute():
        o = _dot_nt(ae_ref[...], lo_sc[...], dt) + _dot_nt(ao_ref[...], hi_sc[...], dt)
        o_ref[...] = round_add(o.astype(dt), b_ref[...], dt)


def _expand_matrix(k_bytes: int) -> jax.Array:
    return jnp.repeat(jnp.eye(k_bytes // GROUP_BYTES, dtype=jnp.bfloat16), GROUP_BYTES, axis=1)


def _tpu_params():
    # Column tiles are independent (megacore may split them); row tiles must run in order for the
    # weight reuse.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=48 * 1024 * 1024)


def _moe_tpu(x, expert_idx, expert_w, params, *, alpha, limit, tm, bs: BlockSizes, interpret):
    T, D = x.shape
    E, F2 = params["mlp1_blocks"].shape[:2]
    F, dt = F2 // 2, x.dtype
    tn1 = F2 if F2 <= bs.tn1 else bs.tn1
    tn2 = D if D <= bs.tn2 else bs.tn2
    if tn1 % 4:
        raise KernelNotApplicable(f"tn1={tn1} must be a multiple of 4 (gate/linear x even/odd rows)")
    # The (8, 128) rule is Mosaic's; interpret mode has none, which lets the tests use tiny tiles.
    if not interpret and (tm % 8 or (tn1 != F2 and tn1 % 512) or (tn2 != D and tn2 % 128)):
        raise KernelNotApplicable(f"TPU MoE cannot tile tn1={tn1}, tn2={tn2}")
    rt = route(expert_idx, E, tm)
    M, rows = rt.num_tiles_max, rt.num_tiles_max * tm

    xr = x[rt.row_token]
    xe, xo = xr[:, 0::2], xr[:, 1::2]  # even / odd input elements meet the low / high nibbles
    w1 = params["mlp1_blocks"].reshape(E, F2, D // 2)
    s1 = params["mlp1_scales"].reshape(E, F2, D // GROUP)
    b1 = params["mlp1_bias"].reshape(E, 1, F2)
    w2 = params["mlp2_blocks"].reshape(E, D, F // 2)
    s2 = params["mlp2_scales"].reshape(E, D, F // GROUP)
    b2 = params["mlp2_bias"].reshape(E, 1, D)

    def m_eff(m, nt_ref):  # idle tiles re-request the last busy tile's blocks: no DMA, no writeback change
        return jnp.minimum(m, jnp.maximum(nt_ref[0] - 1, 0))

    def rows_map(n, m, te_ref, nt_ref):
        return m_eff(m, nt_ref), 0

    def w_map(n, m, te_ref, nt_ref):
        return te_ref[m_eff(m, nt_ref)], n, 0

    def out_map(n, m, te_ref, nt_ref):
        return m_eff(m, nt_ref), n

    kb1, kb2 = D // 2, F // 2
    a_even, a_odd = pl.pallas_call(
        functools.partial(_mlp1_tpu_kernel, alpha=alpha, limit=limit, n_rows=F2, tn=tn1,
                          chunk=_row_chunk(tn1)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cdiv(F2, tn1), M),
            in_specs=[
                pl.BlockSpec((tm, kb1), rows_map),
                pl.BlockSpec((tm, kb1), rows_map),
                pl.BlockSpec((SQUEEZED, tn1, kb1), w_map),
                pl.BlockSpec((SQUEEZED, tn1, D // GROUP), w_map),
                pl.BlockSpec((SQUEEZED, 1, tn1), lambda n, m, te, nt: (te[m_eff(m, nt)], 0, n)),
                pl.BlockSpec((D // GROUP, kb1), lambda n, m, te, nt: (0, 0)),
            ],
            out_specs=[pl.BlockSpec((tm, tn1 // 4), out_map), pl.BlockSpec((tm, tn1 // 4), out_map)],
            scratch_shapes=[pltpu.VMEM((tn1, kb1), dt), pltpu.VMEM((tn1, kb1), dt)],
        ),
        out_shape=[jax.ShapeDtypeStruct((rows, kb2), dt), jax.ShapeDtypeStruct((rows, kb2), dt)],
        compiler_params=_tpu_params(),
        interpret=interpret,
        name="gptoss_moe_mlp1",
    )(rt.tile_expert, rt.num_tiles, xe, xo, w1, s1, b1, _expand_matrix(kb1))

    o_rows = pl.pallas_call(
        functools.partial(_mlp2_tpu_kernel, chunk=_row_chunk(tn2)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cdiv(D, tn2), M),
            in_specs=[
                pl.BlockSpec((tm, kb2), rows_map),
                pl.BlockSpec((tm, kb2), rows_map),
                pl.BlockSpec((SQUEEZED, tn2, kb2), w_map),
                pl.BlockSpec((SQUEEZED, tn2, F // GROUP), w_map),
                pl.BlockSpec((SQUEEZED, 1, tn2), lambda n, m, te, nt: (te[m_eff(m, nt)], 0, n)),
                pl.BlockSpec((F // GROUP, kb2), lambda n, m, te, nt: (0, 0)),
            ],
            out_specs=pl.BlockSpec((tm, tn2), out_map),
            scratch_shapes=[pltpu.VMEM((tn2, kb2), dt), pltpu.VMEM((tn2, kb2), dt)],
        ),
        out_shape=jax.ShapeDtypeStruct((rows, D), dt),
        compiler_params=_tpu_params(),
        interpret=interpret,
        name="gptoss_moe_mlp2",
    )(rt.tile_expert, rt.num_tiles, a_even, a_odd, w2, s2, b2, _expand_matrix(kb2))
    return combine(o_rows, rt, expert_w, dt)


# ============================================================================================= GPU kernels
def _gpu_group_weights(w_ref, s_ref, e, r0, nr, cls, g, valid, dt):
    """One 32-element group of `nr` weight rows -> (low, high) nibble tiles (nr, 16) scaled, in dt."""
    if cls is None:
        w_at = w_ref.at[e, pl.ds(r0, nr), pl.ds(g * GROUP_BYTES, GROUP_BYTES)]
        s_at = s_ref.at[e, pl.ds(r0, nr), g]
    else:
        cls = jnp.int32(cls)  # an array index: interpret mode's discharge of masked loads rejects Python ints
        w_at = w_ref.at[e, pl.ds(r0, nr), cls, pl.ds(g * GROUP_BYTES, GROUP_BYTES)]
        s_at = s_ref.at[e, pl.ds(r0, nr), cls, g]
    codes = plgpu.load(w_at, mask=jnp.broadcast_to(valid[:, None], (nr, GROUP_BYTES)), other=0)
    codes = codes.astype(jnp.int32)
    scale = e8m0_to_f32(plgpu.load(s_at, mask=valid, other=127).astype(jnp.int32))[:, None]
    return (fp4_to_f32(codes & 15) * scale).astype(dt), (fp4_to_f32(codes >> 4) * scale).astype(dt)


def _mlp1_gpu_kernel(te_ref, nt_ref, xe_ref, xo_ref, w_ref, s_ref, b_ref, ae_ref, ao_ref, *, alpha, limit, tm,
                     tq, n_groups, half_f):
    t, n = pl.program_id(0), pl.program_id(1)
    dt = xe_ref.dtype

    @pl.when(t < nt_ref[0])
    def _():
        e = te_ref[t]
        q0 = n * tq
        valid = q0 + lax.broadcasted_iota(jnp.int32, (tq,), 0) < half_f
        rows = pl.ds(t * tm, tm)

        def body(g, accs):
            xe = xe_ref[rows, pl.ds(g * GROUP_BYTES, GROUP_BYTES)]
            xo = xo_ref[rows, pl.ds(g * GROUP_BYTES, GROUP_BYTES)]
            out = []
            for cls in range(4):  # W1 rows 4i+cls: gate/linear of a[2i], gate/linear of a[2i+1]
                lo, hi = _gpu_group_weights(w_ref, s_ref, e, q0, tq, cls, g, valid, dt)
                out.append(accs[cls] + _dot_nt(xe, lo, dt) + _dot_nt(xo, hi, dt))
            return tuple(out)

        zeros = jnp.zeros((tm, tq), jnp.float32)
        accs = lax.fori_loop(0, n_groups, body, (zeros,) * 4)
        h = []
        for cls in range(4):
            b = plgpu.load(b_ref.at[e, pl.ds(q0, tq), jnp.int32(cls)], mask=valid, other=0)
            h.append(round_add(accs[cls].astype(dt), b[None, :], dt))
        smask = jnp.broadcast_to(valid[None, :], (tm, tq))
        cols = pl.ds(q0, tq)
        for out_ref, (gate, lin) in ((ae_ref, (h[0], h[1])), (ao_ref, (h[2], h[3]))):
            a = swiglu(gate.astype(F32), lin.astype(F32), alpha, limit).astype(dt)  # f32 math, one rounding
            plgpu.store(out_ref.at[rows, cols], a, mask=smask)


def _mlp2_gpu_kernel(te_ref, nt_ref, ae_ref, ao_ref, w_ref, s_ref, b_ref, o_ref, *, tm, tn, n_groups, d_out):
    t, n = pl.program_id(0), pl.program_id(1)
    dt = ae_ref.dtype

    @pl.when(t < nt_ref[0])
    def _():
        e = te_ref[t]
        n0 = n * tn
        valid = n0 + lax.broadcasted_iota(jnp.int32, (tn,), 0) < d_out
        rows = pl.ds(t * tm, tm)

        def body(g, acc):
            ae = ae_ref[rows, pl.ds(g * GROUP_BYTES, GROUP_BYTES)]
            ao = ao_ref[rows, pl.ds(g * GROUP_BYTES, GROUP_BYTES)]
            lo, hi = _gpu_group_weights(w_ref, s_ref, e, n0, tn, None, g, valid, dt)
            return acc + _dot_nt(ae, lo, dt) + _dot_nt(ao, hi, dt)

        acc = lax.fori_loop(0, n_groups, body, jnp.zeros((tm, tn), jnp.float32))
        b = plgpu.load(b_ref.at[e, pl.ds(n0, tn)], mask=valid, other=0)
        o = round_add(acc.astype(dt), b[None, :], dt)
        plgpu.store(o_ref.at[rows, pl.ds(n0, tn)], o, mask=jnp.broadcast_to(valid[None, :], (tm, tn)))


def _moe_gpu(x, expert_idx, expert_w, params, *, alpha, limit, tm, bs: BlockSizes, interpret):
    T, D = x.shape
    E, F2 = params["mlp1_blocks"].shape[:2]
    F, dt = F2 // 2, x.dtype
    tq, tn2 = bs.tq, bs.tn2
    if not (is_pow2(tm) and tm >= 16 and is_pow2(tq) and tq >= 16 and is_pow2(tn2) and tn2 >= 16):
        raise KernelNotApplicable("Triton MoE tiles must be powers of two >= 16")
    rt = route(expert_idx, E, tm)
    M, rows = rt.num_tiles_max, rt.num_tiles_max * tm
    xr = x[rt.row_token]
    xe, xo = xr[:, 0::2], xr[:, 1::2]
    # (E, 2F, D/2) viewed as (E, F/2, 4, D/2): class c of block i is W1 row 4i + c.
    w1 = params["mlp1_blocks"].reshape(E, F // 2, 4, D // 2)
    s1 = params["mlp1_scales"].reshape(E, F // 2, 4, D // GROUP)
    b1 = params["mlp1_bias"].reshape(E, F // 2, 4)
    w2 = params["mlp2_blocks"].reshape(E, D, F // 2)
    s2 = params["mlp2_scales"].reshape(E, D, F // GROUP)
    b2 = params["mlp2_bias"]
    cp = plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)

    a_even, a_odd = pl.pallas_call(
        functools.partial(_mlp1_gpu_kernel, alpha=alpha, limit=limit, tm=tm, tq=tq, n_groups=D // GROUP,
                          half_f=F // 2),
        grid=(M, cdiv(F // 2, tq)),
        out_shape=[jax.ShapeDtypeStruct((rows, F // 2), dt), jax.ShapeDtypeStruct((rows, F // 2), dt)],
        compiler_params=cp,
        interpret=interpret,
        name="gptoss_moe_mlp1_gpu",
    )(rt.tile_expert, rt.num_tiles, xe, xo, w1, s1, b1)
    o_rows = pl.pallas_call(
        functools.partial(_mlp2_gpu_kernel, tm=tm, tn=tn2, n_groups=F // GROUP, d_out=D),
        grid=(M, cdiv(D, tn2)),
        out_shape=jax.ShapeDtypeStruct((rows, D), dt),
        compiler_params=cp,
        interpret=interpret,
        name="gptoss_moe_mlp2_gpu",
    )(rt.tile_expert, rt.num_tiles, a_even, a_odd, w2, s2, b2)
    return combine(o_rows, rt, expert_w, dt)


# =================================================================================================== public
def moe_experts_pallas(x, expert_idx, expert_w, params, *, alpha: float, limit: float,
                       block_sizes: BlockSizes | None = None, backend: str | None = None,
                       interpret: bool | None = None) -> jax.Array:
    """Grouped-matmul kernels; backend "tpu" (Mosaic) or "gpu" (Triton), default from the running platform."""
    plat, interp = kernel_platform(interpret)
    backend = backend or plat
    bs = block_sizes or BlockSizes.for_backend(backend)
    T, D = x.shape
    F2 = params["mlp1_blocks"].shape[1]
    if D % GROUP or F2 % (2 * GROUP) or (F2 // 2) % 2:
        raise KernelNotApplicable(f"MoE kernel needs D and F multiples of {GROUP}, got D={D}, F={F2 // 2}")
    tm = bs.decode_tm if T <= bs.decode_max_tokens else bs.tm
    fn = _moe_gpu if backend == "gpu" else _moe_tpu
    return fn(x, expert_idx, expert_w, params, alpha=alpha, limit=limit, tm=tm, bs=bs, interpret=interp)


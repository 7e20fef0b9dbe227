"""gpt-oss MoE experts (spec §2.5) with MXFP4 weights kept packed (spec §4): grouped-matmul Pallas kernels.

Features
- `moe_experts_reference`: the XLA path of the model and the kernels' oracle, plain jnp: for decode it
  gathers and dequantizes only the selected experts (`moe_experts_gather`), for prefill it sorts the
  (token, expert) pairs by expert and runs each expert's rows in tiles (`moe_experts_grouped`). Both compute
  h = W1 x + b1 -> clamped SwiGLU (gate <= limit only, linear in [-limit, limit], the "+1") -> o = W2 a + b2
  -> out = sum_k w_k o_k, rounding to x.dtype where the torch reference rounds (after each matmul, each bias
  add, the SwiGLU output and the combine). The kernels run the SwiGLU on float32 accumulators and round once.
  Both are differentiable (the grouped path by a custom VJP that dequantizes one expert at a time in the
  backward too) and take optional per-expert LoRA adapters (`LORA_LEAVES`): fine-tuning on the packed base.
- `moe_experts_pallas`: the same math as a megablox-style grouped matmul ("gmm"): the (token, expert)
  pairs are sorted by expert and each expert's rows are padded to whole tiles of `tm`; a scalar-prefetched
  table gives each tile its expert, so only tiles that hold tokens do work (at most cdiv(T*X, tm) +
  min(E, T*X) tiles, independent of E). Weights are read as the checkpoint's uint8 blocks and E8M0 scales and
  dequantized next to the dot with integer/f32 ops only (no fp4 dtype: TPU v5e/v6e have none). mlp1 fuses
  bias + clamped SwiGLU into its epilogue; mlp2 fuses its bias; the routing weights are applied in the
  combine (which is where the reference rounds them).
- `moe_experts`: the dispatcher the model calls.

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
    resolve_impl,
)
from gptoss_jax.mxfp4 import BLOCK as GROUP
from gptoss_jax.mxfp4 import GROUP_BYTES, dequantize, e8m0_to_f32, fp4_to_f32
from gptoss_jax.ops import F32, group_by_expert, precision, swiglu


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


# ======================================================================================= reference (XLA path)
# Optional low-rank adapters of the experts (LoRA), one (A, B) pair per expert and matrix, B already
# multiplied by the LoRA scale: mlp1_lora_a (E,r,D), mlp1_lora_b (E,2F,r), mlp2_lora_a (E,r,F),
# mlp2_lora_b (E,D,r).
# Expert e's mlp1 becomes W1 x + B1 (A1 x) for its own tokens only (likewise mlp2): the low-rank product runs
# in float32 at full precision (the adapters are float32 and r is small) and is added before the product is
# rounded, which is what PEFT's merged W + B A gives in float32.
LORA_LEAVES = ("mlp1_lora_a", "mlp1_lora_b", "mlp2_lora_a", "mlp2_lora_b")
HIGHEST = lax.Precision.HIGHEST


def _round_add(h: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """A separate bias add in `dtype`: computed in f32 and rounded once (as torch's bf16 add does)."""
    return (h.astype(jnp.float32) + b.astype(jnp.float32)).astype(dtype)


def expert_weight(p: dict, name: str, e, dtype) -> jax.Array:
    """Expert e's (out, in) weight for `name` in {"mlp1", "mlp2"}, dequantized here if packed.

    `e` may be an int array of any shape (a gather of experts): the result has e.shape + (out, in).
    """
    if f"{name}_weight" in p:
        return expert_leaf(p, f"{name}_weight", e).astype(dtype)
    return dequantize(expert_leaf(p, f"{name}_blocks", e), expert_leaf(p, f"{name}_scales", e), dtype)


PACKED_LEAVES = ("mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales")
STACKED_LEAVES = PACKED_LEAVES + ("mlp1_weight", "mlp2_weight")  # the big ones: see `expert_leaf`


def _at(p: dict, name: str, e):
    return (p["layer"], e) if "layer" in p and name in STACKED_LEAVES else e


def expert_leaf(p: dict, name: str, e):
    """Expert(s) `e` of the expert leaf `name`. Inside the layer scan the weight leaves (`STACKED_LEAVES`)
    may be the whole stack (R, E, ...) with the repeat in `p["layer"]` (`model.forward`): then this reads
    only the selected experts of that layer, where slicing the layer out first would copy all of its experts
    every call (12 MiB per layer packed, 4x that dense, for the CPU benchmark model)."""
    return p[name][_at(p, name, e)]


def own_layer(p: dict) -> dict:
    """`p` with its stacked leaves sliced to its own layer (for the paths that take one layer's arrays: the
    Pallas kernels, expert parallelism)."""
    if "layer" not in p:
        return p
    return {n: a[p["layer"]] if n in STACKED_LEAVES else a for n, a in p.items() if n != "layer"}


def _gathered_weights(p: dict, it, dtype):
    """The (mlp1, mlp2) weights of experts `it`, dequantized if packed. The packed bytes are gathered into a
    plain buffer first (the barrier): fused into the decode, the gather (and, inside the layer scan, the
    slice of the layer's stacked experts) runs several times slower on XLA:CPU, as in `_over_tiles`."""
    if "mlp1_weight" in p:
        return expert_weight(p, "mlp1", it, dtype), expert_weight(p, "mlp2", it, dtype)
    b1, s1, b2, s2 = jax.lax.optimization_barrier(
        tuple(expert_leaf(p, n, it) for n in PACKED_LEAVES)
    )
    return dequantize(b1, s1, dtype), dequantize(b2, s2, dtype)


def num_experts_of(p: dict) -> int:
    return p["mlp1_bias"].shape[0]


def has_lora(p: dict) -> bool:
    return LORA_LEAVES[0] in p


def _lora_of(p: dict, e):
    """Expert e's adapters (A1, B1, A2, B2), or None; `e` may be an index array like in `expert_weight`."""
    return tuple(p[n][e] for n in LORA_LEAVES) if has_lora(p) else None


def _mm(spec: str, a, b, dtype):
    """A product accumulated in float32 and not rounded yet (`ops.einsum` rounds; the adapters add first)."""
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision(dtype))


def _low_rank(spec_a: str, spec_b: str, a, b, x):
    return jnp.einsum(spec_b, b, jnp.einsum(spec_a, a, x.astype(F32), precision=HIGHEST), precision=HIGHEST)


def _expert_mlp(xs, w1, b1, w2, b2, alpha, limit, lora=None):
    """One expert on a tile of its rows: xs (T,D), weights (2F,D)/(D,F) -> (T,D). Each matmul, bias and the
    SwiGLU rounded to xs.dtype. The weights are the LEFT operand of both products ((2F,D) @ xs^T -> (2F,T),
    then (D,F) @ (F,T)), with one small transpose at the end: XLA:CPU's GEMM runs ~1.1x faster this way for a
    64-row tile than with the rows on the left (benchmarks/cpu_profile.py). `lora`: the expert's adapters.
    """
    dtype = xs.dtype
    h = _mm("FD,TD->FT", w1, xs, dtype)
    if lora is not None:
        h = h + _low_rank("RD,TD->RT", "FR,RT->FT", lora[0], lora[1], xs)
    h = _round_add(h.astype(dtype), b1[:, None], dtype)
    h = h.reshape(h.shape[0] // 2, 2, h.shape[1])  # interleaved rows: gate 2i, linear 2i+1
    a = swiglu(h[:, 0], h[:, 1], alpha, limit)
    o = _mm("DF,FT->DT", w2, a, dtype)
    if lora is not None:
        o = o + _low_rank("RF,FT->RT", "DR,RT->DT", lora[2], lora[3], a)
    return _round_add(o.astype(dtype), b2[:, None], dtype).T


def moe_experts_gather(x, idx, w, p, *, alpha: float, limit: float):
    """Few tokens (decode): gather and dequantize only the selected experts' packed weights, token by token.

    Per token, mlp1 of its X experts is ONE matrix-vector product (their (2F, D) weights stacked into
    (X*2F, D)) and mlp2 is X products, each weight the left operand in its stored row-major layout. XLA:CPU
    runs these as plain GEMVs; a batched einsum over (T, X) ran ~10x slower on CPU (a batched dot of small
    operands), and so does anything that transposes a dequantized weight before the product.
    Rounding as in `_expert_mlp`: each product rounded to x.dtype, the weighted sum over experts in float32.
    Selections outside [0, E) (remote experts) contribute nothing. Plain jnp over a fixed-length map, so
    reverse-mode autodiff goes through it as it is.
    """
    dtype = x.dtype
    X = idx.shape[1]
    E = num_experts_of(p)
    local = (idx >= 0) & (idx < E)
    idx, w = jnp.where(local, idx, 0), jnp.where(local, w, 0)

    def one(args):
        xt, it, wt = args  # (D,), (X,), (X,)
        w1, w2 = _gathered_weights(p, it, dtype)  # (X,2F,D), (X,D,F)
        lora = _lora_of(p, it)
        h = _mm("MD,D->M", w1.reshape(-1, w1.shape[-1]), xt, dtype).reshape(X, -1)
        if lora is not None:
            h = h + _low_rank("XRD,D->XR", "XFR,XR->XF", lora[0], lora[1], xt)
        h = _round_add(h.astype(dtype), p["mlp1_bias"][it], dtype).reshape(X, -1, 2)
        a = swiglu(h[..., 0], h[..., 1], alpha, limit)  # (X,F)
        extra = None if lora is None else _low_rank("XRF,XF->XR", "XDR,XR->XD", lora[2], lora[3], a)
        out = jnp.zeros(xt.shape, F32)
        for j in range(X):
            o = _mm("DF,F->D", w2[j], a[j], dtype)
            if extra is not None:
                o = o + extra[j]
            o = _round_add(o.astype(dtype), p["mlp2_bias"][it[j]], dtype)
            out = out + o.astype(F32) * wt[j].astype(F32)
        return out.astype(dtype)

    if x.shape[0] == 1:  # batch-1 decode: no loop at all
        return one((x[0], idx[0], w[0]))[None]
    return jax.lax.map(one, (x, idx, w))


def _tile_rows(m: int, e: int) -> int:
    # About one tile per expert's average share, a power of two in [4, 256]: small enough that partly
    # filled tiles waste little, large enough to keep the matmuls efficient. (Decoding 16 sequences on the
    # CPU benchmark model, 2 rows per expert on average: 4-row tiles take 7% less time than 8-row ones,
    # 2-row ones 6% more.)
    avg = max(1, -(-m // e))
    return int(min(256, max(4, 1 << (avg - 1).bit_length())))


def _over_tiles(p: dict, sizes, starts, tm: int, dtype, body, carry):
    """carry = body(e, weights, s, keep, carry) for each tile of `tm` sorted rows of each expert with tokens:
    weights = (w1, b1, w2, b2, lora) of expert e, dequantized once per expert; s the tile's first row; keep
    (tm,) the rows of the tile that are e's (the rest belong to the next expert or are slack).

    Packed experts: each expert's packed bytes are sliced in a `lax.cond` of their own, then dequantized.
    Dequantizing `blocks[e]` directly makes XLA fuse the dynamic slice into the decode, which XLA:CPU runs
    ~8x slower than the same decode of a plain buffer (3 ms against 0.36 ms for one 1024x512 weight); the
    conditional's boundary keeps the slice a plain copy. Carrying the next expert's bytes through the loop
    does that too, but XLA double-buffers the carry with two more copies per expert (the MoE of a 16-row
    decode step on the CPU benchmark model: 10.7 ms that way, 9.0 ms this way). Dequantizing all experts
    before the loop writes a dense copy of the layer (100 MB per layer for the CPU benchmark model) whose
    fresh pages cost more than the arithmetic. This way one expert's dense weights exist at a time and stay
    in cache for its tiles.
    """
    E = num_experts_of(p)
    packed_names = PACKED_LEAVES if "mlp1_blocks" in p else ()

    def packed_of(e):
        return tuple(expert_leaf(p, n, e) for n in packed_names)

    def expert(e, carry):
        busy = sizes[e] > 0
        if packed_names:  # an idle expert slices its neighbour's bytes, which nothing reads (a loop-invariant
            # branch, e.g. expert 0, lets XLA merge the two branches and fuse the slice into the decode again)
            packed = jax.lax.cond(busy, packed_of, lambda e: packed_of((e + 1) % E), e)

        def compute(carry):
            if packed_names:
                w1 = dequantize(packed[0], packed[1], dtype)
                w2 = dequantize(packed[2], packed[3], dtype)
            else:
                w1, w2 = expert_weight(p, "mlp1", e, dtype), expert_weight(p, "mlp2", e, dtype)
            weights = (w1, p["mlp1_bias"][e], w2, p["mlp2_bias"][e], _lora_of(p, e))
            end = starts[e] + sizes[e]

            def tile(j, carry):
                s = starts[e] + j * tm
                return body(e, weights, s, s + jnp.arange(tm) < end, carry)

            return jax.lax.fori_loop(0, (sizes[e] + tm - 1) // tm, tile, carry)

        return jax.lax.cond(busy, compute, lambda c: c, carry)

    return jax.lax.fori_loop(0, E, expert, carry)


def _sorted_rows(x, idx, w, E: int):
    """The (token, expert) pairs sorted by expert: (order, sizes, starts, tm, rows of x (M+tm, D) with a tile
    of slack, routing weight of each sorted row (M+tm,) float32, 0 for selections outside [0, E))."""
    T, X = idx.shape
    M = T * X
    order, sizes, starts = group_by_expert(idx, E)
    tm = _tile_rows(M, E)
    xs = jnp.concatenate([x[order // X], jnp.zeros((tm, x.shape[-1]), x.dtype)], axis=0)
    flat = idx.reshape(M)
    wts = jnp.where((flat >= 0) & (flat < E), w.reshape(M), 0).astype(F32)[order]
    return order, sizes, starts, tm, xs, jnp.concatenate([wts, jnp.zeros((tm,), F32)])


def _grouped_forward(x, idx, w, p, alpha, limit):
    dtype = x.dtype
    T, X = idx.shape
    order, sizes, starts, tm, xs, wts = _sorted_rows(x, idx, w, num_experts_of(p))

    def body(e, weights, s, keep, out):
        o = _expert_mlp(jax.lax.dynamic_slice_in_dim(xs, s, tm), *weights[:4], alpha, limit, weights[4])
        cur = jax.lax.dynamic_slice_in_dim(out, s, tm)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep[:, None], o, cur), s, 0)

    out = _over_tiles(p, sizes, starts, tm, dtype, body, jnp.zeros(xs.shape, dtype))[: T * X]
    combined = jnp.zeros((T, x.shape[-1]), F32).at[order // X].add(out.astype(F32) * wts[: T * X, None])
    return combined.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped(x, idx, w, p, alpha, limit):
    return _grouped_forward(x, idx, w, p, alpha, limit)


def _grouped_fwd(x, idx, w, p, alpha, limit):
    # symbolic_zeros: each input says whether it is differentiated, so the backward computes only those
    # cotangents (no weight gradients while training adapters only). The residuals are the inputs: the
    # backward recomputes each tile, so nothing of size tokens x experts x width is kept.
    need = {n: None for n, a in p.items() if a.perturbed}
    if x.perturbed:
        need["x"] = None
    if w.perturbed:
        need["w"] = None
    x, idx, w = x.value, idx.value, w.value
    p = {n: a.value for n, a in p.items()}
    return _grouped_forward(x, idx, w, p, alpha, limit), (x, idx, w, p, need)


def _grouped_bwd(alpha, limit, res, dy):
    """Per expert, per tile (the forward's loop, dequantizing one expert at a time): recompute the tile with
    `jax.vjp` of `_expert_mlp`, pull back the tile's share of dy, and accumulate the cotangents of the rows
    (-> x), of the routing weights (<o_k, dy>) and of the expert's own parameters (biases, dense weights,
    adapters) that are being differentiated."""
    x, idx, w, p, need = res
    none = (None, None, None, {n: None for n in p})
    if isinstance(dy, jax.custom_derivatives.SymbolicZero) or not need:
        return none
    dtype = x.dtype
    T, X = idx.shape
    M, E = T * X, num_experts_of(p)
    order, sizes, starts, tm, xs, wts = _sorted_rows(x, idx, w, E)
    dys = jnp.concatenate([dy.astype(F32)[order // X], jnp.zeros((tm, x.shape[-1]), F32)])
    trained = [n for n in p if n in need and jnp.issubdtype(p[n].dtype, jnp.floating)]

    def body(e, weights, s, keep, carry):
        dxs, dws, grads = carry
        w1, b1, w2, b2, lora = weights
        given = {"x": jax.lax.dynamic_slice_in_dim(xs, s, tm), "mlp1_bias": b1, "mlp2_bias": b2,
                 "mlp1_weight": w1, "mlp2_weight": w2} | dict(zip(LORA_LEAVES, lora or ()))  # fmt: skip
        diff = {n: given[n] for n in [*trained, "x"] if n in need}

        def tile(diff):
            a = given | diff
            lo = tuple(a[n] for n in LORA_LEAVES) if lora is not None else None
            return _expert_mlp(a["x"], a["mlp1_weight"], a["mlp1_bias"], a["mlp2_weight"], a["mlp2_bias"],
                               alpha, limit, lo)  # fmt: skip

        o, pull = jax.vjp(tile, diff)
        dyt = jax.lax.dynamic_slice_in_dim(dys, s, tm)
        wt = jax.lax.dynamic_slice_in_dim(wts, s, tm)
        (g,) = pull(jnp.where(keep[:, None], dyt * wt[:, None], 0).astype(o.dtype))
        dw = jnp.sum(o.astype(F32) * dyt, axis=1)
        dws = jax.lax.dynamic_update_slice_in_dim(
            dws, jnp.where(keep, dw, jax.lax.dynamic_slice_in_dim(dws, s, tm)), s, 0)
        if "x" in g:
            cur = jax.lax.dynamic_slice_in_dim(dxs, s, tm)
            dxs = jax.lax.dynamic_update_slice_in_dim(dxs, jnp.where(keep[:, None], g["x"].astype(F32), cur),
                                                      s, 0)
        grads = {n: a.at[_at(p, n, e)].add(g[n].astype(F32)) for n, a in grads.items()}
        return dxs, dws, grads

    grads0 = {n: jnp.zeros(p[n].shape, F32) for n in trained}
    dxs, dws, grads = _over_tiles(p, sizes, starts, tm, dtype, body, (jnp.zeros(xs.shape, F32),
                                                                      jnp.zeros(wts.shape, F32), grads0))
    dx = jnp.zeros(x.shape, F32).at[order // X].add(dxs[:M]).astype(x.dtype) if "x" in need else None
    dw = jnp.zeros((M,), F32).at[order].set(dws[:M]).reshape(T, X).astype(w.dtype) if "w" in need else None
    return dx, None, dw, {n: grads[n].astype(p[n].dtype) if n in grads else None for n in p}


_grouped.defvjp(_grouped_fwd, _grouped_bwd, symbolic_zeros=True)


def moe_experts_grouped(x, idx, w, p, *, alpha: float, limit: float):
    """Many tokens (prefill, training): sort the (token, expert) pairs by expert and run each expert's rows in
    tiles.

    Each expert with tokens is dequantized once and multiplies only its own rows, so the work grows with
    tokens x top-k, not with the number of experts (a dense all-experts product would be E/X times more).
    Selections with idx outside [0, E) contribute nothing (used by expert parallelism for remote experts).

    Differentiable: the loop's trip counts depend on the routing, which reverse-mode autodiff cannot go
    through, so a custom VJP runs the same loop backwards (`_grouped_bwd`), one expert's weights dequantized
    at a time. Packed experts stay packed in the backward too, and get no cotangent (they are frozen);
    dequantized experts get their weight gradients (full fine-tuning).
    """
    return _grouped(x, idx, w, p, alpha, limit)


def moe_experts_reference(x, expert_idx, expert_w, params, *, alpha: float, limit: float) -> jax.Array:
    """The XLA path and the kernels' oracle: the gather path when there are fewer (token, expert) pairs than
    experts (decode), else the grouped path. x (T,D), expert_idx/expert_w (T,X) -> (T,D) in x.dtype.

    Rounds to x.dtype where the torch reference rounds: after each matmul, each bias add, the SwiGLU output;
    the combine over the k experts accumulates in float32 and rounds once.
    """
    fn = moe_experts_gather if expert_idx.size < num_experts_of(params) else moe_experts_grouped
    return fn(x, expert_idx, expert_w, params, alpha=alpha, limit=limit)

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
        h = _round_add(h.astype(dt), b_ref[...], dt)  # matmul output rounded, then the bias add rounded
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
        o_ref[...] = _round_add(o.astype(dt), b_ref[...], dt)


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
            h.append(_round_add(accs[cls].astype(dt), b[None, :], dt))
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
        o = _round_add(acc.astype(dt), b[None, :], dt)
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


def moe_experts(x, expert_idx, expert_w, params, *, alpha: float, limit: float, impl: str = "xla",
                interpret: bool | None = None) -> jax.Array:
    """MoE experts for (T, D) activations; impl "xla" (reference), "pallas" (kernels) or "auto". Experts
    with adapters (`LORA_LEAVES`) take the XLA path: the kernels have no low-rank term."""
    if resolve_impl(impl) == "xla" or has_lora(params):
        return moe_experts_reference(x, expert_idx, expert_w, params, alpha=alpha, limit=limit)
    params = own_layer(params)
    try:
        return moe_experts_pallas(x, expert_idx, expert_w, params, alpha=alpha, limit=limit,
                                  interpret=interpret)
    except KernelNotApplicable:  # shapes the kernel cannot tile (checked at trace time)
        return moe_experts_reference(x, expert_idx, expert_w, params, alpha=alpha, limit=limit)

"""The MoE experts on XLA (spec §2.5), MXFP4 weights kept packed (spec §4): the model's expert path.

- `moe_experts(x, idx, w, p, cfg)`: a layer's selected experts, what `model.moe_layer` calls; under a mesh
  each device runs only its own experts (`sharding.expert_parallel`).
- `local_experts`: the one dispatcher: the Pallas kernels (`kernels.mxfp4_matmul`) where the config asks for
  them and they apply (packed weights, no adapters, a shape they can tile), else the XLA path.
- `moe_experts_xla`: the XLA path, plain jnp: for decode it gathers and dequantizes only the selected experts
  (`moe_experts_gather`), for prefill and training it sorts the (token, expert) pairs by expert and runs each
  expert's rows in tiles (`moe_experts_grouped`). Both compute h = W1 x + b1 -> clamped SwiGLU (gate <= limit
  only, linear in [-limit, limit], the "+1") -> o = W2 a + b2 -> out = sum_k w_k o_k, rounding to x.dtype
  where the torch reference rounds (after each matmul, each bias add, the SwiGLU output and the combine).
- Differentiable: the gather path by autodiff, the grouped path by a custom VJP that dequantizes one expert
  at a time in the backward too. Dense (dequantized) experts get weight gradients (full fine-tuning).
- Per-expert LoRA adapters (`LORA_LEAVES`) ride along with the expert weights: fine-tuning on the packed base.
- Inside the layer scan the big expert weights (`STACKED_LEAVES`) are whole stacks (R, E, ...) read at
  (layer, expert) (`expert_leaf`): no call copies a layer's experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .config import Config
from .kernels import KernelNotApplicable, resolve_impl
from .kernels.mxfp4_matmul import moe_experts_pallas
from .mxfp4 import dequantize
from .ops import F32, group_by_expert, precision, round_add, swiglu
from .sharding import current_mesh, expert_parallel

# Optional low-rank adapters of the experts (LoRA), one (A, B) pair per expert and matrix, B already
# multiplied by the LoRA scale: mlp1_lora_a (E,r,D), mlp1_lora_b (E,2F,r), mlp2_lora_a (E,r,F),
# mlp2_lora_b (E,D,r).
# Expert e's mlp1 becomes W1 x + B1 (A1 x) for its own tokens only (likewise mlp2): the low-rank product runs
# in float32 at full precision (the adapters are float32 and r is small) and is added before the product is
# rounded, which is what PEFT's merged W + B A gives in float32.
LORA_LEAVES = ("mlp1_lora_a", "mlp1_lora_b", "mlp2_lora_a", "mlp2_lora_b")
# Pooled adapters (the serving engine: many adapters in one batch, `engine.adapters`): with this leaf, the
# (T,) int32 adapter slot of each token, each LORA_LEAVES entry has a leading slot axis S (mlp1_lora_a
# (S,E,r,D), ...; slot 0 all zeros = no adapter, B scaled per slot), and each (token, expert) pair adds its
# own slot's low-rank product. Decode gathers the slot's (A, B) per pair; a tile of sorted rows multiplies
# by every slot's A and keeps each row's own slot (a one-hot over S: the other slots add exact zeros), so
# the work per row grows with S x r, small next to the expert's own product. Inference only.
LORA_SLOT = "lora_slot"
# With this leaf too (the layer's repeat r, inside the layer scan), the pooled leaves are whole stacks
# (R,S,E,r,D), ...: a call with no adapted token never slices them (slicing a layer's pool out copies all
# of its slots every call: a base-only step would pay for the pool it skips).
LORA_REPEAT = "lora_repeat"
HIGHEST = lax.Precision.HIGHEST


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
    may be the whole stack (R, E, ...) with the repeat in `p["layer"]` (`model.apply`): then this reads
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
    b1, s1, b2, s2 = jax.lax.optimization_barrier(tuple(expert_leaf(p, n, it) for n in PACKED_LEAVES))
    return dequantize(b1, s1, dtype), dequantize(b2, s2, dtype)


def num_experts_of(p: dict) -> int:
    return p["mlp1_bias"].shape[0]


def has_lora(p: dict) -> bool:
    return LORA_LEAVES[0] in p


def _lora_of(p: dict, e):
    """Expert e's adapters (A1, B1, A2, B2), or None; `e` may be an index array like in `expert_weight`.
    Pooled (`LORA_SLOT`): every slot's, (S, ...) each."""
    if not has_lora(p):
        return None
    return tuple(p[n][:, e] if LORA_SLOT in p else p[n][e] for n in LORA_LEAVES)


def _pooled_low_rank(spec_a: str, spec_b: str, a, b, x, hot):
    """`_low_rank` of every slot at once, each row keeping its own slot's: hot (T,S) the rows' one-hot slots;
    spec_a gives (T,S,R), spec_b takes it."""
    u = jnp.einsum(spec_a, a, x.astype(F32), precision=HIGHEST) * hot[:, :, None]
    return jnp.einsum(spec_b, b, u, precision=HIGHEST)


def _mm(spec: str, a, b, dtype):
    """A product accumulated in float32 and not rounded yet (`ops.einsum` rounds; the adapters add first)."""
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision(dtype))


def _low_rank(spec_a: str, spec_b: str, a, b, x):
    return jnp.einsum(spec_b, b, jnp.einsum(spec_a, a, x.astype(F32), precision=HIGHEST), precision=HIGHEST)


def _expert_mlp(xs, w1, b1, w2, b2, alpha, limit, lora=None, hot=None):
    """One expert on a tile of its rows: xs (T,D), weights (2F,D)/(D,F) -> (T,D). Each matmul, bias and the
    SwiGLU rounded to xs.dtype. The weights are the LEFT operand of both products ((2F,D) @ xs^T -> (2F,T),
    then (D,F) @ (F,T)), with one small transpose at the end: XLA:CPU's GEMM runs ~1.1x faster this way for a
    64-row tile than with the rows on the left (benchmarks/cpu_profile.py). `lora`: the expert's adapters;
    pooled ones (S, ...) with `hot` (T,S) each row's one-hot slot.
    """
    dtype = xs.dtype
    h = _mm("FD,TD->FT", w1, xs, dtype)
    if hot is not None:
        h = h + _pooled_low_rank("SRD,TD->TSR", "SFR,TSR->FT", lora[0], lora[1], xs, hot)
    elif lora is not None:
        h = h + _low_rank("RD,TD->RT", "FR,RT->FT", lora[0], lora[1], xs)
    h = round_add(h.astype(dtype), b1[:, None], dtype)
    h = h.reshape(h.shape[0] // 2, 2, h.shape[1])  # interleaved rows: gate 2i, linear 2i+1
    a = swiglu(h[:, 0], h[:, 1], alpha, limit)
    o = _mm("DF,FT->DT", w2, a, dtype)
    if hot is not None:
        o = o + _pooled_low_rank("SRF,FT->TSR", "SDR,TSR->DT", lora[2], lora[3], a, hot)
    elif lora is not None:
        o = o + _low_rank("RF,FT->RT", "DR,RT->DT", lora[2], lora[3], a)
    return round_add(o.astype(dtype), b2[:, None], dtype).T


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

    slot = p.get(LORA_SLOT, jnp.zeros(x.shape[0], jnp.int32))

    def one(args):
        xt, it, wt, st = args  # (D,), (X,), (X,), ()
        w1, w2 = _gathered_weights(p, it, dtype)  # (X,2F,D), (X,D,F)
        # pooled: the token's own slot's adapters of its experts (a gather)
        lora = tuple(p[n][st, it] for n in LORA_LEAVES) if LORA_SLOT in p else _lora_of(p, it)
        h = _mm("MD,D->M", w1.reshape(-1, w1.shape[-1]), xt, dtype).reshape(X, -1)
        if lora is not None:
            h = h + _low_rank("XRD,D->XR", "XFR,XR->XF", lora[0], lora[1], xt)
        h = round_add(h.astype(dtype), p["mlp1_bias"][it], dtype).reshape(X, -1, 2)
        a = swiglu(h[..., 0], h[..., 1], alpha, limit)  # (X,F)
        extra = None if lora is None else _low_rank("XRF,XF->XR", "XDR,XR->XD", lora[2], lora[3], a)
        out = jnp.zeros(xt.shape, F32)
        for j in range(X):
            o = _mm("DF,F->D", w2[j], a[j], dtype)
            if extra is not None:
                o = o + extra[j]
            o = round_add(o.astype(dtype), p["mlp2_bias"][it[j]], dtype)
            out = out + o.astype(F32) * wt[j].astype(F32)
        return out.astype(dtype)

    if x.shape[0] == 1:  # batch-1 decode: no loop at all
        return one((x[0], idx[0], w[0], slot[0]))[None]
    return jax.lax.map(one, (x, idx, w, slot))


def _tile_rows(m: int, e: int) -> int:
    # About one tile per expert's average share, a power of two in [4, 64]: small enough that partly
    # filled tiles waste little, large enough to keep the matmuls efficient. (Decoding 16 sequences on the
    # CPU benchmark model, 2 rows per expert on average: 4-row tiles take 7% less time than 8-row ones,
    # 2-row ones 6% more. A 2048-token prefill, 256 rows per expert: 64-row tiles take 13% less CPU time than
    # 256-row ones, whose last, partly filled tile wastes up to half an expert's work; Intel Xeon.)
    avg = max(1, -(-m // e))
    return int(min(64, max(4, 1 << (avg - 1).bit_length())))


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
    hots = None
    if LORA_SLOT in p:  # each sorted row's one-hot adapter slot, with the tile of slack
        S = p[LORA_LEAVES[0]].shape[0]
        hots = jax.nn.one_hot(p[LORA_SLOT][order // X], S, dtype=F32)
        hots = jnp.concatenate([hots, jnp.zeros((tm, S), F32)])

    def body(e, weights, s, keep, out):
        hot = None if hots is None else jax.lax.dynamic_slice_in_dim(hots, s, tm)
        o = _expert_mlp(jax.lax.dynamic_slice_in_dim(xs, s, tm), *weights[:4], alpha, limit, weights[4], hot)
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
    if LORA_SLOT in p:
        raise ValueError("pooled adapters (the serving engine's) are inference only: no gradient")
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
            dws, jnp.where(keep, dw, jax.lax.dynamic_slice_in_dim(dws, s, tm)), s, 0
        )
        if "x" in g:
            cur = jax.lax.dynamic_slice_in_dim(dxs, s, tm)
            dxs = jax.lax.dynamic_update_slice_in_dim(
                dxs, jnp.where(keep[:, None], g["x"].astype(F32), cur), s, 0
            )
        grads = {n: a.at[_at(p, n, e)].add(g[n].astype(F32)) for n, a in grads.items()}
        return dxs, dws, grads

    grads0 = {n: jnp.zeros(p[n].shape, F32) for n in trained}
    dxs, dws, grads = _over_tiles(
        p, sizes, starts, tm, dtype, body, (jnp.zeros(xs.shape, F32), jnp.zeros(wts.shape, F32), grads0)
    )
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


def moe_experts_xla(x, expert_idx, expert_w, params, *, alpha: float, limit: float) -> jax.Array:
    """The XLA path: the gather path when there are fewer (token, expert) pairs than
    experts (decode), else the grouped path. x (T,D), expert_idx/expert_w (T,X) -> (T,D) in x.dtype.

    Rounds to x.dtype where the torch reference rounds: after each matmul, each bias add, the SwiGLU output;
    the combine over the k experts accumulates in float32 and rounds once.
    """
    fn = moe_experts_gather if expert_idx.size < num_experts_of(params) else moe_experts_grouped
    return fn(x, expert_idx, expert_w, params, alpha=alpha, limit=limit)


EXPERT_LEAVES = ("mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales", "mlp1_weight", "mlp2_weight",
                 "mlp1_bias", "mlp2_bias", *LORA_LEAVES, LORA_SLOT, LORA_REPEAT)  # fmt: skip


# ============================================================================================= dispatch
def local_experts(
    x,
    expert_idx,
    expert_w,
    params,
    *,
    alpha: float,
    limit: float,
    impl: str = "xla",
    interpret: bool | None = None,
) -> jax.Array:
    """The experts of (T, D) activations on one device; impl "xla", "pallas" (kernels) or "auto". The
    kernels read packed weights only and have no low-rank term: dense experts and experts with adapters
    (`LORA_LEAVES`) take the XLA path, and so do shapes the kernels cannot tile."""
    if resolve_impl(impl) == "xla" or has_lora(params) or "mlp1_blocks" not in params:
        return moe_experts_xla(x, expert_idx, expert_w, params, alpha=alpha, limit=limit)
    params = own_layer(params)
    try:
        return moe_experts_pallas(
            x, expert_idx, expert_w, params, alpha=alpha, limit=limit, interpret=interpret
        )
    except KernelNotApplicable:  # shapes the kernel cannot tile (checked at trace time)
        return moe_experts_xla(x, expert_idx, expert_w, params, alpha=alpha, limit=limit)


def moe_experts(x, idx, w, p: dict, cfg: Config):
    """A layer's selected experts of (T,D) tokens -> (T,D): `local_experts`, run per device with only its
    own experts under a mesh. p: the layer's parameters (the entries other than `EXPERT_LEAVES` and the
    repeat index "layer" are dropped)."""
    p = {n: a for n, a in p.items() if n in EXPERT_LEAVES or n == "layer"}
    local = functools.partial(
        local_experts, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, impl=cfg.moe_impl
    )
    if LORA_SLOT in p:
        # pooled adapters: only a call with some adapted token pays for them (a base-only call takes the
        # plain path, kernels included); adding a slot-0 row's zeros changes no bit, so the two agree
        base = {n: a for n, a in p.items() if n not in (*LORA_LEAVES, LORA_SLOT, LORA_REPEAT)}
        if current_mesh() is not None:
            raise ValueError("pooled adapters do not run on a mesh yet")

        def adapted():  # whole stacks: this layer's slots sliced here only (`LORA_REPEAT`)
            r = p.get(LORA_REPEAT)
            own = {n: a[r] if r is not None and n in LORA_LEAVES else a for n, a in p.items()}
            own.pop(LORA_REPEAT, None)
            return local(x, idx, w, own)

        return jax.lax.cond(jnp.any(p[LORA_SLOT] > 0), adapted, lambda: local(x, idx, w, base))
    if current_mesh() is not None:
        return expert_parallel(local, x, idx, w, own_layer(p), cfg)
    return local(x, idx, w, p)

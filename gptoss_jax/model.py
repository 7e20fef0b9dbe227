"""gpt-oss in Flax NNX: the whole architecture in one file.

Implemented: RMSNorm with float32 math; YaRN RoPE (NTK-by-parts, no truncation of the ramp, the attention
concentration folded into cos and sin, half-split rotation); grouped-query attention with a learned sink
logit per query head and a 128-token window (including the current token) on sliding layers; router with
bias, then top-k, then a softmax over the k; experts with interleaved gate/linear rows, the clamped SwiGLU
with its +1, expert biases, MXFP4 weights kept packed and dequantized inside the expert computation; untied
unembedding. bf16 by default, float32 for the exact mode; wherever the reference computes in float32
(norms, RoPE tables, softmax), so do we.

Axis letters used in every einsum and shape comment:
  B batch, T query tokens, S key slots, D hidden, N query heads, K kv heads, G query heads per kv head
  (N = K*G, query head n = k*G + g), H head dim, E experts, X selected experts (top-k), F expert width,
  V vocabulary, C MXFP4 groups per row (in/32).

The modules only create parameters and call the free functions below (`rms_norm`, `rope`, `attention`,
`route`, `swiglu`, `moe`), so each piece is tested one to one against the reference.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, mxfp4
from .config import Config
from .kernels._common import pad_axis
from .kernels.attention import attention_reference, visible  # noqa: F401 (visible: the attention mask)
from .sharding import constrain, current_mesh, map_attention, moe_experts_sharded, with_model_mesh

F32 = jnp.float32


def _precision(dtype):
    # float32 mode means float32 matmuls on every backend (TPU/GPU default to bf16/tf32 passes otherwise).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def _einsum(spec, a, b, dtype):
    """einsum with float32 accumulation, rounded once to `dtype` (what cuBLAS does in the reference)."""
    out = jnp.einsum(spec, a, b, preferred_element_type=F32, precision=_precision(dtype))
    return out.astype(dtype)


# ------------------------------------------------------------------------------------------------ norms
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """y = x * rsqrt(mean(x^2) + eps) * scale, all in float32, cast back to x's dtype."""
    t = x.astype(F32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + eps)
    return (t * scale.astype(F32)).astype(x.dtype)


# ------------------------------------------------------------------------------------------------- rope
def rope_inv_freq(cfg: Config) -> tuple[np.ndarray, float]:
    """YaRN inverse frequencies (H/2,) float32 and the attention concentration, as the reference computes.

    low/high are NOT rounded (HF truncate=false): rounding them moves 2 of the 32 frequencies.
    """
    d = cfg.head_dim
    base = np.float32(cfg.rope_theta)
    freq = base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    s = cfg.rope_scaling_factor
    if s <= 1.0:
        return (1.0 / freq).astype(np.float32), 1.0
    concentration = 0.1 * math.log(s) + 1.0
    d_half = d / 2
    low = d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_beta * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
    if not 0 < low < high < d_half - 1:
        raise ValueError(f"YaRN ramp out of range: low={low:.4f} high={high:.4f} for head_dim {d}")
    interpolation = np.float32(1.0) / (np.float32(s) * freq)
    extrapolation = np.float32(1.0) / freq
    ramp = (np.arange(d_half, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    mask = np.float32(1) - np.clip(ramp, 0, 1)
    inv_freq = interpolation * (1 - mask) + extrapolation * mask
    return inv_freq.astype(np.float32), concentration


def rope_cos_sin(positions: jax.Array, cfg: Config, dtype) -> tuple[jax.Array, jax.Array]:
    """positions (B,T) int -> cos, sin (B,T,H/2) in `dtype`; angles and trig in float32, then cast."""
    inv_freq, conc = rope_inv_freq(cfg)
    # An elementwise product, not a matmul: no bf16 pass can round the position (257 -> 256).
    angles = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)
    return (jnp.cos(angles) * conc).astype(dtype), (jnp.sin(angles) * conc).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split (NeoX) rotation: dim j pairs with j + H/2. x (B,T,...,H), cos/sin (B,T,H/2)."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# -------------------------------------------------------------------------------------------- attention
# One copy of the math: the XLA path is the kernels' reference (kernels/attention.py, with `visible`, the
# (B,T),(B,S) -> (B,T,S) mask); it rounds where the torch reference does and the kernel tests compare to it.
attention_xla = attention_reference


def attention(q, k, v, sinks, q_pos, k_pos, *, window: int, cfg: Config):
    if _resolve(cfg.attention_impl) == "pallas":

        def kernel(q, k, v, sinks, q_pos, k_pos):
            return kernels.attention(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=cfg.sm_scale,
                                     impl="pallas")  # fmt: skip

        return map_attention(kernel, q, k, v, sinks, q_pos, k_pos)  # a kernel is opaque to XLA's partitioner
    return attention_xla_blocks(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=cfg.sm_scale,
                                block=cfg.prefill_chunk)  # fmt: skip


# Most attention-score elements (B*K*G*queries*keys) the XLA path materializes at once: 2**28 float32 scores are
# 1 GiB (the softmax holds about two such arrays). Long caches get fewer queries per block.
SCORES_BUDGET = 2**28


def attention_xla_blocks(q, k, v, sinks, q_pos, k_pos, *, window: int, sm_scale: float, block: int,
                         budget: int = SCORES_BUDGET):  # fmt: skip
    """`attention_xla` over blocks of at most `block` queries, fewer when the keys are many (at most `budget`
    score elements per block, at least 8 queries): a sequential `lax.map` over query blocks, so the (B,K,G,T,S)
    scores of a long `model(tokens)` or of a prefill chunk against a long cache take bounded memory. Each query
    row is computed as in one call; padding rows (position -1) see no key and are dropped."""
    B, T = q.shape[:2]
    per_query = B * q.shape[2] * q.shape[3] * k.shape[1]  # B*K*G*S
    block = max(1, min(block, max(8, budget // per_query)))
    if T <= block:
        return attention_xla(q, k, v, sinks, q_pos, k_pos, window=window, sm_scale=sm_scale)
    n = -(-T // block)
    qb = pad_axis(q, 1, n * block).reshape(B, n, block, *q.shape[2:]).swapaxes(0, 1)
    pb = pad_axis(q_pos, 1, n * block, -1).reshape(B, n, block).swapaxes(0, 1)
    out = jax.lax.map(lambda a: attention_xla(a[0], k, v, sinks, a[1], k_pos, window=window, sm_scale=sm_scale),
                      (qb, pb))  # fmt: skip
    return out.swapaxes(0, 1).reshape(B, n * block, *q.shape[2:])[:, :T]


def _resolve(impl: str) -> str:
    # "auto" -> the kernels only on backends where they were validated (kernels/_common.VALIDATED_PLATFORMS).
    return kernels.resolve_impl(impl)


# -------------------------------------------------------------------------------------------------- moe
def route(x: jax.Array, weight: jax.Array, bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x (T,D), weight (D,E), bias (E) -> experts (T,X) int32, weights (T,X) in x.dtype.

    Top-k of the biased logits FIRST, then a softmax over just those k (not softmax-then-top-k).
    """
    logits = _einsum("TD,DE->TE", x, weight, x.dtype) + bias.astype(x.dtype)
    vals, idx = jax.lax.top_k(logits, k)
    return idx.astype(jnp.int32), jax.nn.softmax(vals.astype(F32), axis=-1).astype(x.dtype)


def swiglu(h: jax.Array, alpha: float, limit: float) -> jax.Array:
    """(..., 2F) interleaved [gate0, lin0, gate1, lin1, ...] -> (..., F).

    The gate is clamped only from above; the linear half to [-limit, limit] and shifted by +1.
    """
    h = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
    return _glu(h[..., 0], h[..., 1], alpha, limit)


def _glu(gate: jax.Array, lin: jax.Array, alpha: float, limit: float) -> jax.Array:
    gate = jnp.minimum(gate, limit)
    lin = jnp.clip(lin, -limit, limit)
    return (gate * jax.nn.sigmoid(alpha * gate) * (lin + 1)).astype(gate.dtype)


def expert_weight(p: dict, name: str, e, dtype) -> jax.Array:
    """Expert e's (out, in) weight for `name` in {"mlp1", "mlp2"}, dequantized here if packed.

    `e` may be an int array of any shape (a gather of experts): the result has e.shape + (out, in).
    """
    if f"{name}_weight" in p:
        return p[f"{name}_weight"][e].astype(dtype)
    return mxfp4.dequantize(p[f"{name}_blocks"][e], p[f"{name}_scales"][e], dtype)


def num_experts_of(p: dict) -> int:
    return (p["mlp1_weight"] if "mlp1_weight" in p else p["mlp1_blocks"]).shape[0]


def _expert_mlp(xs, w1, b1, w2, b2, cfg: Config):
    """One expert on a tile of its rows: xs (T,D), weights (2F,D)/(D,F) -> (T,D). Each matmul, bias and the
    SwiGLU rounded to xs.dtype. The weights are the LEFT operand of both products ((2F,D) @ xs^T -> (2F,T),
    then (D,F) @ (F,T)), with one small transpose at the end: XLA:CPU's GEMM runs ~1.1x faster this way for a
    64-row tile than with the rows on the left (benchmarks/cpu_profile.py).
    """
    dtype = xs.dtype
    h = _einsum("FD,TD->FT", w1, xs, dtype) + b1.astype(dtype)[:, None]
    h = h.reshape(h.shape[0] // 2, 2, h.shape[1])  # interleaved rows: gate 2i, linear 2i+1
    a = _glu(h[:, 0], h[:, 1], cfg.swiglu_alpha, cfg.swiglu_limit)
    return (_einsum("DF,FT->DT", w2, a, dtype) + b2.astype(dtype)[:, None]).T


def moe_experts_gather(x, idx, w, p, cfg: Config):
    """Few tokens (decode): gather and dequantize only the selected experts' packed weights, token by token.

    Per token, mlp1 of its X experts is ONE matrix-vector product (their (2F, D) weights stacked into
    (X*2F, D)) and mlp2 is X products, each weight the left operand in its stored row-major layout. XLA:CPU
    runs these as plain GEMVs; a batched einsum over (T, X) ran ~10x slower on CPU (a batched dot of small
    operands), and so does anything that transposes a dequantized weight before the product.
    Rounding as in `_expert_mlp`: each product rounded to x.dtype, the weighted sum over experts in float32.
    """
    dtype = x.dtype
    X = idx.shape[1]

    def one(args):
        xt, it, wt = args  # (D,), (X,), (X,)
        w1 = expert_weight(p, "mlp1", it, dtype)  # (X,2F,D)
        w2 = expert_weight(p, "mlp2", it, dtype)  # (X,D,F)
        h = _einsum("MD,D->M", w1.reshape(-1, w1.shape[-1]), xt, dtype).reshape(X, -1)
        a = swiglu(h + p["mlp1_bias"][it].astype(dtype), cfg.swiglu_alpha, cfg.swiglu_limit)  # (X,F)
        b2 = p["mlp2_bias"][it].astype(dtype)
        out = jnp.zeros(xt.shape, F32)
        for j in range(X):
            o = _einsum("DF,F->D", w2[j], a[j], dtype) + b2[j]
            out = out + o.astype(F32) * wt[j].astype(F32)
        return out.astype(dtype)

    if x.shape[0] == 1:  # batch-1 decode: no loop at all
        return one((x[0], idx[0], w[0]))[None]
    return jax.lax.map(one, (x, idx, w))


def _tile_rows(m: int, e: int) -> int:
    # About one tile per expert's average share, a power of two in [8, 256]: small enough that partly
    # filled tiles waste little, large enough to keep the matmuls efficient.
    avg = max(1, -(-m // e))
    return int(min(256, max(8, 1 << (avg - 1).bit_length())))


def moe_experts_grouped(x, idx, w, p, cfg: Config):
    """Many tokens (prefill): sort the (token, expert) pairs by expert and run each expert's rows in tiles.

    Each expert with tokens is dequantized once and multiplies only its own rows, so the work grows with
    tokens x top-k, not with the number of experts (a dense all-experts product would be E/X times more).
    Selections with idx outside [0, E) contribute nothing (used by expert parallelism for remote experts).

    Packed experts: the loop carries the NEXT expert's packed bytes, sliced at the end of each iteration, and
    dequantizes the carried copy. Dequantizing `blocks[e]` directly makes XLA fuse the dynamic slice into the
    decode, which XLA:CPU runs ~8x slower than the same decode of a plain buffer (3 ms against 0.36 ms for
    one 1024x512 weight); dequantizing all experts before the loop instead writes a dense copy of the layer
    (100 MB per layer for the CPU benchmark model) whose fresh pages cost more than the arithmetic. This way
    one expert's dense weights exist at a time and stay in cache for its tiles.
    """
    dtype = x.dtype
    T, X = idx.shape
    D = x.shape[-1]
    E = num_experts_of(p)
    M = T * X
    flat = idx.reshape(M)
    local = (flat >= 0) & (flat < E)
    key = jnp.where(local, flat, E)  # remote selections sort to the end and are never computed
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=E + 1)[:E]
    starts = jnp.cumsum(sizes) - sizes
    tm = _tile_rows(M, E)
    xs = jnp.concatenate([x[order // X], jnp.zeros((tm, D), dtype)], axis=0)  # (M+tm, D), slack for tiles
    out = jnp.zeros((M + tm, D), dtype)
    packed_names = ("mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales") if "mlp1_blocks" in p else ()

    def packed_of(e):
        return tuple(p[n][e] for n in packed_names)

    def expert(e, carry):
        out, packed = carry

        def compute(out):
            if packed_names:
                w1 = mxfp4.dequantize(packed[0], packed[1], dtype)
                w2 = mxfp4.dequantize(packed[2], packed[3], dtype)
            else:
                w1, w2 = expert_weight(p, "mlp1", e, dtype), expert_weight(p, "mlp2", e, dtype)
            b1, b2 = p["mlp1_bias"][e], p["mlp2_bias"][e]
            end = starts[e] + sizes[e]

            def tile(j, out):
                s = starts[e] + j * tm
                o = _expert_mlp(jax.lax.dynamic_slice_in_dim(xs, s, tm), w1, b1, w2, b2, cfg)
                keep = (s + jnp.arange(tm) < end)[:, None]  # rows past this expert belong to the next
                cur = jax.lax.dynamic_slice_in_dim(out, s, tm)
                return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, o, cur), s, 0)

            return jax.lax.fori_loop(0, (sizes[e] + tm - 1) // tm, tile, out)

        out = jax.lax.cond(sizes[e] > 0, compute, lambda o: o, out)
        return out, packed_of(jnp.minimum(e + 1, E - 1))

    out = jax.lax.fori_loop(0, E, expert, (out, packed_of(0)))[0][:M]
    wts = jnp.where(local, w.reshape(M), 0).astype(F32)[order]
    combined = jnp.zeros((T, D), F32).at[order // X].add(out.astype(F32) * wts[:, None])
    return combined.astype(dtype)


def moe_experts_xla(x, idx, w, p, cfg: Config):
    """Chooses the gather path when fewer selections than experts (decode), else the grouped path."""
    if idx.shape[0] * idx.shape[1] < num_experts_of(p):
        E = num_experts_of(p)
        local = (idx >= 0) & (idx < E)
        return moe_experts_gather(x, jnp.where(local, idx, 0), jnp.where(local, w, 0), p, cfg)
    return moe_experts_grouped(x, idx, w, p, cfg)


def moe(x: jax.Array, p: dict, cfg: Config) -> jax.Array:
    """x (T,D) normed -> (T,D): route, then the selected experts."""
    idx, w = route(x, p["gate_weight"], p["gate_bias"], cfg.experts_per_token)
    return moe_experts(x, idx, w, p, cfg)


def moe_experts(x, idx, w, p, cfg: Config):
    if current_mesh() is not None:  # expert parallel: each device runs its own experts, then one psum
        return moe_experts_sharded(x, idx, w, p, cfg)
    if _resolve(cfg.moe_impl) == "pallas" and "mlp1_blocks" in p:
        return kernels.moe_experts(x, idx, w, p, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit,
                                   impl="pallas")  # fmt: skip
    return moe_experts_xla(x, idx, w, p, cfg)


# ---------------------------------------------------------------------------------------------- modules
# Set while `abstract_model` builds a model: parameters are bare ShapeDtypeStructs, no random op is traced
# (tracing every initializer under `nnx.eval_shape` took ~18 s for the 120b preset).
_ABSTRACT = contextvars.ContextVar("abstract_params", default=False)


def _init(fn, shape, dtype) -> nnx.Param:
    return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) if _ABSTRACT.get() else fn().astype(dtype))


def _param(rngs, shape, dtype, std=0.02, mean=0.0):
    return _init(lambda: mean + std * jax.random.normal(rngs.params(), shape, F32), shape, dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: Config, *, rngs: nnx.Rngs):
        # The scale stays float32 (the reference upcasts it from bf16; the upcast is exact).
        self.scale = _param(rngs, (dim,), F32, std=0.1, mean=1.0)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, layer: int, *, rngs: nnx.Rngs):
        D, K, G, H = cfg.hidden_size, cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim
        dt = cfg.jax_dtype
        self.cfg = cfg
        self.window = cfg.sliding_window if cfg.sliding_layers[layer] else 0
        self.norm = RMSNorm(D, cfg, rngs=rngs)
        self.q_weight = _param(rngs, (D, K, G, H), dt)
        self.q_bias = _param(rngs, (K, G, H), dt)
        self.k_weight = _param(rngs, (D, K, H), dt)
        self.k_bias = _param(rngs, (K, H), dt)
        self.v_weight = _param(rngs, (D, K, H), dt)
        self.v_bias = _param(rngs, (K, H), dt)
        self.o_weight = _param(rngs, (K, G, H, D), dt)
        self.o_bias = _param(rngs, (D,), dt)
        self.sinks = _param(rngs, (K, G), F32, std=1.0)  # float32: exact upcast of the bf16 checkpoint

    def __call__(self, x, cos, sin, q_pos, cache: dict | None):
        """x (B,T,D); cache None (keys are these tokens) or this layer's cache dict -> (out, new cache)."""
        cfg, dt = self.cfg, x.dtype
        t = self.norm(x)
        q = _einsum("BTD,DKGH->BTKGH", t, self.q_weight[...], dt) + self.q_bias[...]
        k = _einsum("BTD,DKH->BTKH", t, self.k_weight[...], dt) + self.k_bias[...]
        v = _einsum("BTD,DKH->BTKH", t, self.v_weight[...], dt) + self.v_bias[...]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            keys, vals, k_pos, new_cache = k, v, q_pos, None
        else:
            keys, vals, k_pos, new_cache = cache_attend_update(cache, k, v, q_pos, self.window)
        o = attention(q, keys, vals, self.sinks[...], q_pos, k_pos, window=self.window, cfg=cfg)
        y = _einsum("BTKGH,KGHD->BTD", o, self.o_weight[...], dt) + self.o_bias[...]
        return x + y, new_cache


def cache_attend_update(cache: dict, k, v, q_pos, window: int):
    """Writes this chunk's k/v into the layer cache; returns what to attend over and the new cache.

    Full layers: slots are global indices [index, index+T) of a buffer as long as the context.
    Sliding layers: a ring of exactly `window` slots (slot = global index % window). The chunk attends over
    ring-before-the-chunk + the chunk itself, so a chunk longer than the window still sees all its keys;
    then the ring keeps the last `window` of them.
    """
    index, T = cache["index"], k.shape[1]
    if not window:
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, 1)
        cp = jax.lax.dynamic_update_slice_in_dim(cache["pos"], q_pos, index, 1)
        return ck, cv, cp, dict(cache, k=ck, v=cv, pos=cp)
    W = cache["k"].shape[1]
    keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
    vals = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
    k_pos = jnp.concatenate([cache["pos"], q_pos], axis=1)
    n = min(T, W)
    slots = (index + T - n + jnp.arange(n)) % W
    new = dict(
        cache,
        k=cache["k"].at[:, slots].set(keys[:, W + T - n :]),
        v=cache["v"].at[:, slots].set(vals[:, W + T - n :]),
        pos=cache["pos"].at[:, slots].set(q_pos[:, T - n :]),
    )
    return keys, vals, k_pos, new


class MoE(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        dt = cfg.jax_dtype
        self.cfg = cfg
        self.norm = RMSNorm(D, cfg, rngs=rngs)
        self.gate_weight = _param(rngs, (D, E), dt, std=0.5)
        self.gate_bias = _param(rngs, (E,), dt)
        for name, (rows, cols) in (("mlp1", (2 * F, D)), ("mlp2", (D, F))):
            if cfg.expert_format == "mxfp4":
                bshape, sshape = (E, rows, cols // 32, 16), (E, rows, cols // 32)
                blocks = _init(lambda: jax.random.randint(rngs.params(), bshape, 0, 256), bshape, jnp.uint8)
                # exponent 2**-7 .. 2**-5 keeps random fp4 weights (|w| <= 6) at a sensible scale
                scales = _init(lambda: jax.random.randint(rngs.params(), sshape, 120, 123), sshape, jnp.uint8)
                setattr(self, f"{name}_blocks", blocks)
                setattr(self, f"{name}_scales", scales)
            else:
                setattr(self, f"{name}_weight", _param(rngs, (E, rows, cols), dt))
        self.mlp1_bias = _param(rngs, (E, 2 * F), dt)
        self.mlp2_bias = _param(rngs, (E, D), dt)

    def params(self) -> dict:
        names = ("gate_weight", "gate_bias", "mlp1_bias", "mlp2_bias", "mlp1_blocks", "mlp1_scales",
                 "mlp2_blocks", "mlp2_scales", "mlp1_weight", "mlp2_weight")  # fmt: skip
        return {n: getattr(self, n)[...] for n in names if hasattr(self, n)}

    def __call__(self, x):
        B, T, D = x.shape
        y = moe(self.norm(x).reshape(B * T, D), self.params(), self.cfg)
        return x + y.reshape(B, T, D)


class Block(nnx.Module):
    def __init__(self, cfg: Config, layer: int, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, q_pos, cache):
        x, cache = self.attn(x, cos, sin, q_pos, cache)
        return self.mlp(x), cache


class Transformer(nnx.Module):
    """The whole model. `model(tokens)` -> float32 logits; `model.generate(...)` -> new tokens."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.jax_dtype
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dt, std=1.0)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.unembedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dt)

    def hidden(self, tokens, positions, cache: dict | None = None):
        """tokens (B,T) int32, positions (B,T) int32 (negative = padding) -> final-normed hidden (B,T,D)."""
        dt = self.cfg.jax_dtype
        x = constrain(self.embedding[...][tokens].astype(dt), ("batch", "seq", "embed"))
        cos, sin = rope_cos_sin(positions, self.cfg, dt)
        new_layers = []
        for i, block in enumerate(self.layers):
            with jax.named_scope(f"layer{i}"):
                lc = None if cache is None else dict(cache["layers"][i], index=cache["index"])
                x, lc = block(x, cos, sin, positions, lc)
                x = constrain(x, ("batch", "seq", "embed"))  # block boundary: residual whole per device
                if lc is not None:
                    lc.pop("index")
                new_layers.append(lc)
        new_cache = None
        if cache is not None:
            new_cache = dict(cache, layers=new_layers, index=cache["index"] + tokens.shape[1])
        return self.norm(x), new_cache

    def logits(self, h):
        """(…,D) -> float32 (…,V); rounded to the compute dtype first, as the reference returns them."""
        out = _einsum("...D,VD->...V", h, self.unembedding[...], h.dtype).astype(F32)
        return constrain(out, ("batch",) + (None,) * (h.ndim - 2) + ("vocab",))

    @with_model_mesh
    def __call__(self, tokens, positions=None):
        """tokens int [B,T] (or [T]) -> float32 logits [B,T,V]. Full recompute, no cache."""
        from .generate import check_tokens

        tokens = check_tokens(tokens, self.cfg.vocab_size)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        graphdef, state = nnx.split(self)
        return _forward_jit(graphdef, state, tokens, positions)

    def generate(self, tokens, **kw):
        """See `gptoss_jax.generate.generate`."""
        from .generate import generate

        return generate(self, tokens, **kw)


# jax.jit over (graphdef, state) rather than nnx.jit: nnx.jit's per-call bookkeeping of the module's state
# cost ~0.2 s per call here (measured on the CPU benchmark model), more than a 512-token forward's GEMMs.
@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graphdef, state, tokens, positions):
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden(tokens, positions)
    return model.logits(h)


# ---------------------------------------------------------------------------------------------- helpers
def param_specs(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Name ("layers.0.attn.q_weight") -> ShapeDtypeStruct of every parameter of a config (nothing allocated)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {".".join(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(state)}


def param_count(cfg: Config) -> int:
    """Logical parameter count (a packed MXFP4 byte holds two parameters; scales are not parameters)."""
    total = 0
    for name, leaf in param_specs(cfg).items():
        if not name.endswith("_scales"):
            total += int(np.prod(leaf.shape)) * (2 if name.endswith("_blocks") else 1)
    return total


def param_bytes(cfg: Config, *, experts_only: bool = False) -> int:
    """Bytes the parameters occupy in device memory (packed experts count their uint8 blocks + scales)."""
    total = 0
    for name, leaf in param_specs(cfg).items():
        if experts_only and ".mlp.mlp" not in name:
            continue
        total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_model(cfg: Config) -> Transformer:
    """The model with ShapeDtypeStruct leaves: nothing allocated (for loading and planning)."""
    token = _ABSTRACT.set(True)
    try:
        return Transformer(cfg, rngs=nnx.Rngs(0))
    finally:
        _ABSTRACT.reset(token)


Params = dict[str, Any]

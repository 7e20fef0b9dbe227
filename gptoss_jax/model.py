"""gpt-oss in Flax NNX: the whole architecture in one file.

Implemented: RMSNorm with float32 math; YaRN RoPE (NTK-by-parts, no truncation of the ramp, the attention
concentration folded into cos and sin, half-split rotation); grouped-query attention with a learned sink
logit per query head and a 128-token window (including the current token) on sliding layers; router with
bias, then top-k, then a softmax over the k; experts with interleaved gate/linear rows, the clamped SwiGLU
with its +1, expert biases, MXFP4 weights kept packed and dequantized inside the expert computation; untied
unembedding. bf16 by default, float32 for the exact mode; wherever the reference computes in float32
(norms, RoPE tables, softmax), so do we.

Layers are scanned, not unrolled: the layer pattern repeats (gpt-oss: sliding, full), the weights of each
position of that unit are stacked (`weights.py`), and `lax.scan` runs the unit `cfg.layer_repeats` times, so
compiling a 36-layer model costs what a 2-layer one does. The KV cache (`cache.py`) is stacked alike and
advances per row.

Axis letters used in every einsum and shape comment:
  B batch, T query tokens, S key slots, D hidden, N query heads, K kv heads, G query heads per kv head
  (N = K*G, query head n = k*G + g), H head dim, E experts, X selected experts (top-k), F expert width,
  V vocabulary, C MXFP4 groups per row (in/32), R repeats of the layer unit.

The module only holds the parameters (declared in `weights.TABLE`); the math is free functions
(`rms_norm`, `rope_cos_sin`, `attention_layer`, `route`, `moe_layer`) over arrays, each tested one to one
against the reference. Parallelism wraps them from `sharding.py`; the kernels and the XLA path they share
live in `kernels/`.
"""

from __future__ import annotations

import functools
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, weights
from .cache import Step
from .config import Config
from .ops import F32, einsum
from .sharding import constrain, current_mesh, expert_parallel, map_attention, with_model_mesh

ACT = ("batch", "seq", "embed")  # the residual stream's logical axes at every block boundary


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
def attention_layer(x, p: dict, cos, sin, q_pos, *, window: int, cfg: Config, kv=None, step: Step | None = None,
                    r=None):  # fmt: skip
    """One attention block with its residual: x (B,T,D) -> (x + attn, kv).

    p: this layer's weights by leaf name ("norm" for the scale). Without a cache (kv None) the keys are
    these tokens. With one, kv is this unit position's stacked (k, v) buffers, r the repeat, and `step` the
    cache's `Step` for this forward pass, which writes the chunk and says what to attend over
    (`cache.Step.attend`; the serving engine's paged cache implements the same two methods).
    """
    dt = x.dtype
    T = x.shape[1]
    t = rms_norm(x, p["norm"], cfg.rms_norm_eps)
    q = einsum("BTD,DKGH->BTKGH", t, p["q_weight"], dt) + p["q_bias"]
    k = einsum("BTD,DKH->BTKH", t, p["k_weight"], dt) + p["k_bias"]
    v = einsum("BTD,DKH->BTKH", t, p["v_weight"], dt) + p["v_bias"]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is None:
        keys, vals, k_pos, aligned = k, v, q_pos, T
    else:
        keys, vals, k_pos, aligned, kv = step.attend(kv, r, k, v, q_pos, ring=bool(window))
    o = attention(q, keys, vals, p["sinks"], q_pos, k_pos, window=window, aligned=aligned, cfg=cfg)
    return x + einsum("BTKGH,KGHD->BTD", o, p["o_weight"], dt) + p["o_bias"], kv


def attention(q, k, v, sinks, q_pos, k_pos, *, window: int, aligned: int, cfg: Config):
    fn = functools.partial(kernels.attention, window=window, sm_scale=cfg.sm_scale, impl=cfg.attention_impl,
                           block=cfg.prefill_chunk, aligned=aligned)  # fmt: skip
    if kernels.resolve_impl(cfg.attention_impl) == "pallas":
        return map_attention(fn, q, k, v, sinks, q_pos, k_pos)  # a kernel is opaque to XLA's partitioner
    return fn(q, k, v, sinks, q_pos, k_pos)


# -------------------------------------------------------------------------------------------------- moe
def route(x: jax.Array, weight: jax.Array, bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x (T,D), weight (D,E), bias (E) -> experts (T,X) int32, weights (T,X) in x.dtype.

    Top-k of the biased logits FIRST, then a softmax over just those k (not softmax-then-top-k).
    """
    logits = einsum("TD,DE->TE", x, weight, x.dtype) + bias.astype(x.dtype)
    vals, idx = jax.lax.top_k(logits, k)
    return idx.astype(jnp.int32), jax.nn.softmax(vals.astype(F32), axis=-1).astype(x.dtype)


EXPERT_LEAVES = ("mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales", "mlp1_weight", "mlp2_weight",
                 "mlp1_bias", "mlp2_bias")  # fmt: skip
EXPERT_LEAVES += kernels.mxfp4_matmul.LORA_LEAVES  # training: optional per-expert LoRA adapters


def moe_experts(x, idx, w, p: dict, cfg: Config):
    """The selected experts of (T,D) tokens -> (T,D): one implementation (`kernels.moe_experts`: the XLA
    path or the Pallas kernels), run per device with only its own experts under a mesh."""
    p = {n: a for n, a in p.items() if n in EXPERT_LEAVES}
    impl = cfg.moe_impl if "mlp1_blocks" in p else "xla"  # the kernels read packed weights only
    local = functools.partial(kernels.moe_experts, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, impl=impl)
    if current_mesh() is not None:
        return expert_parallel(local, x, idx, w, p, cfg)
    return local(x, idx, w, p)


def moe_layer(x, p: dict, cfg: Config):
    """One MoE block with its residual: x (B,T,D) -> x + experts(route(norm(x)))."""
    B, T, D = x.shape
    t = rms_norm(x, p["norm"], cfg.rms_norm_eps).reshape(B * T, D)
    idx, w = route(t, p["gate_weight"], p["gate_bias"], cfg.experts_per_token)
    return x + moe_experts(t, idx, w, p, cfg).reshape(B, T, D)


# ---------------------------------------------------------------------------------------------- forward
def _layer_params(group) -> dict:
    """A block's parameters as {"attn": {leaf: array}, "mlp": {leaf: array}} ("norm" for the norm's scale)."""

    def leaves(m):
        d = {n: getattr(m, n)[...] for n in vars(m) if isinstance(getattr(m, n), nnx.Param)}
        d["norm"] = m.norm.scale[...]
        return d

    return {"attn": leaves(group.attn), "mlp": leaves(group.mlp)}


def forward(model: Transformer, tokens, positions, cache=None):
    """tokens (B,T) int32, positions (B,T) int32 (negative = padding) -> (final-normed hidden (B,T,D), cache).

    With a cache, positions must be each row's next positions (`KVCache.chunk_positions`); without one they
    must increase by one along each row (padding at either end), which lets sliding layers skip the keys
    outside their window (`kernels.attention_xla`). The cache is any object with the `KVCache` protocol:
    `begin(positions) -> (cache, step)`, `kv` (a (k, v) pair of stacked buffers per unit position) and
    `with_kv(kv)`, its step with `attend`.
    """
    cfg = model.cfg
    dt = cfg.jax_dtype
    x = constrain(model.embedding[...][tokens].astype(dt), ACT)
    cos, sin = rope_cos_sin(positions, cfg, dt)
    step = kv = None
    if cache is not None:
        cache, step = cache.begin(positions)
        kv = cache.kv
    unit = cfg.layer_unit

    def body(carry, xs):
        x, kv = carry
        r, layers = xs
        kv = list(kv) if kv is not None else None
        for j, sliding in enumerate(unit):
            with jax.named_scope(f"{'sliding' if sliding else 'full'}{j}"):
                x, kv_j = attention_layer(x, layers[j]["attn"], cos, sin, positions,
                                          window=cfg.sliding_window if sliding else 0, cfg=cfg,
                                          kv=None if kv is None else kv[j], step=step, r=r)  # fmt: skip
                if kv is not None:
                    kv[j] = kv_j
                x = constrain(moe_layer(x, layers[j]["mlp"], cfg), ACT)  # block boundary
        return (x, None if kv is None else tuple(kv)), None

    params = [_layer_params(g) for g in model.blocks]
    xs = (jnp.arange(cfg.layer_repeats, dtype=jnp.int32), params)
    (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
    if cache is not None:
        cache = cache.with_kv(kv)
    return rms_norm(x, model.norm.scale[...], cfg.rms_norm_eps), cache


def logits(model: Transformer, h):
    """(…,D) -> float32 (…,V); rounded to the compute dtype first, as the reference returns them."""
    out = einsum("...D,VD->...V", h, model.unembedding[...], h.dtype).astype(F32)
    return constrain(out, ("batch",) + (None,) * (h.ndim - 2) + ("vocab",))


# ---------------------------------------------------------------------------------------------- modules
class _Group(nnx.Module):
    """A named group of parameters (`attn`, `mlp`, a norm): attributes set from `weights.TABLE`."""


class Transformer(nnx.Module):
    """The whole model: parameters only, laid out as `weights.param_layout` says. `model(tokens)` -> float32
    logits; `gptoss_jax.generate(model, tokens)` generates.

    arrays: parameter name -> array (what `load` passes); else random weights from `rngs` (tests, demos), or,
    with neither, ShapeDtypeStructs (the abstract model: nothing allocated).
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs | None = None, arrays: dict | None = None):
        self.cfg = cfg
        self.norm = _Group()
        self.blocks = nnx.List([_Group() for _ in cfg.layer_unit])
        for g in self.blocks:
            g.attn, g.mlp = _Group(), _Group()
            g.attn.norm, g.mlp.norm = _Group(), _Group()
        for name, (shape, dtype, _) in weights.param_layout(cfg).items():
            if arrays is not None:
                value = arrays[name]
            elif rngs is not None:
                value = _random(rngs, weights.TABLE_BY_PATH[_path(name)].init, shape, dtype)
            else:
                value = jax.ShapeDtypeStruct(shape, dtype)
            *parents, leaf = name.split(".")
            node = self
            for part in parents:
                node = node[int(part)] if isinstance(node, nnx.List) else getattr(node, part)
            setattr(node, leaf, nnx.Param(value))

    @with_model_mesh
    def __call__(self, tokens, positions=None):
        """tokens int [B,T] (or [T]) -> float32 logits [B,T,V]. Full recompute, no cache.

        positions (optional, [B,T]): each row's positions, increasing by one, negative for padding at
        either end (default 0..T-1)."""
        tokens = check_tokens(tokens, self.cfg.vocab_size)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        else:
            positions = check_positions(positions, tokens.shape)
        graphdef, state = nnx.split(self)
        return _forward_jit(graphdef, state, tokens, positions)


def _path(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def _random(rngs, init, shape, dtype):
    if init[0] == "uniform_int":
        return jax.random.randint(rngs.params(), shape, init[1], init[2]).astype(dtype)
    return (init[1] + init[2] * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)


# jax.jit over (graphdef, state) rather than nnx.jit: nnx.jit's per-call bookkeeping of the module's state
# cost ~0.2 s per call here (measured on the CPU benchmark model), more than a 512-token forward's GEMMs.
@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graphdef, state, tokens, positions):
    model = nnx.merge(graphdef, state)
    h, _ = forward(model, tokens, positions)
    return logits(model, h)


# ------------------------------------------------------------------------------------------- validation
def check_tokens(tokens, vocab_size: int) -> jax.Array:
    """int [B,T] or [T] -> int32 [B,T]; ValueError naming the first id outside [0, vocab)."""
    try:
        arr = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:  # inside jit: no values to check
        return tokens if tokens.ndim == 2 else tokens[None]
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty int array [batch, seq], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if len(bad):
        b, t = bad[0]
        raise ValueError(f"token id {int(arr[b, t])} at [{b}, {t}] is outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(arr, jnp.int32)


def check_positions(positions, shape) -> jax.Array:
    """Positions [B,T] that increase by one along each row, negative padding only at the ends."""
    try:
        arr = np.asarray(positions)
    except jax.errors.TracerArrayConversionError:
        return positions
    if arr.ndim == 1:
        arr = arr[None]
    if arr.shape != tuple(shape) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"positions must be an int array of the tokens' shape {tuple(shape)}, got "
                         f"{arr.dtype}{arr.shape}")  # fmt: skip
    for b, row in enumerate(arr):
        real = np.flatnonzero(row >= 0)
        if len(real) and (np.any(np.diff(real) != 1) or np.any(np.diff(row[real]) != 1)):
            raise ValueError(f"positions of row {b} must increase by one, with negative padding only at the "
                             f"ends")  # fmt: skip
    return jnp.asarray(arr, jnp.int32)


# ---------------------------------------------------------------------------------------------- helpers
def abstract_model(cfg: Config) -> Transformer:
    """The model with ShapeDtypeStruct leaves: nothing allocated (for loading and planning)."""
    return Transformer(cfg)


def layer_params(model: Transformer, i: int) -> dict:
    """Layer i's weights as {"attn": {leaf: array}, "mlp": {leaf: array}} (a slice of the stacked
    parameters: unit position i % p, repeat i // p). For tests, notebooks and interventions."""
    p = len(model.cfg.layer_unit)
    if not 0 <= i < model.cfg.num_hidden_layers:
        raise ValueError(f"layer {i} out of range: the model has {model.cfg.num_hidden_layers} layers")
    return jax.tree.map(lambda a: a[i // p], _layer_params(model.blocks[i % p]))

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
compiling a 36-layer model costs what a 2-layer one does. The expert weights are read straight from their
stacks at (repeat, expert) instead (`moe.expert_leaf`), so no call copies a layer's experts. The KV cache
(`cache.py`) is stacked alike and advances per row.

One forward pass serves everything: `apply(params, cfg, ...)` over a dict of parameters by name, and
`forward(model, ...)` over the model's own. Generation, the serving engine, inspection and training all run
it; what they add goes through its one extension point, `Hooks` (a transform of each layer's parameters,
named sites on the residual stream, the attention and the router, a state carried through the layer scan),
and remat per layer is an option. Without hooks nothing of them is traced.

Axis letters used in every einsum and shape comment:
  B batch, T query tokens, S key slots, D hidden, N query heads, K kv heads, G query heads per kv head
  (N = K*G, query head n = k*G + g), H head dim, E experts, X selected experts (top-k), F expert width,
  V vocabulary, C MXFP4 groups per row (in/32), R repeats of the layer unit.

The module only holds the parameters (declared in `weights.TABLE`); the math is free functions
(`rms_norm`, `rope_cos_sin`, `attention_layer`, `route`, `moe_layer`) over arrays, each tested one to one
against the reference. The experts' computation is `moe.py`, the Pallas kernels are in `kernels/`, and
parallelism wraps the math from `sharding.py`.
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
from .config import Config, check_token_ids
from .moe import STACKED_LEAVES, moe_experts
from .ops import F32, einsum
from .sharding import constrain, map_attention, with_model_mesh

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
                    r=None, hooks: LayerHooks | None = None):  # fmt: skip
    """One attention block with its residual: x (B,T,D) -> (x + attn, kv).

    p: this layer's weights by leaf name ("norm" for the scale). Without a cache (kv None) the keys are
    these tokens. With one, kv is this unit position's stacked (k, v) buffers, r the repeat, and `step` the
    cache's `Step` for this forward pass, which writes the chunk and runs the attention over what the chunk
    sees (`cache.Step.attend`, given this layer's attention with its sinks and window bound): so a cache may
    lay its tokens out as it likes (the serving engine's paged cache runs one flat row of several
    sequences' tokens and splits it per sequence). `hooks`: this layer's sites "attention" and "heads"
    (`Hooks`), None on the plain path.
    """
    dt = x.dtype
    T = x.shape[1]
    t = rms_norm(x, p["norm"], cfg.rms_norm_eps)
    q = einsum("BTD,DKGH->BTKGH", t, p["q_weight"], dt) + p["q_bias"]
    k = einsum("BTD,DKH->BTKH", t, p["k_weight"], dt) + p["k_bias"]
    v = einsum("BTD,DKH->BTKH", t, p["v_weight"], dt) + p["v_bias"]
    if hooks is not None:
        q, k, v = (hooks.project(n, t, y) for n, y in (("q", q), ("k", k), ("v", v)))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if hooks is not None:
        q, k = hooks.site("attention", (q, k))
    sinks = p["sinks"]

    def attend(q, keys, vals, q_pos, k_pos, aligned):
        return attention(q, keys, vals, sinks, q_pos, k_pos, window=window, aligned=aligned, cfg=cfg)

    attend.sinks = sinks  # a cache that runs its own kernel (the engine's pages) reads the layer's sinks

    if kv is None:
        o = attend(q, k, v, q_pos, q_pos, T)
    else:
        o, kv = step.attend(kv, r, q, k, v, q_pos, ring=bool(window), attention=attend)
    if hooks is None:
        return x + einsum("BTKGH,KGHD->BTD", o, p["o_weight"], dt) + p["o_bias"], kv
    o = hooks.site("heads", o)
    return x + hooks.project("o", o, einsum("BTKGH,KGHD->BTD", o, p["o_weight"], dt)) + p["o_bias"], kv


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
    return choose_experts(router_logits(x, weight, bias), k)


def router_logits(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """x (T,D) -> the router's biased logits (T,E) in x.dtype."""
    return einsum("TD,DE->TE", x, weight, x.dtype) + bias.astype(x.dtype)


def choose_experts(logits: jax.Array, k: int, choice: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """logits (T,E) -> experts (T,X) int32, weights (T,X): the top k, then a softmax over their logits.

    choice (T,E): other scores to pick the k by (a hook's "router" site: e.g. -inf never picks an expert,
    +inf always does); the weights remain the softmax of the chosen experts' own logits.
    """
    if choice is None or choice is logits:
        vals, idx = jax.lax.top_k(logits, k)
    else:
        _, idx = jax.lax.top_k(choice, k)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    return idx.astype(jnp.int32), jax.nn.softmax(vals.astype(F32), axis=-1).astype(logits.dtype)


def moe_layer(x, p: dict, cfg: Config, hooks: LayerHooks | None = None):
    """One MoE block with its residual: x (B,T,D) -> x + experts(route(norm(x))). `hooks`: this layer's sites
    "router" and "experts" (`Hooks`), None on the plain path."""
    B, T, D = x.shape
    t = rms_norm(x, p["norm"], cfg.rms_norm_eps).reshape(B * T, D)
    if hooks is None:
        idx, w = route(t, p["gate_weight"], p["gate_bias"], cfg.experts_per_token)
    else:
        logits = hooks.project("router", t, router_logits(t, p["gate_weight"], p["gate_bias"]))
        idx, w = choose_experts(logits, cfg.experts_per_token, hooks.site("router", logits))
        idx, w = hooks.site("experts", (idx, w))
    return x + moe_experts(t, idx, w, p, cfg).reshape(B, T, D)


# ------------------------------------------------------------------------------------ the extension point
class LayerHooks:
    """One layer's hooks, what `Hooks.layer` returns. Each default changes nothing."""

    def __init__(self, state=None):
        self._state = state

    def params(self, p: dict) -> dict:
        """The layer's parameters {"attn": {leaf: array}, "mlp": {leaf: array}} ("norm" for each norm's
        scale) -> the parameters the layer runs with (a transform: adapters merged, a sink replaced)."""
        return p

    def site(self, name: str, value):
        """The value at site `name` (see `Hooks`) -> the value the layer goes on with."""
        return value

    def project(self, name: str, x, y):
        """The output y of the projection `name` ("q", "k", "v", "o", "router") of its input x (bias added)
        -> the output the layer goes on with (per-token low-rank adapters: `engine.adapters`)."""
        return y

    def state(self):
        """The state after this layer (what `Hooks.layer` was given, or an update of it)."""
        return self._state


class Hooks:
    """The one extension point of the forward pass (`apply`, `forward`): the layer scan calls these methods
    while it is traced, and the model knows nothing else of what they do. Inspection (`gptoss_jax.inspect`)
    records and changes activations with them; LoRA (`gptoss_jax.lora`) merges adapters into each layer's
    weights. Without hooks (None) nothing of them is traced. Each default changes nothing.

    Before the scan:
      scanned()  per unit position j of the layer pattern, a pytree of arrays with a leading axis over the
                 repeats (R), or None: the scan hands layer (r, j) its slice at r (adapters, per-layer values)
      init()     the state carried through the scan (a pytree, e.g. capture buffers; None for none)
    In each layer (inside the scan body; under remat inside the layer's jax.checkpoint):
      layer(j, r, xs, state) -> LayerHooks: this layer's hooks; j its unit position, r its repeat (traced;
                 layer index r * len(cfg.layer_unit) + j), xs its slice of `scanned()[j]`. The layer calls
                 `params` on its parameters first, then `site` at each site in this order, then `state`.
    The state after the last layer is the forward pass's third output.

    Sites (B batch, T tokens; "tokens flattened" = B*T rows, row b*T + t):
      resid_pre     (B,T,D) the residual stream into the layer
      attention     (q (B,T,K,G,H), k (B,T,K,H)): the chunk's queries and keys after RoPE
      heads         (B,T,K,G,H) each query head's attention output, before the output projection
      resid_mid     (B,T,D) after the attention block
      router        (B*T,E) the router's logits, tokens flattened -> the scores the top-k choice is made by
                    (the weights stay the softmax of the chosen experts' own logits)
      experts       (experts (B*T,X) int32, weights (B*T,X)) as chosen, tokens flattened
      resid_post    (B,T,D) after the MoE block: the layer's output
    Projections (`LayerHooks.project(name, x, y)`, x the input, y the output; with its bias but for "o",
    whose bias comes after, in the residual add's order of the plain path): "q", "k", "v"
    (x (B,T,D) the normed stream; before RoPE and the "attention" site), "o" (x the heads (B,T,K,G,H),
    after the "heads" site), "router" (x (B*T,D), y the logits (B*T,E), before the "router" site).
    """

    def scanned(self) -> list | None:
        return None

    def init(self):
        return None

    def layer(self, j: int, r, xs, state) -> LayerHooks:
        return LayerHooks(state)


# ---------------------------------------------------------------------------------------------- forward
def model_params(model: Transformer) -> dict[str, jax.Array]:
    """The model's parameters by name (`weights.param_layout` names: `blocks.0.attn.q_weight`, ...; adapters
    attached by `adapters.apply_adapters` too): what `apply` takes."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): v.get_value() for path, v in flat}


def unit_params(tree: dict, j: int) -> dict:
    """Unit position j's entries of a name -> array dict as {"attn": {leaf: a}, "mlp": {leaf: a}} ("norm" for
    the norm's scale): the layout `attention_layer` / `moe_layer` read (stacked: leading repeats axis)."""
    out: dict = {"attn": {}, "mlp": {}}
    pre = f"blocks.{j}."
    for name, arr in tree.items():
        if name.startswith(pre):
            group, leaf = name[len(pre) :].split(".", 1)
            out[group]["norm" if leaf == "norm.scale" else leaf] = arr
    return out


def forward(model: Transformer, tokens, positions, cache=None, *, hooks: Hooks | None = None,
            remat: bool = False):  # fmt: skip
    """`apply` with the model's own parameters and config."""
    return apply(model_params(model), model.cfg, tokens, positions, cache, hooks=hooks, remat=remat)


def apply(params: dict, cfg: Config, tokens, positions, cache=None, *, hooks: Hooks | None = None,
          remat: bool = False):  # fmt: skip
    """The forward pass: params (name -> array, `model_params`), tokens (B,T) int32, positions (B,T) int32
    (negative = padding) -> (final-normed hidden (B,T,D), cache), and with hooks (hidden, cache, the hooks'
    state after the last layer).

    With a cache, positions must be each row's next positions (`KVCache.chunk_positions`); without one they
    must increase by one along each row (padding at either end), which lets sliding layers skip the keys
    outside their window (`kernels.attention_xla`). The cache is any object with the `KVCache` protocol:
    `begin(positions) -> (cache, step)`, `kv` (a (k, v) pair of stacked buffers per unit position) and
    `with_kv(kv)`, its step with `attend`. A cache may have fewer buffers than unit positions: then its
    `kv_slots` says which buffer each unit position's layers use (the engine's one page pool for all).

    hooks: `Hooks`, the extension point. remat: each layer keeps only its inputs for the backward pass and
    recomputes the rest (jax.checkpoint per layer: the activation memory of one layer plus a (B,T,D) array
    per layer, instead of every intermediate of every layer).
    """
    dt = cfg.jax_dtype
    x = constrain(params["embedding"][tokens].astype(dt), ACT)
    cos, sin = rope_cos_sin(positions, cfg, dt)
    step = kv = None
    if cache is not None:
        cache, step = cache.begin(positions)
        kv = cache.kv
    unit = cfg.layer_unit
    slot = getattr(cache, "kv_slots", None) or range(len(unit))  # unit position -> its buffer in kv
    layers = [unit_params(params, j) for j in range(len(unit))]
    # expert weights are not scanned over: each layer reads its selected experts straight from the stack
    # (`moe.expert_leaf`), which spares a copy of all the layer's experts every call
    stacked = [{n: g["mlp"].pop(n) for n in STACKED_LEAVES if n in g["mlp"]} for g in layers]

    def layer(j, x, lp, kv_j, r, hx, state):
        if stacked[j]:
            lp = lp | {"mlp": lp["mlp"] | stacked[j] | {"layer": r}}
        lh = None if hooks is None else hooks.layer(j, r, hx, state)
        if lh is not None:
            lp = lh.params(lp)
            x = lh.site("resid_pre", x)
        window = cfg.sliding_window if unit[j] else 0
        x, kv_j = attention_layer(x, lp["attn"], cos, sin, positions, window=window, cfg=cfg, kv=kv_j, step=step,
                                  r=r, hooks=lh)  # fmt: skip
        if lh is not None:
            x = lh.site("resid_mid", x)
        x = constrain(moe_layer(x, lp["mlp"], cfg, hooks=lh), ACT)  # block boundary
        if lh is not None:
            x = lh.site("resid_post", x)
            state = lh.state()
        return x, kv_j, state

    fns = [functools.partial(layer, j) for j in range(len(unit))]
    if remat:
        fns = [jax.checkpoint(f) for f in fns]

    def body(carry, xs):
        x, kv, state = carry
        r, lps, hxs = xs
        kv = list(kv) if kv is not None else None
        for j, sliding in enumerate(unit):
            with jax.named_scope(f"{'sliding' if sliding else 'full'}{j}"):
                x, kv_j, state = fns[j](x, lps[j], None if kv is None else kv[slot[j]], r, hxs[j], state)
            if kv is not None:
                kv[slot[j]] = kv_j
        return (x, None if kv is None else tuple(kv), state), None

    hxs = (None if hooks is None else hooks.scanned()) or [None] * len(unit)
    state = None if hooks is None else hooks.init()
    xs = (jnp.arange(cfg.layer_repeats, dtype=jnp.int32), layers, hxs)
    (x, kv, state), _ = jax.lax.scan(body, (x, kv, state), xs)
    if cache is not None:
        cache = cache.with_kv(kv)
    h = rms_norm(x, params["norm.scale"], cfg.rms_norm_eps)
    if hooks is None:
        return h, cache
    return h, cache, state


def logits(model: Transformer, h):
    """(…,D) -> float32 (…,V); rounded to the compute dtype first, as the reference returns them."""
    return unembed(h, model.unembedding[...])


def unembed(h, unembedding):
    """`logits` with the unembedding (V,D) given: the one place the vocabulary projection is written."""
    out = einsum("...D,VD->...V", h, unembedding, h.dtype).astype(F32)
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
    check_token_ids(arr, vocab_size)
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
    return jax.tree.map(lambda a: a[i // p], unit_params(model_params(model), i % p))

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
stacks at (repeat, expert) instead (`kernels.mxfp4_matmul.expert_leaf`), so no call copies a layer's
experts. The KV cache (`cache.py`) is stacked alike and advances per row.

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

import dataclasses
import functools
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, weights
from .cache import Step
from .config import Config
from .kernels.attention import attention_probs
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
                    r=None, tap: _Tap | None = None):  # fmt: skip
    """One attention block with its residual: x (B,T,D) -> (x + attn, kv).

    p: this layer's weights by leaf name ("norm" for the scale). Without a cache (kv None) the keys are
    these tokens. With one, kv is this unit position's stacked (k, v) buffers, r the repeat, and `step` the
    cache's `Step` for this forward pass, which writes the chunk and runs the attention over what the chunk
    sees (`cache.Step.attend`, given this layer's attention with its sinks and window bound): so a cache may
    lay its tokens out as it likes (the serving engine's paged cache runs one flat row of several
    sequences' tokens and splits it per sequence). `tap`: this layer's probe and intervention (`forward`'s
    `probe` / `intervene`), None on the plain path.
    """
    dt = x.dtype
    T = x.shape[1]
    t = rms_norm(x, p["norm"], cfg.rms_norm_eps)
    q = einsum("BTD,DKGH->BTKGH", t, p["q_weight"], dt) + p["q_bias"]
    k = einsum("BTD,DKH->BTKH", t, p["k_weight"], dt) + p["k_bias"]
    v = einsum("BTD,DKH->BTKH", t, p["v_weight"], dt) + p["v_bias"]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    sinks = p["sinks"] if tap is None or tap.sinks is None else tap.sinks.reshape(p["sinks"].shape)

    def attend(q, keys, vals, q_pos, k_pos, aligned):
        return attention(q, keys, vals, sinks, q_pos, k_pos, window=window, aligned=aligned, cfg=cfg)

    attend.sinks = sinks  # a cache that runs its own kernel (the engine's pages) reads the layer's sinks

    if kv is None:
        o = attend(q, k, v, q_pos, q_pos, T)
    else:
        o, kv = step.attend(kv, r, q, k, v, q_pos, ring=bool(window), attention=attend)
    if tap is not None:
        if tap.wants("attention"):  # only without a cache (`_Hooks` refuses it with one): the keys are k
            def probs():  # (B,K,G,Q,S+1) -> (B,N,Q,S+1): query head n = k*G + g
                a = attention_probs(q[:, tap.take], k, sinks, q_pos[:, tap.take], q_pos, window=window,
                                    sm_scale=cfg.sm_scale)  # fmt: skip
                return a.reshape((a.shape[0], -1) + a.shape[3:])

            tap.lazy("attention", probs)
        if tap.heads is not None:
            o = o * tap.heads.reshape(sinks.shape + (1,)).astype(o.dtype)
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
    return choose_experts(router_logits(x, weight, bias), k)


def router_logits(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """x (T,D) -> the router's biased logits (T,E) in x.dtype."""
    return einsum("TD,DE->TE", x, weight, x.dtype) + bias.astype(x.dtype)


def choose_experts(logits: jax.Array, k: int, select: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """logits (T,E) -> experts (T,X) int32, weights (T,X): the top k, then a softmax over their logits.

    select (E,), an intervention, is added to the logits for the choice only: -inf never picks an expert,
    +inf always does, 0 leaves it be; the weights remain the softmax of the chosen experts' own logits.
    """
    if select is None:
        vals, idx = jax.lax.top_k(logits, k)
    else:
        _, idx = jax.lax.top_k(logits + select.astype(logits.dtype), k)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    return idx.astype(jnp.int32), jax.nn.softmax(vals.astype(F32), axis=-1).astype(logits.dtype)


EXPERT_LEAVES = ("mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales", "mlp1_weight", "mlp2_weight",
                 "mlp1_bias", "mlp2_bias")  # fmt: skip
EXPERT_LEAVES += kernels.mxfp4_matmul.LORA_LEAVES  # training: optional per-expert LoRA adapters


def moe_experts(x, idx, w, p: dict, cfg: Config):
    """The selected experts of (T,D) tokens -> (T,D): one implementation (`kernels.moe_experts`: the XLA
    path or the Pallas kernels), run per device with only its own experts under a mesh."""
    p = {n: a for n, a in p.items() if n in EXPERT_LEAVES or n == "layer"}
    impl = cfg.moe_impl if "mlp1_blocks" in p else "xla"  # the kernels read packed weights only
    local = functools.partial(kernels.moe_experts, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, impl=impl)
    if current_mesh() is not None:
        return expert_parallel(local, x, idx, w, kernels.mxfp4_matmul.own_layer(p), cfg)
    return local(x, idx, w, p)


def moe_layer(x, p: dict, cfg: Config, tap: _Tap | None = None):
    """One MoE block with its residual: x (B,T,D) -> x + experts(route(norm(x))). `tap` as in
    `attention_layer`."""
    B, T, D = x.shape
    t = rms_norm(x, p["norm"], cfg.rms_norm_eps).reshape(B * T, D)
    if tap is None:
        idx, w = route(t, p["gate_weight"], p["gate_bias"], cfg.experts_per_token)
    else:
        logits = router_logits(t, p["gate_weight"], p["gate_bias"])
        idx, w = choose_experts(logits, cfg.experts_per_token, tap.experts)
        if tap.wants("router"):
            for name, a in (("router_logits", logits), ("experts", idx), ("expert_weights", w)):
                tap.out[name] = a.reshape(B, T, -1)[:, tap.take]
    return x + moe_experts(t, idx, w, p, cfg).reshape(B, T, D)


# ---------------------------------------------------------------------------------------------- forward
def _layer_params(group) -> dict:
    """A block's parameters as {"attn": {leaf: array}, "mlp": {leaf: array}} ("norm" for the norm's scale)."""

    def leaves(m):
        d = {n: getattr(m, n)[...] for n in vars(m) if isinstance(getattr(m, n), nnx.Param)}
        d["norm"] = m.norm.scale[...]
        return d

    return {"attn": leaves(group.attn), "mlp": leaves(group.mlp)}


def forward(model: Transformer, tokens, positions, cache=None, *, probe: Probe | None = None,
            intervene: Intervene | None = None):  # fmt: skip
    """tokens (B,T) int32, positions (B,T) int32 (negative = padding) -> (final-normed hidden (B,T,D), cache).

    With a cache, positions must be each row's next positions (`KVCache.chunk_positions`); without one they
    must increase by one along each row (padding at either end), which lets sliding layers skip the keys
    outside their window (`kernels.attention_xla`). The cache is any object with the `KVCache` protocol:
    `begin(positions) -> (cache, step)`, `kv` (a (k, v) pair of stacked buffers per unit position) and
    `with_kv(kv)`, its step with `attend`. A cache may have fewer buffers than unit positions: then its
    `kv_slots` says which buffer each unit position's layers use (the engine's one page pool for all).

    probe (`Probe`): also return what it asks for, (hidden, cache, captures: name -> array with a leading
    axis over the probed layers, in order). intervene (`Intervene`): change the pass as it says. Without
    either, the pass is exactly the plain one (no hook is traced).
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
    slot = getattr(cache, "kv_slots", None) or range(len(unit))  # unit position -> its buffer in kv
    hooks = None
    if probe is not None or intervene is not None:
        hooks = _Hooks(model, probe, intervene, tokens.shape, cached=cache is not None)

    def body(carry, xs):
        x, kv, bufs = carry
        r, layers, hx = xs
        layers = [g | {"mlp": g["mlp"] | s | {"layer": r}} if s else g
                  for g, s in zip(layers, stacked, strict=True)]  # fmt: skip
        kv = list(kv) if kv is not None else None
        for j, sliding in enumerate(unit):
            tap = None if hooks is None else _Tap(hooks, j, hx[j])
            with jax.named_scope(f"{'sliding' if sliding else 'full'}{j}"):
                if tap is not None:
                    x = tap.site("resid_pre", x)
                x, kv_j = attention_layer(x, layers[j]["attn"], cos, sin, positions,
                                          window=cfg.sliding_window if sliding else 0, cfg=cfg,
                                          kv=None if kv is None else kv[slot[j]], step=step, r=r,
                                          tap=tap)  # fmt: skip
                if kv is not None:
                    kv[slot[j]] = kv_j
                if tap is not None:
                    x = tap.site("resid_mid", x)
                x = constrain(moe_layer(x, layers[j]["mlp"], cfg, tap=tap), ACT)  # block boundary
                if tap is not None:
                    x = tap.site("resid_post", x)
                    bufs = hooks.record(bufs, tap)
        return (x, None if kv is None else tuple(kv), bufs), None

    params = [_layer_params(g) for g in model.blocks]
    # expert weights are not scanned over: each layer reads its selected experts straight from the stack
    # (`kernels.mxfp4_matmul.expert_leaf`), which spares a copy of all the layer's experts every call
    stacked = [{n: g["mlp"].pop(n) for n in kernels.mxfp4_matmul.STACKED_LEAVES if n in g["mlp"]}
               for g in params]  # fmt: skip
    xs = (jnp.arange(cfg.layer_repeats, dtype=jnp.int32), params, None if hooks is None else hooks.xs)
    bufs = None if hooks is None else hooks.buffers()
    (x, kv, bufs), _ = jax.lax.scan(body, (x, kv, bufs), xs)
    if cache is not None:
        cache = cache.with_kv(kv)
    h = rms_norm(x, model.norm.scale[...], cfg.rms_norm_eps)
    if probe is None:
        return h, cache
    return h, cache, hooks.collect(bufs)


def logits(model: Transformer, h):
    """(…,D) -> float32 (…,V); rounded to the compute dtype first, as the reference returns them."""
    out = einsum("...D,VD->...V", h, model.unembedding[...], h.dtype).astype(F32)
    return constrain(out, ("batch",) + (None,) * (h.ndim - 2) + ("vocab",))


# ------------------------------------------------------------------------------------------- inspection
CAPTURES = {  # Probe flag -> the captures it records
    "attention": ("attention",),
    "router": ("router_logits", "experts", "expert_weights"),
    "residual": ("resid_pre", "resid_mid", "resid_post"),
    "logit_lens": ("logit_lens",),
}
SITES = CAPTURES["residual"]


def _int_tuple(v, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in (v if isinstance(v, tuple | list | range | np.ndarray) else [v]))
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be integers, got {v!r}") from None


@dataclasses.dataclass(frozen=True)
class Probe:
    """What `forward` records in each layer: hashable, so jit takes it as a static argument. Each capture is
    an array with a leading axis over the probed layers, for the Q tokens of `at`:

    attention   float32 (L, B, N, Q, S+1): each query head's attention probabilities over the S keys, the
                sink's share last (the XLA path's softmax, `attention_probs`; a pass without a cache)
    router      router_logits float32 (L, B, Q, E); experts int32 (L, B, Q, X), as chosen; expert_weights
                (L, B, Q, X)
    residual    resid_pre, resid_mid, resid_post (L, B, Q, D): the stream before the attention block,
                between the blocks and after the MoE block
    logit_lens  float32 (L, B, Q, V): each layer's output through the final norm and the unembedding

    layers: which layers (default all); at: which tokens, as indices along the sequence, negative from the
    end (default all). Only these are computed and kept, in buffers of their size carried through the layer
    scan, and an attention or logit-lens capture runs only in the layers asked for, so a long sequence never
    holds every layer's T x S probabilities.
    """

    attention: bool = False
    router: bool = False
    residual: bool = False
    logit_lens: bool = False
    layers: tuple[int, ...] | None = None
    at: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("layers", "at"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _int_tuple(getattr(self, name), f"Probe.{name}"))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for flag, names in CAPTURES.items() if getattr(self, flag) for n in names)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervene:
    """Changes to the forward pass, every field optional (`inspect.intervention` builds one from a model).
    A pytree: its arrays are jit arguments (new values do not recompile), the rest is static.

    experts  (L, E) float32 added to the router logits for the choice only: 0 routes as usual, -inf never
             picks the expert (ablation), +inf always picks it (forcing); the chosen experts' weights stay
             the softmax of their own logits.
    heads    (L, N) float32: each query head's attention output is multiplied by it (0 zeroes the head).
    sinks    (L, N) float32: the sink logits used instead of the checkpoint's.
    patch    (P, B, Q, D): written into the residual stream at `patch_site` (one of `SITES`) of each of the P
             `patch_layers`, at the Q tokens `patch_at` (indices along the sequence; None: all) -- e.g.
             another run's `Probe(residual=True)` capture (activation patching).
    """

    experts: jax.Array | None = None
    heads: jax.Array | None = None
    sinks: jax.Array | None = None
    patch: jax.Array | None = None
    patch_site: str = dataclasses.field(default="resid_post", metadata={"static": True})
    patch_layers: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    patch_at: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"static": True})


def _take(at, n: int, what: str) -> np.ndarray:
    """Indices (negative from the end) into n tokens -> int array; ValueError naming `what` if one is out."""
    if at is None:
        return np.arange(n)
    if not at:
        raise ValueError(f"{what} must name at least one token (None: all)")
    bad = [i for i in at if not -n <= i < n]
    if bad:
        raise ValueError(f"{what}: index {bad[0]} is out of range for {n} tokens")
    return np.asarray([i % n for i in at], dtype=np.int64)


def _layer_rows(layers, cfg: Config, what: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Selected layers -> per unit position j: the row (among the selected layers of j) of each repeat's
    layer (the count of them = not selected) and the layers in row order."""
    L, p, R = cfg.num_hidden_layers, len(cfg.layer_unit), cfg.layer_repeats
    chosen = set(range(L)) if layers is None else set(layers)
    if not chosen:
        raise ValueError(f"{what} must name at least one layer (None: all)")
    bad = sorted(i for i in chosen if not 0 <= i < L)
    if bad:
        raise ValueError(f"{what}: layer {bad[0]} is out of range: the model has {L} layers")
    slots, order = [], []
    for j in range(p):
        mine = [r * p + j for r in range(R) if r * p + j in chosen]
        slot = np.full(R, len(mine), np.int32)
        slot[[i // p for i in mine]] = np.arange(len(mine), dtype=np.int32)
        slots.append(slot)
        order.append(np.asarray(mine, np.int64))
    return slots, order


class _Hooks:
    """A forward pass's probe and intervention, checked against the model and the token shape (at trace
    time): per unit position, the arrays the layer scan reads at each repeat (`xs`), and the capture
    buffers it carries."""

    def __init__(self, model: Transformer, probe: Probe | None, iv: Intervene | None, shape, *, cached: bool):
        cfg = self.cfg = model.cfg
        self.model = model
        B, T = self.shape = tuple(shape)
        L, p, R = cfg.num_hidden_layers, len(cfg.layer_unit), cfg.layer_repeats
        self.probe = probe if probe is not None and probe.names else None
        if self.probe is not None and probe.attention and cached:
            raise ValueError("Probe(attention=True) needs a forward pass without a cache (model(tokens) or "
                             "inspect.run); the other captures work with one")  # fmt: skip
        self.take = _take(None if probe is None else probe.at, T, "Probe.at")
        self.slots, self.order = _layer_rows(None if probe is None else probe.layers, cfg, "Probe.layers")
        self.xs = [{} for _ in range(p)]
        if self.probe is not None:
            for j in range(p):
                if len(self.order[j]):
                    self.xs[j]["slot"] = jnp.asarray(self.slots[j])
        iv = iv or Intervene()
        N, E = cfg.num_attention_heads, cfg.num_experts
        for name, width in (("experts", E), ("heads", N), ("sinks", N)):
            a = getattr(iv, name)
            if a is None:
                continue
            if tuple(a.shape) != (L, width):
                what = "experts" if name == "experts" else "heads"
                raise ValueError(f"Intervene.{name} must have shape ({L}, {width}) (layers, {what}), got "
                                 f"{tuple(a.shape)}")  # fmt: skip
            a = jnp.asarray(a, F32).reshape(R, p, width)
            for j in range(p):
                self.xs[j][name] = a[:, j]
        self.patch = None
        if iv.patch is not None:
            if iv.patch_site not in SITES:
                raise ValueError(f"Intervene.patch_site must be one of {', '.join(SITES)}, got "
                                 f"{iv.patch_site!r}")  # fmt: skip
            self.patch_at = _take(iv.patch_at, T, "Intervene.patch_at")
            want = (len(iv.patch_layers), B, len(self.patch_at), cfg.hidden_size)
            if tuple(iv.patch.shape) != want:
                raise ValueError(f"Intervene.patch must have shape {want} (patch_layers, batch, patch_at "
                                 f"tokens, hidden), got {tuple(iv.patch.shape)}")  # fmt: skip
            if len(set(iv.patch_layers)) != len(iv.patch_layers):
                raise ValueError(f"Intervene.patch_layers must not repeat a layer, got {iv.patch_layers}")
            pslots, porder = _layer_rows(iv.patch_layers, cfg, "Intervene.patch_layers")
            row = {layer: i for i, layer in enumerate(iv.patch_layers)}
            values = jnp.asarray(iv.patch).astype(cfg.jax_dtype)
            self.patch, self.patch_site = [], iv.patch_site
            for j in range(p):
                self.patch.append(values[np.asarray([row[int(i)] for i in porder[j]], np.int64)])
                if len(porder[j]):
                    self.xs[j]["pslot"] = jnp.asarray(pslots[j])

    def shapes(self) -> dict[str, tuple[tuple[int, ...], object]]:
        cfg, (B, T), Q = self.cfg, self.shape, len(self.take)
        E, X, N, D = cfg.num_experts, cfg.experts_per_token, cfg.num_attention_heads, cfg.hidden_size
        out = {"attention": ((B, N, Q, T + 1), F32), "router_logits": ((B, Q, E), F32),
               "experts": ((B, Q, X), jnp.int32), "expert_weights": ((B, Q, X), F32),
               "logit_lens": ((B, Q, cfg.vocab_size), F32)}  # fmt: skip
        out.update({s: ((B, Q, D), cfg.jax_dtype) for s in SITES})
        return {n: out[n] for n in self.probe.names}

    def buffers(self):
        """The capture buffers the layer scan carries: name -> per unit position (its probed layers, ...)."""
        if self.probe is None:
            return None
        return {n: tuple(jnp.zeros((len(o),) + shape, dt) if len(o) else None for o in self.order)
                for n, (shape, dt) in self.shapes().items()}  # fmt: skip

    def record(self, bufs, tap: _Tap):
        """Writes a layer's captures into its row of the buffers (a repeat not probed writes nothing)."""
        if tap.slot is None:
            return bufs
        return {n: tuple(b.at[tap.slot].set(tap.out[n].astype(b.dtype), mode="drop") if j == tap.j else b
                         for j, b in enumerate(bs)) for n, bs in bufs.items()}  # fmt: skip

    def collect(self, bufs) -> dict[str, jax.Array]:
        """Buffers per unit position -> name: (probed layers in order, ...)."""
        if self.probe is None:
            return {}
        layers = np.concatenate(self.order)
        perm = np.argsort(layers, kind="stable")
        return {n: jnp.concatenate([b for b in bs if b is not None])[perm] for n, bs in bufs.items()}


class _Tap:
    """One layer's hooks while `forward` is traced: its intervention values and the captures it records
    (`out`). `slot` is the layer's row in the capture buffers (traced: the repeat is a scan index)."""

    def __init__(self, hooks: _Hooks, j: int, hx: dict):
        self.hooks, self.j, self.take = hooks, j, hooks.take
        self.slot = hx.get("slot")
        self.pslot = hx.get("pslot")
        self.experts, self.heads, self.sinks = hx.get("experts"), hx.get("heads"), hx.get("sinks")
        self.out: dict[str, jax.Array] = {}

    def wants(self, flag: str) -> bool:
        return self.slot is not None and getattr(self.hooks.probe, flag)

    def lazy(self, name: str, fn) -> None:
        """Captures fn() (an expensive capture) only in the layers asked for: under `lax.cond`, unless every
        repeat of this unit position is probed."""
        n = len(self.hooks.order[self.j])
        if n == self.hooks.cfg.layer_repeats:
            self.out[name] = fn()
            return
        shape = jax.eval_shape(fn)
        self.out[name] = jax.lax.cond(self.slot < n, fn, lambda: jnp.zeros(shape.shape, shape.dtype))

    def site(self, name: str, x):
        """The residual stream x (B,T,D) at site `name`: patched if the intervention says so, captured if the
        probe asks; after the layer (resid_post), also its logit lens."""
        h = self.hooks
        if self.pslot is not None and name == h.patch_site:
            values, at = h.patch[self.j], h.patch_at
            v = jnp.take(values, jnp.minimum(self.pslot, len(values) - 1), axis=0)
            x = x.at[:, at].set(jnp.where(self.pslot < len(values), v, x[:, at]))
        if self.wants("residual"):
            self.out[name] = x[:, self.take]
        if name == "resid_post" and self.wants("logit_lens"):
            m = h.model
            lens = lambda: logits(m, rms_norm(x[:, self.take], m.norm.scale[...], m.cfg.rms_norm_eps))  # noqa: E731
            self.lazy("logit_lens", lens)
        return x


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

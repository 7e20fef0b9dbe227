"""Look inside gpt-oss and change it, exactly, through the model's own forward pass.

- `run(model, tokens, probe=..., intervene=...)`: logits and, per layer, what a `Probe` asks for: attention
  probabilities with the sink's share, router logits, the chosen experts and their weights, the residual
  stream around each block, and the logit lens. Only the layers and tokens asked for are computed and kept.
- `intervention(model, ...)`: an `Intervene` that ablates or forces experts, scales or zeroes attention
  heads, sets sink logits, or patches the residual stream with another run's values (activation patching).
  It changes the model's own forward pass, not a copy of the model: `run`, `log_probs` and `score` take it.
- `log_probs` / `score`: per-token log-probabilities and perplexity of token ids or texts, batched, the
  vocabulary projected a block of tokens at a time.
- `sink_share`, `expert_load`, `coselection`, `routing_entropy`, `attention_by_distance`: the summaries the
  notebooks plot, from a `Trace`.
- `forward(model, tokens, positions, cache, probe=..., intervene=...)`: `model.forward` with both, the pass
  the functions above run (with a cache too, for every capture but attention).

A probe and an intervention are the forward pass's hooks (`model.Hooks`: `_Inspection` hands each layer its
row of the intervention and carries the capture buffers through the layer scan, `_Tap` acts at the model's
named sites), so the model knows nothing of them. Everything runs under jit (the probe is static, the
intervention's arrays are arguments) and on a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from . import model as _model
from . import tokenizer
from .config import Config
from .kernels.attention import attention_probs
from .logprobs import chunked_log_probs
from .model import (
    Hooks,
    LayerHooks,
    Transformer,
    check_positions,
    check_tokens,
    layer_params,
    logits,
    rms_norm,
)
from .ops import F32
from .sharding import to_host, with_model_mesh

__all__ = ["CAPTURES", "SITES", "Intervene", "Probe", "Score", "Trace", "attention_by_distance",
           "coselection", "expert_load", "forward", "intervention", "layer_table", "log_probs",
           "routing_entropy", "run", "score", "sink_share"]  # fmt: skip


# ---------------------------------------------------------------------------------------- probe, intervene
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


class _Inspection(Hooks):
    """A forward pass's probe and intervention as the model's `Hooks`, checked against the model and the
    tokens (at trace time): per unit position, the arrays the layer scan hands each repeat (`scanned`), and
    the capture buffers it carries (the state)."""

    def __init__(self, model: Transformer, probe: Probe | None, iv: Intervene | None, positions, *,
                 cached: bool):  # fmt: skip
        cfg = self.cfg = model.cfg
        self.model, self.positions = model, positions
        B, T = self.shape = tuple(positions.shape)
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

    @property
    def active(self) -> bool:
        """Whether the pass records or changes anything (else it runs without hooks: the plain program)."""
        return any(self.xs)

    def scanned(self) -> list[dict]:
        return self.xs

    def init(self):
        return self.buffers()

    def layer(self, j: int, r, xs, state) -> _Tap:
        return _Tap(self, j, xs, state)

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


class _Tap(LayerHooks):
    """One layer's probe and intervention while the forward pass is traced: its intervention values and the
    captures it records (`out`). `slot` is the layer's row in the capture buffers (traced: the repeat is a
    scan index)."""

    def __init__(self, hooks: _Inspection, j: int, hx: dict, bufs):
        super().__init__(bufs)
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

    def params(self, p: dict) -> dict:
        if self.sinks is not None:  # the intervention's sink logits instead of the checkpoint's
            p = p | {"attn": p["attn"] | {"sinks": self.sinks.reshape(p["attn"]["sinks"].shape)}}
        self.layer_sinks = p["attn"]["sinks"]
        return p

    def site(self, name: str, value):
        if name in SITES:
            return self.residual(name, value)
        if name == "attention" and self.wants("attention"):  # only without a cache (`_Inspection` refuses
            q, k = value  # it with one): the keys are these tokens'
            cfg, pos, take = self.hooks.cfg, self.hooks.positions, self.take
            window = cfg.sliding_window if cfg.layer_unit[self.j] else 0

            def probs():  # (B,K,G,Q,S+1) -> (B,N,Q,S+1): query head n = k*G + g
                a = attention_probs(q[:, take], k, self.layer_sinks, pos[:, take], pos, window=window,
                                    sm_scale=cfg.sm_scale)  # fmt: skip
                return a.reshape((a.shape[0], -1) + a.shape[3:])

            self.lazy("attention", probs)
        elif name == "heads" and self.heads is not None:
            value = value * self.heads.reshape(self.layer_sinks.shape + (1,)).astype(value.dtype)
        elif name == "router":
            if self.wants("router"):
                self.out["router_logits"] = value.reshape(*self.hooks.shape, -1)[:, self.take]
            if self.experts is not None:  # added for the choice only
                return value + self.experts.astype(value.dtype)
        elif name == "experts" and self.wants("router"):
            for n, a in zip(("experts", "expert_weights"), value, strict=True):
                self.out[n] = a.reshape(*self.hooks.shape, -1)[:, self.take]
        return value

    def residual(self, name: str, x):
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

    def state(self):
        return self.hooks.record(self._state, self)


def forward(model: Transformer, tokens, positions, cache=None, *, probe: Probe | None = None,
            intervene: Intervene | None = None):  # fmt: skip
    """`model.forward` with a probe and an intervention as its hooks: (final-normed hidden (B,T,D), cache),
    and with a probe (hidden, cache, captures: name -> array with a leading axis over the probed layers, in
    order). A probe that captures nothing and an intervention that changes nothing run the plain pass (no
    hook is traced)."""
    hooks = None
    if probe is not None or intervene is not None:
        hooks = _Inspection(model, probe, intervene, positions, cached=cache is not None)
    if hooks is None or not hooks.active:
        h, cache = _model.forward(model, tokens, positions, cache)
        caps = {}
    else:
        h, cache, bufs = _model.forward(model, tokens, positions, cache, hooks=hooks)
        caps = hooks.collect(bufs)
    return (h, cache) if probe is None else (h, cache, caps)


# ------------------------------------------------------------------------------------------------ capture
@dataclasses.dataclass(frozen=True)
class Trace:
    """What `run` returns: float32 logits (B,T,V) (None when not asked for) and the captures (name ->
    array with a leading axis over `layers`; the token axis holds the tokens `at`, indices along the
    sequence)."""

    logits: jax.Array | None
    captures: dict[str, jax.Array]
    layers: tuple[int, ...]
    at: tuple[int, ...]

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self.captures:
            raise KeyError(f"{name!r} was not captured (captured: {', '.join(self.captures) or 'nothing'}; "
                           f"ask the Probe for it)")  # fmt: skip
        return self.captures[name]

    def layer(self, i: int) -> dict[str, jax.Array]:
        """Layer i's captures (name -> array)."""
        if i not in self.layers:
            raise ValueError(f"layer {i} was not probed (probed: {self.layers})")
        return {n: a[self.layers.index(i)] for n, a in self.captures.items()}


def _positions(tokens, positions):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return check_positions(positions, tokens.shape)


@with_model_mesh
def run(model: Transformer, tokens, positions=None, *, probe: Probe | None = None,
        intervene: Intervene | None = None, with_logits: bool = True) -> Trace:  # fmt: skip
    """`model(tokens)` with captures and interventions: tokens int (B,T) or (T,); positions as for
    `model(tokens)` (default 0..T-1). Returns a `Trace`. with_logits=False skips the (B,T,V) logits (a long
    sequence's are large: 0.8 MB per token)."""
    tokens = check_tokens(tokens, model.cfg.vocab_size)
    positions = _positions(tokens, positions)
    probe = Probe() if probe is None else probe
    if not isinstance(probe, Probe):
        raise ValueError(f"probe must be a gptoss_jax.inspect.Probe, got {type(probe).__name__}")
    if intervene is not None and not isinstance(intervene, Intervene):
        raise ValueError(f"intervene must be a gptoss_jax.inspect.Intervene, got {type(intervene).__name__}")
    graphdef, state = nnx.split(model)
    out, caps = _run_jit(graphdef, state, tokens, positions, probe, intervene, bool(with_logits))
    T = tokens.shape[1]
    layers = range(model.cfg.num_hidden_layers) if probe.layers is None else sorted(set(probe.layers))
    at = tuple(range(T)) if probe.at is None else tuple(i % T for i in probe.at)
    return Trace(out, caps, tuple(layers) if caps else (), at)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _run_jit(graphdef, state, tokens, positions, probe, intervene, with_logits):
    model = nnx.merge(graphdef, state)
    h, _, caps = forward(model, tokens, positions, probe=probe, intervene=intervene)
    return logits(model, h) if with_logits else None, caps


# -------------------------------------------------------------------------------------------- intervene
def _check(value: int, n: int, what: str) -> int:
    if not isinstance(value, int | np.integer) or not 0 <= value < n:
        raise ValueError(f"{what} {value!r} is out of range [0, {n})")
    return int(value)


def layer_table(model: Transformer, path: str) -> np.ndarray:
    """A per-layer weight of every layer, flattened per layer: e.g. "attn.sinks" -> (L, N) float32."""
    group, leaf = path.split(".")
    return np.stack([np.asarray(to_host(layer_params(model, i)[group][leaf]), np.float32).reshape(-1)
                     for i in range(model.cfg.num_hidden_layers)])  # fmt: skip


def intervention(model: Transformer, *, ablate_experts: Mapping[int, Iterable[int]] | None = None,
                 force_experts: Mapping[int, Iterable[int]] | None = None,
                 head_scale: Mapping[tuple[int, int], float] | None = None,
                 sink_logits: Mapping[tuple[int, int], float] | None = None,
                 patch: Trace | None = None, patch_site: str = "resid_post",
                 patch_layers: Sequence[int] | None = None) -> Intervene:  # fmt: skip
    """An `Intervene` for `model`, from plain mappings (layers and heads count from 0; head n is query head n
    of the checkpoint, kv head n // G):

    ablate_experts  {layer: experts}: the router never picks them (the same as a router bias of -inf)
    force_experts   {layer: experts}: every token picks them (at most top-k of them), the other slots go to
                    the best of the rest; weights stay the softmax of the chosen experts' logits
    head_scale      {(layer, head): factor}: the head's attention output times factor (0 zeroes it)
    sink_logits     {(layer, head): logit}: the head's sink logit, instead of the checkpoint's
    patch           a `Trace` with `Probe(residual=True)`: its residual stream at `patch_site` of
                    `patch_layers` (default: every layer it holds), at its tokens, replaces this run's
    """
    cfg = model.cfg
    L, E, N, X = cfg.num_hidden_layers, cfg.num_experts, cfg.num_attention_heads, cfg.experts_per_token
    kw = {}
    if ablate_experts or force_experts:
        select = np.zeros((L, E), np.float32)
        for table, value, what in ((ablate_experts, -np.inf, "ablate_experts"),
                                   (force_experts, np.inf, "force_experts")):  # fmt: skip
            for layer, experts in (table or {}).items():
                layer = _check(layer, L, f"{what}: layer")
                experts = {_check(e, E, f"{what}: layer {layer} expert") for e in experts}
                if any(select[layer, e] not in (0, value) for e in experts):
                    raise ValueError(f"{what}: layer {layer}: an expert cannot be both ablated and forced")
                select[layer, list(experts)] = value
        for layer in range(L):
            if (select[layer] == -np.inf).sum() > E - X or (select[layer] == np.inf).sum() > X:
                raise ValueError(f"layer {layer}: at most {X} experts can be forced and at most {E - X} "
                                 f"ablated (each token chooses {X} of {E})")  # fmt: skip
        kw["experts"] = jnp.asarray(select)
    for table, name, base, what in ((head_scale, "heads", None, "head_scale"),
                                    (sink_logits, "sinks", "attn.sinks", "sink_logits")):  # fmt: skip
        if not table:
            continue
        a = np.ones((L, N), np.float32) if base is None else layer_table(model, base)
        for key, value in table.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"{what}: keys must be (layer, head) pairs, got {key!r}")
            a[_check(key[0], L, f"{what}: layer"), _check(key[1], N, f"{what}: head")] = float(value)
        kw[name] = jnp.asarray(a)
    if patch is not None:
        if patch_site not in SITES:
            raise ValueError(f"patch_site must be one of {', '.join(SITES)}, got {patch_site!r}")
        if patch_site not in patch.captures:
            raise ValueError(f"patch: the trace holds no {patch_site} (run it with Probe(residual=True))")
        layers = patch.layers if patch_layers is None else tuple(int(i) for i in patch_layers)
        missing = [i for i in layers if i not in patch.layers]
        if missing:
            raise ValueError(f"patch_layers: layer {missing[0]} is not in the trace (it holds "
                             f"{patch.layers})")  # fmt: skip
        rows = [patch.layers.index(i) for i in layers]
        kw.update(patch=patch[patch_site][np.asarray(rows)], patch_site=patch_site, patch_layers=layers,
                  patch_at=patch.at)  # fmt: skip
    return Intervene(**kw)


# ---------------------------------------------------------------------------------------------- scoring
@with_model_mesh
def log_probs(model: Transformer, tokens, positions=None, *, intervene: Intervene | None = None,
              block: int = 256) -> jax.Array:  # fmt: skip
    """float32 (B, T-1): log p(tokens[:, t+1] | tokens[:, :t+1]), through `forward` (interventions apply).

    The vocabulary projection and its log-softmax run `block` tokens at a time, so (B, T, V) logits never
    exist at once. Entries whose target (or context) is padding (negative position) are 0."""
    tokens = check_tokens(tokens, model.cfg.vocab_size)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens: log_probs needs at least 2 tokens per row, got {tokens.shape[1]}")
    positions = _positions(tokens, positions)
    graphdef, state = nnx.split(model)
    block = max(1, min(int(block), tokens.shape[1] - 1))  # no block longer than the sequence
    return _log_probs_jit(graphdef, state, tokens, positions, intervene, block)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _log_probs_jit(graphdef, state, tokens, positions, intervene, block):
    model = nnx.merge(graphdef, state)
    h, _ = forward(model, tokens, positions, intervene=intervene)
    out = chunked_log_probs(h[:, :-1], model.unembedding[...], tokens[:, 1:], chunk=block)
    return jnp.where((positions[:, 1:] >= 0) & (positions[:, :-1] >= 0), out, 0.0)


@dataclasses.dataclass(frozen=True)
class Score:
    """One text's score: its token ids and log p of each token after the first (float32, len - 1)."""

    tokens: np.ndarray
    log_probs: np.ndarray

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token (nats)."""
        return float(-np.mean(self.log_probs, dtype=np.float64))

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def score(model: Transformer, texts: Sequence[str | Sequence[int]], *, batch_size: int = 8,
          intervene: Intervene | None = None) -> list[Score]:  # fmt: skip
    """Per-token log-probabilities and perplexity of each text (a string, encoded with o200k_harmony, or
    token ids), `batch_size` texts per forward pass, right-padded to a length of a few buckets (fewer
    compiles). A text scores the same alone as in any batch."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings or token lists, got one string (wrap it in a list)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ids = [np.asarray(tokenizer.encode(t) if isinstance(t, str) else t, np.int64).reshape(-1) for t in texts]
    for i, t in enumerate(ids):
        if len(t) < 2:
            raise ValueError(f"texts[{i}]: needs at least 2 tokens to score, got {len(t)}")
    out = []
    for start in range(0, len(ids), batch_size):
        group = ids[start : start + batch_size]
        T = max(16, 1 << (max(len(t) for t in group) - 1).bit_length())  # a power of two
        toks = np.zeros((len(group), T), np.int64)
        pos = np.full((len(group), T), -1, np.int64)
        for b, t in enumerate(group):
            toks[b, : len(t)], pos[b, : len(t)] = t, np.arange(len(t))
        lp = np.asarray(to_host(log_probs(model, toks, pos, intervene=intervene)))
        out += [Score(t, lp[b, : len(t) - 1]) for b, t in enumerate(group)]
    return out


# -------------------------------------------------------------------------------------------- summaries
def sink_share(trace: Trace) -> np.ndarray:
    """The attention mass each head gives its sink: (layers, B, N, Q) float32."""
    return np.asarray(to_host(trace["attention"]))[..., -1]


def expert_load(trace: Trace) -> np.ndarray:
    """(layers, E): the fraction of (token, top-k slot) choices that went to each expert (rows sum to 1)."""
    idx = np.asarray(to_host(trace["experts"]))
    E = trace["router_logits"].shape[-1]
    counts = np.stack([np.bincount(layer.ravel(), minlength=E) for layer in idx])
    return counts / counts.sum(axis=1, keepdims=True)


def coselection(trace: Trace) -> np.ndarray:
    """(layers, E, E): how many tokens chose both experts i and j (the diagonal: tokens that chose i)."""
    idx = np.asarray(to_host(trace["experts"]))
    E = trace["router_logits"].shape[-1]
    onehot = np.zeros(idx.shape[:-1] + (E,), np.int64)
    np.put_along_axis(onehot, idx, 1, axis=-1)
    onehot = onehot.reshape(idx.shape[0], -1, E)
    return np.einsum("lte,ltf->lef", onehot, onehot)


def routing_entropy(trace: Trace) -> np.ndarray:
    """(layers,): the mean entropy, in nats, of the router's softmax over all experts (log E = uniform)."""
    z = np.asarray(to_host(trace["router_logits"]), np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1).reshape(z.shape[0], -1).mean(-1)


def attention_by_distance(trace: Trace) -> np.ndarray:
    """(layers, T): the mean attention mass at each distance (query index - key index) back from a query,
    over heads, rows and captured queries, for a run at positions 0..T-1; the sink's share is not in it."""
    p = np.asarray(to_host(trace["attention"]))[..., :-1]  # (L, B, N, Q, T)
    T = p.shape[-1]
    out = np.zeros((p.shape[0], T))
    for qi, t in enumerate(trace.at):
        out[:, : t + 1] += p[:, :, :, qi, t::-1].mean(axis=(1, 2))
    return out / len(trace.at)

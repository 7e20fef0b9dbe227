"""LoRA on gpt-oss without forking the model: targets, adapter arrays, and the training forward pass.

Targets (`LoraConfig.targets`): the attention projections `q`, `k`, `v`, `o`, the `router`, and the experts'
`mlp1` (gate/up) and `mlp2` (down). Each dense target gets one (A, B) pair per layer; each expert target one
pair per expert per layer, applied only to the tokens routed to that expert.

How an adapter enters the forward pass, per layer (inside the layer scan, so only one layer's effective
weights exist at a time):
- dense targets are merged into the effective weight, W + scale * (B A) laid out as our weight, computed in
  float32 and rounded to the model dtype: what PEFT computes in float32 (its merged weight for the router,
  the same product unmerged for the projections), cheap next to the layer, and differentiable;
- expert targets ride along as extra entries of the layer's expert parameters (`kernels.mxfp4_matmul.
  LORA_LEAVES`, B pre-multiplied by the scale), and the expert computation adds B (A x) inside each expert,
  its packed weights dequantized one expert at a time (forward and backward).

Adapter arrays are float32, stacked like the model's weights: `blocks.{j}.attn.q_lora_a` (R, r, in),
`..._lora_b` (R, out, r) for unit position j of the layer pattern (layers j, j + p, ...); experts
`blocks.{j}.mlp.mlp1_lora_a` (R, E, r, D) and `mlp1_lora_b` (R, E, 2F, r), `mlp2_lora_a` (R, E, r, F),
`mlp2_lora_b` (R, E, D, r). "in"/"out" are the Hugging Face orientation (out x in), so the arrays are PEFT's
up to a reshape (`training/peft.py`). Initialisation as PEFT's: A uniform in +-1/sqrt(in), B zero.

`hidden_states` is the model's forward pass (`model.forward`, no cache) rebuilt from the model's own free
functions (`attention_layer`, `moe_layer`, `rms_norm`, `rope_cos_sin`) with the adapters merged per layer and
rematerialization per layer; `loss_sums` adds a cross-entropy computed over chunks of positions, so the
(tokens x vocabulary) logits never exist at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import weights
from ..config import Config
from ..kernels.mxfp4_matmul import LORA_LEAVES
from ..model import ACT, attention_layer, moe_layer, rms_norm, rope_cos_sin
from ..ops import F32, einsum
from ..sharding import constrain, current_mesh, param_spec

HIGHEST = jax.lax.Precision.HIGHEST

# target -> (group, leaf of the base weight in our layout); each dense one is reshape(W_hf.T) of its HF weight
TARGETS = {
    "q": ("attn", "q_weight"),
    "k": ("attn", "k_weight"),
    "v": ("attn", "v_weight"),
    "o": ("attn", "o_weight"),
    "router": ("mlp", "gate_weight"),
    "mlp1": ("mlp", "mlp1"),
    "mlp2": ("mlp", "mlp2"),
}
EXPERT_TARGETS = ("mlp1", "mlp2")
# OpenAI's cookbook: all linear layers (q, k, v, o; the router is not an nn.Linear) plus the experts, which
# "all-linear" alone silently leaves untrained.
DEFAULT_TARGETS = ("q", "k", "v", "o", "mlp1", "mlp2")
ALIASES = {
    "attn": ("q", "k", "v", "o"),
    "experts": EXPERT_TARGETS,
    "all": tuple(TARGETS),
    "default": DEFAULT_TARGETS,
}

# Logical axes of the expert adapters (per layer), so expert parallelism splits them with their experts:
# over `expert`, and along the expert width F where the experts' width is split.
EXPERT_LORA_AXES = {
    "mlp1_lora_a": ("expert", None, "embed"),
    "mlp1_lora_b": ("expert", "expert_ffw", None),
    "mlp2_lora_a": ("expert", None, "expert_ffw"),
    "mlp2_lora_b": ("expert", "embed", None),
}
assert tuple(EXPERT_LORA_AXES) == LORA_LEAVES
# `sharding.expert_parallel` looks every expert array's axes up by leaf name in the weight declarations;
# the adapters are not weights of the released model, so they are registered here.
weights.LEAF_AXES.update(EXPERT_LORA_AXES)


class LoraError(ValueError):
    """A bad LoRA setting or adapter (one line, naming the field or file)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be a positive number, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """ "q,v,experts" or a sequence of names (aliases attn, experts, all, default) -> targets, fixed order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[str] = set()
    for n in (n.strip() for n in names):
        if n in ALIASES:
            out.update(ALIASES[n])
        elif n in TARGETS:
            out.add(n)
        else:
            raise LoraError(f"unknown LoRA target {n!r}; choose from {', '.join([*TARGETS, *ALIASES])}")
    if not out:
        raise LoraError("LoRA targets: none given")
    return tuple(t for t in TARGETS if t in out)


def target_dims(cfg: Config, target: str) -> tuple[int, int]:
    """(in, out) of a target's weight, Hugging Face orientation (per expert for the experts)."""
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    nq, nk = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "q": (D, nq),
        "k": (D, nk),
        "v": (D, nk),
        "o": (nq, D),
        "router": (D, E),
        "mlp1": (D, 2 * F),
        "mlp2": (F, D),
    }[target]


def adapter_layout(cfg: Config, lcfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Adapter name -> shape (stacked over the `R` repeats of the layer unit, like the model's weights)."""
    R, r, E = cfg.layer_repeats, lcfg.rank, cfg.num_experts
    out = {}
    for j in range(len(cfg.layer_unit)):
        for t in lcfg.targets:
            group = TARGETS[t][0]
            din, dout = target_dims(cfg, t)
            pre = (R, E) if t in EXPERT_TARGETS else (R,)
            out[f"blocks.{j}.{group}.{t}_lora_a"] = (*pre, r, din)
            out[f"blocks.{j}.{group}.{t}_lora_b"] = (*pre, dout, r)
    return out


def init_adapters(
    cfg: Config, lcfg: LoraConfig, seed: int = 0, *, b_std: float = 0.0
) -> dict[str, jax.Array]:
    """PEFT's initialisation: A uniform in +-1/sqrt(in) (kaiming-uniform with a=sqrt(5)), B zero, so the
    adapted model starts as the base. `b_std` > 0 draws B from a normal instead (tests: nonzero gradients)."""
    out = {}
    key = jax.random.key(seed)
    for i, (name, shape) in enumerate(adapter_layout(cfg, lcfg).items()):
        k = jax.random.fold_in(key, i)
        if name.endswith("_a"):
            bound = 1.0 / math.sqrt(shape[-1])
            out[name] = jax.random.uniform(k, shape, F32, -bound, bound)
        else:
            out[name] = b_std * jax.random.normal(k, shape, F32)
    return out


def trainable_specs(cfg: Config, shapes: dict[str, tuple[int, ...]], mesh_shape) -> dict[str, P]:
    """PartitionSpecs of adapters (or of the weights, for full fine-tuning) by name: expert adapters split
    like their experts, the base weights by the rule table, the dense adapters (r x in, out x r: small)
    replicated."""
    out = {}
    for name, shape in shapes.items():
        known = name.rsplit(".", 1)[-1] in weights.LEAF_AXES
        out[name] = param_spec(name, shape, dict(mesh_shape), cfg) if known else P()
    return out


def adapter_shardings(cfg: Config, shapes: dict[str, tuple[int, ...]], mesh) -> dict[str, NamedSharding]:
    return {n: NamedSharding(mesh, s) for n, s in trainable_specs(cfg, shapes, mesh.shape).items()}


def keep_shardings(tree, names_like: dict, cfg: Config):
    """Inside jit under a mesh: every dict of `tree` keyed like `names_like` (the adapters, Adam's moments)
    constrained to `trainable_specs`, so the step returns them as it got them (and does not compile again)."""
    mesh = current_mesh()
    if mesh is None:
        return tree
    specs = trainable_specs(cfg, {n: a.shape for n, a in names_like.items()}, mesh.shape)

    def fix(d):
        return {n: jax.lax.with_sharding_constraint(a, specs[n]) for n, a in d.items()}

    same = lambda x: isinstance(x, dict) and set(x) == set(specs)  # noqa: E731
    return jax.tree.map(lambda x: fix(x) if same(x) else x, tree, is_leaf=same)


# ------------------------------------------------------------------------------------ parameters by name
def model_params(model) -> dict[str, jax.Array]:
    """The model's parameters by name (`weights.param_layout` names: `blocks.0.attn.q_weight`, ...)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): v.get_value() for path, v in flat}


def _unit(tree: dict, j: int) -> dict:
    """Unit position j's entries of a name -> array dict as {"attn": {leaf: a}, "mlp": {leaf: a}} ("norm" for
    the norm's scale): the layout `model.attention_layer` / `model.moe_layer` read."""
    out: dict = {"attn": {}, "mlp": {}}
    pre = f"blocks.{j}."
    for name, arr in tree.items():
        if name.startswith(pre):
            group, leaf = name[len(pre) :].split(".", 1)
            out[group]["norm" if leaf == "norm.scale" else leaf] = arr
    return out


def merge_layer(layer: dict, adapters: dict, lcfg: LoraConfig) -> dict:
    """One layer's effective parameters: dense targets merged (W + scale * B A, in float32, rounded to W's
    dtype), expert adapters added as `LORA_LEAVES` entries with B scaled. `adapters` is this layer's slice
    in the `_unit` layout."""
    out = {g: dict(v) for g, v in layer.items()}
    s = lcfg.scale
    for t in lcfg.targets:
        group, leaf = TARGETS[t]
        a, b = adapters[group][f"{t}_lora_a"], adapters[group][f"{t}_lora_b"]
        if t in EXPERT_TARGETS:
            out[group][f"{t}_lora_a"], out[group][f"{t}_lora_b"] = a, b * s
        else:
            out[group][leaf] = merge_dense(out[group][leaf], a, b, s)
    return out


def merge_dense(w, a, b, scale: float):
    """W + scale * B A for one layer's weight in our layout (every dense target is reshape(W_hf^T)), in
    float32, rounded to W's dtype."""
    delta = jnp.einsum("or,ri->io", b, a, precision=HIGHEST) * scale  # (in, out) = our layout, flattened
    return (w.astype(F32) + delta.reshape(w.shape)).astype(w.dtype)


def target_of(name: str) -> str:
    """`blocks.0.mlp.mlp1_lora_a` -> "mlp1"."""
    return name.rsplit(".", 1)[-1].rsplit("_lora_", 1)[0]


# ------------------------------------------------------------------------------------------ forward
def hidden_states(
    params: dict,
    adapters: dict,
    tokens,
    positions,
    cfg: Config,
    lcfg: LoraConfig | None,
    *,
    remat: bool = True,
) -> jax.Array:
    """`model.forward` without a cache, adapters merged per layer: tokens, positions (B,T) -> final-normed
    hidden (B,T,D). Positions increase by one along each row, negative for padding at the ends.

    remat: each layer keeps only its input for the backward pass and recomputes the rest (activation memory
    of one layer plus a (B,T,D) array per layer, instead of every intermediate of every layer). Attention and
    experts take the XLA path whatever the config says: the Pallas kernels have no backward pass.
    """
    cfg = cfg.replace(attention_impl="xla", moe_impl="xla")  # the Pallas kernels have no backward pass
    dt = cfg.jax_dtype
    x = constrain(params["embedding"][tokens].astype(dt), ACT)
    cos, sin = rope_cos_sin(positions, cfg, dt)

    def layer_fn(sliding):
        def fn(x, lp, ad):
            if lcfg is not None:
                lp = merge_layer(lp, ad, lcfg)
            x, _ = attention_layer(
                x, lp["attn"], cos, sin, positions, window=cfg.sliding_window if sliding else 0, cfg=cfg
            )
            return constrain(moe_layer(x, lp["mlp"], cfg), ACT)

        return jax.checkpoint(fn) if remat else fn

    fns = [layer_fn(s) for s in cfg.layer_unit]

    def body(x, xs):
        layers, ads = xs
        for j, fn in enumerate(fns):
            with jax.named_scope(f"layer{j}"):
                x = fn(x, layers[j], ads[j])
        return x, None

    p = len(cfg.layer_unit)
    xs = ([_unit(params, j) for j in range(p)], [_unit(adapters, j) for j in range(p)])
    x, _ = jax.lax.scan(body, x, xs)
    return rms_norm(x, params["norm.scale"], cfg.rms_norm_eps)


LOSS_CHUNK_LOGITS = (
    1 << 26
)  # float32 logits per cross-entropy chunk (256 MiB), and as many for their gradient


def cross_entropy_sums(h, unembedding, targets, weights_, dtype) -> tuple[jax.Array, jax.Array]:
    """(sum of weights * -log p(target), sum of weights) over (B,T) positions, the logits computed as
    `model.logits` does (rounded to the compute dtype, then float32) a chunk of positions at a time and
    recomputed in the backward pass. Chunks run along T, so a batch split over `data` stays split."""
    B, T, D = h.shape
    V = unembedding.shape[0]
    c = int(max(1, min(T, LOSS_CHUNK_LOGITS // max(1, B * V))))
    n = -(-T // c)
    pad = n * c - T

    def chunks(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(B, n, c, *a.shape[2:]), 1, 0)

    def one(total, xs):
        hc, tc, wc = xs
        logits = einsum("BCD,VD->BCV", hc, unembedding, dtype).astype(F32)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum(nll * wc), None

    w = weights_.astype(F32)
    if n == 1:  # fits one chunk: nothing to recompute
        return one(jnp.zeros((), F32), (h, targets, w))[0], jnp.sum(w)
    total, _ = jax.lax.scan(jax.checkpoint(one), jnp.zeros((), F32), (chunks(h), chunks(targets), chunks(w)))
    return total, jnp.sum(w)


def loss_sums(
    params: dict, adapters: dict, batch: dict, cfg: Config, lcfg: LoraConfig | None, *, remat: bool = True
) -> tuple[jax.Array, jax.Array]:
    """(summed token loss, number of trained tokens) of a batch: tokens, positions (B,T); loss_pos (B,K) the
    positions whose next token carries loss, targets (B,K) those tokens, weights (B,K) 0 for padding
    entries (`data.Rows.batch`). Only those K positions go through the unembedding."""
    h = hidden_states(params, adapters, batch["tokens"], batch["positions"], cfg, lcfg, remat=remat)
    h = jnp.take_along_axis(h, batch["loss_pos"][..., None], axis=1)
    return cross_entropy_sums(h, params["unembedding"], batch["targets"], batch["weights"], cfg.jax_dtype)

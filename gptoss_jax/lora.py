"""LoRA on gpt-oss without forking the model: targets, adapter arrays, and the adapters as a per-layer transform
of the model's own forward pass. Used by training (`training/`) and at inference (`adapters.apply_adapters`).

Targets (`LoraConfig.targets`): the attention projections `q`, `k`, `v`, `o`, the `router`, and the experts'
`mlp1` (gate/up) and `mlp2` (down). Each dense target gets one (A, B) pair per layer; each expert target one
pair per expert per layer, applied only to the tokens routed to that expert.

How an adapter enters the forward pass, per layer (`Adapters`, a `model.Hooks`: inside the layer scan, so
only one layer's effective weights exist at a time, and inside its remat when the pass rematerializes):
- dense targets are merged into the effective weight, W + scale * (B A) laid out as our weight, computed in
  float32 and rounded to the model dtype: what PEFT computes in float32 (its merged weight for the router,
  the same product unmerged for the projections), cheap next to the layer, and differentiable;
- expert targets ride along as extra entries of the layer's expert parameters (`moe.LORA_LEAVES`, B
  pre-multiplied by the scale), and the expert computation adds B (A x) inside each expert, its packed
  weights dequantized one expert at a time (forward and backward) and read from their stacks at (layer,
  expert).

Adapter arrays are float32, stacked like the model's weights: `blocks.{j}.attn.q_lora_a` (R, r, in),
`..._lora_b` (R, out, r) for unit position j of the layer pattern (layers j, j + p, ...); experts
`blocks.{j}.mlp.mlp1_lora_a` (R, E, r, D) and `mlp1_lora_b` (R, E, 2F, r), `mlp2_lora_a` (R, E, r, F),
`mlp2_lora_b` (R, E, D, r). "in"/"out" are the Hugging Face orientation (out x in), so the arrays are PEFT's
up to a reshape (`adapters.py`). Their shapes and logical axes are declared in `weights.TABLE` with the
model's weights. Initialisation as PEFT's: A uniform in +-1/sqrt(in), B zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import weights
from .config import Config
from .model import Hooks, LayerHooks, unit_params
from .moe import LORA_LEAVES
from .ops import F32
from .sharding import param_spec

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
assert tuple(f"{t}_lora_{ab}" for t in EXPERT_TARGETS for ab in "ab") == LORA_LEAVES
# OpenAI's cookbook: all linear layers (q, k, v, o; the router is not an nn.Linear) plus the experts, which
# "all-linear" alone silently leaves untrained.
DEFAULT_TARGETS = ("q", "k", "v", "o", "mlp1", "mlp2")
ALIASES = {
    "attn": ("q", "k", "v", "o"),
    "experts": EXPERT_TARGETS,
    "all": tuple(TARGETS),
    "default": DEFAULT_TARGETS,
}


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


def adapter_layout(cfg: Config, lcfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Adapter name -> shape (stacked over the `R` repeats of the layer unit, like the model's weights), from
    the adapters' rows of `weights.TABLE`."""
    out = {}
    for j in range(len(cfg.layer_unit)):
        for t in lcfg.targets:
            for ab in "ab":
                path = f"{TARGETS[t][0]}.{t}_lora_{ab}"
                shape = weights.shape_of(weights.TABLE_BY_PATH[path], cfg, lcfg.rank)
                out[f"blocks.{j}.{path}"] = (cfg.layer_repeats, *shape)
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
    """PartitionSpecs of adapters (or of the weights, for full fine-tuning) by name, from their logical axes
    in `weights.TABLE`: expert adapters split like their experts, the dense adapters replicated."""
    return {name: param_spec(name, shape, dict(mesh_shape), cfg) for name, shape in shapes.items()}


def adapter_shardings(cfg: Config, shapes: dict[str, tuple[int, ...]], mesh) -> dict[str, NamedSharding]:
    return {n: NamedSharding(mesh, s) for n, s in trainable_specs(cfg, shapes, mesh.shape).items()}


def target_of(name: str) -> str:
    """`blocks.0.mlp.mlp1_lora_a` -> "mlp1"."""
    return name.rsplit(".", 1)[-1].rsplit("_lora_", 1)[0]


# ---------------------------------------------------------------------------------- the per-layer merge
def merge_layer(layer: dict, adapters: dict, lcfg: LoraConfig) -> dict:
    """One layer's effective parameters: dense targets merged (W + scale * B A, in float32, rounded to W's
    dtype), expert adapters added as `LORA_LEAVES` entries with B scaled. `layer` and `adapters` (this
    layer's slice) in the `model.unit_params` layout."""
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


class Adapters(Hooks):
    """Adapters as the forward pass's hooks (`model.apply(..., hooks=Adapters(adapters, cfg, lcfg))`): the
    scan hands each layer its slice of the adapter arrays, and `merge_layer` makes its effective weights."""

    def __init__(self, adapters: dict, cfg: Config, lcfg: LoraConfig):
        self.adapters, self.lcfg = adapters, lcfg
        self.units = len(cfg.layer_unit)

    def scanned(self) -> list[dict]:
        return [unit_params(self.adapters, j) for j in range(self.units)]

    def layer(self, j: int, r, xs, state) -> LayerHooks:
        return _Merge(xs, self.lcfg)


class _Merge(LayerHooks):
    def __init__(self, adapters: dict, lcfg: LoraConfig):
        super().__init__()
        self.adapters, self.lcfg = adapters, lcfg

    def params(self, p: dict) -> dict:
        return merge_layer(p, self.adapters, self.lcfg)

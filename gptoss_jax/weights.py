"""Every weight of gpt-oss declared once: its shape, dtype, logical axes and initializer, in one table.

Everything else is derived from `TABLE`: the NNX model's parameters (`model.Transformer`), the abstract
model (`param_specs`, nothing allocated), the loader's and converter's expectations (`storage_specs`), the
sharding of each array (`sharding.param_spec` reads `axes_of`), and the planner's and the README's counts
(`param_count`, `param_bytes`).

Two namings of the same weights:
- **Parameter names** (in memory): layers are stacked for `lax.scan`. The layer pattern repeats with a
  period of `cfg.layer_unit` layers (gpt-oss: one sliding, one full), so `blocks.{j}.attn.q_weight` holds
  layers j, j + p, j + 2p, ... along a leading `layers` axis of `cfg.layer_repeats` entries. Compiling one
  unit of layers is what makes compile time independent of depth.
- **Storage names** (on disk, in converted checkpoints): one array per layer, `layers.{i}.attn.q_weight`,
  with the per-layer shape. Conversion streams one layer's tensor at a time and any Orbax user can read a
  layer; the loader writes each into its slot of the stacked parameter (`storage_slot`).

Sizes are named by the axis letters of `model.py` (D hidden, K kv heads, G q per kv, H head dim, E experts,
F expert width, V vocab); `2F` is mlp1's interleaved gate/linear rows, `D/32`, `F/32` MXFP4 groups per row,
16 the bytes of one packed group; `NH`, `KH` a projection's query or key heads times the head dim, flattened.

The LoRA adapters (`gptoss_jax.lora`) are declared here too, with their rank `r` (`adapter=True`): they are
not weights of the released model (no parameter, no storage name), but their axes shard them like the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .mxfp4 import BLOCK, GROUP_BYTES

MODEL = "model"  # the config's dtype (bf16 or f32): every weight the reference keeps in bf16


@dataclass(frozen=True)
class Weight:
    path: str  # "embedding", or inside a layer "attn.q_weight"
    dims: tuple[str | int, ...]  # sizes by name (see `sizes`)
    dtype: str  # MODEL, "float32" or "uint8"
    axes: tuple[str | None, ...]  # logical axes, one per dim (sharding.RULES maps them; None: not split)
    init: tuple  # ("normal", mean, std) or ("uniform_int", low, high)
    layered: bool = True
    experts: str | None = None  # "mxfp4" / "dequantized": present only in that expert format
    adapter: bool = False  # a LoRA adapter (`gptoss_jax.lora`), not a weight of the model

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def _w(path, dims, axes, dtype=MODEL, init=("normal", 0.0, 0.02), **kw) -> Weight:
    return Weight(path, tuple(dims), dtype, tuple(axes), init, **kw)


_NORM = ("normal", 1.0, 0.1)
TABLE: tuple[Weight, ...] = (
    _w("embedding", "VD", ("vocab", "embed"), init=("normal", 0.0, 1.0), layered=False),
    _w("norm.scale", "D", ("embed",), "float32", _NORM, layered=False),  # the reference upcasts it: exact
    _w("unembedding", "VD", ("vocab", "embed"), layered=False),
    _w("attn.norm.scale", "D", ("embed",), "float32", _NORM),
    _w("attn.q_weight", "DKGH", ("embed", "kv_heads", "q_per_kv", "head_dim")),
    _w("attn.q_bias", "KGH", ("kv_heads", "q_per_kv", "head_dim")),
    _w("attn.k_weight", "DKH", ("embed", "kv_heads", "head_dim")),
    _w("attn.k_bias", "KH", ("kv_heads", "head_dim")),
    _w("attn.v_weight", "DKH", ("embed", "kv_heads", "head_dim")),
    _w("attn.v_bias", "KH", ("kv_heads", "head_dim")),
    _w("attn.o_weight", "KGHD", ("kv_heads", "q_per_kv", "head_dim", "embed")),
    _w("attn.o_bias", "D", ("embed",)),
    _w("attn.sinks", "KG", ("kv_heads", "q_per_kv"), "float32", ("normal", 0.0, 1.0)),
    _w("mlp.norm.scale", "D", ("embed",), "float32", _NORM),
    _w("mlp.gate_weight", "DE", ("embed", "router"), init=("normal", 0.0, 0.5)),
    _w("mlp.gate_bias", "E", ("router",)),
    # Packed experts as released: uint8 pairs of E2M1 codes and E8M0 scales; exponents 2**-7 .. 2**-5 keep
    # random fp4 weights (|w| <= 6) at a sensible scale.
    _w("mlp.mlp1_blocks", ("E", "2F", "D/32", GROUP_BYTES), ("expert", "expert_ffw", "embed_groups", "group_bytes"),
       "uint8", ("uniform_int", 0, 256), experts="mxfp4"),  # fmt: skip
    _w("mlp.mlp1_scales", ("E", "2F", "D/32"), ("expert", "expert_ffw", "embed_groups"), "uint8",
       ("uniform_int", 120, 123), experts="mxfp4"),  # fmt: skip
    _w("mlp.mlp2_blocks", ("E", "D", "F/32", GROUP_BYTES), ("expert", "embed", "expert_ffw", "group_bytes"),
       "uint8", ("uniform_int", 0, 256), experts="mxfp4"),  # fmt: skip
    _w("mlp.mlp2_scales", ("E", "D", "F/32"), ("expert", "embed", "expert_ffw"), "uint8",
       ("uniform_int", 120, 123), experts="mxfp4"),  # fmt: skip
    _w("mlp.mlp1_weight", ("E", "2F", "D"), ("expert", "expert_ffw", "embed"), experts="dequantized"),
    _w("mlp.mlp2_weight", ("E", "D", "F"), ("expert", "embed", "expert_ffw"), experts="dequantized"),
    _w("mlp.mlp1_bias", ("E", "2F"), ("expert", "expert_ffw")),
    _w("mlp.mlp2_bias", ("E", "D"), ("expert", "embed")),
)

# LoRA adapters, one (A, B) pair per layer for each target (`lora.TARGETS`), per expert for the experts, in
# Hugging Face's orientation (A: r x in, B: out x r; `adapters.py` maps them onto PEFT's files). float32;
# initialised by PEFT's rule (`lora.init_adapters`), not by `init`. The dense ones are small: replicated.
# The expert ones split with their experts: over `expert`, and along F where the experts' width is split.
_LORA = {"dtype": "float32", "init": ("normal", 0.0, 0.0), "adapter": True}
TABLE += (
    _w("attn.q_lora_a", ("r", "D"), (None, None), **_LORA),
    _w("attn.q_lora_b", ("NH", "r"), (None, None), **_LORA),
    _w("attn.k_lora_a", ("r", "D"), (None, None), **_LORA),
    _w("attn.k_lora_b", ("KH", "r"), (None, None), **_LORA),
    _w("attn.v_lora_a", ("r", "D"), (None, None), **_LORA),
    _w("attn.v_lora_b", ("KH", "r"), (None, None), **_LORA),
    _w("attn.o_lora_a", ("r", "NH"), (None, None), **_LORA),
    _w("attn.o_lora_b", ("D", "r"), (None, None), **_LORA),
    _w("mlp.router_lora_a", ("r", "D"), (None, None), **_LORA),
    _w("mlp.router_lora_b", ("E", "r"), (None, None), **_LORA),
    _w("mlp.mlp1_lora_a", ("E", "r", "D"), ("expert", None, "embed"), **_LORA),
    _w("mlp.mlp1_lora_b", ("E", "2F", "r"), ("expert", "expert_ffw", None), **_LORA),
    _w("mlp.mlp2_lora_a", ("E", "r", "F"), ("expert", None, "expert_ffw"), **_LORA),
    _w("mlp.mlp2_lora_b", ("E", "D", "r"), ("expert", "embed", None), **_LORA),
)

# Logical axes by the last part of a name: they do not depend on the config (used for per-layer slices too).
LEAF_AXES: dict[str, tuple[str | None, ...]] = {w.leaf: w.axes for w in TABLE}
LAYER_AXIS = "layers"  # the leading axis of stacked parameters


def sizes(cfg: Config, rank: int | None = None) -> dict[str, int]:
    """Size names -> sizes; `r` (adapters only) is the LoRA rank, when given."""
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    out = {"V": cfg.vocab_size, "D": D, "K": cfg.num_key_value_heads, "G": cfg.q_per_kv, "H": H,
           "E": cfg.num_experts, "F": F, "2F": 2 * F, "D/32": D // BLOCK, "F/32": F // BLOCK,
           "NH": cfg.num_attention_heads * H, "KH": cfg.num_key_value_heads * H}  # fmt: skip
    return out if rank is None else out | {"r": rank}


def weights(cfg: Config) -> Iterator[Weight]:
    """The model's rows of `TABLE` in this config's expert format (no adapters)."""
    return (w for w in TABLE if w.experts in (None, cfg.expert_format) and not w.adapter)


def shape_of(w: Weight, cfg: Config, rank: int | None = None) -> tuple[int, ...]:
    """One layer's shape (or the whole shape of a top-level weight); an adapter's needs its `rank`."""
    s = sizes(cfg, rank)
    return tuple(d if isinstance(d, int) else s[d] for d in w.dims)


def dtype_of(w: Weight, cfg: Config) -> np.dtype:
    return jnp.dtype(cfg.dtype if w.dtype == MODEL else w.dtype)


# ---------------------------------------------------------------------------------------------- namings
def param_layout(cfg: Config) -> dict[str, tuple[tuple[int, ...], np.dtype, tuple[str, ...]]]:
    """Parameter name -> (shape, dtype, logical axes) of the in-memory model (layers stacked)."""
    out = {}
    R = cfg.layer_repeats
    for w in weights(cfg):
        shape, dt = shape_of(w, cfg), dtype_of(w, cfg)
        if not w.layered:
            out[w.path] = (shape, dt, w.axes)
            continue
        for j in range(len(cfg.layer_unit)):
            out[f"blocks.{j}.{w.path}"] = ((R, *shape), dt, (LAYER_AXIS, *w.axes))
    return out


def param_specs(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Parameter name -> ShapeDtypeStruct (the abstract model: nothing allocated)."""
    return {n: jax.ShapeDtypeStruct(s, d) for n, (s, d, _) in param_layout(cfg).items()}


def axes_of(name: str, ndim: int | None = None) -> tuple[str, ...]:
    """Logical axes of a parameter, a storage array or a per-layer slice, by name (`layers.3.attn.q_weight`,
    `blocks.0.attn.q_weight`, or just `q_weight`). Stacked parameters have the leading `layers` axis."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf not in LEAF_AXES:
        raise ValueError(f"parameter {name}: no logical axes known for {leaf!r}")
    axes = (LAYER_AXIS, *LEAF_AXES[leaf]) if parts[0] == "blocks" else LEAF_AXES[leaf]
    if ndim is not None and ndim != len(axes):
        raise ValueError(f"parameter {name}: {ndim} dims, but its logical axes are {axes}")
    return axes


def storage_specs(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Storage name -> per-layer ShapeDtypeStruct, in file order (top-level weights, then layer by layer)."""
    out = {}
    per_layer = []
    for w in weights(cfg):
        spec = jax.ShapeDtypeStruct(shape_of(w, cfg), dtype_of(w, cfg))
        if w.layered:
            per_layer.append((w.path, spec))
        else:
            out[w.path] = spec
    for i in range(cfg.num_hidden_layers):
        for path, spec in per_layer:
            out[f"layers.{i}.{path}"] = spec
    return out


def storage_slot(name: str, cfg: Config) -> tuple[str, int | None]:
    """Storage name -> (parameter name, index along its `layers` axis, or None for a top-level weight)."""
    if not name.startswith("layers."):
        return name, None
    _, i, path = name.split(".", 2)
    i, p = int(i), len(cfg.layer_unit)
    return f"blocks.{i % p}.{path}", i // p


# ------------------------------------------------------------------------------------------------ counts
def param_count(cfg: Config) -> int:
    """Logical parameter count (a packed MXFP4 byte holds two parameters; scales are not parameters)."""
    total = 0
    for name, (shape, _, _) in param_layout(cfg).items():
        if not name.endswith("_scales"):
            total += math.prod(shape) * (2 if name.endswith("_blocks") else 1)
    return total


def param_bytes(cfg: Config, *, experts_only: bool = False) -> int:
    """Bytes the parameters occupy in device memory (packed experts count their uint8 blocks + scales)."""
    return sum(math.prod(shape) * dt.itemsize for name, (shape, dt, _) in param_layout(cfg).items()
               if not experts_only or ".mlp.mlp" in name)  # fmt: skip


def is_expert(name: str) -> bool:
    """The expert tensors (`mlp1_*`, `mlp2_*`): what expert parallelism splits and MXFP4 packs."""
    return name.rsplit(".", 1)[-1].startswith(("mlp1_", "mlp2_"))


TABLE_BY_PATH: dict[str, Weight] = {}  # path -> row, one per path (a path is in one expert format only)
for _row in TABLE:
    TABLE_BY_PATH[_row.path] = _row

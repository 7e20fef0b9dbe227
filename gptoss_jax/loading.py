"""`gptoss_jax.load`: a released safetensors folder (either layout) or a converted Orbax checkpoint -> model.

Tensors are read one at a time from memory-mapped files, transformed into our layout by the key table
(`conversion/keys.py`) and placed on device; MXFP4 experts stay packed unless `expert_format="dequantized"`.
With a mesh, each array is built with `jax.make_array_from_callback`, so every process reads only the
pieces its devices hold.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from . import mxfp4
from .checkpoint import orbax as ckpt_orbax
from .checkpoint.safetensors import CheckpointError
from .checkpoint.source import open_source
from .config import RUNTIME_FIELDS, Config
from .hub import resolve_checkpoint
from .model import Transformer, abstract_model, param_specs  # noqa: F401 - param_specs is loading's API too
from .progress import progress_bar
from .sharding import param_sharding


def flat_names(state) -> dict[str, tuple]:
    """Our parameter names ("layers.0.attn.q_weight") -> NNX state paths."""
    return {".".join(str(p) for p in path): path for path, _ in nnx.to_flat_state(state)}


def build_model(cfg: Config, arrays: dict[str, jax.Array]) -> Transformer:
    """Assembles a Transformer from named arrays without allocating random weights first."""
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = []
    names = set()
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        names.add(name)
        if name not in arrays:
            raise ValueError(f"missing parameter {name}")
        a = arrays[name]
        want = var.get_value()
        if tuple(a.shape) != tuple(want.shape) or a.dtype != want.dtype:
            raise ValueError(f"parameter {name}: got {a.dtype}{tuple(a.shape)}, expected {want.dtype}{tuple(want.shape)}")
        flat.append((path, var.replace(value=a) if hasattr(var, "replace") else a))
    extra = sorted(set(arrays) - names)
    if extra:
        raise ValueError(f"unexpected parameter {extra[0]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def place(name: str, arr: np.ndarray, spec: jax.ShapeDtypeStruct, cfg: Config, mesh) -> jax.Array:
    """Host array -> device array of spec.dtype; on a mesh, each device gets only its shard."""
    if mesh is None:
        return jnp.asarray(np.asarray(arr).astype(spec.dtype, copy=False))
    sharding = param_sharding(name, spec.shape, mesh, cfg)
    return jax.make_array_from_callback(
        spec.shape, sharding, lambda idx: np.asarray(arr[idx]).astype(spec.dtype, copy=False)
    )


def _split_overrides(overrides: dict) -> dict:
    from dataclasses import fields

    known = {f.name for f in fields(Config)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"load(): unknown option(s) {', '.join(bad)}; runtime options are {', '.join(RUNTIME_FIELDS)}")
    return overrides


def load(path: str | os.PathLike, *, dtype: str = "bfloat16", mesh=None, quiet: bool = False, **overrides):
    """Loads gpt-oss weights from `path` and returns a `Transformer`.

    path: a folder of released safetensors (Hugging Face top level with its index, or `original/`, or a
    repo folder holding both) or an Orbax checkpoint written by `gptoss-convert`.
    dtype: "bfloat16" (default) or "float32" for compute and non-expert weights.
    mesh: a `jax.sharding.Mesh` with axes from (data, expert, model); None = one device.
    overrides: runtime config fields, e.g. expert_format="dequantized", attention_impl="pallas".
    """
    # [firsthour] any path as typed (relative, ~, trailing slash) or a Hugging Face model id -> absolute folder
    path = resolve_checkpoint(path, quiet=quiet)
    overrides = _split_overrides(dict(overrides, dtype=dtype))
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if ckpt_orbax.is_orbax_checkpoint(path):
        return _load_orbax(path, mesh=mesh, **overrides)
    try:
        src = open_source(path)
        cfg = src.config.replace(**overrides)
        specs = param_specs(cfg)
        arrays = {}
        with progress_bar(src.total_bytes(), f"loading {path.name}", quiet=quiet) as bar:
            for rule in src.rules(cfg.expert_format):
                arr = src.read(rule)
                arrays[rule.target] = place(rule.target, arr, specs[rule.target], cfg, mesh)
                bar.update(sum(src.files[s].nbytes(s) for s in rule.sources) // max(1, _shared(rule, src)))
    except CheckpointError:
        raise
    if src.layout_note and not quiet:
        print(src.layout_note, file=sys.stderr)
    return build_model(cfg, arrays)


def _shared(rule, src) -> int:
    # The original layout's fused qkv tensors feed three of our parameters; count their bytes once.
    return 3 if src.layout == "original" and ".attn.qkv." in rule.sources[0] else 1


def _sharding(name: str, shape, mesh, cfg: Config):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return param_sharding(name, shape, mesh, cfg)


def _load_orbax(path: str | os.PathLike, *, mesh=None, dtype: str = "bfloat16", **overrides):
    """A converted checkpoint -> `Transformer`, each array read straight into its target sharding.

    dtype: compute / non-expert weight dtype to load as (cast on read; the checkpoint may hold another).
    overrides: runtime config fields (expert_format, attention_impl, moe_impl, prefill_chunk). A packed
    checkpoint loads with expert_format="dequantized" (dequantized on device, exactly); the reverse is
    refused (re-quantizing is not what the user meant).
    """
    path = Path(path)
    meta = ckpt_orbax.read_metadata(path)
    stored = ckpt_orbax.stored_config(meta)
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(
            f"{path}: cannot override architecture field(s) {', '.join(bad)} of a converted checkpoint"
        )
    cfg = stored.replace(dtype=dtype, **overrides)
    if stored.expert_format == "dequantized" and cfg.expert_format == "mxfp4":
        raise ValueError(f"{path}: holds dequantized experts; load it with expert_format='dequantized' "
                         f"or convert again with packed experts")  # fmt: skip
    want = param_specs(cfg)
    on_disk = param_specs(stored)
    have = ckpt_orbax.stored_arrays(path)
    for name, spec in on_disk.items():
        if name not in have:
            raise ValueError(f"{path / ckpt_orbax.STATE}: missing parameter {name}")
        if have[name][0] != tuple(spec.shape):
            raise ValueError(
                f"{path / ckpt_orbax.STATE}: parameter {name} has shape {have[name][0]}, expected {tuple(spec.shape)}"
            )
    extra = sorted(set(have) - set(on_disk))
    if extra:
        raise ValueError(f"{path / ckpt_orbax.STATE}: unexpected parameter {extra[0]}")

    targets = {}
    for name, spec in on_disk.items():
        dt = want[name].dtype if name in want else spec.dtype  # packed blocks/scales to dequantize stay uint8
        targets[name] = jax.ShapeDtypeStruct(spec.shape, dt, sharding=_sharding(name, spec.shape, mesh, cfg))
    arrays = ckpt_orbax.read_arrays(path, targets)

    if stored.expert_format == "mxfp4" and cfg.expert_format == "dequantized":
        for name in [n for n in want if n.endswith("_weight") and ".mlp.mlp" in n]:
            base = name[: -len("_weight")]
            blocks, scales = arrays.pop(f"{base}_blocks"), arrays.pop(f"{base}_scales")
            out = _sharding(name, want[name].shape, mesh, cfg)
            fn = jax.jit(lambda b, s: mxfp4.dequantize(b, s, dtype=cfg.jax_dtype), out_shardings=out)
            arrays[name] = fn(blocks, scales)
            del blocks, scales
    return build_model(cfg, arrays)

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

from .config import RUNTIME_FIELDS, Config
from .model import Transformer, abstract_model, param_specs  # noqa: F401 - param_specs is loading's API too


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
    from .sharding import param_sharding

    sharding = param_sharding(name, spec.shape, mesh, cfg)
    return jax.make_array_from_callback(
        spec.shape, sharding, lambda idx: np.asarray(arr[idx]).astype(spec.dtype, copy=False)
    )


def progress_bar(total: int, desc: str, *, quiet: bool, initial: int = 0, terminal_only: bool = True):
    """A tqdm byte counter on stderr (shared by loading and conversion).

    `terminal_only` hides it when stderr is not a terminal (logs, notebooks); the converter keeps it in logs.
    """
    from tqdm import tqdm

    disable = quiet or (terminal_only and not sys.stderr.isatty())
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=disable, file=sys.stderr, dynamic_ncols=True, leave=not terminal_only)  # fmt: skip


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
    path = Path(path)
    overrides = _split_overrides(dict(overrides, dtype=dtype))
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    try:
        from conversion import orbax_io  # the converter's Orbax format (issue: conversion)
    except ImportError:
        orbax_io = None
    if orbax_io is not None and orbax_io.is_orbax_checkpoint(path):
        return orbax_io.restore(path, mesh=mesh, **overrides)
    from conversion.safetensors import CheckpointError
    from conversion.source import open_source

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

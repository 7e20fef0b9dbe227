"""`gptoss_jax.load`: a released safetensors folder (either layout) or a converted Orbax checkpoint -> model.

Both sources hold one array per layer (released tensors, or the converted checkpoint's storage names
`layers.{i}.attn.q_weight`); the model holds them stacked per position of the layer unit
(`weights.py`). Loading reads one layer's tensor at a time (memory-mapped safetensors through the key table
`checkpoint/keys.py`, or an Orbax partial restore), places it on device in its sharding and writes it into
its slot of the stacked parameter, which was allocated once, in place (a donated update): the peak is the
weights plus one tensor. MXFP4 experts stay packed unless `expert_format="dequantized"`. On a mesh each
process reads only the pieces its devices hold.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import mxfp4, weights
from .checkpoint import integrity
from .checkpoint import orbax as ckpt_orbax
from .checkpoint.safetensors import CheckpointError
from .checkpoint.source import open_source
from .config import RUNTIME_FIELDS, Config
from .hub import resolve_checkpoint
from .model import Transformer
from .progress import progress_bar
from .sharding import as_model_mesh, param_sharding


@partial(jax.jit, donate_argnums=0)
def _set_layer(buf, x, r):
    return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), r, 0)


class _Assembler:
    """Collects per-layer arrays (storage names) into the model's stacked parameters, on device."""

    def __init__(self, cfg: Config, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.specs = weights.param_specs(cfg)
        self.arrays: dict[str, jax.Array] = {}
        self.filled: dict[str, set[int]] = {}

    def sharding(self, name: str, shape):
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return param_sharding(name, shape, self.mesh, self.cfg)

    def put(self, storage_name: str, arr) -> None:
        """arr: a host array in our per-layer layout, or a device array already in its per-layer sharding."""
        name, r = weights.storage_slot(storage_name, self.cfg)
        spec = self.specs[name]
        if not isinstance(arr, jax.Array):
            arr = self.place(storage_name, arr, spec.shape[1:] if r is not None else spec.shape, spec.dtype)
        if r is None:
            self.arrays[name] = arr.astype(spec.dtype)
            return
        if name not in self.arrays:
            alloc = jax.jit(partial(jnp.zeros, spec.shape, spec.dtype), out_shardings=self.sharding(name, spec.shape))
            self.arrays[name] = alloc()
            self.filled[name] = set()
        self.arrays[name] = _set_layer(self.arrays[name], arr, r)
        self.filled[name].add(r)

    def place(self, name: str, arr: np.ndarray, shape, dtype) -> jax.Array:
        """Host array -> device array of `dtype`; on a mesh each device gets only its shard."""
        if self.mesh is None:
            return jnp.asarray(np.asarray(arr).astype(dtype, copy=False))
        return jax.make_array_from_callback(tuple(shape), self.sharding(name, shape),
                                            lambda idx: np.asarray(arr[idx]).astype(dtype, copy=False))  # fmt: skip

    def model(self) -> Transformer:
        missing = sorted(set(self.specs) - set(self.arrays))
        holes = [f"{n}[{r}]" for n, got in self.filled.items() for r in range(self.cfg.layer_repeats) if r not in got]
        if missing or holes:  # the key tables cover every parameter: this is a bug, not bad input
            raise RuntimeError(f"loading left parameters unset: {(missing + holes)[:3]}")
        return Transformer(self.cfg, arrays=self.arrays)


def build_model(cfg: Config, arrays: dict[str, object], mesh=None) -> Transformer:
    """A Transformer from per-layer arrays by storage name (host or device arrays)."""
    asm = _Assembler(cfg, as_model_mesh(mesh))
    for name, arr in arrays.items():
        asm.put(name, arr)
    return asm.model()


def _check_overrides(overrides: dict) -> None:
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"load(): unknown option(s) {', '.join(bad)}; runtime options are {', '.join(RUNTIME_FIELDS)}")


def load(path: str | os.PathLike, *, dtype: str = "bfloat16", mesh=None, quiet: bool = False,
         expert_format: str | None = None, verify: bool = False, **overrides) -> Transformer:  # fmt: skip
    """Loads gpt-oss weights from `path` and returns a `Transformer`.

    path: a folder of released safetensors (Hugging Face top level with its index, or `original/`, or a
    repo folder holding both) or an Orbax checkpoint written by `gptoss-convert`.
    dtype: "bfloat16" (default) or "float32" for compute and non-expert weights.
    mesh: a `jax.sharding.Mesh` with axes among (data, expert, model), Explicit or Auto axis types (e.g.
    `jax.make_mesh((1, 4, 2), ("data", "expert", "model"))`), or a spec "expert=4,model=2"; None = one device.
    expert_format: "mxfp4" (packed), "dequantized", or None: as the checkpoint stores them.
    verify: for a converted checkpoint, first re-read every array and check its recorded crc32c
    (`checkpoint.integrity`); a damaged array is a CheckpointError naming it and its file.
    overrides: other runtime config fields: attention_impl, moe_impl ("xla" | "pallas" | "auto"),
    prefill_chunk.
    """
    _check_overrides(overrides)
    mesh = as_model_mesh(mesh)
    # any path as typed (relative, ~, trailing slash) or a Hugging Face model id -> absolute folder
    path = resolve_checkpoint(path, quiet=quiet)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    overrides = dict(overrides, dtype=dtype)
    if ckpt_orbax.is_orbax_checkpoint(path):
        if verify:
            integrity.verify_checkpoint(path, quiet=quiet).raise_if_bad()
        return _load_orbax(path, mesh, expert_format, overrides, quiet)
    if verify:
        raise ValueError(f"{path}: verify=True checks the checksums of a converted checkpoint; released "
                         f"safetensors carry none (convert it with gptoss-convert, which records them)")  # fmt: skip
    src = open_source(path)
    cfg = src.config.replace(expert_format=expert_format or src.config.expert_format, **overrides)
    asm = _Assembler(cfg, mesh)
    with progress_bar(src.total_bytes(), f"loading {path.name}", quiet=quiet) as bar:
        for rule in src.rules(cfg.expert_format):
            asm.put(rule.target, src.read(rule))
            bar.update(sum(src.files[s].nbytes(s) for s in rule.sources) // max(1, _shared(rule, src)))
    if src.layout_note and not quiet:
        print(src.layout_note, file=sys.stderr)
    return asm.model()


def _shared(rule, src) -> int:
    # The original layout's fused qkv tensors feed three of our parameters; count their bytes once.
    return 3 if src.layout == "original" and ".attn.qkv." in rule.sources[0] else 1


def _load_orbax(path: Path, mesh, expert_format: str | None, overrides: dict, quiet: bool) -> Transformer:
    """A converted checkpoint, restored one layer at a time, each array read straight into its sharding.

    A packed checkpoint loads with expert_format="dequantized" (dequantized on device, exactly); the reverse
    is refused (re-quantizing is not what the user meant).
    """
    stored = ckpt_orbax.stored_config(ckpt_orbax.read_metadata(path))
    cfg = stored.replace(expert_format=expert_format or stored.expert_format, **overrides)
    if stored.expert_format == "dequantized" and cfg.expert_format == "mxfp4":
        raise ValueError(f"{path}: holds dequantized experts, which cannot be loaded as packed MXFP4; "
                         f"convert the released checkpoint again with packed experts")  # fmt: skip
    on_disk = weights.storage_specs(stored)
    have = ckpt_orbax.stored_arrays(path)
    for name, spec in on_disk.items():
        if name not in have:
            raise CheckpointError(f"{path / ckpt_orbax.STATE}: missing array {name}")
        if have[name][0] != tuple(spec.shape):
            raise CheckpointError(f"{path / ckpt_orbax.STATE}: array {name} has shape {have[name][0]}, "
                                  f"expected {tuple(spec.shape)}")  # fmt: skip
    extra = sorted(set(have) - set(on_disk))
    if extra:
        raise CheckpointError(f"{path / ckpt_orbax.STATE}: unexpected array {extra[0]}")
    want = weights.storage_specs(cfg)
    asm = _Assembler(cfg, mesh)
    groups: dict[str, list[str]] = {}
    for name in on_disk:
        groups.setdefault(name.split(".")[1] if name.startswith("layers.") else "top", []).append(name)
    total = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in on_disk.values())
    with progress_bar(total, f"loading {path.name}", quiet=quiet) as bar:
        for names in groups.values():
            targets = {}
            for name in names:
                spec = on_disk[name]
                dt = want[name].dtype if name in want else spec.dtype  # packed bytes to dequantize stay uint8
                targets[name] = jax.ShapeDtypeStruct(spec.shape, dt, sharding=asm.sharding(name, spec.shape))
            arrays = ckpt_orbax.read_arrays(path, targets)
            if stored.expert_format == "mxfp4" and cfg.expert_format == "dequantized":
                _dequantize_layer(arrays, asm, cfg)
            for name, arr in arrays.items():
                asm.put(name, arr)
            bar.update(sum(int(np.prod(on_disk[n].shape)) * on_disk[n].dtype.itemsize for n in names))
    return asm.model()


def _dequantize_layer(arrays: dict, asm: _Assembler, cfg: Config) -> None:
    """Packed expert arrays of one layer -> dequantized weights, on device, in their sharding."""
    for name in [n for n in arrays if n.endswith("_blocks")]:
        base = name[: -len("_blocks")]
        blocks, scales = arrays.pop(name), arrays.pop(f"{base}_scales")
        shape = (*blocks.shape[:-2], blocks.shape[-2] * mxfp4.BLOCK)
        fn = jax.jit(partial(mxfp4.dequantize, dtype=cfg.jax_dtype), out_shardings=asm.sharding(f"{base}_weight", shape))
        arrays[f"{base}_weight"] = fn(blocks, scales)


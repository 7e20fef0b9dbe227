"""The converted checkpoint: Orbax's own format (OCDBT + zarr3 through tensorstore), read and written here.

Layout of `DST` (what `gptoss-convert` writes, what `gptoss_jax.load(DST)` reads):

  DST/_CHECKPOINT_METADATA   Orbax's step metadata; `custom_metadata["gptoss"]` holds our config:
                             {"format": 1, "config": Config.architecture_dict(), "expert_format", "dtype",
                              "generation_config": generation_config.json or null, "source": {...}}
  DST/state/                 the parameter pytree: nested dicts keyed by the parts of our names
                             ({"layers": {"0": {"attn": {"q_weight": ...}}}}), so the tensorstore key of
                             each array is our dotted name (`layers.0.attn.q_weight`)
  DST/orbax.checkpoint, DST/commit_success.txt   Orbax's markers

A plain Orbax restore needs nothing from this package:

  import orbax.checkpoint as ocp
  params = ocp.StandardCheckpointer().restore(DST / "state")   # nested dict of numpy arrays

Restoring into a model (`restore`) passes `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` targets, so
Orbax reads from disk only the chunks that the devices of this process hold, and casts on read.

Writing uses Orbax's partial-save API (`orbax.checkpoint.experimental.v1.partial`): each `save` call adds a
group of tensors to the checkpoint as one atomic snapshot, and `finalize` merges the snapshots' OCDBT
databases into one. That is what lets the converter stream (see `conversion/convert.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import jax
import numpy as np

from gptoss_jax.config import RUNTIME_FIELDS, Config
from gptoss_jax.model import param_specs

META_KEY = "gptoss"
FORMAT_VERSION = 1
STATE = "state"  # the checkpointable name Orbax's partial save uses for the pytree
STEP_METADATA = "_CHECKPOINT_METADATA"


# --------------------------------------------------------------------------------------------- pytree
def nest(flat: dict[str, object]) -> dict:
    """{"layers.0.attn.q_weight": x} -> {"layers": {"0": {"attn": {"q_weight": x}}}}."""
    out: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Inverse of `nest`."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# ------------------------------------------------------------------------------------------- metadata
def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a finished Orbax checkpoint folder with a pytree in `state/` (ours or not)."""
    p = Path(path)
    return p.is_dir() and (p / STEP_METADATA).is_file() and (p / STATE / "_METADATA").is_file()


def make_metadata(cfg: Config, *, generation_config: dict | None, source: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "config": cfg.architecture_dict(),
        "expert_format": cfg.expert_format,
        "dtype": cfg.dtype,
        "generation_config": generation_config,
        "source": source,
    }


def read_metadata(path: str | os.PathLike) -> dict:
    """Our `custom_metadata["gptoss"]` block; ValueError naming the file when absent or unreadable."""
    f = Path(path) / STEP_METADATA
    try:
        step = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: cannot read Orbax step metadata ({e})") from None
    meta = (step.get("custom_metadata") or {}).get(META_KEY) if isinstance(step, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{f}: an Orbax checkpoint without gpt-oss metadata (not written by gptoss-convert)")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{f}: gpt-oss checkpoint format {meta.get('format')!r}, this version reads {FORMAT_VERSION}"
        )
    return meta


def stored_config(meta: dict) -> Config:
    """The Config the checkpoint was written with (architecture + its expert format and dtype)."""
    arch = {k: v for k, v in meta["config"].items() if k not in RUNTIME_FIELDS}
    return Config(**arch, expert_format=meta["expert_format"], dtype=meta["dtype"])


# --------------------------------------------------------------------------------------------- writing
def writer_context(*, chunk_bytes: int, shard_experts: bool, compression: bool):
    """An Orbax v1 Context for streaming partial saves of numpy leaves.

    chunk_bytes caps each stored chunk (the unit a sharded restore reads); with shard_experts the expert
    tensors are chunked one expert at a time, so a restore that splits experts over devices reads exactly
    its experts. deepcopy_host_arrays is off: `partial.save` blocks until written, so Orbax need not copy
    (a copy would double the peak memory of every tensor).
    """
    import orbax.checkpoint.experimental.v1 as ocp1
    from orbax.checkpoint.experimental.v1 import options as ocp_options

    Storage = ocp_options.ArrayOptions.Saving.StorageOptions

    def storage(keypath, value):
        name = ".".join(str(getattr(k, "key", k)) for k in keypath)
        if shard_experts and ".mlp.mlp" in name:
            return Storage(chunk_byte_size=chunk_bytes, shard_axes=(0,))
        return None

    ctx = ocp1.Context()
    ctx.array.saving.use_compression = compression
    ctx.array.saving.storage_options.chunk_byte_size = chunk_bytes
    ctx.array.saving.scoped_storage_options_creator = storage
    ctx.memory.deepcopy_host_arrays = False
    return ctx


@contextlib.contextmanager
def _deferred_fsync():
    """Tensorstore fsyncs every file it writes; for a stream of snapshots that halves the throughput
    (measured: 134 -> 278 MB/s). A killed process loses nothing that was written (the page cache
    survives it), so the converter defers durability to one `sync_tree` before it publishes DST. The
    setting lives in Orbax's default tensorstore context; if a future Orbax moves it, we keep its default.
    """
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils as tu

        ctx = tu._DEFAULT_OCDBT_TS_CONTEXT
    except (ImportError, AttributeError):
        yield
        return
    old = ctx.get("file_io_sync", _MISSING)
    ctx["file_io_sync"] = False
    try:
        yield
    finally:
        if old is _MISSING:
            ctx.pop("file_io_sync", None)
        else:
            ctx["file_io_sync"] = old


_MISSING = object()


def sync_tree(path: Path) -> None:
    """fsyncs every file and folder under `path` (the durability `_deferred_fsync` postponed)."""
    for root, dirs, files in os.walk(path):
        for name in files + ["."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def partial_save(ctx, path: Path, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """Adds `arrays` to the partial checkpoint at `path` (Orbax keeps them in `path.partial_save/`)."""
    import orbax.checkpoint.experimental.v1 as ocp1

    with ctx, _deferred_fsync():
        ocp1.partial.save(path, nest(arrays), custom_metadata={META_KEY: metadata})


def partial_finalize(ctx, path: Path) -> None:
    import orbax.checkpoint.experimental.v1 as ocp1

    with ctx, _deferred_fsync():
        ocp1.partial.finalize(path)


def saved_in_partial(path: Path) -> set[str]:
    """Names already written by completed `partial_save` calls for `path`.

    Each completed call is one `*.pending_<time>_<uuid>` snapshot folder inside `path.partial_save/`
    (Orbax renames it into place only once written, so an interrupted call leaves none); its
    `state/_METADATA` lists the keys it holds.
    """
    names: set[str] = set()
    pdir = path.parent / (path.name + ".partial_save")
    for d in sorted(pdir.glob("*.pending_*")) if pdir.is_dir() else []:
        meta = d / STATE / "_METADATA"
        if not meta.is_file():
            continue
        tree = json.loads(meta.read_text())["tree_metadata"]
        for entry in tree.values():
            names.add(".".join(str(k["key"]) for k in entry["key_metadata"]))
    return names


# --------------------------------------------------------------------------------------------- reading
def stored_arrays(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array in the checkpoint, from Orbax's metadata (no data read)."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointHandler().metadata(Path(path) / STATE).tree
    return {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in flatten(dict(tree)).items()}


def read_arrays(path: str | os.PathLike, targets: dict[str, object]) -> dict[str, object]:
    """Restores the named arrays only (plain Orbax partial restore).

    targets: name -> jax.ShapeDtypeStruct with a sharding (restored as jax.Array straight into it, cast to
    its dtype on read) or a numpy dtype (restored as a host numpy array of that dtype).
    """
    import orbax.checkpoint as ocp

    item, args = {}, {}
    for name, t in targets.items():
        if isinstance(t, jax.ShapeDtypeStruct):
            item[name] = t
            args[name] = ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
        else:
            item[name] = np.empty((0,), dtype=t)  # structure only; the shape comes from the checkpoint
            args[name] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(t))
    out = ocp.PyTreeCheckpointer().restore(
        Path(path) / STATE,
        args=ocp.args.PyTreeRestore(item=nest(item), restore_args=nest(args), partial_restore=True),
    )
    return flatten(out)


def _sharding(name: str, shape, mesh, cfg: Config):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    from gptoss_jax.sharding import param_sharding

    return param_sharding(name, shape, mesh, cfg)


def restore(path: str | os.PathLike, *, mesh=None, dtype: str = "bfloat16", **overrides):
    """A converted checkpoint -> `Transformer`, each array read straight into its target sharding.

    dtype: compute / non-expert weight dtype to load as (cast on read; the checkpoint may hold another).
    overrides: runtime config fields (expert_format, attention_impl, moe_impl, prefill_chunk). A packed
    checkpoint loads with expert_format="dequantized" (dequantized on device, exactly); the reverse is
    refused (re-quantizing is not what the user meant).
    """
    from gptoss_jax import mxfp4
    from gptoss_jax.loading import build_model

    path = Path(path)
    meta = read_metadata(path)
    stored = stored_config(meta)
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
    have = stored_arrays(path)
    for name, spec in on_disk.items():
        if name not in have:
            raise ValueError(f"{path / STATE}: missing parameter {name}")
        if have[name][0] != tuple(spec.shape):
            raise ValueError(
                f"{path / STATE}: parameter {name} has shape {have[name][0]}, expected {tuple(spec.shape)}"
            )
    extra = sorted(set(have) - set(on_disk))
    if extra:
        raise ValueError(f"{path / STATE}: unexpected parameter {extra[0]}")

    targets = {}
    for name, spec in on_disk.items():
        dt = want[name].dtype if name in want else spec.dtype  # packed blocks/scales to dequantize stay uint8
        targets[name] = jax.ShapeDtypeStruct(spec.shape, dt, sharding=_sharding(name, spec.shape, mesh, cfg))
    arrays = read_arrays(path, targets)

    if stored.expert_format == "mxfp4" and cfg.expert_format == "dequantized":
        for name in [n for n in want if n.endswith("_weight") and ".mlp.mlp" in n]:
            base = name[: -len("_weight")]
            blocks, scales = arrays.pop(f"{base}_blocks"), arrays.pop(f"{base}_scales")
            out = _sharding(name, want[name].shape, mesh, cfg)
            fn = jax.jit(lambda b, s: mxfp4.dequantize(b, s, dtype=cfg.jax_dtype), out_shardings=out)
            arrays[name] = fn(blocks, scales)
            del blocks, scales
    return build_model(cfg, arrays)

"""The converted checkpoint: Orbax's own format (OCDBT + zarr3 through tensorstore), the reading side.

The writer (`conversion/orbax_io.py`, streaming partial saves) lives with the converter; the format's
names and metadata are defined here, once.

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

import json
import os
from pathlib import Path

import jax
import numpy as np

from ..config import RUNTIME_FIELDS, Config

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



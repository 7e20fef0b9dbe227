"""The converted checkpoint: Orbax's own format (OCDBT + zarr3 through tensorstore), the reading side.

The writer (`conversion/orbax_io.py`, streaming partial saves) lives with the converter; the format's
names and metadata are defined here, once.

Layout of `DST` (what `gptoss-convert` writes, what `gptoss_jax.load(DST)` reads):

  DST/_CHECKPOINT_METADATA   Orbax's step metadata; `custom_metadata["gptoss"]` holds our config:
                             {"format": 1, "config": Config.architecture_dict(), "expert_format", "dtype",
                              "generation_config": generation_config.json or null, "source": {...},
                              "crc32c": {name: crc32c of the array's stored bytes}}  (see integrity.py;
                             absent in checkpoints converted before checksums were recorded)
  DST/state/                 the parameter pytree: nested dicts keyed by the parts of our names
                             ({"layers": {"0": {"attn": {"q_weight": ...}}}}), so the tensorstore key of
                             each array is our dotted name (`layers.0.attn.q_weight`)
  DST/orbax.checkpoint, DST/commit_success.txt   Orbax's markers

A plain Orbax restore needs nothing from this package:

  import orbax.checkpoint as ocp
  params = ocp.StandardCheckpointer().restore(DST / "state")   # nested dict of numpy arrays

Restoring into a model (`restore`) passes `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` targets, so
Orbax reads from disk only the chunks that the devices of this process hold, and casts on read.

Everything read here is untrusted: our metadata is validated field by field, Orbax's `_METADATA` is read
through the bounded JSON reader before Orbax parses it, and any failure inside Orbax or tensorstore
(missing, truncated or corrupt manifest and data files) becomes one `CheckpointError` line that names the
checkpoint and suggests `gptoss-convert --verify DIR` or converting again.

Writing uses Orbax's partial-save API (`orbax.checkpoint.experimental.v1.partial`): each `save` call adds a
group of tensors to the checkpoint as one atomic snapshot, and `finalize` merges the snapshots' OCDBT
databases into one. That is what lets the converter stream (see `conversion/convert.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import jax
import numpy as np

from ..config import RUNTIME_FIELDS, Config
from .untrusted import CheckpointError, read_json

META_KEY = "gptoss"
FORMAT_VERSION = 1
STATE = "state"  # the checkpointable name Orbax's partial save uses for the pytree
STEP_METADATA = "_CHECKPOINT_METADATA"
PYTREE_METADATA = "_METADATA"
CHECKSUMS = "crc32c"  # our metadata key: array name -> crc32c (see integrity.py)


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
    return p.is_dir() and (p / STEP_METADATA).is_file() and (p / STATE / PYTREE_METADATA).is_file()


def make_metadata(cfg: Config, *, generation_config: dict | None, source: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "config": cfg.architecture_dict(),
        "expert_format": cfg.expert_format,
        "dtype": cfg.dtype,
        "generation_config": generation_config,
        "source": source,
    }


def _hint(path) -> str:
    return f"check it with `gptoss-convert --verify {path}`, or convert it again"


def read_metadata(path: str | os.PathLike) -> dict:
    """Our `custom_metadata["gptoss"]` block, every field checked; CheckpointError naming the file otherwise."""
    f = Path(path) / STEP_METADATA
    step = read_json(f)
    custom = step.get("custom_metadata")
    meta = custom.get(META_KEY) if isinstance(custom, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: an Orbax checkpoint without gpt-oss metadata (not written by gptoss-convert)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: gpt-oss checkpoint format {meta.get('format')!r}, this version reads "
                              f"{FORMAT_VERSION}")  # fmt: skip
    for key, kind in (("config", dict), ("expert_format", str), ("dtype", str), ("generation_config", dict)):
        if not isinstance(meta.get(key), kind) and not (key == "generation_config" and meta.get(key) is None):
            raise CheckpointError(f"{f}: damaged gpt-oss metadata: {key!r} is missing or not a "
                                  f"{kind.__name__}; {_hint(path)}")  # fmt: skip
    sums = meta.get(CHECKSUMS)
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in sums.values())):  # fmt: skip
        raise CheckpointError(f"{f}: damaged gpt-oss metadata: {CHECKSUMS!r} must map array names to 32-bit "
                              f"checksums; {_hint(path)}")  # fmt: skip
    try:
        stored_config(meta)
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    return meta


_ARCH_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in RUNTIME_FIELDS}


def stored_config(meta: dict) -> Config:
    """The Config the checkpoint was written with (architecture + its expert format and dtype)."""
    arch = meta.get("config")
    if not isinstance(arch, dict):
        raise ValueError("gpt-oss metadata has no 'config' object")
    arch = {k: v for k, v in arch.items() if k not in RUNTIME_FIELDS}
    unknown = sorted(set(arch) - set(_ARCH_FIELDS))
    missing = [n for n, f in _ARCH_FIELDS.items() if n not in arch
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if unknown or missing:
        raise ValueError(f"gpt-oss metadata config has {'unknown' if unknown else 'no'} field "
                         f"{(unknown or missing)[0]!r}"[:200])  # fmt: skip
    return Config(**arch, expert_format=meta.get("expert_format"), dtype=meta.get("dtype"))


# --------------------------------------------------------------------------------------------- reading
def _orbax_noise_filter() -> None:
    """When one read fails, Orbax stops waiting for the others: its read coroutines that fail too are
    reported, when collected, as 'Exception ignored in <coroutine ...>' with a few KB of tensorstore spec
    each, and tensorstore's completions on the closed asyncio loop as 'Event loop is closed'. All of that
    goes through sys.unraisablehook, after we have already reported the one real error: drop it, pass
    everything else on."""
    prev = sys.unraisablehook
    if getattr(prev, "_gptoss_filter", False):
        return

    def hook(unraisable):
        e, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        prev(unraisable)

    hook._gptoss_filter = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def orbax_errors(path: Path, what: str = "cannot read the converted checkpoint"):
    """Any error from Orbax or tensorstore -> one CheckpointError line naming `path` (the tensorstore spec
    that its messages append, a few KB of JSON, is cut)."""
    _orbax_noise_filter()
    try:
        yield
    except (CheckpointError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the boundary to a library reading damaged files
        for _ in range(20):  # the innermost cause is tensorstore's own message, naming the array
            if (e.__cause__ or e.__context__) is None:
                break
            e = e.__cause__ or e.__context__
        text = str(e).split(" [tensorstore_spec", 1)[0].strip()
        text = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"{path}: {what} ({text}); it is damaged or incomplete: {_hint(path.parent)}") from None


def stored_arrays(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array in the checkpoint, from Orbax's metadata (no data read)."""
    import orbax.checkpoint as ocp

    state = Path(path) / STATE
    md = read_json(state / PYTREE_METADATA)
    if not isinstance(md.get("tree_metadata"), dict):
        raise CheckpointError(f"{state / PYTREE_METADATA}: damaged Orbax metadata: no 'tree_metadata' object; "
                              f"{_hint(path)}")  # fmt: skip
    with orbax_errors(state, "cannot read the array metadata"):
        tree = ocp.PyTreeCheckpointHandler().metadata(state).tree
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
    state = Path(path) / STATE
    what = f"cannot read {next(iter(targets), '')}" + (f" or one of {len(targets) - 1} other arrays" if len(targets) > 1 else "")
    with orbax_errors(state, what):
        out = ocp.PyTreeCheckpointer().restore(
            state, args=ocp.args.PyTreeRestore(item=nest(item), restore_args=nest(args), partial_restore=True)
        )
    return flatten(out)

"""Streaming conversion: a released gpt-oss folder -> an Orbax checkpoint, in bounded memory, resumable.

How it streams: tensors are read one at a time from memory-mapped safetensors (a view, no copy), put in
our layout by the key table (`conversion/keys.py`), cast, and handed to Orbax in groups (`group_budget`:
64 MiB or the largest tensor; a tensor larger than the budget is a group of its own). Each group is one
Orbax partial save: an atomic snapshot holding those arrays, written by tensorstore into its own OCDBT
database. After the last group, `finalize` merges the snapshots into one Orbax checkpoint. Between
groups the memory maps are dropped, so neither the mapped pages nor the copies accumulate: the peak is a
few times the largest tensor (mapped source + transformed copy + tensorstore's buffers), whatever the
model size.
Dequantized experts are produced one expert at a time straight into the output array, so no float32 copy
of a whole expert tensor ever exists.

Safety: everything is written under `DST.converting/`, and `DST` appears only by one rename at the very
end. That folder holds:
  journal.json       the source (files, sizes, mtimes) and options; a re-run with the same command
                     resumes, a different command is refused (exit 2) rather than mixing two conversions;
  progress.jsonl     one line per finished group (names, bytes), appended after Orbax commits it;
  ckpt.partial_save/ Orbax's completed snapshots; what resume skips is read from them, since Orbax makes
                     each one appear atomically (a group interrupted mid-write leaves only an
                     `*.orbax-checkpoint-tmp*` folder, which resume deletes);
  finalizing         present while Orbax merges the snapshots; a run interrupted then starts over;
  ckpt/              the finalized checkpoint, just before it is renamed to DST.
Snapshots are written without tensorstore's fsync per file (`orbax_io._deferred_fsync`); the finished
checkpoint is fsync'd as a whole (`orbax_io.sync_tree`) before the rename, so DST is durable when it appears.
Bad input (corrupt or truncated shard, bad header, missing/unexpected/wrong-shape/wrong-dtype tensor,
config not matching the tensors, an E8M0 scale of 255) raises `CheckpointError` and deletes the temporary
folder: nothing of it can be resumed. An interruption (signal, kill, I/O error such as a full disk) keeps
it, so the same command resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import keys
from gptoss_jax.checkpoint import orbax as ckpt_orbax
from gptoss_jax.checkpoint.safetensors import CheckpointError
from gptoss_jax.checkpoint.source import Source, open_source
from gptoss_jax.progress import progress_bar
from gptoss_jax.weights import storage_specs

from . import orbax_io

WORK_SUFFIX = ".converting"
JOURNAL = "journal.json"
PROGRESS = "progress.jsonl"
FINALIZING = "finalizing"  # present while Orbax merges the snapshots
CKPT = "ckpt"
MiB = 1 << 20
# Seconds to sleep after each written group; set only by the interruption test, which kills the process
# while it waits.
_TEST_DELAY = float(os.environ.get("GPTOSS_CONVERT_TEST_DELAY", "0") or 0)


class UsageError(ValueError):
    """Bad arguments: an invalid option, an existing DST, another unfinished conversion in its way."""


class VerifyError(RuntimeError):
    """The written checkpoint differs from the source (`--verify`)."""


@dataclass(frozen=True)
class Options:
    expert_format: str = "mxfp4"  # "mxfp4" (packed, as released) or "dequantized"
    dtype: str = "bfloat16"  # non-expert float weights; norms and sinks stay float32 as in the model
    shard_hint: str = "expert"  # "expert": chunk expert tensors per expert; "none": by size only
    chunk_mib: int = 16  # largest stored chunk: the unit a sharded restore reads
    compression: bool = False  # zstd; random-looking bf16/fp4 data barely compresses and it costs time
    group_mib: float | None = None  # MiB per Orbax snapshot; None: 64 MiB or the largest tensor if larger

    def __post_init__(self):
        if self.expert_format not in ("mxfp4", "dequantized"):
            raise UsageError(f"expert format must be 'mxfp4' or 'dequantized', got {self.expert_format!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise UsageError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.shard_hint not in ("expert", "none"):
            raise UsageError(f"shard hint must be 'expert' or 'none', got {self.shard_hint!r}")
        if self.chunk_mib <= 0 or (self.group_mib is not None and self.group_mib <= 0):
            raise UsageError("chunk and group sizes must be positive")

    def journal(self) -> dict:
        # group_mib only changes how tensors are batched, not the result: a resume may use another.
        return {"expert_format": self.expert_format, "dtype": self.dtype, "shard_hint": self.shard_hint,
                "chunk_mib": self.chunk_mib, "compression": self.compression}  # fmt: skip


@dataclass
class Result:
    dst: Path
    layout: str
    layout_note: str
    tensors: int
    resumed: int  # tensors found already written
    source_bytes: int
    output_bytes: int
    seconds: float
    verified: bool = False
    plan_seconds: float = 0.0  # opening the source and tracing the model's shapes, before any tensor is read
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- helpers
def work_dir(dst: Path) -> Path:
    return dst.parent / (dst.name + WORK_SUFFIX)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fingerprint(src: Source) -> dict:
    files = sorted({f.path for f in src.files.values()})
    return {"root": str(src.root.resolve()), "layout": src.layout,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}  # fmt: skip


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _source_bytes(rule: keys.Rule, src: Source) -> int:
    # The original layout's fused qkv tensors feed three of our parameters; count their bytes once.
    share = 3 if src.layout == "original" and ".attn.qkv." in rule.sources[0] else 1
    return sum(src.files[s].nbytes(s) for s in rule.sources) // share


def _release(src: Source) -> None:
    """Unmaps every file: mapped pages count as this process's memory until unmapped."""
    for f in set(src.files.values()):
        f.close()


def _dequantize(src: Source, rule: keys.Rule, dtype) -> np.ndarray:
    """Packed expert weight -> (E, rows, cols) `dtype`, one expert at a time (bounded temporaries)."""
    bname, sname = rule.sources
    blocks, scales = src.files[bname].get(bname), src.files[sname].get(sname)
    try:
        keys.check_scales(scales)
    except ValueError as e:
        raise CheckpointError(f"{src.files[sname].path}: tensor {sname}: {e}") from None
    E, rows, groups, _ = blocks.shape
    out = np.empty((E, rows, groups * mxfp4.BLOCK), dtype=dtype)
    for e in range(E):
        out[e] = mxfp4.dequantize_np(blocks[e], scales[e]).astype(dtype)  # exact: fp4 * 2^k fits bf16
    return out


def produce(src: Source, rule: keys.Rule, spec) -> np.ndarray:
    """The parameter `rule.target` as stored: our layout, the spec's dtype, C-contiguous."""
    if len(rule.sources) == 2:  # dequantized experts (the only two-source rule)
        return _dequantize(src, rule, spec.dtype)
    arr = src.read(rule)
    return np.ascontiguousarray(arr.astype(spec.dtype, copy=False))


def group_budget(items, opts: Options) -> int:
    """Bytes per Orbax snapshot: `group_mib` when given, else 64 MiB or the largest tensor if larger.

    Each snapshot costs Orbax work of its own (an OCDBT database, metadata, a merge in `finalize`): on a
    1.5 GB checkpoint 256 MiB groups converted 1.8x faster than 64 MiB ones. The peak memory is set by
    the largest tensor anyway, so groups that large cost little memory, while checkpoints made of small
    tensors keep the 64 MiB bound.
    """
    if opts.group_mib is not None:
        return max(1, int(opts.group_mib * MiB))
    largest = max(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for _, spec, _ in items)
    return max(64 * MiB, largest)


def _groups(items, budget: int):
    """Consecutive (rule, spec, nbytes) items batched to about `budget` bytes each."""
    cur, size = [], 0
    for it in items:
        if cur and size + it[2] > budget:
            yield cur
            cur, size = [], 0
        cur.append(it)
        size += it[2]
    if cur:
        yield cur


# ------------------------------------------------------------------------------------------- convert
def plan(src: Source, opts: Options):
    """(rule, target spec, source bytes) for every parameter; raises CheckpointError on a bad source."""
    cfg = src.config.replace(expert_format=opts.expert_format, dtype=opts.dtype)
    rules = src.rules(opts.expert_format)  # missing / unexpected / wrong shape or dtype -> CheckpointError
    specs = storage_specs(cfg)
    targets = [r.target for r in rules]
    if sorted(targets) != sorted(specs) or len(set(targets)) != len(targets):
        raise CheckpointError(
            f"{src.root}: key table does not cover the model's parameters"
        )  # a bug, not input
    return cfg, [(r, specs[r.target], _source_bytes(r, src)) for r in rules]


def convert(src_path, dst_path, opts: Options = Options(), *, verify: bool = False, quiet: bool = False,
            log=None) -> Result:  # fmt: skip
    """Converts `src_path` (either released layout) into an Orbax checkpoint at `dst_path`.

    Resumes an interrupted run of the same conversion. Raises CheckpointError (bad input; temporary folder
    deleted), UsageError (bad arguments, DST exists, a different unfinished conversion is in the way),
    VerifyError (verification failed; temporary folder deleted).
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
    src_path, dst = Path(src_path), Path(dst_path).absolute()  # Orbax wants absolute paths
    if dst.exists():
        raise UsageError(f"{dst}: already exists; choose a new destination or delete it")
    src = open_source(src_path)
    cfg, items = plan(src, opts)
    t_plan = time.perf_counter() - t0
    note = f" ({src.layout_note})" if src.layout_note else ""
    log(f"source: {src.root} ({'Hugging Face' if src.layout == 'hf' else 'original/'} layout){note}")

    work = work_dir(dst)
    journal = {"tool": "gptoss-convert", "format": ckpt_orbax.FORMAT_VERSION, "source": _fingerprint(src),
               "options": opts.journal(), "dst": str(dst.resolve())}  # fmt: skip
    _prepare_work(work, journal)
    ckpt = work / CKPT
    meta = ckpt_orbax.make_metadata(cfg, generation_config=src.extra_json.get("generation_config"),
                                  source={"layout": src.layout, "files": [f[0] for f in journal["source"]["files"]]})  # fmt: skip
    try:
        resumed = _write_all(src, items, opts, ckpt, meta, work, quiet, log)
        if verify:
            verify_checkpoint(src, items, ckpt, opts, quiet=quiet)
        orbax_io.sync_tree(ckpt)  # on disk before it is published under its final name
        os.rename(ckpt, dst)
        _fsync_dir(dst.parent)
    except (CheckpointError, VerifyError):
        _release(src)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    total = sum(n for _, _, n in items)
    return Result(dst=dst, layout=src.layout, layout_note=src.layout_note, tensors=len(items), resumed=resumed,
                  source_bytes=total, output_bytes=folder_bytes(dst), seconds=time.perf_counter() - t0,
                  verified=verify, plan_seconds=t_plan)  # fmt: skip


def _prepare_work(work: Path, journal: dict) -> None:
    """Creates the temporary folder, or checks that the unfinished one there is this same conversion."""
    jpath = work / JOURNAL
    if work.exists():
        try:
            old = json.loads(jpath.read_text())
        except (OSError, ValueError):
            old = None
        if old is None:  # killed before the journal was written: nothing of value inside
            shutil.rmtree(work)
        else:
            for k in ("source", "options", "dst"):
                if old.get(k) != journal[k]:
                    raise UsageError(f"{work}: holds an unfinished conversion with different {k} "
                                     f"({json.dumps(old.get(k))[:120]}); rerun that command to resume it, "
                                     f"or delete the folder")  # fmt: skip
            # a group interrupted mid-write leaves an Orbax temporary folder: never part of a snapshot
            for tmp in work.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
            return
    work.mkdir(parents=True)
    _write_json(jpath, journal)


def _write_all(src, items, opts, ckpt: Path, meta, work: Path, quiet, log) -> int:
    """Writes every parameter not yet in the partial checkpoint, then finalizes it. Returns how many
    tensors an earlier run had already written."""
    ctx = orbax_io.writer_context(chunk_bytes=opts.chunk_mib * MiB, shard_experts=opts.shard_hint == "expert",
                                  compression=opts.compression)  # fmt: skip
    if ckpt.is_dir() and ckpt_orbax.is_orbax_checkpoint(ckpt):
        log("resuming: every tensor was written and merged; renaming")
        return len(items)
    partial = ckpt.parent / (ckpt.name + ".partial_save")
    if (work / FINALIZING).exists():
        # Orbax's finalize moves snapshot files into place one by one: an interrupted merge cannot be
        # continued safely, so everything is written again.
        log("resuming: the previous run was interrupted while merging its snapshots; starting over")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        (work / FINALIZING).unlink()
    done = orbax_io.saved_in_partial(ckpt)
    todo = [it for it in items if it[0].target not in done]
    resumed = len(items) - len(todo)
    if resumed:
        log(f"resuming: {resumed} of {len(items)} tensors already written")
    total = sum(n for _, _, n in items)
    done = total - sum(n for _, _, n in todo)
    bar = progress_bar(total, "converting", quiet=quiet, initial=done, terminal_only=False)
    with bar, open(work / PROGRESS, "a") as journal:
        for group in _groups(todo, group_budget(items, opts)):
            arrays = {rule.target: produce(src, rule, spec) for rule, spec, _ in group}
            orbax_io.partial_save(ctx, ckpt, arrays, meta)
            del arrays
            _release(src)
            nbytes = sum(n for _, _, n in group)
            journal.write(json.dumps({"names": [r.target for r, _, _ in group], "bytes": nbytes}) + "\n")
            journal.flush()
            bar.update(nbytes)
            if _TEST_DELAY:  # tests only: widen the window in which an interruption lands
                time.sleep(_TEST_DELAY)
    if not partial.is_dir():
        raise RuntimeError(f"{ckpt}: nothing to finalize")
    (work / FINALIZING).touch()
    orbax_io.partial_finalize(ctx, ckpt)
    have = ckpt_orbax.stored_arrays(ckpt)
    missing = sorted({it[0].target for it in items} - set(have))
    if missing:  # a snapshot vanished between runs: refuse to publish an incomplete checkpoint
        raise RuntimeError(f"{ckpt}: finalized checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
    return resumed


# -------------------------------------------------------------------------------------------- verify
def _expected_dequantized(src: Source, rule: keys.Rule, dtype) -> np.ndarray:
    """An independent dequantization for --verify: the jnp bit-manipulation decoder (no lookup table,
    no ldexp), one expert at a time."""
    bname, sname = rule.sources
    blocks, scales = src.files[bname].get(bname), src.files[sname].get(sname)
    E, rows, groups, _ = blocks.shape
    out = np.empty((E, rows, groups * mxfp4.BLOCK), dtype=dtype)
    f = jax.jit(lambda b, s: mxfp4.dequantize(b, s, dtype=jnp.dtype(dtype)))
    for e in range(E):
        out[e] = np.asarray(f(np.asarray(blocks[e]), np.asarray(scales[e])))
    return out


def verify_checkpoint(src: Source, items, ckpt: Path, opts: Options, *, quiet: bool = False) -> None:
    """Re-reads every array through a plain Orbax restore and compares it bit for bit with the source.

    Packed experts and other weights: the source bytes after our layout transform and cast (bf16 -> bf16
    is a copy, so bit-exact). Dequantized experts: an independent decoder (`_expected_dequantized`).
    """
    total = sum(n for _, _, n in items)
    with progress_bar(total, "verifying", quiet=quiet, terminal_only=False) as bar:
        for group in _groups(items, group_budget(items, opts)):
            got = ckpt_orbax.read_arrays(ckpt, {r.target: np.dtype(spec.dtype) for r, spec, _ in group})
            for rule, spec, n in group:
                if len(rule.sources) == 2:
                    want = _expected_dequantized(src, rule, spec.dtype)
                else:
                    want = produce(src, rule, spec)
                g = got.pop(rule.target)
                if g.shape != want.shape or g.dtype != want.dtype:
                    raise VerifyError(
                        f"{ckpt}: {rule.target} is {g.dtype}{g.shape}, expected {want.dtype}{want.shape}"
                    )
                if not np.array_equal(g.view(np.uint8), want.view(np.uint8)):
                    bad = int(np.count_nonzero(g.view(np.uint8) != want.view(np.uint8)))
                    raise VerifyError(f"{ckpt}: {rule.target} differs from {rule.sources[0]} "
                                      f"({bad} bytes differ)")  # fmt: skip
                del want, g
                bar.update(n)
            _release(src)

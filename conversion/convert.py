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
config not matching the tensors, an E8M0 scale of 255, NaN or Inf in a float weight unless
`allow_nonfinite`) raises `CheckpointError` and deletes the temporary folder: nothing of it can be
resumed. An interruption (signal, kill, I/O error) keeps it, so the same command resumes.

Destinations are checked before any work: an existing DST (a dangling symlink included), a parent that is
not a folder, a folder we cannot write in, or too little free space for the output raise `UsageError`. A
disk that fills up anyway while writing raises `NoSpaceError` (one line: bytes still to write, bytes
free) and keeps `DST.converting/` for resuming.

Integrity: each array's crc32c is computed from the bytes handed to Orbax and recorded in our metadata
(`gptoss_jax.checkpoint.integrity`); `--verify` re-reads the output and checks it against both the source
and the checksums.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import integrity, keys
from gptoss_jax.checkpoint import orbax as ckpt_orbax
from gptoss_jax.checkpoint.source import Source, open_source
from gptoss_jax.checkpoint.untrusted import CheckpointError, read_json
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
    """The written checkpoint differs from the source or from its checksums (`--verify`)."""


class NoSpaceError(RuntimeError):
    """The disk filled up while writing; the partial work is kept for resuming."""


@dataclass(frozen=True)
class Options:
    expert_format: str = "mxfp4"  # "mxfp4" (packed, as released) or "dequantized"
    dtype: str = "bfloat16"  # non-expert float weights; norms and sinks stay float32 as in the model
    shard_hint: str = "expert"  # "expert": chunk expert tensors per expert; "none": by size only
    chunk_mib: int = 16  # largest stored chunk: the unit a sharded restore reads
    compression: bool = False  # zstd; random-looking bf16/fp4 data barely compresses and it costs time
    group_mib: float | None = None  # MiB per Orbax snapshot; None: 64 MiB or the largest tensor if larger
    allow_nonfinite: bool = False  # NaN/Inf in a float weight: a warning instead of an error

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
        # group_mib and allow_nonfinite do not change what is written: a resume may use others.
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


def produce(src: Source, rule: keys.Rule, spec, nonfinite=None) -> np.ndarray:
    """The parameter `rule.target` as stored: our layout, the spec's dtype, C-contiguous. NaN or Inf in a
    float source raises CheckpointError, or is passed to `nonfinite` (a warning) when that is given."""
    if len(rule.sources) == 2:  # dequantized experts (the only two-source rule)
        return _dequantize(src, rule, spec.dtype)
    arr = src.read(rule, nonfinite=nonfinite)
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
    deleted), UsageError (bad arguments, a destination that cannot be written or lacks the space, DST
    exists, a different unfinished conversion is in the way), VerifyError (verification failed; temporary
    folder deleted), NoSpaceError (the disk filled up while writing; temporary folder kept).
    `log` receives progress messages (default: stderr unless quiet) and warnings (default: stderr).
    """
    t0 = time.perf_counter()
    warn = log or (lambda msg: print(msg, file=sys.stderr))
    log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
    src_path, dst = Path(src_path), Path(dst_path).absolute()  # Orbax wants absolute paths
    check_destination(dst)
    src = open_source(src_path)
    cfg, items = plan(src, opts)
    t_plan = time.perf_counter() - t0
    note = f" ({src.layout_note})" if src.layout_note else ""
    log(f"source: {src.root} ({'Hugging Face' if src.layout == 'hf' else 'original/'} layout){note}")

    work = work_dir(dst)
    check_space(work, bytes_to_write(work, items))
    journal = {"tool": "gptoss-convert", "format": ckpt_orbax.FORMAT_VERSION, "source": _fingerprint(src),
               "options": opts.journal(), "dst": str(dst.resolve())}  # fmt: skip
    _prepare_work(work, journal)
    ckpt = work / CKPT
    meta = ckpt_orbax.make_metadata(cfg, generation_config=src.extra_json.get("generation_config"),
                                  source={"layout": src.layout, "files": [f[0] for f in journal["source"]["files"]]})  # fmt: skip
    nonfinite = None
    if opts.allow_nonfinite:
        nonfinite = lambda msg: warn(f"warning: {msg}; converted as it is (--allow-nonfinite)")  # noqa: E731
    try:
        resumed = _write_all(src, items, opts, ckpt, meta, work, quiet, log, nonfinite)
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


# -------------------------------------------------------------------------------------- destination
def check_destination(dst: Path) -> None:
    """Refuses, before any work, a destination that could never become the checkpoint (UsageError)."""
    if os.path.lexists(dst):
        what = "is a symbolic link to a missing target" if not dst.exists() else "already exists"
        raise UsageError(f"{dst}: {what}; choose a new destination or delete it")
    work = work_dir(dst)
    if os.path.lexists(work) and (work.is_symlink() or not work.is_dir()):
        raise UsageError(f"{work}: exists and is not the folder of an unfinished conversion; delete it")
    parent = dst.parent
    while not os.path.lexists(parent):  # missing parents are created; the first existing one must be a folder
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{dst}: cannot be created: {parent} is not a folder")
    try:  # os.access says yes to root on a read-only mount's files; creating something is the real test
        os.rmdir(tempfile.mkdtemp(prefix=".gptoss-convert-probe-", dir=parent))
    except OSError as e:
        raise UsageError(f"{dst}: cannot write in {parent} ({e.strerror or e})") from None


def _stored_bytes(spec) -> int:
    return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize


def bytes_to_write(work: Path, items) -> int:
    """Bytes of the arrays not yet written by an earlier run of this conversion."""
    ckpt = work / CKPT
    if ckpt_orbax.is_orbax_checkpoint(ckpt):  # finalized: only the rename is left
        return 0
    done = orbax_io.saved_in_partial(ckpt) if work.is_dir() else set()
    return sum(_stored_bytes(spec) for rule, spec, _ in items if rule.target not in done)


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _with_overhead(n: int) -> int:
    # Orbax's metadata, OCDBT's B-tree and the partial-save snapshots' own files: small, bounded generously
    return n + n // 50 + (16 << 20) if n else 0


def _needed_vs_free(need: int, free: int) -> str:
    return f"about {need} bytes ({need / 1e9:.2f} GB) are needed, {free} bytes ({free / 1e9:.2f} GB) are free"


def check_space(work: Path, nbytes: int) -> None:
    need, free = _with_overhead(nbytes), _free_bytes(work)
    if need > free:
        raise UsageError(f"{work.parent}: not enough free space for the output: " + _needed_vs_free(need, free))


def _no_space(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in text \
                or "Disk quota exceeded" in text or "os_error_code='28'" in text:  # fmt: skip
            return True
        e = e.__cause__ or e.__context__
    return False


class _DropErrors(logging.Filter):
    def filter(self, record):
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _orbax_errors_raised_not_logged():
    """Orbax logs a failed write (a full disk) as a long traceback on stderr, then raises it: we turn what
    it raises into one line, so its log of the same error is dropped."""
    logger, f = logging.getLogger("absl"), _DropErrors()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def _prepare_work(work: Path, journal: dict) -> None:
    """Creates the temporary folder, or checks that the unfinished one there is this same conversion."""
    jpath = work / JOURNAL
    if work.exists():
        try:
            old = read_json(jpath)  # bounded, regular files only: a FIFO there cannot hang us
        except CheckpointError:
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


def _write_all(src, items, opts, ckpt: Path, meta, work: Path, quiet, log, nonfinite=None) -> int:
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
    left = sum(_stored_bytes(spec) for _, spec, _ in todo)
    bar = progress_bar(total, "converting", quiet=quiet, initial=done, terminal_only=False)
    try:
        with bar, open(work / PROGRESS, "a") as journal, _orbax_errors_raised_not_logged():
            for group in _groups(todo, group_budget(items, opts)):
                arrays = {rule.target: produce(src, rule, spec, nonfinite) for rule, spec, _ in group}
                # at memory speed over data just produced; Orbax merges the snapshots' metadata key by key
                # at finalize, so each snapshot records its own arrays' checksums and they add up
                sums = {name: integrity.crc32c(a) for name, a in arrays.items()}
                orbax_io.partial_save(ctx, ckpt, arrays, meta | {ckpt_orbax.CHECKSUMS: sums})
                del arrays
                _release(src)
                left -= sum(_stored_bytes(spec) for _, spec, _ in group)
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
    except Exception as e:
        if not _no_space(e):
            raise
        raise NoSpaceError(f"{work}: the disk filled up while writing: "
                           f"{_needed_vs_free(_with_overhead(left), _free_bytes(work))}; {work} is kept: free "
                           f"some space and rerun the same command to resume") from None  # fmt: skip
    have = ckpt_orbax.stored_arrays(ckpt)
    sums = ckpt_orbax.read_metadata(ckpt).get(ckpt_orbax.CHECKSUMS) or {}
    missing = sorted({it[0].target for it in items} - (set(have) & set(sums)))
    if missing:  # a snapshot vanished between runs: refuse to publish an incomplete checkpoint
        raise RuntimeError(f"{ckpt}: finalized checkpoint lacks {missing[0]} or its checksum "
                           f"(and {len(missing) - 1} more)")  # fmt: skip
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
    """Re-reads every array through a plain Orbax restore and compares it bit for bit with the source, and
    its crc32c with the one recorded while converting (one read serves both).

    Packed experts and other weights: the source bytes after our layout transform and cast (bf16 -> bf16
    is a copy, so bit-exact). Dequantized experts: an independent decoder (`_expected_dequantized`).
    """
    total = sum(n for _, _, n in items)
    sums = ckpt_orbax.read_metadata(ckpt).get(ckpt_orbax.CHECKSUMS) or {}
    report = integrity.VerifyReport(path=ckpt)
    with progress_bar(total, "verifying", quiet=quiet, terminal_only=False) as bar:
        for group in _groups(items, group_budget(items, opts)):
            got = ckpt_orbax.read_arrays(ckpt, {r.target: np.dtype(spec.dtype) for r, spec, _ in group})
            for rule, spec, n in group:
                if len(rule.sources) == 2:
                    want = _expected_dequantized(src, rule, spec.dtype)
                else:
                    want = produce(src, rule, spec, nonfinite=lambda msg: None)  # checked when written
                g = got.pop(rule.target)
                if g.shape != want.shape or g.dtype != want.dtype:
                    raise VerifyError(
                        f"{ckpt}: {rule.target} is {g.dtype}{g.shape}, expected {want.dtype}{want.shape}"
                    )
                if not np.array_equal(g.view(np.uint8), want.view(np.uint8)):
                    bad = int(np.count_nonzero(g.view(np.uint8) != want.view(np.uint8)))
                    raise VerifyError(f"{ckpt}: {rule.target} differs from {rule.sources[0]} "
                                      f"({bad} bytes differ)")  # fmt: skip
                integrity.check(report, rule.target, g, sums.get(rule.target))
                if report.problems:
                    raise VerifyError(report.problems[0])
                del want, g
                bar.update(n)
            _release(src)

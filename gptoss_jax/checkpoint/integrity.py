"""Checksums of converted checkpoints: a crc32c per array, recorded while converting, checked on demand.

OCDBT and zarr checksum their indices, not the chunks: a flipped byte in a data file loads without a
word and the model computes something else. So the converter computes each array's crc32c while it
streams (`crc32c`, over the bytes it hands to Orbax: C order, stored dtype, which are exactly the bytes a
plain Orbax restore returns) and records them in our metadata (`custom_metadata["gptoss"]["crc32c"]`,
name -> int). `verify_checkpoint` re-reads every array and compares, naming the array and the data
file(s) that hold it. A checkpoint converted before checksums were recorded still loads; its arrays are
reported as unchecked.

Cost: one full read of the checkpoint (see docs/conversion.md for the measured figure per GB); the
checksum itself runs at memory speed (google-crc32c uses the CPU's CRC instructions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np

from ..progress import progress_bar
from . import orbax as ckpt_orbax
from .untrusted import CheckpointError

_CHUNK = 16 << 20  # bytes handed to the checksum at a time: google-crc32c takes bytes, so each is copied
GROUP_BYTES = 256 << 20  # arrays read back per Orbax restore (or the largest array, if larger)


def crc32c(a: np.ndarray) -> int:
    """crc32c of the array's bytes in C order (a contiguous array is read in place)."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    crc = 0
    for i in range(0, flat.size, _CHUNK):
        crc = google_crc32c.extend(crc, flat[i : i + _CHUNK].tobytes())
    return crc


@dataclass
class VerifyReport:
    """What `verify_checkpoint` found. `problems` holds one line per damaged array."""

    path: Path
    checked: int = 0  # arrays read back and compared with their recorded checksum
    # arrays without a recorded checksum (converted before checksums were recorded)
    unrecorded: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes read back
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem_line(self) -> str:
        """The first problem and how many more, in one line ("" when there is none)."""
        if not self.problems:
            return ""
        more = f" (and {len(self.problems) - 1} more damaged arrays)" if len(self.problems) > 1 else ""
        return self.problems[0] + more + "; convert it again"

    def raise_if_bad(self) -> None:
        """CheckpointError with the first problem (one line) when there is any."""
        if self.problems:
            raise CheckpointError(self.problem_line())

    def summary(self) -> str:
        s = (f"{self.path}: {self.checked} arrays checked, {self.nbytes / 1e9:.2f} GB read in "
             f"{self.seconds:.1f} s")  # fmt: skip
        if self.unrecorded:
            s += f"; {len(self.unrecorded)} arrays have no recorded checksum (converted by an older version)"
        return s + (f"; {len(self.problems)} damaged" if self.problems else "; all match")


def check(report: VerifyReport, name: str, arr: np.ndarray, recorded: int | None) -> None:
    """Adds `arr` (array `name` as read back) to `report`, comparing its crc32c with `recorded`."""
    report.nbytes += arr.nbytes
    if recorded is None:
        report.unrecorded.append(name)
        return
    report.checked += 1
    got = crc32c(arr)
    if got != recorded:
        files = ", ".join(data_files(report.path, name)) or "unknown data files"
        report.problems.append(f"{report.path / ckpt_orbax.STATE}: array {name} (stored in {files}) has crc32c "
                               f"{got:#010x}, {recorded:#010x} was recorded when it was converted")  # fmt: skip


def verify_checkpoint(path, *, quiet: bool = True) -> VerifyReport:
    """Re-reads every array of the converted checkpoint at `path` and compares it with its recorded crc32c.

    Returns a VerifyReport (damaged arrays in `report.problems`, one line each; `report.raise_if_bad()`
    turns them into a CheckpointError). Raises CheckpointError when the checkpoint cannot be read at all
    (damaged metadata, missing or truncated manifest and data files). Memory: one group of arrays
    (`GROUP_BYTES`, or the largest array) at a time, on the host.
    """
    t0 = time.perf_counter()
    path = Path(path).absolute()
    meta = ckpt_orbax.read_metadata(path)
    sums = meta.get(ckpt_orbax.CHECKSUMS) or {}
    have = ckpt_orbax.stored_arrays(path)
    report = VerifyReport(path=path)
    for name in sorted(set(sums) - set(have)):
        report.problems.append(f"{path / ckpt_orbax.STATE}: array {name} was recorded but is missing")
    sizes = {n: int(np.prod(shape)) * dt.itemsize for n, (shape, dt) in have.items()}
    budget = max([GROUP_BYTES, *sizes.values()])
    groups: list[list[str]] = [[]]
    total = 0
    for name in sorted(have):
        if groups[-1] and total + sizes[name] > budget:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += sizes[name]
    with progress_bar(sum(sizes.values()), "verifying", quiet=quiet, terminal_only=False) as bar:
        for group in groups:
            got = ckpt_orbax.read_arrays(path, {n: have[n][1] for n in group}) if group else {}
            for n in group:
                check(report, n, got.pop(n), sums.get(n))
                bar.update(sizes[n])
    report.seconds = time.perf_counter() - t0
    return report


def data_files(path, name: str) -> list[str]:
    """The OCDBT data files (relative to `path`) that hold the chunks of array `name`, for messages.

    Read from the database's B-tree through tensorstore's own dump; an empty list if it cannot be read.
    """
    import tensorstore as ts

    state = Path(path) / ckpt_orbax.STATE
    prefix = f"{name}/".encode()
    try:
        kv = ts.KvStore.open({"driver": "file", "path": f"{state}/"}).result()
        versions = ts.ocdbt.dump(kv).result().get("versions") or []
        todo = [versions[-1]["root"]["location"]] if versions and "location" in versions[-1]["root"] else []
        files: set[str] = set()
        while todo:
            for entry in ts.ocdbt.dump(kv, todo.pop()).result().get("entries", []):
                for v in entry.values():  # interior nodes point at nodes, leaves at values
                    if isinstance(v, str) and v.startswith("btreenode::"):
                        todo.append(v)
                ref = entry.get("indirect_value", "")
                if entry.get("key", b"").startswith(prefix) and ref.startswith("value:"):
                    base, rel = ref[len("value:") :].rsplit(":", 2)[0].split(":", 1)
                    files.add(f"{ckpt_orbax.STATE}/{base}{rel}")
        return sorted(files)
    except Exception:  # noqa: BLE001 - only used to enrich a message about a damaged checkpoint
        return []

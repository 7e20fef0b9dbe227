"""What verifying a converted checkpoint's checksums costs, per GB, beside what its parts cost.

    python benchmarks/verify_bench.py --size-gb 1 --workdir /tmp/verifybench [--keep]

Writes a synthetic checkpoint of about --size-gb (as `convert_bench.py` does), converts it, then times:
  restore  every array read back through a plain Orbax restore to host memory, in the groups
           `verify_checkpoint` uses (the reading part of verification);
  crc32c   the checksum alone over those arrays, already in memory;
  verify   `gptoss_jax.checkpoint.integrity.verify_checkpoint` end to end (metadata, restore, checksums).
The files were just written, so reads come mostly from the page cache: the figures are the verifier's
own cost, a lower bound on a cold disk (where the disk's read rate bounds it). Prints one line per
measurement and a JSON summary; deletes everything unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convert_bench import bench_config
from conversion.convert import Options, convert
from gptoss_jax.checkpoint import integrity
from gptoss_jax.checkpoint import orbax as ckpt_orbax
from gptoss_jax.checkpoint.synthetic import write_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--workdir", default="/tmp/gptoss-verify-bench")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, the best reported (default 3)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)

    work = Path(args.workdir)
    if work.exists():
        p.error(f"{work} exists; choose another --workdir")
    cfg = bench_config(args.size_gb)
    try:
        src = write_checkpoint(work / "src", cfg, layout="hf", shards=max(2, round(args.size_gb / 0.25)))
        dst = work / "out"
        convert(src, dst, Options(), quiet=True)
        shutil.rmtree(src)
        os.sync()
        have = ckpt_orbax.stored_arrays(dst)
        size = sum(int(np.prod(s)) * d.itemsize for s, d in have.values())
        print(f"converted checkpoint: {size / 1e9:.2f} GB in {len(have)} arrays, {cfg.num_hidden_layers} layers")

        def restore():
            names, out, group, total = sorted(have), [], [], 0
            for n in [*names, None]:  # the groups verify_checkpoint reads
                nbytes = 0 if n is None else int(np.prod(have[n][0])) * have[n][1].itemsize
                if group and (n is None or total + nbytes > integrity.GROUP_BYTES):
                    out += ckpt_orbax.read_arrays(dst, {g: have[g][1] for g in group}).values()
                    group, total = [], 0
                if n is not None:
                    group.append(n)
                    total += nbytes
            return out

        def best(fn):
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        t_restore = best(restore)
        arrays = restore()
        t_crc = best(lambda arrays=arrays: [integrity.crc32c(a) for a in arrays])
        del arrays
        t_verify = best(lambda: integrity.verify_checkpoint(dst).raise_if_bad())
        for name, t in (("restore", t_restore), ("crc32c", t_crc), ("verify", t_verify)):
            print(f"{name:8s} {t:7.2f} s  {size / t / 1e9:6.2f} GB/s  {t / (size / 1e9):6.2f} s per GB")
        summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "size_gb": size / 1e9, "arrays": len(have),
                   "restore_s_per_gb": t_restore / (size / 1e9), "crc32c_s_per_gb": t_crc / (size / 1e9),
                   "verify_s_per_gb": t_verify / (size / 1e9)}  # fmt: skip
        print(json.dumps(summary))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

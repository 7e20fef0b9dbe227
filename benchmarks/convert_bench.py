"""Conversion throughput beside the time to simply read (and to copy) the same files, in one run.

    python benchmarks/convert_bench.py --size-gb 1.5 --workdir /tmp/convbench [--experts dequantized] [--keep]

Writes a synthetic multi-shard checkpoint of about --size-gb (Hugging Face layout, packed MXFP4 experts,
32 experts of width --hidden, hidden --hidden, as many layers as the size needs), then
measures, in this order:
  read     every shard read sequentially in 16 MiB pieces (the files were just written, so this is
           mostly the page cache: the fastest the converter could possibly consume its input);
  copy     every shard read and written to another folder, fsync'd (the bound the disk sets);
  convert  `conversion.convert.convert` end to end (open, plan, stream, finalize), and its streaming
           part alone (end to end minus planning, which traces the model's shapes once).
Prints one line per measurement and a JSON summary; deletes everything unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.convert import Options, convert, folder_bytes
from gptoss_jax.checkpoint.synthetic import checkpoint_bytes, write_checkpoint
from gptoss_jax.config import Config

PIECE = 16 << 20


def bench_config(size_gb: float, hidden: int = 2048) -> Config:
    base = dict(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden, num_experts=32, experts_per_token=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=8, pad_token_id=999,
                eos_token_ids=(998,))  # fmt: skip
    one = checkpoint_bytes(Config.tiny(**base, num_hidden_layers=1))
    two = checkpoint_bytes(Config.tiny(**base, num_hidden_layers=2))
    layers = max(1, math.ceil((size_gb * 1e9 - (2 * one - two)) / (two - one)))
    return Config.tiny(**base, num_hidden_layers=layers)


def read_all(files) -> float:
    t = time.perf_counter()
    buf = bytearray(PIECE)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t


def copy_all(files, dst: Path) -> float:
    """Reads each shard and writes it to a new file, fsync'd: the bound the disk sets on any converter.
    (An explicit read/write loop: shutil may clone extents without writing any data.)"""
    dst.mkdir()
    t = time.perf_counter()
    buf = bytearray(PIECE)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fi, open(dst / f.name, "wb", buffering=0) as fo:
            while n := fi.readinto(view):
                fo.write(view[:n])
            os.fsync(fo.fileno())
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.5)
    p.add_argument("--workdir", default="/tmp/gptoss-convert-bench")
    p.add_argument(
        "--hidden",
        type=int,
        default=2048,
        help="hidden and expert width (default 2048: 134 MB expert tensors, the 20b has 265 MB ones)",
    )
    p.add_argument("--experts", choices=("mxfp4", "dequantized"), default="mxfp4")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)

    work = Path(args.workdir)
    if work.exists():
        p.error(f"{work} exists; choose another --workdir")
    cfg = bench_config(args.size_gb, args.hidden)
    try:
        t = time.perf_counter()
        src = write_checkpoint(work / "src", cfg, layout="hf", shards=max(2, round(args.size_gb / 0.25)))
        files = sorted(src.glob("model-*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {len(files)} shards, {cfg.num_hidden_layers} layers "
              f"(written in {time.perf_counter() - t:.1f} s)")  # fmt: skip
        os.sync()

        t_read = read_all(files)
        print(f"read     {t_read:7.2f} s  {size / t_read / 1e9:6.2f} GB/s")
        t_copy = copy_all(files, work / "copy")
        print(f"copy     {t_copy:7.2f} s  {size / t_copy / 1e9:6.2f} GB/s   (read + write + fsync)")
        shutil.rmtree(work / "copy")
        os.sync()

        t = time.perf_counter()
        res = convert(src, work / "out", Options(expert_format=args.experts), quiet=True)
        os.sync()
        t_conv = time.perf_counter() - t
        t_stream = t_conv - res.plan_seconds
        out = folder_bytes(work / "out")
        print(f"convert  {t_conv:7.2f} s  {size / t_conv / 1e9:6.2f} GB/s   end to end, incl. sync "
              f"(output {out / 1e9:.2f} GB, {out / size:.3f}x the input)")  # fmt: skip
        print(f"  stream {t_stream:7.2f} s  {size / t_stream / 1e9:6.2f} GB/s   without planning "
              f"({res.plan_seconds:.1f} s)")  # fmt: skip
        print(f"convert / read = {t_read / t_conv:.2f}; convert / copy = {t_copy / t_conv:.2f}")
        summary = {"hidden": args.hidden, "layers": cfg.num_hidden_layers, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "experts": args.experts, "input_gb": size / 1e9,
                   "output_gb": out / 1e9, "read_gbps": size / t_read / 1e9, "copy_gbps": size / t_copy / 1e9,
                   "convert_gbps": size / t_conv / 1e9, "stream_gbps": size / t_stream / 1e9,
                   "plan_s": res.plan_seconds}  # fmt: skip
        print(json.dumps(summary))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many LoRA adapters in one engine batch (`gptoss_jax.engine.adapters`): the figures of issue 23, on the
mid-size CPU checkpoint (benchmarks/cpu_vs_transformers.py `bench_config()`: 4 layers, 32 experts top-4,
hidden 512).

Measured (float32, packed MXFP4 experts, greedy, no prefix reuse), each case's decode step time (median over
every step in which all sequences decode) and its end-to-end rate (generated tokens / wall time, prefill
included). The cases run in turn, repetition by repetition, so a drift of the machine hits them alike:
  mixed    - 16 sequences, 8 adapters (rank 16, every target) mixed round-robin, against the same batch all
             on one adapter, in the same engine. Target: throughput >= 0.8x the one-adapter batch.
  base     - the same 16 sequences with no adapter, in that engine (a base-only step skips the pool:
             `lax.cond`) against an engine started without adapters. Target: step time within 3%.
  memory   - the pool's device bytes per resident adapter (its arrays, as allocated) against the plan of
             `gptoss-jax info CKPT --adapters NAME=DIR ...` (run as a subprocess, its --json read back).

Usage:  python benchmarks/multi_adapter.py [--ckpt DIR] [--reps 5] [--quick]
(--quick: the tiny test model, short lengths, one repetition: checks the script runs; not for figures.)
Run it on a quiet machine: the base-step comparison is a few per cent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIXED_TARGET = 0.8  # mixed throughput / one-adapter throughput, at least
BASE_TARGET = 1.03  # base step with the pool / without, at most


def header() -> list[str]:
    """Where and when: date, command, CPU (lscpu), versions."""
    import flax
    import jax
    import jaxlib
    import numpy as np
    from cpu_vs_transformers import cpu_model

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    dev = jax.devices()[0]
    return [
        f"date      {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"command   {shlex.join([Path(sys.executable).name, *sys.argv])}",
        (
            f"cpu       {cpu_model()}, {os.cpu_count()} logical cores; device {dev.platform} "
            f"({getattr(dev, 'device_kind', '')})"
        ),
        (
            f"software  gptoss-jax {commit}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax "
            f"{flax.__version__}, numpy {np.__version__}, python {platform.python_version()}"
        ),
    ]


def info_plan(ckpt: Path, folders: dict[str, Path]) -> dict:
    """The adapter pool `gptoss-jax info CKPT --adapters NAME=DIR ... --json` plans (float32, as served)."""
    cmd = [sys.executable, "-m", "gptoss_jax", "info", str(ckpt), "--dtype", "float32", "--json"]
    for name, folder in folders.items():
        cmd += ["--adapters", f"{name}={folder}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
    return json.loads(out)["adapters"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse (or create) the checkpoint in this folder")
    ap.add_argument("--reps", type=int, help="timed repetitions per case (default 5; --quick: 1)")
    ap.add_argument("--adapters", type=int, default=8, help="adapters in the pool (default 8)")
    ap.add_argument("--seqs", type=int, default=16, help="sequences in the batch (default 16)")
    ap.add_argument("--rank", type=int, default=16, help="every adapter's rank (default 16)")
    ap.add_argument("--quick", action="store_true", help="tiny model, short lengths: checks the script runs")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 5

    import numpy as np

    import gptoss_jax
    from gptoss_jax.adapters import save_adapters
    from gptoss_jax.checkpoint.synthetic import write_checkpoint
    from gptoss_jax.config import Config
    from gptoss_jax.engine import Engine
    from gptoss_jax.engine.adapters import bytes_per_adapter
    from gptoss_jax.lora import LoraConfig, init_adapters

    for line in header():
        print(line, flush=True)
    if args.quick:
        cfg = Config.tiny(vocab_size=1000, pad_token_id=999, eos_token_ids=(998,), sliding_window=8)
        prompt_len, new = 16, args.seqs + 4  # one prompt is prefilled per step: then all decode a while
    else:
        from cpu_vs_transformers import bench_config

        cfg = bench_config()
        prompt_len, new = 128, args.seqs + 32
    tmp = tempfile.TemporaryDirectory(prefix="gptoss_lora_")
    if args.ckpt is None:
        args.ckpt = Path(tmp.name) / "ckpt"
    if not (args.ckpt / "config.json").exists():
        print(f"writing the checkpoint to {args.ckpt} ...", flush=True)
        write_checkpoint(args.ckpt, cfg, layout="hf", seed=0)
    model = gptoss_jax.load(args.ckpt, dtype="float32", quiet=True)
    cfg = model.cfg
    lcfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="all")
    folders = {}
    for i in range(args.adapters):
        arrays = init_adapters(cfg, lcfg, seed=i, b_std=0.02)
        folders[f"ft{i}"] = save_adapters(Path(tmp.name) / f"ft{i}", arrays, cfg, lcfg)
    names = list(folders)
    B = args.seqs
    shape = {"max_seqs": B, "max_context": prompt_len + new + 1, "chunk": prompt_len, "seq_buckets": (B,),
             "token_buckets": (prompt_len,), "detokenize": False}  # fmt: skip
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt_len)).tolist()

    def run(engine, adapters) -> tuple[list[float], float]:
        """One run of the batch -> (seconds of each step in which every sequence decodes, generated tokens
        per second from the first submit to the last token)."""
        t0 = time.perf_counter()
        handles = [engine.submit(p, max_tokens=new, stop_token_ids=(), reuse=False, adapter=a)
                   for p, a in zip(prompts, adapters)]  # fmt: skip
        steps = []
        while not all(h.done for h in handles):
            decoding = engine.metrics().running == B and all(len(h._seq.generated) for h in handles)
            t = time.perf_counter()
            engine.step()
            if decoding:
                steps.append(time.perf_counter() - t)
        rate = sum(len(h.result().tokens) for h in handles) / (time.perf_counter() - t0)
        return steps, rate

    t0 = time.perf_counter()
    engine = Engine(model, adapters=folders, **shape)
    engine.warmup()
    print(f"engine with {args.adapters} adapters of rank {args.rank}: ready in {time.perf_counter() - t0:.1f} s",
          flush=True)  # fmt: skip
    plain = Engine(model, **shape)
    plain.warmup()
    cases = {  # label: (engine, each row's adapter)
        f"mixed, {len(names)} adapters": (engine, [names[i % len(names)] for i in range(B)]),
        "one adapter": (engine, [names[0]] * B),
        "no adapter, pool loaded": (engine, [None] * B),
        "engine without adapters": (plain, [None] * B),
    }
    steps = {k: [] for k in cases}
    rates = {k: [] for k in cases}
    for k, (eng, ads) in cases.items():  # one untimed run each
        run(eng, ads)
    for rep in range(args.reps):  # the cases in turn, their order rotated each repetition
        order = list(cases)[rep % len(cases) :] + list(cases)[: rep % len(cases)]
        for k in order:
            s, r = run(*cases[k])
            steps[k].extend(s)
            rates[k].append(r)
    allocated = sum(a.nbytes for a in engine.pool.arrays.values()) // (engine.pool.max_adapters + 1)
    own = bytes_per_adapter(cfg, engine.pool.rank, engine.pool.targets)
    engine.close()
    plain.close()
    planned = info_plan(args.ckpt, folders)

    med = {k: statistics.median(v) for k, v in steps.items()}
    print(f"\n{B} sequences x {prompt_len} prompt + {new} new tokens, float32, rank {args.rank} on every target; "
          f"{args.reps} repetitions ({sum(map(len, steps.values()))} decode steps timed)")  # fmt: skip
    print(f"  {'case':<26}{'decode step':>12}{'decode tok/s':>14}{'end-to-end tok/s':>18}")
    for k in cases:
        print(f"  {k:<26}{med[k] * 1e3:9.2f} ms{B / med[k]:14.1f}{statistics.median(rates[k]):18.1f}")
    mixed, one, pool, none = (med[k] for k in cases)
    ratio_mixed, ratio_base = one / mixed, pool / none
    print(f"  mixed / one adapter, throughput   {ratio_mixed:.3f}x   (target >= {MIXED_TARGET}x: "
          f"{'met' if ratio_mixed >= MIXED_TARGET else 'NOT met'})")  # fmt: skip
    print(f"  no adapter: pool / none, step     {ratio_base:.3f}x   (target <= {BASE_TARGET}x: "
          f"{'met' if ratio_base <= BASE_TARGET else 'NOT met'})")  # fmt: skip
    print(f"  memory per resident adapter       {allocated / 2**20:.3f} MiB allocated, "
          f"{planned['bytes_per_adapter'] / 2**20:.3f} MiB planned by `gptoss-jax info --adapters` "
          f"({'equal' if allocated == planned['bytes_per_adapter'] else 'DIFFERENT'}); pool "
          f"{planned['bytes_total'] / 2**20:.3f} MiB for {planned['max_adapters']} slots + the zero slot")  # fmt: skip
    if args.quick:
        print("(--quick: the tiny model and short runs, to check the script: not figures)")
    assert allocated == planned["bytes_per_adapter"] == own, (allocated, planned, own)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many LoRA adapters in one engine batch (`gptoss_jax.engine.adapters`), on the mid-size CPU checkpoint
(benchmarks/cpu_vs_transformers.py `bench_config()`: 4 layers, 32 experts top-4, hidden 512).

Measured (float32, packed MXFP4 experts, greedy, no prefix reuse; each case's decode step time, median):
  mixed    - 16 sequences, 8 adapters (rank 16, every target) mixed round-robin, against the same batch all
             on one adapter, in the same engine (the pool's one-hot form costs the same for one or eight
             adapters: the two should be close).
  base     - the same 16 sequences with no adapter, in that engine (a base-only step skips the pool:
             `lax.cond`) against an engine without adapters at all. Target: <= 1.05x.
  memory   - the pool's device bytes per adapter slot, measured (the arrays allocated) against the plan
             (`gptoss-jax info --adapters`, `engine.adapters.bytes_per_adapter`).

Usage:  python benchmarks/multi_adapter.py [--ckpt DIR] [--reps 3] [--quick]
(--quick: the tiny test model and short lengths, to check the script runs; not for figures.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse (or create) the checkpoint in this folder")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    ap.add_argument("--adapters", type=int, default=8, help="adapters in the pool (default 8)")
    ap.add_argument("--seqs", type=int, default=16, help="sequences in the batch (default 16)")
    ap.add_argument("--rank", type=int, default=16, help="every adapter's rank (default 16)")
    ap.add_argument("--quick", action="store_true", help="tiny model, short lengths: checks the script runs")
    args = ap.parse_args(argv)

    import numpy as np

    import gptoss_jax
    from gptoss_jax.adapters import save_adapters
    from gptoss_jax.checkpoint.synthetic import write_checkpoint
    from gptoss_jax.config import Config
    from gptoss_jax.engine import Engine
    from gptoss_jax.engine.adapters import bytes_per_adapter
    from gptoss_jax.lora import LoraConfig, init_adapters

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
    shape = dict(max_seqs=B, max_context=prompt_len + new + 1, chunk=prompt_len, seq_buckets=(B,),
                 token_buckets=(prompt_len,), detokenize=False)  # fmt: skip
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt_len)).tolist()

    def decode_step(engine, adapters) -> float:
        """Median seconds of the batch's decode steps (every sequence decoding), over --reps runs."""
        out = []
        for rep in range(args.reps + 1):  # the first run untimed
            handles = [engine.submit(p, max_tokens=new, stop_token_ids=(), reuse=False, adapter=a)
                       for p, a in zip(prompts, adapters)]  # fmt: skip
            steps = []
            while not all(h.done for h in handles):
                decoding = engine.metrics().running == B and all(len(h._seq.generated) for h in handles)
                t = time.perf_counter()
                engine.step()
                if decoding:
                    steps.append(time.perf_counter() - t)
            if rep:
                out.extend(steps)
        return statistics.median(out)

    t0 = time.perf_counter()
    engine = Engine(model, adapters=folders, **shape)
    engine.warmup()
    ready = time.perf_counter() - t0
    print(f"engine with {args.adapters} adapters of rank {args.rank}: ready in {ready:.1f} s", flush=True)
    mixed = decode_step(engine, [names[i % len(names)] for i in range(B)])
    one = decode_step(engine, [names[0]] * B)
    base_in_pool = decode_step(engine, [None] * B)
    allocated = sum(a.nbytes for a in engine.pool.arrays.values()) // (engine.pool.max_adapters + 1)
    planned = bytes_per_adapter(cfg, engine.pool.rank, engine.pool.targets)
    engine.close()
    plain = Engine(model, **shape)
    plain.warmup()
    base_plain = decode_step(plain, [None] * B)
    plain.close()

    print(f"{B} sequences x {prompt_len} prompt + {new} new tokens, decode step (median of {args.reps} "
          f"runs):")  # fmt: skip
    rows = [(f"mixed, {len(names)} adapters", mixed, ""),
            ("one adapter", one, f"mixed / one {mixed / one:.2f}x"),
            ("no adapter, pool loaded", base_in_pool, ""),
            ("engine without adapters", base_plain, f"pool / none {base_in_pool / base_plain:.2f}x")]
    for label, sec, note in rows:
        print(f"  {label:<26}{sec * 1e3:8.2f} ms   {note}")
    print(f"  {'memory per adapter slot':<26}{allocated / 2**20:8.2f} MiB allocated, "
          f"{planned / 2**20:.2f} MiB planned")  # fmt: skip
    assert allocated == planned
    return 0


if __name__ == "__main__":
    sys.exit(main())

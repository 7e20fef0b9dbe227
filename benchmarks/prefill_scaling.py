"""Prefill time against length on the XLA path: sliding layers grow linearly, full layers quadratically.

A small gpt-oss (hidden 256, 4 query heads over 2 kv heads of 64, 8 experts top-2, window 128) is built
twice with random weights: once with every layer sliding and once with every layer full, 2 layers each.
`model(tokens)` (float32 logits for every position) runs at 2k, 8k and 16k tokens; the attention of one
layer is also timed alone (`kernels.attention_xla`, the blocks a sliding layer visits bounded by the
window). Ideal growth from 2k: linear 4x at 8k and 8x at 16k, quadratic 16x and 64x.

    python benchmarks/prefill_scaling.py [--lengths 2048 8192 16384] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import Config
from gptoss_jax.kernels.attention import attention_xla
from gptoss_jax.model import Transformer


def config(kind: str) -> Config:
    return Config.tiny(num_hidden_layers=2, num_experts=8, experts_per_token=2, hidden_size=256,
                       intermediate_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=1024, sliding_window=128, dtype="float32", pad_token_id=1023,
                       eos_token_ids=(1022,), max_position_embeddings=32768,
                       layer_types=(f"{kind}_attention",) * 2)  # fmt: skip


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} "
          f"cores, jax {jax.__version__}, float32, XLA attention path")  # fmt: skip
    print(f"# python benchmarks/prefill_scaling.py --lengths {' '.join(map(str, args.lengths))} --reps {args.reps}")
    models = {k: Transformer(config(k), rngs=nnx.Rngs(0)) for k in ("sliding", "full")}
    cfg = models["full"].cfg
    K, G, H = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim
    rows = []
    for T in args.lengths:
        tokens = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        ks = jax.random.split(jax.random.key(T), 4)
        q = jax.random.normal(ks[0], (1, T, K, G, H))
        k, v = jax.random.normal(ks[1], (1, T, K, H)), jax.random.normal(ks[2], (1, T, K, H))
        sinks, pos = jax.random.normal(ks[3], (K, G)), jnp.arange(T, dtype=jnp.int32)[None]
        row = {"T": T}
        for kind, window in (("sliding", cfg.sliding_window), ("full", 0)):
            row[f"{kind} model"] = timed(models[kind], tokens, reps=args.reps)
            attn = jax.jit(lambda q, k, v, w=window: attention_xla(q, k, v, sinks, pos, pos, window=w,
                                                                   sm_scale=cfg.sm_scale, aligned=T))  # fmt: skip
            row[f"{kind} attention"] = timed(attn, q, k, v, reps=args.reps)
        rows.append(row)
        print(f"T={T}: " + ", ".join(f"{n} {s:.3f} s" for n, s in row.items() if n != "T"), flush=True)
    base = rows[0]
    print("\n| tokens | 2 sliding layers, model | x | 2 full layers, model | x | sliding attention, 1 layer | x "
          "| full attention, 1 layer | x |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[n]:.3f} s | {r[n] / base[n]:.1f}" for n in
                 ("sliding model", "full model", "sliding attention", "full attention")]  # fmt: skip
        print(f"| {r['T']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

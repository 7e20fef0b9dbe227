"""Prefill throughput against length on the XLA path: sliding layers grow linearly, full layers quadratically.

A tiny-dimension gpt-oss with the real attention (hidden 256, 4 query heads over 2 kv heads of 64, window 128,
sinks) and the real layer pattern (one sliding and one full layer), 8 experts top-2, vocab 1024, float32, with
random weights. At each length:

  prefill       `generate(prompt, max_new_tokens=1)`: the prompt in chunks of 512 (the default) into the KV
                cache, then the first token; reported as tokens per second
  sliding attn  one sliding layer's attention over the whole prompt alone (`kernels.attention_xla`, aligned:
                each block of queries visits only the keys inside its window): O(T x window)
  full attn     one full layer's attention alone: each block of queries visits only the key blocks up to
                its own position (the causal triangle): O(T^2 / 2)

Ideal growth from the first length: linear (x4 per 4x length) for sliding, quadratic (x16) for full.
Each figure is the best of `--reps` calls after a warm-up (1 call at 32k and beyond: the full layer's
quadratic prefill takes minutes there).

    python benchmarks/prefill_scaling.py [--lengths 2048 8192 32768 131072] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gptoss_jax  # noqa: E402
from benchmarks.cpu_vs_transformers import cpu_model  # noqa: E402
from gptoss_jax.config import Config  # noqa: E402
from gptoss_jax.kernels.attention import attention_xla  # noqa: E402
from gptoss_jax.model import Transformer  # noqa: E402


def config(context: int) -> Config:
    return Config.tiny(num_hidden_layers=2, num_experts=8, experts_per_token=2, hidden_size=256,
                       intermediate_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=1024, sliding_window=128, dtype="float32", pad_token_id=1023,
                       eos_token_ids=(1022,), max_position_embeddings=context,
                       layer_types=("sliding_attention", "full_attention"))  # fmt: skip


def best(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return min(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores")
    print(f"software  jax {jax.__version__}, python {platform.python_version()}")
    print(f"command   python {shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])}")
    cfg = config(max(args.lengths) + 16)
    print("model     hidden 256, 4 q / 2 kv heads x 64, window 128, layers (sliding, full), 8 experts top-2, "
          "float32, XLA path\n")  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    K, G, H = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim
    rows = []
    for T in args.lengths:
        reps = args.reps if T < 32768 else 1
        prompt = np.random.default_rng(T).integers(0, cfg.vocab_size - 2, T).tolist()
        row = {"T": T}
        row["prefill"] = best(lambda: gptoss_jax.generate(model, prompt, max_new_tokens=1, stop_tokens=()),
                              reps=reps)  # fmt: skip
        ks = jax.random.split(jax.random.key(T), 4)
        q = jax.random.normal(ks[0], (1, T, K, G, H))
        k, v = jax.random.normal(ks[1], (1, T, K, H)), jax.random.normal(ks[2], (1, T, K, H))
        sinks, pos = jax.random.normal(ks[3], (K, G)), jnp.arange(T, dtype=jnp.int32)[None]
        for kind, window in (("sliding", cfg.sliding_window), ("full", 0)):
            attn = jax.jit(lambda q, k, v, w=window: attention_xla(q, k, v, sinks, pos, pos, window=w,
                                                                   sm_scale=cfg.sm_scale, aligned=T))  # fmt: skip
            row[f"{kind} attn"] = best(attn, q, k, v, reps=reps)
        rows.append(row)
        print(f"T={T}: prefill {row['prefill']:.3f} s ({T / row['prefill']:.0f} tok/s), sliding attention "
              f"{row['sliding attn']:.3f} s, full attention {row['full attn']:.3f} s", flush=True)  # fmt: skip
    base = rows[0]
    print("\n| tokens | prefill (s) | tok/s | x | sliding attention, 1 layer (s) | x | full attention, 1 layer (s) | x |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r['prefill']:.3f} | {r['T'] / r['prefill']:.0f} | {r['prefill'] / base['prefill']:.1f}"]
        cells += [f"{r[n]:.3f} | {r[n] / base[n]:.1f}" for n in ("sliding attn", "full attn")]
        print(f"| {r['T']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

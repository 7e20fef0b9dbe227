"""Where gptoss-jax's CPU time goes, piece by piece, on the model of `benchmarks/cpu_vs_transformers.py`.

Backs the tables in docs/benchmarks.md ("Packed experts on CPU", "Why the forward target is missed"). Random
weights of that model's shape (4 layers, 32 experts top-4, hidden 512, width 512, 8 q / 2 kv heads, vocab
32000), float32, batch 1, `--tokens` tokens (default 512).

Measured (median of `--reps` calls after a warm-up; "fresh pages" = minor page faults per call, getrusage):
  dequantize one expert (mlp1, 1024 x 512), with its index a Python int (static) or a traced scalar (dynamic:
    XLA fuses the dynamic slice into the decode)
  the experts of one layer (`moe_experts_grouped`, sorted rows in tiles):
    packed, carried      - as shipped: the loop carries the next expert's packed bytes; one expert decoded at
                           a time
    packed, all first    - every expert of the layer decoded before the loop (the previous strategy)
    dequantized weights  - dense float32 experts as inputs (`expert_format="dequantized"`)
  one tile's first product (64 rows x 512 -> 1024), with the rows or the weight as the left operand
  one attention block (norm, projections, RoPE, sinks; layer 0 sliding window, layer 1 full causal)
  the unembedding (final hidden -> float32 logits for every position)
  the whole forward pass `model(tokens)`, packed and dequantized experts

Usage:  python benchmarks/cpu_profile.py [--tokens 512] [--reps 9]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(fn, args, reps: int) -> tuple[float, float]:
    """(median seconds, median MiB of freshly touched pages) per call of jitted `fn`."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times, faults = [], []
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        del out
    return float(np.median(times)), float(np.median(faults)) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.cpu_vs_transformers import bench_config, cpu_model
    from gptoss_jax import model as M
    from gptoss_jax.moe import moe_experts_grouped
    from gptoss_jax.mxfp4 import dequantize

    cfg = bench_config().replace(dtype="float32")
    T, D = args.tokens, cfg.hidden_size
    model = M.Transformer(cfg, rngs=nnx.Rngs(0))
    dense_model = M.Transformer(cfg.replace(expert_format="dequantized"), rngs=nnx.Rngs(0))
    p = M.layer_params(model, 0)["mlp"]
    x = jax.random.normal(jax.random.key(1), (T, D), jnp.float32)
    idx, w = M.route(x, p["gate_weight"], p["gate_bias"], cfg.experts_per_token)
    f32 = jnp.float32
    b, s = p["mlp1_blocks"], p["mlp1_scales"]
    tokens = jax.random.randint(jax.random.key(2), (1, T), 0, cfg.vocab_size)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    cos, sin = M.rope_cos_sin(pos, cfg, f32)

    def dense_of(p):
        return {k: v for k, v in p.items() if k.endswith("_bias")} | {
            f"{n}_weight": dequantize(p[f"{n}_blocks"], p[f"{n}_scales"], f32) for n in ("mlp1", "mlp2")
        }

    def block_fn(module, call):
        graphdef, state = nnx.split(module)
        return jax.jit(lambda state, *a: call(nnx.merge(graphdef, state), *a)), state

    kw = dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    grouped = jax.jit(lambda x, i, w, p: moe_experts_grouped(x, i, w, p, **kw))
    hp = jax.lax.Precision.HIGHEST
    tile, w1 = x[:64], dequantize(b[0], s[0], f32)
    def attn_fn(layer):
        window = cfg.sliding_window if cfg.sliding_layers[layer] else 0
        return jax.jit(lambda p, h: M.attention_layer(h, p, cos, sin, pos, window=window, cfg=cfg)[0]), \
            M.layer_params(model, layer)["attn"]

    attn0, st0 = attn_fn(0)
    attn1, st1 = attn_fn(1)
    unembed, stm = block_fn(model, lambda m, h: M.logits(m, h))
    rows = [
        ("dequantize 1 expert, static index", jax.jit(lambda b, s: dequantize(b[3], s[3], f32)), (b, s)),
        ("dequantize 1 expert, dynamic index",
         jax.jit(lambda b, s, e: dequantize(b[e], s[e], f32)), (b, s, 3)),
        ("experts of 1 layer, packed, carried (shipped)", grouped, (x, idx, w, p)),
        ("experts of 1 layer, packed, all first",
         jax.jit(lambda x, i, w, p: moe_experts_grouped(x, i, w, dense_of(p), **kw)), (x, idx, w, p)),
        ("experts of 1 layer, dequantized weights", grouped, (x, idx, w, jax.jit(dense_of)(p))),
        ("tile product, rows on the left (T,D)x(F,D)",
         jax.jit(lambda t, w: jnp.einsum("TD,FD->TF", t, w, precision=hp)), (tile, w1)),
        ("tile product, weight on the left (F,D)x(T,D)",
         jax.jit(lambda t, w: jnp.einsum("FD,TD->FT", w, t, precision=hp)), (tile, w1)),
        ("attention block, sliding window (layer 0)", attn0, (st0, x[None])),
        ("attention block, full causal (layer 1)", attn1, (st1, x[None])),
        ("unembedding, all positions", unembed, (stm, x[None])),
        ("whole forward, packed experts", model, (tokens,)),
        ("whole forward, dequantized experts", dense_model, (tokens,)),
    ]  # fmt: skip

    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores")
    print(f"software  jax {jax.__version__}, python {platform.python_version()}")
    print(f"command   python {shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])}")
    print(f"model     4 layers, {cfg.num_experts} experts top-{cfg.experts_per_token}, hidden {D}, width "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, float32, {T} tokens\n")  # fmt: skip
    print(f"| {'what':46s} | {'ms per call':>11s} | {'fresh pages (MiB)':>17s} |")
    print(f"|{'-' * 48}|{'-' * 13}|{'-' * 19}|")
    for name, fn, fargs in rows:
        t, mib = measure(fn, fargs, args.reps)
        print(f"| {name:46s} | {t * 1e3:11.2f} | {mib:17.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

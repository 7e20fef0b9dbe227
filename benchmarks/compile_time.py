"""Lower + compile time of one decode step and one 512-token prefill chunk of the 20b preset, by depth.

Weights are abstract (ShapeDtypeStructs: nothing is allocated), so this runs on a laptop CPU. The layers are
scanned over the (sliding, full) unit, so the compiled program is the same size at 4, 24 or 36 layers; the
issue's bound is 36 layers <= 1.3x 4 layers. Before the scan (layers unrolled in Python), the decode step
took 5.6 s / 16.6 s / 26.5 s at 4 / 24 / 36 layers on the development VM.

    python benchmarks/compile_time.py [--layers 4 24 36] [--reps 2]

Each figure is the best of `--reps` fresh compilations (JAX's in-memory cache is cleared between them, the
persistent cache is off).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from gptoss_jax.cache import KVCache
from gptoss_jax.config import Config
from gptoss_jax.generate import _decode_step, _prefill
from gptoss_jax.model import abstract_model
from gptoss_jax.sampling import SamplingParams, row_keys

CONTEXT = 4096
CHUNK = 512


def sds(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def lower_compile(fn, *args) -> tuple[float, float, int]:
    """(lower seconds, compile seconds, lines of the optimized HLO module: a size that timing noise on a
    shared machine cannot blur)."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, compiled.as_text().count("\n")


def measure(layers: int, reps: int) -> dict:
    cfg = Config.gpt_oss_20b(num_hidden_layers=layers)
    graphdef, state = nnx.split(abstract_model(cfg))
    state = sds(state)
    cache = KVCache.abstract(cfg, 1, CONTEXT)
    i32 = jnp.int32
    prefill_args = (graphdef, state, jax.ShapeDtypeStruct((1, CHUNK), i32), cache,
                    jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.float32), jax.ShapeDtypeStruct((1,), i32),
                    jax.ShapeDtypeStruct((1,), jnp.bool_))  # fmt: skip
    sp = sds(SamplingParams.create(1))
    decode_args = (graphdef, state, jax.ShapeDtypeStruct((1,), i32), cache, sds(row_keys(0, 1)),
                   jax.ShapeDtypeStruct((), i32), None, sp, True)  # fmt: skip
    out = {}
    for name, fn, args in (("decode", _decode_step, decode_args), ("prefill", _prefill, prefill_args)):
        best = None
        for _ in range(reps):
            jax.clear_caches()
            t = lower_compile(fn, *args)
            best = t if best is None or sum(t[:2]) < sum(best[:2]) else best
        out[name] = best
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 24, 36])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    jax.config.update("jax_compilation_cache_dir", None)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}, 20b preset, abstract weights")  # fmt: skip
    print(f"# python benchmarks/compile_time.py --layers {' '.join(map(str, args.layers))} --reps {args.reps}")
    print("| layers | decode: lower + compile (s) | HLO lines | prefill 512: lower + compile (s) | HLO lines |")
    print("|---:|---|---:|---|---:|")
    first = None
    for n in args.layers:
        r = measure(n, args.reps)
        d, p = sum(r["decode"][:2]), sum(r["prefill"][:2])
        first = first or (d, p)
        print(f"| {n} | {r['decode'][0]:.2f} + {r['decode'][1]:.2f} = {d:.2f} ({d / first[0]:.2f}x) | "
              f"{r['decode'][2]} | {r['prefill'][0]:.2f} + {r['prefill'][1]:.2f} = {p:.2f} ({p / first[1]:.2f}x) | "
              f"{r['prefill'][2]} |", flush=True)


if __name__ == "__main__":
    main()

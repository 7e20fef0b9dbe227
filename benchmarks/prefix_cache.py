"""Serving at real lengths: the prefix cache and the page pool, on the mid-size CPU checkpoint
(benchmarks/cpu_vs_transformers.py `bench_config()`: 4 layers, 32 experts top-4, hidden 512, window 128).

Measured (float32, packed MXFP4 experts, greedy, the model's full 131k context):
  agent   - an agent-shaped trace: every request starts with the same 10k tokens (instructions and tool
            schemas). Turn 1 is that prefix and a user message; the model answers (64 tokens: its
            reasoning). Turn 2 resends turn 1's prompt and a final answer in place of the reasoning
            (harmony drops an earlier turn's analysis), then a new message: it matches turn 1 up to turn 1's
            prompt end, then differs. Turn 2's time to first token hitting the cache against the same prompt
            prefilled cold (reuse=False). Target: >= 10x lower.
  shared  - 8 conversations with a 4k-token common system-and-tools prefix arriving together: prompt tokens
            computed against the unique tokens. Target: <= 1.2x.
  mixed   - 15 rows near 1k tokens and one at 32k decoding together: the step time (each row's inter-token
            latency) against the same 15 rows once the long one is gone. Target: <= 1.5x. Also the 32k
            prompt's prefill time.
  shapes  - the programs the engine compiles with its default buckets at 8k and 131k context (the page
            tables are data); with --default-warmup, the warm-up time of `Engine(model)` as
            `gptoss-jax serve` builds it (default flags: every reachable shape).

Usage:  python benchmarks/prefix_cache.py [--ckpt DIR] [--reps 3] [--quick] [--default-warmup]
(--quick divides every length by 8: to check the script, not for figures.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def median(xs):
    return statistics.median(xs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse (or create) the checkpoint in this folder")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the agent trace (median reported)")
    ap.add_argument("--quick", action="store_true", help="every length / 8: checks the script runs")
    ap.add_argument("--default-warmup", action="store_true", help="also time Engine(model).warmup()")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from cpu_vs_transformers import bench_config, cpu_model

    import gptoss_jax
    from gptoss_jax.checkpoint.synthetic import write_checkpoint
    from gptoss_jax.engine import Engine
    from gptoss_jax.engine.scheduler import Scheduler

    scale = 8 if args.quick else 1
    cfg = bench_config()
    tmp = None
    if args.ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptoss_prefix_")
        args.ckpt = Path(tmp.name) / "ckpt"
    if not (args.ckpt / "config.json").exists():
        print(f"writing the checkpoint to {args.ckpt} ...", flush=True)
        write_checkpoint(args.ckpt, cfg, layout="hf", seed=0)
    model = gptoss_jax.load(args.ckpt, dtype="float32", quiet=True)
    rng = np.random.default_rng(0)
    V = cfg.vocab_size
    toks = lambda n: rng.integers(0, V, n).tolist()  # noqa: E731
    engine = Engine(model, max_seqs=16, chunk=512, seq_buckets=(1, 2, 8, 16), token_buckets=(64, 128, 512),
                    detokenize=False)  # fmt: skip
    print(f"engine warm-up: {len(engine.scheduler.shapes())} shapes, pool {engine.plan['num_pages']} pages "
          f"({engine.plan['bytes_per_device'] / 2**30:.2f} GiB) ...", flush=True)  # fmt: skip
    warm = engine.warmup()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, d, **kw: compiles.append(d) if ev == "/jax/core/compile/backend_compile_duration" else None
    )

    # ------------------------------------------------------------------------------------------ agent
    print("agent trace ...", flush=True)
    prefix = toks(10_000 // scale)
    agent = {"hit": [], "cold": [], "turn1": []}
    for rep in range(args.reps):
        turn1 = prefix + toks(50)
        r1 = engine.generate([turn1], max_tokens=64, stop_token_ids=())[0]
        turn2 = turn1 + toks(40) + toks(60)  # the final answer instead of the reasoning, then a new message
        hit = engine.generate([turn2], max_tokens=1, stop_token_ids=())[0]
        cold = engine.generate([turn2], max_tokens=1, stop_token_ids=(), reuse=False)[0]
        assert hit.tokens == cold.tokens
        agent["turn1"].append((r1.ttft, r1.cached_tokens))
        agent["hit"].append((hit.ttft, hit.cached_tokens, len(turn2)))
        agent["cold"].append(cold.ttft)

    # ----------------------------------------------------------------------------------------- shared
    print("8 conversations sharing a prefix ...", flush=True)
    common = toks(4096 // scale)
    own = [toks(200 // scale) for _ in range(8)]
    m0 = engine.metrics()
    results = engine.generate([common + o for o in own], max_tokens=8, stop_token_ids=())
    m1 = engine.metrics()
    computed = m1.prefill_tokens - m0.prefill_tokens
    unique = len(common) + sum(map(len, own))
    shared = (computed, unique, [r.cached_tokens for r in results], [r.ttft for r in results])

    # ------------------------------------------------------------------------------------------ mixed
    print("15 rows near 1k and one at 32k ...", flush=True)
    short = [toks(int(n)) for n in rng.integers(950 // scale, 1050 // scale, 15)]
    long_prompt = toks(32_768 // scale)
    t0 = time.perf_counter()
    long_h = engine.submit(long_prompt, max_tokens=100_000, stop_token_ids=(), reuse=False)
    while not long_h._seq.generated:
        engine.step()
    long_prefill = time.perf_counter() - t0
    hs = [engine.submit(p, max_tokens=100_000, stop_token_ids=(), reuse=False) for p in short]

    def steps(n_rows, n):
        out = []
        while len(out) < n:
            m0 = engine.metrics()
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            m1 = engine.metrics()
            if m1.decode_tokens - m0.decode_tokens == n_rows and m1.prefill_tokens == m0.prefill_tokens:
                out.append(dt)
        return out

    n_steps = 40 if not args.quick else 8
    with_long = steps(16, n_steps)
    long_h.cancel()
    engine.step()
    without = steps(15, n_steps)
    for h in hs:
        h.cancel()
    engine.step()
    mixed = (median(with_long), median(without), long_prefill)
    after = len(compiles)

    # ----------------------------------------------------------------------------------------- shapes
    def shape_count(context):
        return len(Scheduler(lanes=1, slots=16, pages=64, page_size=16, max_context=context, chunk=512,
                             budget=512, kinds=tuple(cfg.layer_unit), window=cfg.sliding_window,
                             vocab_size=V, eos=(), prefix_cache=True, max_top=20).shapes())  # fmt: skip

    shapes = (shape_count(8192), shape_count(cfg.context_length))
    default_warm = None
    if args.default_warmup:
        print("Engine(model).warmup() with default settings ...", flush=True)
        engine.close()
        default = Engine(model, detokenize=False)
        default_warm = (len(default.scheduler.shapes()), default.warmup())
        default.close()

    # ----------------------------------------------------------------------------------------- report
    print()
    print(f"date      {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores")
    print(f"software  jax {jax.__version__}, python {platform.python_version()}")
    print(f"command   python {os.path.relpath(__file__, ROOT)} {' '.join(argv or sys.argv[1:])}")
    print(f"load avg  {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min; a busy machine slows everything)")
    print("model     bench_config(): 4 layers, 32 experts top-4, hidden 512, window 128, float32, packed experts")
    print(f"engine    16 sequences, context {engine.scheduler.max_context}, pages of 16 tokens, pool "
          f"{engine.plan['num_pages']} pages ({engine.plan['bytes_per_device'] / 2**30:.2f} GiB, the CPU "
          f"default); warm-up {warm:.1f} s for {len(engine.scheduler.shapes())} shapes; compiles after warm-up: "
          f"{after}")  # fmt: skip
    if args.quick:
        print("QUICK RUN (lengths / 8): not figures")
    print()
    t_hit = median(t for t, _, _ in agent["hit"])
    t_cold = median(agent["cold"])
    _, cached, n2 = agent["hit"][-1]
    print(f"agent trace: {len(prefix)}-token shared prefix, turn 2 drops turn 1's reasoning ({args.reps} reps):")
    print(f"  turn 2 TTFT {1e3 * t_hit:.0f} ms hitting the cache ({cached} of {n2} prompt tokens reused) vs "
          f"{1e3 * t_cold:.0f} ms cold = {t_cold / t_hit:.1f}x lower (target >= 10)")  # fmt: skip
    t1 = ", ".join(f"{1e3 * t:.0f} ms ({c} cached)" for t, c in agent["turn1"])
    print(f"  turn 1 TTFT per rep: {t1}")
    print()
    computed, unique, cached, ttft = shared
    print(f"8 conversations, {len(common)}-token common prefix, arriving together:")
    print(f"  prompt tokens computed {computed} vs unique {unique} = {computed / unique:.3f}x (target <= 1.2); "
          f"cached per request {cached}; TTFT {min(ttft):.1f}..{max(ttft):.1f} s")  # fmt: skip
    print()
    w, wo, pre = mixed
    print(f"mixed batch: 15 rows near {950 // scale}..{1050 // scale} tokens and one at {len(long_prompt)}:")
    print(f"  step (inter-token latency) with the long row {1e3 * w:.1f} ms, without {1e3 * wo:.1f} ms = "
          f"{w / wo:.2f}x (target <= 1.5); the long prompt's prefill {pre:.1f} s")  # fmt: skip
    print()
    print(f"compiled shapes with the default buckets: {shapes[0]} at 8k context, {shapes[1]} at "
          f"{cfg.context_length}")  # fmt: skip
    if default_warm is not None:
        print(f"  Engine(model) with default settings: {default_warm[0]} shapes compiled in {default_warm[1]:.1f} s "
              f"(compilation cache off)")  # fmt: skip
    else:
        engine.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

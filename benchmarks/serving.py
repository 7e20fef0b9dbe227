"""The serving engine on the mid-size CPU checkpoint (benchmarks/cpu_vs_transformers.py `bench_config()`).
(The HTTP server under concurrent streaming clients: benchmarks/serve_load.py.)

Measured (float32, packed MXFP4 experts, greedy):
  throughput - aggregate decode tokens/s of 16 sequences decoding together in the engine (steps that
               decode 16 rows and prefill nothing), against a static batch of the same 16 prompts through
               `gptoss_jax.generate` and one sequence through it ((t(1 + N tokens) - t(1 token)) / N), and
               against transformers' continuous batching (`generate_batch`, same subtraction). Sides are
               interleaved: each repetition runs every one in turn.
  ceiling    - where the engine's decode step goes: the jitted call alone (device), the host's share
               (planning, transfers, commit), against `generate`'s on-device loop step.
  no stall   - 8 sequences decode; a 4k-token prompt arrives; their inter-token latency while it is
               prefilled (p99) against the steady state before it arrived (p99).
  memory     - 16 sequences of 200..2000 tokens decoding together: KV bytes their pages hold (full pages,
               and the sliding pages their windows cover) against what their lengths need (full layers:
               every token; sliding layers: min(length, window) tokens).
  reuse      - a 2k-token conversation's second turn: time to first token hitting the prefix cache (the
               first turn's pages) against a cold start (reuse=False), and the tokens prefilled.
The engine is warmed up first (every bucket compiled: the time is printed); nothing compiles after.

Each repetition's throughput is printed too: on a shared host a whole stretch of seconds can run at half
speed (batch-1 decoding suffers most), and the spread shows it.

Usage:  python benchmarks/serving.py [--ckpt DIR] [--reps 3] [--new 64] [--budget 128] [--no-hf]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

HF_PINNED = "5.24.0"  # the transformers whose generate_batch these figures compare against


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def pct(xs, q):
    return float(statistics.quantiles(xs, n=100, method="inclusive")[q - 1]) if len(xs) > 1 else float(xs[0])


def run_engine(engine, prompts, **opts):
    """Steps until every prompt finishes -> (results, [(step seconds, decode rows, prefill tokens)])."""
    handles = [engine.submit(p, **opts) for p in prompts]
    steps = []
    while not all(h.done for h in handles):
        m0 = engine.metrics()
        dt, _ = timed(engine.step)
        m1 = engine.metrics()
        steps.append((dt, m1.decode_tokens - m0.decode_tokens, m1.prefill_tokens - m0.prefill_tokens,
                      engine.last_step[1]))  # fmt: skip
    return [h.result() for h in handles], steps


def hf_runner(ckpt, threads):
    import torch
    import transformers
    from transformers import GenerationConfig, GptOssForCausalLM, Mxfp4Config
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.utils import logging

    if transformers.__version__ != HF_PINNED:
        print(f"warning: transformers {transformers.__version__}, the figures were taken with {HF_PINNED}")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    import logging as pylogging

    # it warns that eos_token_id is not set: on purpose, every sequence decodes its N tokens
    pylogging.getLogger("ContinuousBatchingLogger").setLevel(pylogging.ERROR)
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM.from_pretrained(
            str(ckpt), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32,
            attn_implementation="eager").eval()  # fmt: skip

    def gen(prompts, n):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)  # fmt: skip
        cb = ContinuousBatchingConfig(num_blocks=256, max_batch_tokens=512)
        with torch.inference_mode():
            out = model.generate_batch(prompts, generation_config=cfg, continuous_batching_config=cb)
        return [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.split("_")[1]))]

    return gen, f"transformers {transformers.__version__} generate_batch (eager, dequantized f32)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse (or create) the checkpoint in this folder")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions, median reported (default 3)")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens timed per sequence (default 64)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length of the throughput run (default 32)")
    ap.add_argument("--budget", type=int, default=64,
                    help="engine: prefill tokens per step while sequences decode (default 64)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cores)")
    ap.add_argument("--expert-format", choices=("mxfp4", "dequantized"), default="mxfp4",
                    help="our experts: packed MXFP4 (default) or dense float32 like transformers' on CPU")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from cpu_vs_transformers import bench_config, cpu_model

    import gptoss_jax
    from gptoss_jax.checkpoint.synthetic import write_checkpoint
    from gptoss_jax.engine import Engine
    from gptoss_jax.engine.paged import token_bytes

    cfg = bench_config()
    tmp = None
    if args.ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptoss_serving_")
        args.ckpt = Path(tmp.name) / "ckpt"
    if not (args.ckpt / "config.json").exists():
        print(f"writing the checkpoint to {args.ckpt} ...", flush=True)
        write_checkpoint(args.ckpt, cfg, layout="hf", seed=0)
    model = gptoss_jax.load(args.ckpt, dtype="float32", quiet=True, expert_format=args.expert_format)
    rng = np.random.default_rng(0)
    V, N = cfg.vocab_size, args.new
    max_context = 4096 + 256
    engine = Engine(model, max_seqs=16, max_context=max_context, page_size=16, chunk=512, budget=args.budget,
                    seq_buckets=(1, 8, 16), token_buckets=(args.budget, 512), detokenize=False)  # fmt: skip
    print(f"engine warm-up: {len(engine.scheduler.shapes())} shapes ...", flush=True)
    warm = engine.warmup()
    print(f"  {warm:.1f} s", flush=True)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, d, **kw: compiles.append(d) if ev == "/jax/core/compile/backend_compile_duration" else None
    )

    # ------------------------------------------------------------------------------------- throughput
    prompts = [rng.integers(0, V, args.prompt).tolist() for _ in range(16)]
    gen16 = lambda n: gptoss_jax.generate(model, prompts, max_new_tokens=n, stop_tokens=())
    gen1 = lambda n: gptoss_jax.generate(model, prompts[:1], max_new_tokens=n, stop_tokens=())
    for f in (gen16, gen1):
        f(1), f(N + 1)  # compile
    hf = hf_runner(args.ckpt, args.threads) if not args.no_hf else None
    if hf:
        hf[0](prompts[:2], 2)
    times = {k: [] for k in ("engine", "static16", "one", "hf")}
    device_step = []
    want = gen16(N + 1)
    n_before = len(compiles)
    for rep in range(args.reps):
        print(f"throughput repetition {rep + 1}/{args.reps} ...", flush=True)
        results, steps = run_engine(engine, prompts, max_tokens=N + 1, stop_token_ids=(), reuse=False)
        assert [r.tokens for r in results] == want, "engine tokens differ from generate's"
        full = [(dt, dev) for dt, dec, pre, dev in steps if dec == 16 and pre == 0]
        times["engine"].append(16 / statistics.median(dt for dt, _ in full))
        device_step.append(statistics.median(dev for _, dev in full))
        for key, f, b in (("static16", gen16, 16), ("one", gen1, 1)):
            t1, _ = timed(lambda f=f: f(1))
            tn, _ = timed(lambda f=f: f(N + 1))
            times[key].append(b * N / (tn - t1))
        if hf:
            t1, _ = timed(lambda: hf[0](prompts, 1))
            tn, out = timed(lambda: hf[0](prompts, N + 1))
            times["hf"].append(16 * N / (tn - t1))
            same = sum(a == b for a, b in zip(out, want))
    tps = {k: statistics.median(v) for k, v in times.items() if v}

    # -------------------------------------------------------------------------------------- no stall
    print("no-stall run ...", flush=True)
    dec = [rng.integers(0, V, args.prompt).tolist() for _ in range(8)]
    long_prompt = rng.integers(0, V, 4096).tolist()
    handles = [engine.submit(p, max_tokens=10_000 // 8, stop_token_ids=(), reuse=False) for p in dec]
    stamps = [[] for _ in handles]
    seen = [0] * len(handles)
    arrival = big = None
    step = 0
    while True:
        engine.step()
        now = time.perf_counter()
        for i, h in enumerate(handles):
            n = len(h._seq.generated)
            if n > seen[i]:
                stamps[i].append(now)
                seen[i] = n
        step += 1
        if step == 40:
            arrival = now
            big = engine.submit(long_prompt, max_tokens=2, stop_token_ids=(), reuse=False)
        if big is not None and big.done:
            done_at = now
            break
    for h in handles:
        h.cancel()
    engine.step()
    steady = [b - a for s in stamps for a, b in itertools.pairwise(s) if b < arrival and a > stamps[0][5]]
    during = [b - a for s in stamps for a, b in itertools.pairwise(s) if a >= arrival and b <= done_at]
    stall = (pct(steady, 99), pct(during, 99), big.result().ttft, pct(steady, 50), pct(during, 50))

    # ---------------------------------------------------------------------------------------- memory
    print("memory run ...", flush=True)
    lengths = np.linspace(200, 2000, 16).astype(int).tolist()
    rng.shuffle(lengths)
    handles = [engine.submit(rng.integers(0, V, n).tolist(), max_tokens=1000, stop_token_ids=(), reuse=False)
               for n in lengths]  # fmt: skip
    while not all(h._seq.generated for h in handles):
        engine.step()
    m = engine.metrics()
    full_tok, ring_tok = token_bytes(model.cfg)
    held_lengths = [h._seq.length for h in handles]
    need = sum(n * full_tok + min(n, cfg.sliding_window) * ring_tok for n in held_lengths)
    memory = (m.pages_used * engine.plan["page_bytes"], need, m.pages_used, sum(held_lengths))
    for h in handles:
        h.cancel()
    engine.step()

    # ----------------------------------------------------------------------------------------- reuse
    print("reuse run ...", flush=True)
    ttft = {"reuse": [], "cold": []}
    prefilled = {}
    turn1 = rng.integers(0, V, 2000).tolist()
    for rep in range(args.reps):
        first = engine.generate([turn1], max_tokens=32, stop_token_ids=())[0]
        turn2 = turn1 + first.tokens + rng.integers(0, V, 24).tolist()
        for key, reuse in (("reuse", True), ("cold", False)):
            m0 = engine.metrics()
            r = engine.generate([turn2], max_tokens=4, stop_token_ids=(), reuse=reuse)[0]
            ttft[key].append(r.ttft)
            fed = engine.metrics().prefill_tokens - m0.prefill_tokens
            prefilled[key] = (fed, r.cached_tokens, len(turn2))
    after = len(compiles) - n_before

    # ------------------------------------------------------------------------------------------ report
    print()
    print(f"date      {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores")
    print(f"software  jax {jax.__version__}, python {platform.python_version()}"
          + (f", {hf[1]}" if hf else ""))  # fmt: skip
    print(f"command   python {os.path.relpath(__file__, ROOT)} {' '.join(argv or sys.argv[1:])}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load avg  {load} (1/5/15 min; a busy machine slows everything)")
    experts = "packed MXFP4" if args.expert_format == "mxfp4" else "dequantized float32"
    print(f"model     bench_config(): 4 layers, 32 experts top-4, hidden 512, vocab 32000, float32, "
          f"{experts} experts")  # fmt: skip
    print(f"engine    16 slots, pages of 16 tokens, prefill {args.budget} tokens/step while decoding (else "
          f"512); warm-up {warm:.1f} s for {len(engine.scheduler.shapes())} shapes; compiles after warm-up: "
          f"{after}")  # fmt: skip
    print()
    print(f"decode throughput, {args.prompt}-token prompts, {N} tokens each (median of {args.reps}):")
    print(f"  engine, 16 concurrent sequences     {tps['engine']:7.1f} tok/s")
    print(f"  generate, static batch of 16        {tps['static16']:7.1f} tok/s   engine / static = "
          f"{tps['engine'] / tps['static16']:.2f}x (target >= 0.9)")
    print(f"  generate, 1 sequence                {tps['one']:7.1f} tok/s   engine / one = "
          f"{tps['engine'] / tps['one']:.2f}x (target >= 2.5; ceiling ~3.8)")
    if hf:
        print(f"  transformers generate_batch, 16     {tps['hf']:7.1f} tok/s   engine / transformers = "
              f"{tps['engine'] / tps['hf']:.2f}x; greedy tokens equal: {same}/16 sequences")
    sides = [k for k in ("engine", "static16", "one", "hf") if times[k]]
    spread = "; ".join(f"{k} " + " ".join(f"{v:.1f}" for v in times[k]) for k in sides)
    print(f"  each repetition (tok/s): {spread}")
    full_step = 16 / tps["engine"]
    dev = statistics.median(device_step)
    print(f"  engine step {1e3 * full_step:.1f} ms = jitted call and transfers {1e3 * dev:.1f} ms + host "
          f"{1e3 * (full_step - dev):.1f} ms; generate's loop step "
          f"{1e3 * 16 / tps['static16']:.1f} ms")  # fmt: skip
    print()
    print(f"no stall: 8 sequences decoding, a 4096-token prompt arrives ({args.budget} tokens/step):")
    print(f"  inter-token p99 steady {1e3 * stall[0]:.1f} ms, while prefilling {1e3 * stall[1]:.1f} ms "
          f"= {stall[1] / stall[0]:.2f}x (target <= 3); p50 {1e3 * stall[3]:.1f} -> {1e3 * stall[4]:.1f} ms "
          f"({stall[4] / stall[3]:.2f}x); the long prompt's TTFT {stall[2]:.1f} s")
    print()
    print(f"memory: 16 sequences of {min(lengths)}..{max(lengths)} tokens ({memory[3]} tokens held):")
    print(f"  KV held {memory[0] / 2**20:.2f} MiB ({memory[2]} pages, full and sliding) vs needed "
          f"{memory[1] / 2**20:.2f} MiB "
          f"= {memory[0] / memory[1]:.3f}x (target <= 1.1)")
    print()
    print("reuse: second turn of a 2000-token conversation (+ 32 generated + 24 new tokens), prefix cache:")
    t_r, t_c = statistics.median(ttft["reuse"]), statistics.median(ttft["cold"])
    re_fed, re_cached, re_len = prefilled["reuse"]
    print(f"  TTFT reusing {t_r * 1e3:.0f} ms (prefilled {re_fed} of {re_len} tokens, "
          f"{re_cached} cached) vs cold {t_c * 1e3:.0f} ms (prefilled {prefilled['cold'][0]}) "
          f"= {t_c / t_r:.1f}x lower (target >= 5)")  # fmt: skip
    engine.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark: gpt-oss-20b / 120b shapes, random weights, MXFP4 experts kept packed, XLA vs Pallas kernels.

Nothing is downloaded: the weights are random (drawn on the device, leaf by leaf, in their final dtypes, so a
120b model needs no host copy). Speed does not depend on the values, except through routing, which random
router weights spread over the experts about evenly (as a trained router does on average).

Measured, for each model and each implementation (`--impl xla pallas`, the config fields attention_impl
and moe_impl together):
  decode   - batch-1 greedy tokens/s after a `--context`-token prompt: (time of 1 + N new tokens - time of 1
             new token) / N with `gptoss_jax.generate` (KV cache, jitted on-device loop), prefill excluded.
  prefill  - tokens/s of `generate(prompt, max_new_tokens=1)` at each `--prefill` length (4096, 32768):
             chunked prefill into the KV cache (`--chunk` tokens a call) plus the first sample.
  memory   - the device's peak bytes in use (jax memory_stats) over the whole run of that implementation.
  roofline - decode: bytes a token must read (non-expert weights, top-k experts' packed blocks and scales,
             the KV cache at that context) x tokens/s, against `--bw` (H100 SXM HBM3 ~3.0 TB/s usable);
             prefill: model FLOPs (2 x active params per token + attention QK and PV over the visible keys)
             x tokens/s, against `--flops` (790 TFLOP/s dense bf16, the figure the project uses for H100).
  peer     - `--peer`: Hugging Face transformers' GptOssForCausalLM from the same config, random init, bf16
             on cuda (its MXFP4 path needs the `kernels` package; otherwise dequantized bf16 experts, which
             fit for 20b but not for 120b: reported as "did not run" with the reason).
Each figure is the median of `--reps` timed runs after a warm-up run (compilation excluded).

Usage on a GPU machine (see docs/kernels.md):
    python benchmarks/gpu_bench.py --models 20b 120b --impl xla pallas --peer --out bench.json
Check on any machine (tiny shapes, CPU is fine; Pallas runs in interpret mode there):
    python benchmarks/gpu_bench.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import resource
import shlex
import statistics
import sys
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

import gptoss_jax
from gptoss_jax.config import Config
from gptoss_jax.cache import cache_bytes
from gptoss_jax.model import abstract_model

H100_BW = 3.0e12  # bytes/s
H100_BF16_FLOPS = 790e12  # FLOP/s, dense


# --------------------------------------------------------------------------------------------- the models
def make_config(name: str, impl: str, chunk: int) -> Config:
    kw = {"attention_impl": impl, "moe_impl": impl, "prefill_chunk": chunk, "dtype": "bfloat16",
          "expert_format": "mxfp4"}
    if name == "20b":
        return Config.gpt_oss_20b(**kw)
    if name == "120b":
        return Config.gpt_oss_120b(**kw)
    if name == "smoke":  # gpt-oss proportions at toy size: 2 layers (sliding, full), window 16
        return Config.tiny(num_hidden_layers=2, vocab_size=512, sliding_window=16, **kw)
    raise ValueError(f"--models: unknown model {name!r}; expected 20b, 120b or smoke")


def _kind(name: str) -> str:
    for suffix in ("_blocks", "_scales", "sinks", "norm.scale"):
        if name.endswith(suffix):
            return suffix
    return "normal"


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fill(key, kind: str, shape: tuple, dtype):
    if kind == "_blocks":  # any byte is two valid fp4 codes
        return jax.random.bits(key, shape, jnp.uint8)
    if kind == "_scales":  # 2**-9 .. 2**-6: O(1) activations through the random experts
        return (118 + jax.random.randint(key, shape, 0, 4)).astype(jnp.uint8)
    if kind == "sinks":
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)
    if kind == "norm.scale":
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg: Config, seed: int = 0) -> gptoss_jax.Transformer:
    """The model with random weights made on the device in their own dtypes: one jitted fill per leaf
    (compiled once per distinct shape), so no host copy and no float32 copy of the packed experts."""
    graphdef, state = nnx.split(abstract_model(cfg))
    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        sds = var.get_value()
        kind = _kind(".".join(map(str, path)))
        value = _fill(jax.random.fold_in(key, i), kind, tuple(sds.shape), sds.dtype)
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def with_impl(model: gptoss_jax.Transformer, cfg: Config) -> gptoss_jax.Transformer:
    """The same weights (no copy) under another config, e.g. another attention_impl / moe_impl."""
    _, state = nnx.split(model)
    graphdef, _ = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, state)


def check_against_xla(model: gptoss_jax.Transformer, length: int) -> dict:
    """Logits of `model` vs the XLA path on the same weights: validation before trusting any timing."""
    ref = with_impl(model, model.cfg.replace(attention_impl="xla", moe_impl="xla"))
    tokens = np.asarray([prompt_tokens(model.cfg, length, seed=7)], np.int32)
    got, want = np.asarray(model(tokens)), np.asarray(ref(tokens))
    return {"length": length, "max_abs_diff": float(np.abs(got - want).max()),
            "max_abs_ref": float(np.abs(want).max()),
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean())}  # fmt: skip


# ----------------------------------------------------------------------------------------- accounting
def weight_bytes(cfg: Config) -> tuple[int, int]:
    """(non-expert bytes, expert bytes) of the parameters as the model stores them."""
    from gptoss_jax.weights import param_bytes

    experts = param_bytes(cfg, experts_only=True)
    return param_bytes(cfg) - experts, experts


def decode_bytes_per_token(cfg: Config, context: int) -> float:
    """Bytes one batch-1 decode step must read: everything but the unused experts, plus the KV cache.
    (The embedding row is one row, but the unembedding is read whole; we count both matrices whole: the
    embedding is then a ~2% overestimate of the 20b traffic.)"""
    dense, experts = weight_bytes(cfg)
    active = experts * cfg.experts_per_token / cfg.num_experts
    return dense + active + cache_bytes(cfg, 1, context)


def active_params(cfg: Config) -> float:
    """Parameters one token multiplies (per-token FLOPs / 2), without the embedding lookup."""
    D, F, E, X = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * (N + 2 * K) * H + N * H * D
    moe = D * E + X * (D * 2 * F + F * D)
    return cfg.num_hidden_layers * (attn + moe) + cfg.vocab_size * D


def prefill_flops(cfg: Config, length: int) -> float:
    """Model FLOPs of a prefill of `length` tokens (logits for the last token only, as generate computes)."""
    N, H = cfg.num_attention_heads, cfg.head_dim
    unembed = cfg.vocab_size * cfg.hidden_size
    linear = 2 * (active_params(cfg) - unembed) * length + 2 * unembed
    attn = 0.0
    for sliding in cfg.sliding_layers:
        w = cfg.sliding_window if sliding else length
        # visible keys summed over queries: the causal triangle, capped at the window
        keys = length * (length + 1) / 2 if w >= length else w * (w + 1) / 2 + (length - w) * w
        attn += 4 * N * H * keys  # QK^T and PV, 2 FLOPs a multiply-add each
    return linear + attn


# --------------------------------------------------------------------------------------------- timing
def error_line(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def median_time(fn, reps: int) -> float:
    fn()  # warm-up: compiles
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory() -> tuple[int | None, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS (no device memory stats)"


def prompt_tokens(cfg: Config, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(cfg.vocab_size, 199_000), size=n).tolist()


def bench_ours(base: gptoss_jax.Transformer, name: str, impl: str, args) -> dict:
    cfg = make_config(name, impl, args.chunk)
    model = with_impl(base, cfg)
    res = dict(model=name, impl=impl)
    if args.check and impl != "xla":
        res["check"] = check_against_xla(model, args.check)
    gen = dict(temperature=0.0, stop_tokens=())

    prompt = prompt_tokens(cfg, args.context)
    t1 = median_time(lambda: gptoss_jax.generate(model, prompt, max_new_tokens=1, **gen), args.reps)
    tn = median_time(lambda: gptoss_jax.generate(model, prompt, max_new_tokens=1 + args.new, **gen), args.reps)
    tok_s = args.new / max(tn - t1, 1e-9)
    bpt = decode_bytes_per_token(cfg, args.context + args.new)
    res["decode"] = dict(context=args.context, new_tokens=args.new, tok_s=round(tok_s, 2),
                         bytes_per_token=int(bpt), achieved_bw_TBs=round(bpt * tok_s / 1e12, 4),
                         bw_fraction=round(bpt * tok_s / args.bw, 4))  # fmt: skip
    res["prefill"] = []
    for length in args.prefill:
        try:
            p = prompt_tokens(cfg, length, seed=length)
            t = median_time(lambda p=p: gptoss_jax.generate(model, p, max_new_tokens=1, **gen), args.reps)
            fl = prefill_flops(cfg, length)
            res["prefill"].append({"length": length, "tok_s": round(length / t, 1), "seconds": round(t, 4),
                                   "tflops": round(fl / t / 1e12, 3),
                                   "flops_fraction": round(fl / t / args.flops, 4)})  # fmt: skip
        except Exception as e:  # e.g. out of memory at 32k on the XLA path: report, keep going
            res["prefill"].append({"length": length, "error": error_line(e)})
    res["peak_memory_bytes"], res["peak_memory_source"] = peak_memory()
    return res


def bench_transformers(name: str, args) -> dict:
    """Hugging Face transformers from the same config, random init; decode and prefill as above."""
    res = dict(model=name, impl="transformers")
    try:
        import torch
        from transformers import GptOssConfig, GptOssForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = make_config(name, "xla", args.chunk)
        hf_cfg = {k: v for k, v in cfg.to_hf_config().items() if k != "quantization_config"}
        # eager attention is the path that applies the sinks on every device; bf16 dense experts
        model = GptOssForCausalLM(GptOssConfig(**hf_cfg, attn_implementation="eager")).to(torch.bfloat16)
        model = model.to(device).eval()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def gen(ids, n):
            with torch.no_grad():
                gptoss_jax.generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)  # fmt: skip
            sync()

        ids = torch.tensor([prompt_tokens(cfg, args.context)], device=device)
        t1 = median_time(lambda: gen(ids, 1), args.reps)
        tn = median_time(lambda: gen(ids, 1 + args.new), args.reps)
        tok_s = args.new / max(tn - t1, 1e-9)
        res["decode"] = {"context": args.context, "new_tokens": args.new, "tok_s": round(tok_s, 2)}
        res["prefill"] = []
        for length in args.prefill:
            try:
                ids = torch.tensor([prompt_tokens(cfg, length, seed=length)], device=device)
                t = median_time(lambda ids=ids: gen(ids, 1), args.reps)
                res["prefill"].append(dict(length=length, tok_s=round(length / t, 1), seconds=round(t, 4)))
            except Exception as e:
                res["prefill"].append({"length": length, "error": error_line(e)})
        if device == "cuda":
            res["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        res["device"] = device
    except Exception as e:  # no torch, no memory for 120b's dense experts, ...: say so, keep the run going
        res["error"] = f"did not run: {error_line(e)}"
    return res


# ----------------------------------------------------------------------------------------------- main
def hardware() -> str:
    devs = jax.devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devs})
    host = f"{platform.machine()} {platform.node()}"
    return f"{len(devs)} x {', '.join(kinds)} ({jax.default_backend()}), host {host}"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["20b", "120b"], help="20b, 120b (or smoke)")
    ap.add_argument("--impl", nargs="+", default=["xla", "pallas"], choices=["xla", "pallas"])
    ap.add_argument("--context", type=int, default=1024, help="prompt length before the decode measurement")
    ap.add_argument("--new", type=int, default=128, help="decode tokens timed")
    ap.add_argument("--prefill", type=int, nargs="+", default=[4096, 32768], help="prefill lengths")
    ap.add_argument("--chunk", type=int, default=512,
                    help="prefill chunk (config prefill_chunk; 512 is the library default: the XLA path's "
                         "chunk x context logits must fit in memory)")  # fmt: skip
    ap.add_argument("--check", type=int, default=256, metavar="TOKENS",
                    help="compare each non-xla impl's logits with xla on a prompt of this length (0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bw", type=float, default=H100_BW, help="peak memory bandwidth, bytes/s")
    ap.add_argument("--flops", type=float, default=H100_BF16_FLOPS, help="peak bf16 FLOP/s")
    ap.add_argument("--peer", action="store_true", help="also time Hugging Face transformers")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep: checks the script end to end")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.context, args.new, args.prefill = ["smoke"], 24, 4, [40]
        args.chunk, args.reps = 16, 1
        args.check = min(args.check, 40)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command   {shlex.join([sys.executable, *sys.argv])}")
    print(f"hardware  {hardware()}")
    print(f"software  jax {jax.__version__}, gptoss_jax {gptoss_jax.__version__}, "
          f"python {platform.python_version()}")
    print(f"limits    {args.bw / 1e12:.2f} TB/s, {args.flops / 1e12:.0f} TFLOP/s bf16")
    results = []
    for name in args.models:
        t0 = time.perf_counter()
        base = random_model(make_config(name, "xla", args.chunk))
        jax.block_until_ready(nnx.state(base))
        print(f"{name:>5} random weights made in {time.perf_counter() - t0:.1f} s")
        for impl in args.impl:
            r = bench_ours(base, name, impl, args)
            results.append(r)
            if "check" in r:
                c = r["check"]
                print(f"{name:>5} {impl:<7} check vs xla at {c['length']} tokens: "
                      f"max |diff| {c['max_abs_diff']:.3g} (max |logit| {c['max_abs_ref']:.3g}), "
                      f"argmax agree {100 * c['argmax_agree']:.1f}%")  # fmt: skip
            d = r["decode"]
            print(f"{name:>5} {impl:<7} decode {d['tok_s']:9.2f} tok/s  ({d['achieved_bw_TBs']:.3f} TB/s, "
                  f"{100 * d['bw_fraction']:.1f}% of bw)  "
                  f"peak mem {r['peak_memory_bytes'] / 2**30:.2f} GiB")  # fmt: skip
            for p in r["prefill"]:
                if "error" in p:
                    print(f"{name:>5} {impl:<7} prefill {p['length']:6d}: {p['error']}")
                else:
                    print(f"{name:>5} {impl:<7} prefill {p['length']:6d}: {p['tok_s']:10.1f} tok/s  "
                          f"({p['tflops']:.2f} TFLOP/s, "
                          f"{100 * p['flops_fraction']:.1f}% of peak)")  # fmt: skip
        del base
        if args.peer:
            r = bench_transformers(name, args)
            results.append(r)
            if "error" in r:
                print(f"{name:>5} transformers: {r['error']}")
            else:
                pre = ", ".join(f"{p['length']}: {p.get('tok_s', p.get('error'))}" for p in r["prefill"])
                print(f"{name:>5} transformers decode {r['decode']['tok_s']:9.2f} tok/s on {r['device']}; "
                      f"prefill {pre}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), command=sys.argv,
                           hardware=hardware(), results=results), f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

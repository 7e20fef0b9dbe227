"""gptoss-jax against Hugging Face transformers on CPU, in one run, on the same random checkpoint.

The checkpoint is a mid-size gpt-oss written by `conversion.synthetic.write_checkpoint` in the released
Hugging Face MXFP4 layout (both libraries read the same files):

    4 layers (sliding, full, sliding, full), 32 experts, top-4, hidden 512, expert width 512,
    head_dim 64, 8 query heads, 2 kv heads (4 query heads per kv head), window 128, vocab 32000.

The head sizes follow the real model (head_dim 64; hidden = heads x 64 at this scale; the kv heads are a
quarter of the q heads rather than an eighth so that both libraries' grouped-query paths are exercised).

Both run in float32, batch 1, torch with `--threads` intra-op threads (default 2 = this machine's cores)
and XLA on the same cores. transformers reads the checkpoint as `tests/hf_reference.py` does:
`Mxfp4Config(dequantize=True)` (it has no CPU MXFP4 kernel, so its experts become dense float32) and
eager attention (the only CPU path that applies the sinks). gptoss-jax is measured with its default
packed MXFP4 experts (dequantized inside the expert computation) and with `expert_format="dequantized"`
(the same dense float32 experts transformers uses).

Measured:
  prefill  - a `--seq`-token prompt in, the first new token out: `generate(..., max_new_tokens=1)` in both
             libraries (both compute the logits of the last position only and fill their KV caches).
  forward  - one full forward pass over a `--seq`-token prompt (default 512) returning float32 logits for
             every position (what `model(input_ids)` returns in both libraries; no cache).
  decode   - greedy decoding tokens/s after a `--prompt`-token prompt: (time to generate 1 + N tokens
             - time to generate 1 token) / N, so prefill is excluded. transformers uses `model.generate`
             (its KV cache); gptoss-jax uses `gptoss_jax.generate` (jitted on-device decode loop).
All models are loaded first; then each repetition times every implementation in turn (interleaved, so a
change in the load of a shared machine hits all of them alike). Each figure is the median of `--reps`
repetitions after a warm-up run (compilation excluded; it is reported separately for gptoss-jax).

Usage:  python benchmarks/cpu_vs_transformers.py [--ckpt DIR] [--seq 512] [--new 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_config():
    from gptoss_jax.config import Config

    return Config.tiny(num_hidden_layers=4, num_experts=32, experts_per_token=4, hidden_size=512,
                       intermediate_size=512, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                       sliding_window=128, vocab_size=32000, pad_token_id=31999,
                       eos_token_ids=(31998,))  # fmt: skip


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


class Runner:
    """One implementation: `forward()` runs the 512-token forward pass, `gen(n)` greedy-generates n tokens."""

    def __init__(self, name, load_s, forward, prefill, gen, compile_s=None):
        self.name, self.load_s, self.forward, self.prefill, self.gen = name, load_s, forward, prefill, gen
        self.compile_s = compile_s
        self.fwd_times, self.prefill_times, self.gen1_times, self.genn_times = [], [], [], []


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- ours
def ours(ckpt: Path, tokens, prompt, new: int, expert_format: str) -> Runner:
    import jax
    import numpy as np

    import gptoss_jax

    t0 = time.perf_counter()
    model = gptoss_jax.load(ckpt, dtype="float32", quiet=True, expert_format=expert_format)
    load_s = time.perf_counter() - t0
    x = np.asarray(tokens, np.int32)[None]

    def forward():
        jax.block_until_ready(model(x))

    def gen(n, p=prompt):
        return gptoss_jax.generate(model, p, max_new_tokens=n, stop_tokens=())[0]

    def prefill():
        gen(1, list(tokens))

    compile_s = timed(forward) + timed(prefill) + timed(lambda: gen(1)) + timed(lambda: gen(new + 1))
    name = f"gptoss-jax ({'packed MXFP4' if expert_format == 'mxfp4' else 'dequantized f32'} experts)"
    return Runner(name, load_s, forward, prefill, gen, compile_s)


# ------------------------------------------------------------------------------------- transformers
def transformers_runner(ckpt: Path, tokens, prompt, new: int) -> Runner:
    import torch
    import transformers
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM.from_pretrained(str(ckpt), quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32, attn_implementation="eager").eval()  # fmt: skip
    load_s = time.perf_counter() - t0
    x = torch.as_tensor([list(tokens)], dtype=torch.long)
    p = torch.as_tensor([list(prompt)], dtype=torch.long)

    def forward():
        with torch.inference_mode():
            model(x, use_cache=False).logits

    def gen(n, p=p):
        with torch.inference_mode():
            out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, p.shape[1] :].tolist()

    def prefill():
        gen(1, x)

    forward(), prefill(), gen(1), gen(new + 1)  # warm-up
    return Runner(f"transformers {transformers.__version__} (eager, dequantized f32)", load_s, forward, prefill,
                  gen)  # fmt: skip


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse (or create) the checkpoint in this folder")
    ap.add_argument("--seq", type=int, default=512, help="forward-pass length (default 512)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length for decoding (default 32)")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens timed (default 64)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: cores)")
    ap.add_argument("--only", choices=["ours", "hf"], help="run one side only")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cfg = bench_config()
    from gptoss_jax.checkpoint.synthetic import checkpoint_bytes, write_checkpoint

    tmp = None
    if args.ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptoss_bench_")
        args.ckpt = Path(tmp.name) / "ckpt"
    if not (args.ckpt / "config.json").exists():
        print(f"writing the {checkpoint_bytes(cfg) / 2**20:.1f} MiB checkpoint to {args.ckpt} ...", flush=True)
        write_checkpoint(args.ckpt, cfg, layout="hf", seed=0)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, args.seq).tolist()
    prompt = rng.integers(0, cfg.vocab_size, args.prompt).tolist()

    import jax

    runners = []
    if args.only != "hf":
        for fmt in ("mxfp4", "dequantized"):
            print(f"loading and compiling gptoss-jax ({fmt}) ...", flush=True)
            runners.append(ours(args.ckpt, tokens, prompt, args.new, fmt))
    if args.only != "ours":
        print("loading transformers ...", flush=True)
        runners.append(transformers_runner(args.ckpt, tokens, prompt, args.new))
    # Interleaved: each repetition times every implementation in turn, so a change in the machine's load
    # (it may be shared) affects all of them alike; medians are reported.
    for rep in range(args.reps):
        print(f"repetition {rep + 1}/{args.reps} ...", flush=True)
        for r in runners:
            r.fwd_times.append(timed(r.forward))
        for r in runners:
            r.prefill_times.append(timed(r.prefill))
        for r in runners:
            r.gen1_times.append(timed(lambda: r.gen(1)))
            r.genn_times.append(timed(lambda: r.gen(args.new + 1)))
    rows = {}
    for r in runners:
        t1, tn = statistics.median(r.gen1_times), statistics.median(r.genn_times)
        rows[r.name] = {"load_s": r.load_s, "forward_s": statistics.median(r.fwd_times),
                        "prefill512_s": statistics.median(r.prefill_times),
                        "decode_tps": args.new / (tn - t1), "prefill_s": t1, "tokens": r.gen(args.new + 1)}  # fmt: skip
        if r.compile_s is not None:
            rows[r.name]["compile_s"] = r.compile_s
    hf = next((r for k, r in rows.items() if k.startswith("transformers")), None)
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS")
           if os.environ.get(k)]  # fmt: skip
    cmd = " ".join([*env, cmd])  # settings that change the speed of either side are part of the command
    print()
    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    print(f"software  jax {jax.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"command   {cmd}")
    print("model     4 layers, 32 experts top-4, hidden 512, width 512, 8 q / 2 kv heads x 64, vocab 32000, "
          "float32, batch 1")  # fmt: skip
    print(f"load avg  {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min; other work slows both sides)")
    print()
    cols = [f"forward {args.seq} tok, all logits (s)", f"prefill {args.seq} tok -> 1st token (s)",
            f"decode tok/s (prompt {args.prompt}, {args.new} new)"]  # fmt: skip
    print(f"| {'implementation':<52} | " + " | ".join(cols) + " |")
    print(f"|{'-' * 54}|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")
    for name, r in rows.items():
        cells = [(r["forward_s"], "forward_s", False), (r["prefill512_s"], "prefill512_s", False),
                 (r["decode_tps"], "decode_tps", True)]  # fmt: skip
        out = []
        for (v, key, higher), c in zip(cells, cols):
            txt = f"{v:.1f}" if higher else f"{v:.3f}"
            if hf is not None and r is not hf:
                txt += f" ({(v / hf[key]) if higher else (hf[key] / v):.2f}x)"
            out.append(f"{txt:>{len(c)}}")
        print(f"| {name:<52} | " + " | ".join(out) + " |")
    print("(x) = speed relative to transformers (>1 is faster)")
    print()
    for name, r in rows.items():
        extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        print(f"{name}: load {r['load_s']:.2f} s{extra}")
    if hf is not None:
        for name, r in rows.items():
            if r is not hf:
                same = sum(a == b for a, b in zip(r["tokens"], hf["tokens"]))
                print(f"greedy tokens equal to transformers' ({name}): {same}/{len(hf['tokens'])}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

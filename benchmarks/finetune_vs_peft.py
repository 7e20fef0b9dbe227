"""LoRA fine-tuning step time and peak memory: gptoss-jax against transformers + PEFT on CPU, in one run.

The checkpoint is `cpu_vs_transformers.py`'s mid-size gpt-oss (4 layers, 32 experts top-4, hidden 512, expert
width 512, 8 q / 2 kv heads, vocab 32000) in the released Hugging Face MXFP4 layout. One optimizer step =
forward over `--batch` rows of `--seq` tokens, cross-entropy on every position, backward, AdamW on the
adapters. Adapters: rank 16, alpha 32, on q, k, v, o and both expert matrices (PEFT: `target_modules`
q/k/v/o_proj and `target_parameters` gate_up_proj / down_proj, as OpenAI's cookbook), float32.

  gptoss-jax, packed experts      the base as released (MXFP4 experts dequantized one at a time, forward and
                                  backward), the jitted `training.loop.make_step`, remat per layer
  gptoss-jax, dequantized experts the same with dense float32 experts (what transformers holds)
  transformers + PEFT             `Mxfp4Config(dequantize=True)` (it has no CPU MXFP4 path: dense float32
                                  experts), eager attention, torch.optim.AdamW

Each implementation runs in its own process, so that its peak resident memory (ru_maxrss) is its own ("over
start" subtracts the process's resident memory after its imports); the parent has them take their steps in
turn (interleaved, so a change in the load of a shared machine hits all of them alike). Step time is the
median of `--steps` steps after `--warmup` (the first step's time, for gptoss-jax its compilation, apart).

`--against DIR` compares this checkout's gptoss-jax with another's (e.g. `git worktree add /tmp/before REV`)
instead of with PEFT: each expert format's two workers, each run by its own checkout's copy of this script,
take their steps in turn, the order alternating every step, and the table adds the median of the per-step
ratios (other / this: above 1, this checkout is faster), which a shared machine's changing load disturbs
least.

Usage:  python benchmarks/finetune_vs_peft.py [--ckpt DIR] [--seq 512] [--batch 1] [--steps 5] [--against DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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

RANK, ALPHA = 16, 32


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_tokens(cfg, seq: int, batch: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


def ours_stepper(ckpt: Path, expert_format: str, seq: int, batch: int, steps: int):
    """-> step(s): one optimizer step of gptoss-jax's `training.loop.make_step` (the jitted step)."""
    import jax
    import numpy as np

    import gptoss_jax
    from gptoss_jax.lora import LoraConfig, init_adapters
    from gptoss_jax.model import model_params
    from gptoss_jax.training.loop import TrainConfig, init_state, make_optimizer, make_step

    model = gptoss_jax.load(ckpt, dtype="float32", quiet=True, expert_format=expert_format)
    cfg = model.cfg
    lora = LoraConfig(rank=RANK, alpha=ALPHA)
    tcfg = TrainConfig(learning_rate=1e-4, steps=steps, batch_size=batch)
    opt, sched = make_optimizer(tcfg, tcfg.steps)
    step = make_step(cfg, lora, tcfg, opt, sched)
    ad = init_adapters(cfg, lora)
    state = [*jax.device_put((ad, init_state(opt, ad, cfg)), jax.devices()[0])]
    params = jax.device_put(model_params(model), jax.devices()[0])

    def one(s: int) -> float:
        tok = batch_tokens(cfg, seq, batch, s)
        pos = np.broadcast_to(np.arange(seq, dtype=np.int32), tok.shape)
        b = {"tokens": tok, "positions": pos, "loss_pos": pos, "targets": np.roll(tok, -1, 1),
             "weights": np.ones(tok.shape, np.float32)}  # fmt: skip
        b = jax.device_put(jax.tree.map(lambda a: a[None], b), jax.devices()[0])
        state[0], state[1], m = step(state[0], state[1], params, b, np.int32(s))
        return float(m["loss"])

    return one


def peft_stepper(ckpt: Path, seq: int, batch: int, threads: int):
    """-> step(s): one optimizer step of transformers + PEFT (forward, cross-entropy, backward, AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    from gptoss_jax.config import Config

    torch.set_num_threads(threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = Mxfp4Config(dequantize=True)  # no CPU MXFP4 path: dense float32 experts
        model = GptOssForCausalLM.from_pretrained(str(ckpt), quantization_config=q, dtype=torch.float32,
                                                  attn_implementation="eager")  # fmt: skip
    conf = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    model = get_peft_model(model, conf)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    cfg = Config.from_hf_config(json.loads((ckpt / "config.json").read_text()))

    def one(s: int) -> float:
        tok = torch.as_tensor(batch_tokens(cfg, seq, batch, s), dtype=torch.long)
        logits = model(input_ids=tok, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return one


def worker(args) -> int:
    """One implementation in its own process: set up, then one step per "step" line on stdin, answering
    with its time; "end" answers with the process's peak resident memory."""
    if args.one == "peft":  # "over start" counts from here: the libraries imported, nothing loaded
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import gptoss_jax.training.loop  # noqa: F401
    start = _rss_mib()
    total = args.steps + args.warmup
    if args.one == "peft":
        one = peft_stepper(args.ckpt, args.seq, args.batch, args.threads)
    else:
        one = ours_stepper(args.ckpt, args.one, args.seq, args.batch, total)
    s = 0
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "end":
            print("RESULT " + json.dumps({"peak_mib": _peak_mib(), "start_mib": start}), flush=True)
            return 0
        t0 = time.perf_counter()
        loss = one(s)
        print(f"TIME {time.perf_counter() - t0} {loss}", flush=True)
        s += 1
    return 1


def _expect(p, word: str) -> str:
    for line in p.stdout:
        if line.startswith(word):
            return line.strip()
    raise RuntimeError(f"worker ended without {word} (exit code {p.wait()})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse (or create) the checkpoint in this folder")
    ap.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    ap.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps, median reported (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: cores)"
    )
    ap.add_argument("--against", type=Path, help="another checkout to compare with (instead of PEFT)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a worker process (see `worker`)
    args = ap.parse_args(argv)

    if args.one:
        return worker(args)

    from benchmarks.cpu_vs_transformers import bench_config, cpu_model
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    cfg = bench_config()
    tmp = None
    if args.ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptoss_ft_bench_")
        args.ckpt = Path(tmp.name) / "ckpt"
    if not (args.ckpt / "config.json").exists():
        write_checkpoint(args.ckpt, cfg, layout="hf", seed=0)
    names = {
        "mxfp4": "gptoss-jax, packed MXFP4 experts",
        "dequantized": "gptoss-jax, dequantized f32 experts",
        "peft": "transformers + PEFT (dequantized f32)",
    }
    this = Path(__file__).resolve()
    runs = {w: (w, label, this) for w, label in names.items()}  # key -> (worker kind, label, script)
    if args.against:  # each expert format twice: this checkout's, and the other's (its copy of this script)
        other = args.against.resolve() / "benchmarks" / this.name
        runs = {}
        for w in ("mxfp4", "dequantized"):
            runs[w] = (w, names[w], this)
            runs[f"{w}, against"] = (w, f"{names[w]}, {args.against}", other)
    procs = {}
    for key, (which, _, script) in runs.items():
        cmd = [sys.executable, str(script), "--one", which, "--ckpt", str(args.ckpt), "--seq", str(args.seq),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]  # fmt: skip
        pipe = subprocess.PIPE
        procs[key] = subprocess.Popen(cmd, cwd=script.parents[1], stdin=pipe, stdout=pipe, text=True)
        _expect(procs[key], "READY")  # set up one at a time: untimed, but it takes the cores

    def step(p) -> tuple[float, float]:
        p.stdin.write("step\n")
        p.stdin.flush()
        _, t, loss = _expect(p, "TIME").split()
        return float(t), float(loss)

    times = {k: [] for k in runs}
    compile_s, losses = {}, {}
    for s in range(args.steps + args.warmup):
        print(f"step {s + 1}/{args.steps + args.warmup} ...", flush=True)
        order = list(procs.items())
        if args.against and s % 2:  # each pair alternates which of the two goes first
            order.reverse()
        for which, p in order:  # interleaved: a change in the machine's load hits all alike
            t, losses[which] = step(p)
            if s == 0:
                compile_s[which] = t
            if s >= args.warmup:
                times[which].append(t)
    results = {}
    for which, p in procs.items():
        p.stdin.write("end\n")
        p.stdin.flush()
        results[which] = json.loads(_expect(p, "RESULT")[7:])
        results[which] |= {"step_s": statistics.median(times[which]), "loss": losses[which],
                           "compile_s": compile_s[which] if which != "peft" else None}  # fmt: skip
        p.wait()

    import jax
    import peft
    import torch
    import transformers

    print(f"\ndate      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores")
    print(
        f"software  jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, python {platform.python_version()}"
    )
    print(f"command   python {shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])}")
    print(
        f"model     4 layers, 32 experts top-4, hidden 512, width 512, vocab 32000, float32; LoRA r={RANK} "
        f"on q,k,v,o + experts; {args.batch} x {args.seq} tokens per step\n"
    )
    w = max(38, *(len(label) for _, label, _ in runs.values()))
    print(f"| {'implementation':{w}s} | step (s) | compile (s) | peak RSS (MiB) | over start (MiB) |")
    print(f"|{'-' * (w + 2)}|----------|-------------|----------------|------------------|")
    for which, r in results.items():
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] else "-"
        print(
            f"| {runs[which][1]:{w}s} | {r['step_s']:8.2f} | {comp:>11s} | {r['peak_mib']:14.0f} | "
            f"{r['peak_mib'] - r['start_mib']:16.0f} |"
        )
    if args.against:
        print(f"\nper-step time ratio, {args.against} / this checkout (median, min-max):")
        for which in ("mxfp4", "dequantized"):
            ratios = [b / a for a, b in zip(times[which], times[f"{which}, against"], strict=True)]
            print(f"  {which:12s} {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

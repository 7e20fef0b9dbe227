"""`gptoss-jax serve` with default flags at long prompts: a 32k-token prompt served, a 100k one admitted.

The checkpoint is the embedded default of `gptoss-jax demo` (`Config.tiny()`, written in the released HF
MXFP4 layout), or with `--bench` the CPU benchmark checkpoint of benchmarks/cpu_vs_transformers.py (4 layers,
32 experts top-4, hidden 512, vocab 32000). The server is started as a user would: `gptoss-jax serve CKPT --port P`, nothing else (full
context, the CPU default KV budget, the warm-up). Measured over real HTTP with the official `openai` client,
on `/v1/completions` with the prompt as token ids:

  ready     from the process start to /health answering 200 (load, pool, warm-up), with an empty
            compilation cache (a new folder in $GPTOSS_JAX_COMPILE_CACHE)
  32k       a 32768-token prompt, 1 output token: the request's time (prefill dominates; the full layers'
            attention is quadratic on the CPU)
  100k      a 100000-token prompt, streamed: admitted (the engine runs it: /metrics shows it running and
            its first prefill chunks computed), then abandoned without waiting for its prefill

    python benchmarks/serve_long_prompt.py [--bench] [--tokens 32768] [--admit 100000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {k.removeprefix("gptoss_engine_"): float(v) for k, v in
            (line.split() for line in text.splitlines() if line.startswith("gptoss_engine_"))}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--admit", type=int, default=100_000)
    ap.add_argument("--bench", action="store_true", help="the CPU benchmark checkpoint, not the demo's")
    args = ap.parse_args(argv)

    import openai

    from benchmarks.cpu_vs_transformers import bench_config
    from gptoss_jax.checkpoint.synthetic import write_checkpoint
    from gptoss_jax.demo import demo_config

    cfg = bench_config() if args.bench else demo_config()
    tmp = tempfile.TemporaryDirectory(prefix="gptoss_long_")
    ckpt = Path(tmp.name) / ("gpt-oss-bench" if args.bench else "gpt-oss-tiny")
    write_checkpoint(ckpt, cfg, layout="hf", shards=2, seed=0)
    port = free_port()
    cmd = [sys.executable, "-m", "gptoss_jax", "serve", str(ckpt), "--port", str(port)]
    t0 = time.perf_counter()
    # an empty compilation cache, as on a new machine (the server's default cache folder is left alone)
    env = os.environ | {"GPTOSS_JAX_COMPILE_CACHE": str(Path(tmp.name) / "compile-cache")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        shapes = metrics(port)  # the warm-up's figures
        if args.bench:  # its vocabulary has no harmony tokens (the server's default stops): readiness only
            return report(args, argv, cfg, ckpt, cmd, ready, shapes)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600)
        model = client.models.list().data[0].id
        vocab = 1000  # ordinary token ids of the o200k vocabulary the checkpoint carries
        prompt = [(i * 7919) % vocab for i in range(args.tokens)]
        t = time.perf_counter()
        out = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
        long_s = time.perf_counter() - t
        assert out.usage.prompt_tokens == args.tokens, out.usage
        big = [(i * 104729) % vocab for i in range(args.admit)]
        before = metrics(port)["prefill_tokens"]

        def send():  # streams until the server closes the connection at the end of the run
            try:
                body = {"model": model, "prompt": big, "max_tokens": 1, "stream": True}
                url = f"http://127.0.0.1:{port}/v1/completions"
                with httpx.stream("POST", url, timeout=None, json=body) as r:
                    status.append(r.status_code)
                    r.read()
            except httpx.HTTPError:
                pass

        status: list[int] = []
        threading.Thread(target=send, daemon=True).start()
        t = time.perf_counter()
        while time.perf_counter() - t < 120:  # running, and its prefill under way (the first chunks computed)
            m = metrics(port)
            if m["running"] == 1 and m["prefill_tokens"] > before + 2048:
                break
            time.sleep(0.5)
        admit_s = time.perf_counter() - t
        admitted = m["running"] == 1 and m["prefill_tokens"] > before + 2048
        progress = m["prefill_tokens"] - before
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    report(args, argv, cfg, ckpt, cmd, ready, shapes)
    print(f"{args.tokens}-token prompt, 1 token out         {long_s:8.1f} s "
          f"({args.tokens / long_s:.0f} prompt tokens/s)")  # fmt: skip
    print(f"{args.admit}-token prompt, streamed          "
          f"{'admitted' if admitted else 'NOT admitted'}: running, {progress:.0f} prompt tokens computed "
          f"{admit_s:.1f} s after it was sent (HTTP {status or 'pending'}; then abandoned)")  # fmt: skip
    return 0 if admitted else 1


def report(args, argv, cfg, ckpt, cmd, ready, m) -> int:
    import jax

    from benchmarks.cpu_vs_transformers import cpu_model

    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"software  jax {jax.__version__}, python {platform.python_version()}")
    print(f"command   python {shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])}")
    print(f"model     {ckpt.name}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts top-"
          f"{cfg.experts_per_token}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")  # fmt: skip
    print(f"server    {shlex.join(['gptoss-jax', *cmd[3:4], 'CKPT', *cmd[5:]])} (default flags)\n")
    warm = m.get("warmup_seconds", float("nan"))
    print(f"ready (start -> /health 200)             {ready:8.1f} s (warm-up {warm:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

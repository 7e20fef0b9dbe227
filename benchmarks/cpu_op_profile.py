"""Where gptoss-jax's CPU time goes, per XLA operation, mapped back to our source lines.

Runs `generate` on the model of `benchmarks/cpu_vs_transformers.py` (the checkpoint in `--ckpt`, written
there if missing) under `jax.profiler`, with XLA's optimized HLO dumped alongside. Every executed operation
of the trace (XLA:CPU thunks: fusions, dots, copies, gathers ...; loops and conditionals are containers and
not counted, their bodies are) is attributed through its HLO metadata to the Python function and line that
produced it. Times are thread time summed over XLA's threads, so with 2 threads busy they add up to about
twice the wall time.

  prefill   `generate(T random tokens, max_new_tokens=1)`, T = `--tokens` (default 2048)
  decode    `generate(32 tokens, max_new_tokens=1 + N)`, N = `--new` (default 64); the prefill part is the
            same small fraction in every run

    python benchmarks/cpu_op_profile.py --ckpt /tmp/bench/ckpt [--what prefill|decode] [--expert-format
        mxfp4|dequantized] [--tokens 2048] [--new 64] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTAINERS = ("while", "cond", "call", "conditional", "ThunkExecutor")
INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (.*)$", re.M)


def _table(text: str, name: str) -> dict[int, str]:
    """One of the HLO module's tables (FileNames, FunctionNames, FileLocations, StackFrames): id -> text."""
    m = re.search(rf"^{name}\n((?:\d+ .*\n)+)", text, re.M)
    return {int(i): v for i, v in re.findall(r"^(\d+) (.*)$", m.group(1), re.M)} if m else {}


def hlo_sources(dump: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(module name, instruction name) -> (our source 'file:function:line' or the op name, result shape), from
    the dumped optimized HLO: an instruction's stack_frame_id names its innermost Python frame."""
    out = {}
    for p in glob.glob(f"{dump}/*after_optimizations.txt"):
        module = re.match(r"module_\d+\.(.+?)\.cpu_after_optimizations\.txt$", os.path.basename(p))
        if not module:
            continue
        text = Path(p).read_text()
        files, funcs = _table(text, "FileNames"), _table(text, "FunctionNames")
        locs, frames = _table(text, "FileLocations"), _table(text, "StackFrames")

        def frame(i: int) -> str:
            loc = re.search(r"file_location_id=(\d+)", frames.get(i, ""))
            f = loc and locs.get(int(loc.group(1)), "")
            if not f:
                return ""
            ids = dict(re.findall(r"(\w+)=(\d+)", f))
            path = files.get(int(ids.get("file_name_id", 0)), '""').strip('"')
            try:
                path = str(Path(path).resolve().relative_to(ROOT))
            except ValueError:
                path = "/".join(Path(path).parts[-2:])
            return f"{path}:{funcs.get(int(ids.get('function_name_id', 0)), '?').strip(chr(34))}:{ids.get('line')}"

        for name, shape, rest in INSTR.findall(text):
            meta = re.search(r"metadata=\{([^}]*)\}", rest)
            meta = meta.group(1) if meta else ""
            sf = re.search(r"stack_frame_id=(\d+)", meta)
            src = frame(int(sf.group(1))) if sf else ""
            if not src:
                op = re.search(r'op_name="([^"]+)"', meta)
                src = f"(no source) {op.group(1).split('/')[-1]}" if op else "(no metadata)"
            out[(module.group(1), name)] = (src, shape)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="the benchmark checkpoint (written if missing)")
    ap.add_argument("--what", choices=("prefill", "decode"), default="prefill")
    ap.add_argument("--expert-format", choices=("mxfp4", "dequantized"), default="mxfp4")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    dump = tempfile.mkdtemp(prefix="gptoss_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_pass_re=NONE").strip()  # fmt: skip
    import jax
    import numpy as np

    import gptoss_jax
    from benchmarks.cpu_vs_transformers import bench_config, cpu_model
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    if not (args.ckpt / "config.json").exists():
        write_checkpoint(args.ckpt, bench_config(), layout="hf", seed=0)
    model = gptoss_jax.load(args.ckpt, dtype="float32", quiet=True, expert_format=args.expert_format)
    rng = np.random.default_rng(0)
    if args.what == "prefill":
        prompt, new = rng.integers(0, 32000, args.tokens).tolist(), 1
    else:
        prompt, new = rng.integers(0, 32000, 32).tolist(), 1 + args.new
    run = lambda: gptoss_jax.generate(model, prompt, max_new_tokens=new, stop_tokens=())  # noqa: E731
    run(), run()  # compile, then once warm
    trace = tempfile.mkdtemp(prefix="gptoss_trace_")
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        run()
    events = json.load(gzip.open(glob.glob(f"{trace}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
    sources = hlo_sources(dump)
    by_src, by_op, total = collections.Counter(), collections.Counter(), 0.0
    for e in events:
        a = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in a or e["name"].startswith(CONTAINERS):
            continue
        src, shape = sources.get((a.get("hlo_module", ""), a["hlo_op"]), ("(unmapped)", ""))
        by_src[src] += e["dur"] / 1e3
        by_op[(src, f"{a['hlo_op']} {shape}")] += e["dur"] / 1e3
        total += e["dur"] / 1e3
    wall = max((e["dur"] for e in events if e.get("name", "").startswith("$") and "generate" in e["name"]),
               default=0) / 1e3  # fmt: skip
    what = f"{args.tokens}-token prefill" if args.what == "prefill" else f"decode of {args.new} tokens"
    print(f"date      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"software  jax {jax.__version__}, python {platform.python_version()}")
    print(f"command   python {shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])}")
    print(f"run       {what}, {args.expert_format} experts: {wall:.0f} ms wall, {total:.0f} ms of XLA thread "
          "time\n")  # fmt: skip
    print(f"| {'source (file:function:line)':62s} | {'ms':>8s} | {'share':>6s} |")
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 8}|")
    for src, ms in by_src.most_common(args.top):
        print(f"| {src[:62]:62s} | {ms:8.1f} | {ms / total:6.1%} |")
    print(f"\nlargest single operations:\n| {'source':56s} | {'HLO op and its result':52s} | {'ms':>8s} |")
    print(f"|{'-' * 58}|{'-' * 54}|{'-' * 10}|")
    for (src, op), ms in by_op.most_common(12):
        print(f"| {src[:56]:56s} | {op[:52]:52s} | {ms:8.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

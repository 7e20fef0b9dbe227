"""`gptoss-jax demo`: the whole path on a tiny random model, in well under a minute on a laptop CPU.

1. writes a random checkpoint with the real vocabulary (`Config.tiny`: 4 layers, 5 experts, hidden 64,
   vocab 201088) in the released Hugging Face layout: sharded bf16 safetensors with MXFP4 expert blocks
   and scales, the index, config.json and generation_config.json;
2. loads it with `gptoss_jax.load`, the same code that reads the released 20b/120b weights;
3. tokenizes a prompt with o200k_harmony, generates, decodes, and reports prefill and decode speed.

The weights are random, so the text is gibberish: the demo shows the machinery, not the model.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"


def demo_config(**overrides):
    from .config import Config

    return Config.tiny(**overrides)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def run_demo(out: str | Path | None = None, *, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24,
             dtype: str = "bfloat16", mesh=None, seed: int = 0, temperature: float = 0.0,
             file=None, **overrides) -> dict:  # fmt: skip
    """Runs the demo, printing each step to `file` (default stdout). Returns what it measured.

    out: folder to write the checkpoint to (must not exist); None = a temporary folder, removed at the end.
    overrides: runtime config fields for loading (attention_impl, moe_impl, expert_format ...).
    """
    from . import tokenizer
    from .checkpoint.synthetic import write_checkpoint
    from .generate import generate
    from .loading import load

    file = file or sys.stdout

    def say(*a, **kw):
        print(*a, **kw, file=file, flush=True)

    cfg = demo_config()
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptoss_jax_demo_")
        path = Path(tmp.name) / "gpt-oss-tiny"
    else:
        path = Path(out)
        if path.exists():
            raise ValueError(f"--out {path}: already exists (choose a new folder)")
    try:
        say(f"1. Writing a random gpt-oss checkpoint ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
            f"top-{cfg.experts_per_token}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}) in the Hugging Face "
            f"MXFP4 layout to {path}")  # fmt: skip
        t0 = time.perf_counter()
        write_checkpoint(path, cfg, layout="hf", shards=2, seed=seed)
        files = sorted(p.name for p in path.iterdir())
        size = folder_bytes(path)
        say(f"   {len(files)} files, {_human(size)} in {time.perf_counter() - t0:.1f} s: {', '.join(files)}")

        say(f"2. Loading it with gptoss_jax.load (dtype {dtype}, experts kept packed in MXFP4)")
        t0 = time.perf_counter()
        model = load(path, dtype=dtype, mesh=mesh, **overrides)
        from .weights import param_count

        say(f"   {param_count(model.cfg) / 1e6:.1f} M parameters loaded in {time.perf_counter() - t0:.1f} s")

        ids = tokenizer.encode(prompt)
        say(f"3. Prompt {prompt!r} -> {len(ids)} o200k_harmony tokens {ids}")
        stamps: list[float] = []
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                  callback=lambda toks: stamps.append(time.perf_counter()))  # fmt: skip
        t0 = time.perf_counter()
        generate(model, ids, **kw)  # first call: compiles the prefill and the decode step
        compile_s = time.perf_counter() - t0
        say(f"   jit compilation (first call, includes one generation): {compile_s:.1f} s")
        stamps.clear()
        t0 = time.perf_counter()
        new = generate(model, ids, **kw)[0]
        t_prefill = stamps[0] - t0  # prompt in, first token out
        t_decode = stamps[-1] - stamps[0]
        text = tokenizer.decode(new)
        say(f"4. Generated {len(new)} tokens {new}")
        say(f"   text: {text!r}")
        say("   (random weights: gibberish is expected; load real weights with `gptoss-jax generate PATH`)")
        prefill_tps = len(ids) / t_prefill
        decode_tps = (len(new) - 1) / t_decode if len(new) > 1 and t_decode > 0 else float("nan")
        say(f"5. Speed: prefill {len(ids)} tokens in {t_prefill * 1e3:.1f} ms ({prefill_tps:.0f} tok/s); "
            f"decode {len(new) - 1} tokens in {t_decode * 1e3:.1f} ms ({decode_tps:.0f} tok/s)")  # fmt: skip
        if out is not None:
            say(f"   the checkpoint stays in {path}: try `gptoss-jax generate {path} --prompt 'Hello'`")
        return {"path": str(path), "bytes": size, "prompt_tokens": ids, "tokens": new, "text": text,
                "compile_s": compile_s, "prefill_tps": prefill_tps, "decode_tps": decode_tps}  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()

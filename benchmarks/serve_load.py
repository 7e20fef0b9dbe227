"""`gptoss-jax serve` under load: concurrent streaming clients on the mid-size CPU checkpoint (issue 11).

The checkpoint is benchmarks/cpu_vs_transformers.py's `bench_config()` (4 layers, 32 experts top-4,
hidden 512, ...) with the real o200k_harmony vocabulary (201088 tokens, the real pad and eos ids), since
the server renders harmony prompts with real token ids; written in the released HF MXFP4 layout.

Each server is started once and gets the same load phases one after the other (`--phases`, default
`completions,chat`): in each, `--clients` concurrent clients (the official `openai` AsyncOpenAI client,
stream=True, include_usage) send `--requests` requests each, one after the other: a short varied prompt, at
most `--max-tokens` output tokens, `--temperature` (0: greedy). A request is lost when it raises or ends
without usage; 5xx are counted apart. Throughput is output tokens (usage) over the phase's wall time.

completions   POST /v1/completions with the prompt as raw text (no chat template): both servers stream the
              decoded text token by token (checked: one text chunk per generated token on both), so this phase
              gives TTFT (send -> first chunk with text) and TPOT ((finish chunk - first text) /
              (completion_tokens - 1)), p50/p99. Neither API can force exactly max_tokens tokens (no
              min_tokens / ignore_eos; ours refuses logit_bias), so a request may stop at an end token:
              tokens are counted from usage, which both count the same way (every generated token, the end
              token included; transformers sends usage in its finish chunk whatever stream_options says), and
              the table shows tokens per request.
chat          POST /v1/chat/completions with the prompt as the user message: counts, throughput and total
              latency p50/p99. Random weights write no harmony header (`<|channel|>final<|message|>`), so
              `gptoss-jax serve` cannot tell which channel the text belongs to and holds it until the sequence
              ends (one chunk per request): its TTFT is not measurable here and shows as "-" (a note under the
              table counts such requests). `transformers serve` (no response parser for this template) streams
              the decoded text token by token, special tokens skipped.

Ours: `gptoss-jax serve CKPT --dtype float32 --max-seqs N` with its warm-up (every call shape compiled
before /health answers), so no compile lands inside the measurement; `--no-warmup` passes --no-warmup to it:
it then compiles during the load and its latency figures include compilation (for debugging only).

Then, unless --no-hf, the same phases against `transformers serve` (pinned: HF_VERSION below; another
installed version is skipped with the reason printed). It serves a view of the same folder (symlinks) plus
an o200k_harmony tokenizer built from tiktoken's ranks (raw text encoded as ours does, no BOS) and a chat
template that renders exactly the prompt our server renders (derived from `render_chat_prompt`); both are
checked token for token. On CPU it dequantizes the MXFP4 experts to dense float32 and uses its default (not
continuous-batching) generation: one request at a time. The two servers run one after the other, never
together.

Duration (2 busy cores, load average ~3): checkpoint write 5 s, our server's warm-up 1.5-8 min (89 s in the
last run), transformers serve's start ~10 s. 4 clients x 1 request x 8 tokens: each phase 3 s (gptoss-jax:
TPOT ~290 ms at 4 sequences) and 2 s (transformers: ~50 ms a token, one request at a time), 2 min in all.
The full 64 x 4 x 32 load (8192 output tokens per side and phase) is estimated, not measured, at ~4-6 min a
phase for gptoss-jax and ~8-9 min a phase for transformers: roughly 30-45 min in all.

Usage:  python benchmarks/serve_load.py [--ckpt DIR] [--clients 64] [--requests 4] [--max-tokens 32]
                                        [--temperature 0] [--max-seqs 16] [--phases completions,chat]
                                        [--no-hf] [--no-warmup]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_vs_transformers import bench_config, cpu_model

HF_VERSION = "5.24.0"  # the transformers whose `serve` this benchmark was written against and checked with
MODEL = "gpt-oss-bench"
SENTINEL = "@@USER_MESSAGE@@"
TOPICS = ["the sea", "a red bicycle", "prime numbers", "autumn rain", "a lighthouse", "coffee", "the moon",
          "a chess opening", "bread", "a mountain path", "jazz", "a paper boat", "volcanoes", "a train station",
          "honeybees", "a library"]  # fmt: skip
FORMS = ["Write one sentence about {}.", "Give me three words for {}.", "What is interesting about {}?",
         "Describe {} to a child.", "Tell a very short story about {}."]  # fmt: skip


def load_config():
    from gptoss_jax.config import Config

    real = Config.tiny()  # the real vocabulary and special ids
    return bench_config().replace(vocab_size=real.vocab_size, pad_token_id=real.pad_token_id,
                                  eos_token_ids=real.eos_token_ids)  # fmt: skip


def prompts(clients: int, requests: int) -> list[list[str]]:
    """Per client, its requests' user messages: varied, the same for both servers."""
    out, n = [], 0
    for _ in range(clients):
        row = []
        for _ in range(requests):
            row.append(FORMS[n % len(FORMS)].format(TOPICS[(n * 7) % len(TOPICS)]))
            n += 1
        out.append(row)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, url: str, timeout: float, env: dict) -> subprocess.Popen:
    """Starts a server, returns once GET /health answers 200; raises with the log's tail if it exits."""
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text().strip().splitlines()[-15:]
            raise RuntimeError(f"exited with {proc.returncode}: " + "\n".join(tail))
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"no /health after {timeout:.0f} s (log: {log})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client, phase: str, model: str, text: str, args) -> dict:
    """One streaming request. TTFT: send -> first chunk with text (or reasoning). TPOT: (finish chunk - first
    text) / (completion_tokens - 1), usage's count: both servers count every generated token there, the end
    token included, whether or not it shows as text, and send the finish chunk right after the last one."""
    import openai

    rec = {"ok": False, "status": None, "error": None, "ttft": None, "tpot": None, "tokens": 0, "pieces": 0}
    t0 = time.perf_counter()
    first = end = None
    usage, pieces = None, 0
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
              "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        if phase == "completions":
            stream = await client.completions.create(prompt=text, **common)
        else:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": text}], **common
            )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if phase == "completions":
                    has_text = bool(choice.text)
                else:
                    extra = choice.delta.model_extra or {}
                    has_text = bool(
                        choice.delta.content or extra.get("reasoning") or extra.get("reasoning_content")
                    )
                if has_text:
                    first, pieces = first or now, pieces + 1
                if choice.finish_reason and end is None:
                    end = now
        rec["status"] = 200
    except openai.APIStatusError as e:
        rec["status"], rec["error"] = e.status_code, f"{e.status_code}: {str(e)[:200]}"
    except Exception as e:  # noqa: BLE001 - every failure is a lost request, counted and reported
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rec["total"], rec["pieces"] = time.perf_counter() - t0, pieces
    if rec["error"] is None and usage is None:
        rec["error"] = "stream ended without the usage chunk"
    if rec["error"] is None:
        n = usage.completion_tokens
        rec["ok"], rec["tokens"] = True, n
        # a chat reply held to the end (one piece for many tokens) has no measurable TTFT: see the docstring
        if first is not None and (pieces > 1 or n == 1):
            rec["ttft"] = first - t0
            if n > 1 and end is not None:
                rec["tpot"] = (end - first) / (n - 1)
    return rec


async def load(url: str, phase: str, model: str, work: list[list[str]], args) -> tuple[list[dict], float]:
    import openai

    # one connection per client: the pool must not queue requests in front of the server
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=len(work) + 8), timeout=httpx.Timeout(1800))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-bench", http_client=http, max_retries=0)

    async def user(texts):
        return [await one_request(client, phase, model, t, args) for t in texts]

    t0 = time.perf_counter()
    rows = await asyncio.gather(*(user(texts) for texts in work))
    wall = time.perf_counter() - t0
    await http.aclose()
    return [r for row in rows for r in row], wall


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-len(xs) * q // 100) - 1))]


def summary(name: str, recs: list[dict], wall: float) -> dict:
    ok = [r for r in recs if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    total = [r["total"] for r in ok]
    return {"name": name, "ok": len(ok), "total": len(recs), "5xx": sum((r["status"] or 0) >= 500 for r in recs),
            "lost": len(recs) - len(ok), "no_text": sum(r["pieces"] == 0 for r in ok),
            "one_piece": sum(r["pieces"] == 1 and r["tokens"] > 1 for r in ok),
            "tok_req": sum(r["tokens"] for r in ok) / max(1, len(ok)),
            "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "tpot50": pct(tpot, 50),
            "tpot99": pct(tpot, 99), "total50": pct(total, 50), "total99": pct(total, 99),
            "tok_s": sum(r["tokens"] for r in ok) / wall, "wall": wall,
            "errors": sorted({r["error"] for r in recs if r["error"]})[:5]}  # fmt: skip


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def write_hf_view(ckpt: Path, view: Path, cfg) -> None:
    """`ckpt`'s files (symlinked) plus an o200k_harmony tokenizer and a chat template rendering what our
    server renders for one user message: what `transformers serve` needs to serve the same model."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptoss_jax.harmony import render_chat_prompt
    from gptoss_jax.tokenizer import encode, get_encoding

    enc = get_encoding()

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_):  # the ranks already loaded (offline) by our tokenizer
            return enc._mergeable_ranks

    # added tokens take the ids after the BPE ranks in order; one name per id (two names share one id)
    specials = [enc.decode([i]) for i in range(len(enc._mergeable_ranks), enc.n_vocab)]
    tok = Converter(vocab_file="", pattern=enc._pat_str, extra_special_tokens=specials).converted()
    # today's date, as `gptoss-jax serve` renders it by default
    ids = render_chat_prompt([("user", SENTINEL)], conversation_start_date=datetime.date.today())
    head, tail = enc.decode(ids).split(SENTINEL)
    template = (
        "{% raw %}" + head + "{% endraw %}{{ messages[-1]['content'] }}{% raw %}" + tail + "{% endraw %}"
    )
    eos = enc.decode([cfg.eos_token_ids[0]])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=enc.decode([cfg.pad_token_id]),
                                   chat_template=template)  # fmt: skip
    probe = "Write one sentence about the sea."
    got = fast.apply_chat_template([{"role": "user", "content": probe}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)  # fmt: skip
    got = got["input_ids"] if isinstance(got, dict) else got
    want = render_chat_prompt([("user", probe)], conversation_start_date=datetime.date.today())
    if list(got) != list(want):
        raise RuntimeError(
            f"the HF tokenizer renders {len(got)} tokens, ours {len(want)}: not the same prompt"
        )
    if fast(probe)["input_ids"] != encode(probe):  # the completions prompt: plain text, no BOS added
        raise RuntimeError("the HF tokenizer encodes the raw prompt differently from ours")
    view.mkdir(parents=True)
    for f in ckpt.iterdir():
        (view / f.name).symlink_to(f.resolve())
    fast.save_pretrained(view)


PHASES = ("completions", "chat")


def run_side(name: str, cmd: list[str], log: Path, url: str, model: str, work, args, env) -> dict:
    """Starts one server, runs every phase against it one after the other, stops it."""
    print(f"starting {name} ...", flush=True)
    t0 = time.perf_counter()
    proc = start(cmd, log, url, args.start_timeout, env)
    print(f"  ready after {time.perf_counter() - t0:.0f} s", flush=True)
    out = {}
    try:
        for phase in args.phases:
            print(f"  {phase}: {args.clients} clients x {args.requests} request(s) ...", flush=True)
            recs, wall = asyncio.run(load(url, phase, model, work, args))
            out[phase] = summary(name, recs, wall)
            print(f"    {out[phase]['ok']}/{out[phase]['total']} ok in {wall:.0f} s", flush=True)
    finally:
        stop(proc)
    return out


def print_table(phase: str, sides: list[dict]) -> None:
    if phase == "completions":
        cols = ["ok/total", "5xx", "lost", "tok/req", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "out tok/s", "wall"]  # fmt: skip
        keys = ["tok_req", "ttft50", "ttft99", "tpot50", "tpot99"]
    else:
        cols = ["ok/total", "5xx", "lost", "TTFT p50", "TTFT p99", "total p50", "total p99", "out tok/s",
                "wall"]  # fmt: skip
        keys = ["ttft50", "ttft99", "total50", "total99"]
    print(f"{phase}:")
    print(f"| {'server':<50} | " + " | ".join(cols) + " |")
    print(f"|{'-' * 52}|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")
    for s in sides:
        mid = [f"{s[k]:.1f}" if k == "tok_req" else ms(s[k]) for k in keys]
        vals = [f"{s['ok']}/{s['total']}", str(s["5xx"]), str(s["lost"]), *mid, f"{s['tok_s']:.1f}",
                f"{s['wall']:.0f} s"]  # fmt: skip
        print(f"| {s['name']:<50} | " + " | ".join(v.rjust(len(c)) for v, c in zip(vals, cols)) + " |")
    for s in sides:
        if s["no_text"]:
            print(f"  {s['name']}: {s['no_text']} completed request(s) streamed no text (no TTFT/TPOT)")
        if s["one_piece"]:
            print(f"  {s['name']}: {s['one_piece']} request(s) streamed all their text in one chunk at "
                  "the end (no TTFT)")  # fmt: skip
        for e in s["errors"]:
            print(f"  {s['name']} error: {e}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="checkpoint folder (written there if it does not exist)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, choices=[0.0, 1.0])
    ap.add_argument("--max-seqs", type=int, default=16, help="gptoss-jax serve --max-seqs")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="comma-separated load phases, run in this order against each server: "
                    "completions (TTFT, TPOT), chat (counts, total latency)")  # fmt: skip
    ap.add_argument("--no-hf", action="store_true", help="skip transformers serve")
    ap.add_argument("--no-warmup", action="store_true",
                    help="pass --no-warmup to gptoss-jax serve: it compiles during the load, so its latency "
                    "figures then include compilation; for debugging only")  # fmt: skip
    ap.add_argument(
        "--start-timeout", type=float, default=900, help="seconds a server may take to answer /health"
    )
    args = ap.parse_args(argv)
    for name in ("clients", "requests", "max_tokens", "max_seqs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad or not args.phases or len(set(args.phases)) != len(args.phases):
        ap.error(f"--phases: distinct names among {','.join(PHASES)} (got {','.join(args.phases)!r})")

    cfg = load_config()
    from gptoss_jax.checkpoint.synthetic import checkpoint_bytes, write_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="gptoss_serve_load_")
    if args.ckpt is None:
        args.ckpt = Path(tmp.name) / MODEL
    if not (args.ckpt / "config.json").exists():
        print(
            f"writing the {checkpoint_bytes(cfg) / 2**20:.0f} MiB checkpoint to {args.ckpt} ...", flush=True
        )
        write_checkpoint(args.ckpt, cfg, layout="hf", seed=0)
    work = prompts(args.clients, args.requests)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    sides = []

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "gptoss_jax", "serve", str(args.ckpt), "--port", str(port), "--host",
             "127.0.0.1", "--dtype", "float32", "--max-seqs", str(args.max_seqs), "--served-model-name",
             MODEL, *(["--no-warmup"] if args.no_warmup else [])]  # fmt: skip
    name = "gptoss-jax serve" + (" (--no-warmup: compiles inside)" if args.no_warmup else "")
    sides.append(run_side(name, serve, Path(tmp.name) / "gptoss.log", url, MODEL, work, args, env))

    hf_note = None
    if not args.no_hf:
        try:
            import transformers

            if transformers.__version__ != HF_VERSION:
                raise RuntimeError(
                    f"transformers {transformers.__version__} installed, this compares {HF_VERSION}"
                )
            view = Path(tmp.name) / "hf"
            write_hf_view(args.ckpt, view, cfg)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cli = Path(sys.executable).with_name("transformers")
            hf = [str(cli), "serve", str(view), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
                  "--dtype", "float32"]  # fmt: skip
            name = f"transformers {HF_VERSION} serve (eager, dequantized f32)"
            sides.append(run_side(name, hf, Path(tmp.name) / "hf.log", url, str(view), work, args, env))
        except Exception as e:  # noqa: BLE001 - the comparison is optional: say why it did not run
            hf_note = (
                f"transformers serve not measured: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
            )

    import jax
    import openai

    try:
        import transformers

        hf_ver = transformers.__version__
    except ImportError:
        hf_ver = "not installed"
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print()
    print(f"date      {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"hardware  {cpu_model()}, {os.cpu_count()} cores")
    print(f"software  jax {jax.__version__}, openai {openai.__version__}, transformers {hf_ver} "
          f"(compared: {HF_VERSION}), python {platform.python_version()}")  # fmt: skip
    print(f"command   {cmd}")
    print("model     4 layers, 32 experts top-4, hidden 512, width 512, 8 q / 2 kv heads x 64, vocab 201088, "
          "MXFP4 experts, float32, random weights")  # fmt: skip
    print(f"load      per phase: {args.clients} streaming clients x {args.requests} request(s), max_tokens "
          f"{args.max_tokens}, temperature {args.temperature:g}; gptoss-jax --max-seqs "
          f"{args.max_seqs}")  # fmt: skip
    print(
        f"load avg  {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min; other work slows both sides)"
    )
    print()
    for phase in args.phases:
        print_table(phase, [side[phase] for side in sides if phase in side])
    if "completions" in args.phases:
        print("completions: tok/req = usage.completion_tokens (an end token may stop a request before "
              "max_tokens); TPOT = (finish chunk - first text) / (tokens - 1)")  # fmt: skip
    if hf_note:
        print(hf_note)
    tmp.cleanup()
    done = [s for side in sides for s in side.values()]
    return 0 if all(s["ok"] == s["total"] and not s["5xx"] for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`gptoss-jax`: a thin shell over the library (every command is a few calls to public functions).

    gptoss-jax demo                      write a tiny random checkpoint, load it, generate (start here)
    gptoss-jax generate PATH --prompt T  raw completion (--prompt-file F, --prompt - for stdin, --tokens IDS)
    gptoss-jax chat PATH                 harmony chat: multi-turn, reasoning effort, analysis/final channels
    gptoss-jax bench PATH                prefill and decode tokens/s, memory
    gptoss-jax info MODEL [--train]      per-device memory plan for a mesh (nothing loaded)
    gptoss-jax finetune BASE DATA --out DIR   LoRA fine-tuning on chat JSONL; adapters in PEFT's format
    gptoss-jax merge BASE --adapters DIR --out OUT   adapters folded into a new checkpoint (HF layout)
    gptoss-jax serve PATH                OpenAI-compatible HTTP server (docs/serving.md)
    gptoss-jax verify DIR                check every array of a converted checkpoint against its checksum

PATH is a checkpoint folder as typed (relative, ~, trailing slash) or a Hugging Face model id
(openai/gpt-oss-20b, fetched through the hub cache). Commands that load a model take --mesh
data=1,expert=4,model=2, --dtype, --attention-impl, --moe-impl, --expert-format. Every argument is checked
before any weight is read.
Exit codes: 0 ok; 1 `verify` found a damaged array; 2 bad input (one line on stderr naming the argument, file or tensor); 130 interrupted
(one line, at any point, also during compilation).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import threading
import time

from .kernels import VALIDATED_PLATFORMS
from .progress import StatusLine, exit_now, exit_on_interrupt

PROG = "gptoss-jax"
IMPLS = ("auto", "xla", "pallas")
DTYPES = ("auto", "bfloat16", "float32")
DTYPE_HELP = ("compute and non-expert weight dtype: auto (default) = bfloat16 on GPU/TPU, float32 on CPU, where "
              "XLA's bfloat16 matmuls are several times slower; float32 is also the exact mode")  # fmt: skip
IMPL_HELP = ("{what}: auto (default) = the Pallas kernel only on platforms where it has been validated "
             f"({', '.join(sorted(VALIDATED_PLATFORMS)) or 'none yet'}), XLA everywhere else; xla; or pallas "
             "(interpret mode on CPU)")  # fmt: skip
COMPILING = "compiling (first run for these shapes)"
SEED_LIMIT = 2**63  # jax.random.key takes a signed 64-bit seed


class UsageError(ValueError):
    """Bad command-line input detected by the CLI itself."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; we want one line on stderr and exit code 2.
    def error(self, message):
        sub = self.prog.removeprefix(PROG).strip()  # "generate" for a subcommand's parser
        raise UsageError(f"{sub}: {message}" if sub else message)


def _fail(msg, code: int = 2) -> int:
    print(f"{PROG}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------ arguments
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint: a folder of released safetensors (HF or original/ layout), an "
                   "Orbax checkpoint from gptoss-convert, or a Hugging Face model id such as openai/gpt-oss-20b")  # fmt: skip
    g = p.add_argument_group("model")
    g.add_argument("--mesh", help="device mesh, e.g. data=1,expert=4,model=2 (the sizes must multiply to the "
                   "number of devices; default: one device)")  # fmt: skip
    g.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    _impl_args(g)
    g.add_argument("--expert-format", choices=("auto", "mxfp4", "dequantized"), default="auto",
                   help="auto (default): as the checkpoint stores them (released weights: packed MXFP4); "
                   "mxfp4 keeps them packed; dequantized inflates them at load")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress bar, status or timing lines")
    _cache_arg(g)


def _impl_args(g) -> None:
    g.add_argument("--attention-impl", choices=IMPLS, default="auto", help=IMPL_HELP.format(what="attention"))
    g.add_argument("--moe-impl", choices=IMPLS, default="auto",
                   help=IMPL_HELP.format(what="expert computation"))  # fmt: skip


def _cache_arg(g) -> None:
    g.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="persistent XLA compilation cache, so that later runs skip most of the compile time "
        f"(default: ${CACHE_ENV}, else {_default_cache_dir()}; 'off' disables it)",
    )


def _adapters_arg(p) -> None:
    p.add_argument("--adapters", metavar="DIR", help="apply LoRA adapters from a PEFT folder (e.g. written by "
                   "`finetune`); the experts stay packed")  # fmt: skip


CACHE_ENV = "GPTOSS_JAX_COMPILE_CACHE"
CACHE_MAX_BYTES = 4 * 2**30  # least recently used programs are evicted past this
# Which programs get a file is decided by their size, not by how long they took to compile: a compile time
# threshold depends on the machine's load, so the same command cached different programs from run to run.
# The model's programs are 100 KB and more even for the tiny demo model; JAX's per-op helpers (zeros,
# broadcasts, key folding) are under 10 KB.
CACHE_MIN_ENTRY_BYTES = 16 * 2**10


def _default_cache_dir() -> str:
    return os.path.join("~", ".cache", "gptoss_jax", "xla")  # beside the tokenizer's encodings/


def setup_compile_cache(choice: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `choice` (or $GPTOSS_JAX_COMPILE_CACHE, else the user
    cache folder); 'off' disables it. Leaves JAX alone when the user configured it
    (JAX_COMPILATION_CACHE_DIR). Returns the folder used, or None."""
    import jax

    if jax.config.jax_compilation_cache_dir:  # set by the user (JAX reads JAX_COMPILATION_CACHE_DIR into it)
        return jax.config.jax_compilation_cache_dir
    choice = choice if choice is not None else os.environ.get(CACHE_ENV) or _default_cache_dir()
    if choice.lower() in ("off", "none", "0", ""):
        return None
    path = os.path.expanduser(choice)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache, say so once
        print(f"{PROG}: warning: no compilation cache ({path}: {e.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default is unbounded: keep the newest 4 GiB
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    if (
        jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
        and jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    ):  # JAX's defaults: not the user's
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", CACHE_MIN_ENTRY_BYTES)
    return path


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy (default {temperature:g})")  # fmt: skip
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1.0 = off)")  # fmt: skip
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min-p times the most likely one, in [0, 1] (default off)")  # fmt: skip
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the logits of tokens already in the context by this when positive, multiply "
                   "when negative (> 0; default 1.0 = off)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="sampling seed, 0 <= seed < 2**63 (default 0)")
    g.add_argument("--max-context", type=int, help="KV-cache length: prompt + new tokens must fit (default: "
                   "exactly what the request needs, up to the model's context length)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from .training.command import add_finetune_arguments, add_merge_arguments, add_train_plan_arguments

    p = _Parser(prog=PROG, description="gpt-oss in JAX / Flax NNX with MXFP4 experts kept packed.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="write a tiny random checkpoint in the real layout, load it, generate")
    d.add_argument(
        "--out", help="write the checkpoint here (a new folder) and keep it; default: a temp folder"
    )
    d.add_argument("--prompt", default=None, help="text prompt (default: 'The capital of France is')")
    d.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")
    d.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    d.add_argument("--mesh", help="device mesh, e.g. expert=2 (default: one device)")
    _impl_args(d)
    d.add_argument("--seed", type=int, default=0, help="checkpoint and sampling seed (default 0)")
    _cache_arg(d)

    g = sub.add_parser("generate", help="raw completion of a text prompt or of token ids")
    _model_args(g)
    _adapters_arg(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (o200k_harmony tokenizer; needs the real 201088 "
                     "vocabulary); '-' reads it from stdin")  # fmt: skip
    src.add_argument("--prompt-file", metavar="FILE", help="read the text prompt from FILE (UTF-8; one final "
                     "newline is dropped, as for stdin)")  # fmt: skip
    src.add_argument("--tokens", help="prompt as token ids, separated by spaces or commas; prints token ids")
    _sampling_args(g, temperature=0.0)
    g.add_argument("--no-stream", action="store_true", help="print the result at the end (one jitted loop)")

    c = sub.add_parser("chat", help="harmony chat (multi-turn; analysis and final channels shown apart)")
    _model_args(c)
    _adapters_arg(c)
    c.add_argument("--message", "-m", action="append", help="a user message (repeat for several turns); "
                   "default: read messages from stdin, one per line (an empty line or EOF ends), with line "
                   "editing and history on a terminal; /reset starts a new conversation, /exit leaves")  # fmt: skip
    c.add_argument("--reasoning-effort", choices=("low", "medium", "high"),
                   help="of the system message (default: the one --adapters were trained with, else medium)")  # fmt: skip
    c.add_argument("--developer", help="developer instructions (the system prompt of other chat formats)")
    c.add_argument("--date", metavar="none|today|YYYY-MM-DD", help="conversation start date for the system "
                   "message, e.g. 2025-08-05 (default: the one --adapters were trained with, else none)")  # fmt: skip
    c.add_argument("--show-prompt", action="store_true", help="print each turn's rendered prompt token ids")
    c.add_argument("--hide-analysis", action="store_true", help="do not print the analysis channel")
    c.add_argument("--tools", metavar="TOOL[,TOOL...]",
                   help="gpt-oss's built-in tools to declare and run in the chat (python, browser); each call and its "
                   "result are shown (docs/tools.md)")  # fmt: skip
    c.add_argument("--python-sandbox", choices=("auto", "bwrap", "none"), default="auto",
                   help="python's isolation: bwrap (default where it works), or none (a warning: no "
                   "isolation of files or network)")  # fmt: skip
    c.add_argument(
        "--max-tool-calls", type=int, default=16, metavar="N", help="tool calls per user message (default 16)"
    )
    from .api.cli import add_browser_arguments

    add_browser_arguments(c)
    _sampling_args(c, temperature=1.0)

    b = sub.add_parser("bench", help="prefill and decode tokens/s and memory of a checkpoint")
    _model_args(b)
    b.add_argument("--adapters", metavar="DIR | NAME=DIR,NAME=DIR...",
                   help="DIR: LoRA adapters merged into the base, timed as usual. NAME=DIR,...: the serving "
                   "engine with these adapters in its pool, timing a batch that mixes them (row i runs "
                   "adapter i mod N) against the same batch on the base and on one adapter")  # fmt: skip
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    b.add_argument("--new", type=int, default=64, help="decoded tokens timed (default 64)")
    b.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions, median reported (default 3)")

    f = sub.add_parser("finetune", help="LoRA fine-tuning on chat JSONL (experts stay packed); PEFT adapters")
    _model_args(f)
    add_finetune_arguments(f)

    m = sub.add_parser("merge", help="fold LoRA adapters into a new checkpoint (experts re-quantized to MXFP4 "
                       "with the error reported, or dequantized)")  # fmt: skip
    add_merge_arguments(m)

    i = sub.add_parser("info", help="per-device memory plan of a model on a mesh (nothing is loaded)")
    from .memory import add_info_arguments

    add_info_arguments(i)
    add_train_plan_arguments(i)

    v = sub.add_parser("verify", help="re-read a converted (Orbax) checkpoint and check every array against "
                       "the crc32c recorded when it was converted; exit 1 naming the damaged array and file")  # fmt: skip
    v.add_argument("path", help="a checkpoint folder written by gptoss-convert")
    v.add_argument(
        "--quiet", action="store_true", help="no progress bar (the one-line result is still printed)"
    )

    from .api.cli import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server: chat completions, responses, "
                                       "completions, with harmony tool calls and structured outputs"))  # fmt: skip
    return p


# -------------------------------------------------------------------------------------------- helpers
def _say(args, *a) -> None:
    if not getattr(args, "quiet", False):
        print(*a, file=sys.stderr, flush=True)


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _mesh(spec):
    if not spec:
        return None
    from .sharding import make_mesh

    return make_mesh(spec)


def _load(args):
    from .loading import load
    from .sharding import maybe_initialize_distributed

    if maybe_initialize_distributed():  # one process of a pod / cluster job: join it before touching a device
        import jax

        if jax.process_index() != 0:  # every process runs the model; process 0 alone prints
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
            args.quiet = True
    mesh = _mesh(args.mesh)
    t0 = time.perf_counter()
    args.dtype = resolve_dtype(args.dtype)
    # "auto" passes nothing: the loader then keeps the format the checkpoint stores
    fmt = {} if args.expert_format == "auto" else {"expert_format": args.expert_format}
    model = load(args.path, dtype=args.dtype, mesh=mesh, quiet=args.quiet, attention_impl=args.attention_impl,
                 moe_impl=args.moe_impl, **fmt)  # fmt: skip
    if getattr(args, "adapters", None):
        from .adapters import apply_adapters

        apply_adapters(model, args.adapters)
    cfg = model.cfg
    _say(args, f"loaded {args.path}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
               f"({cfg.expert_format}), vocab {cfg.vocab_size}, {args.dtype}, {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return model


def _check_args(args) -> None:
    """Everything that can be checked from the command line alone, before any file is read."""

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise UsageError(f"--{name} must be {rule}, got {getattr(args, name.replace('-', '_'))}")

    if getattr(args, "mesh", None):
        from .sharding import parse_mesh

        parse_mesh(args.mesh)  # the spec's syntax; its size is checked against the devices at load
    if not hasattr(args, "max_new_tokens"):
        return
    need(args.max_new_tokens >= 1, "max-new-tokens", "at least 1")
    need(math.isfinite(args.temperature) and args.temperature >= 0, "temperature", ">= 0 (0 = greedy)")
    need(0 < args.top_p <= 1, "top-p", "in (0, 1]")
    need(args.top_k >= 0, "top-k", ">= 0 (0 = off)")
    need(args.min_p is None or 0 <= args.min_p <= 1, "min-p", "in [0, 1]")
    penalty = args.repetition_penalty
    need(penalty is None or (math.isfinite(penalty) and penalty > 0), "repetition-penalty", "> 0 (1.0 = off)")
    need(0 <= args.seed < SEED_LIMIT, "seed", "in [0, 2**63)")
    need(args.max_context is None or args.max_context >= 1, "max-context", "at least 1")


def _check_fit(args, cfg, prompt: list[int] | None = None, what: str = "") -> None:
    """Prompt tokens against the vocabulary and prompt + new tokens against the cache and the model, from the
    checkpoint's config alone (no weights read yet)."""
    if args.top_k > cfg.vocab_size:
        raise UsageError(f"--top-k must be at most the vocabulary size {cfg.vocab_size}, got {args.top_k}")
    if prompt is None:
        return
    if not prompt:
        raise UsageError(f"{what}: the prompt is empty")
    from .config import check_token_ids

    try:
        check_token_ids(prompt, cfg.vocab_size, at=False)  # the message names the checkpoint instead
    except ValueError as e:
        hint = " (text needs the o200k_harmony vocabulary; use --tokens)" if what != "--tokens" else ""
        raise UsageError(f"{what}: {e} of {args.path}{hint}") from None
    need = len(prompt) + args.max_new_tokens
    limits = [("the cache length", args.max_context, "--max-context"),
              ("the model's context length", cfg.context_length, args.path)]  # fmt: skip
    for name, limit, source in limits:
        if limit is not None and need > limit:
            raise UsageError(f"{what}: prompt {len(prompt)} + --max-new-tokens {args.max_new_tokens} = "
                             f"{need} tokens exceed {name} {limit} ({source})")  # fmt: skip


def _config(args):
    from .hub import read_config

    return read_config(args.path)


def _sample_kw(args) -> dict:
    kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
          "top_k": args.top_k, "seed": args.seed, "cache_length": args.max_context}  # fmt: skip
    # passed only when set, so generate() keeps its own defaults (off)
    kw.update({k: v for k in ("min_p", "repetition_penalty") if (v := getattr(args, k)) is not None})
    return kw


def read_prompt(args) -> tuple[str, str]:
    """(text, where it came from) for --prompt TEXT, --prompt - (stdin) or --prompt-file FILE."""
    if args.prompt_file is not None:
        try:
            with open(os.path.expanduser(args.prompt_file), encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {args.prompt_file}: not UTF-8 text") from None
        return text.removesuffix("\n"), "--prompt-file"
    if args.prompt == "-":
        return sys.stdin.read().removesuffix("\n"), "--prompt -"
    return args.prompt, "--prompt"


_COMPILE_STARTED = threading.Event()


@functools.cache
def _watch_compiles() -> None:
    import jax

    def on_event(event: str, *_, **__) -> None:
        if event.startswith("/jax/core/compile/"):  # JAX traced, lowered or compiled a program
            _COMPILE_STARTED.set()

    jax.monitoring.register_event_duration_secs_listener(on_event)


def _compile_status(args) -> StatusLine:
    """The "compiling ..." line of the next generate call: shown only once JAX starts on a new program (its
    monitoring events), so shapes already compiled in this process print nothing."""
    _watch_compiles()
    _COMPILE_STARTED.clear()
    return StatusLine(COMPILING, quiet=args.quiet, delay=1.0, when=_COMPILE_STARTED)


# ------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from .demo import DEFAULT_PROMPT, run_demo

    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    run_demo(args.out, prompt=args.prompt or DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens,
             dtype=resolve_dtype(args.dtype), mesh=_mesh(args.mesh), seed=args.seed,
             attention_impl=args.attention_impl, moe_impl=args.moe_impl)  # fmt: skip
    return 0


def cmd_generate(args) -> int:
    from . import tokenizer
    from .generate import generate

    _check_args(args)
    raw = args.tokens is not None
    if raw:
        try:  # the vocabulary is checked below (`_check_fit`), naming the checkpoint
            ids, what = tokenizer.parse_token_ids(args.tokens, vocab_size=None), "--tokens"
        except ValueError as e:
            raise UsageError(f"--tokens: {e}") from None
    else:
        text, what = read_prompt(args)
        ids = tokenizer.encode(text)
    _check_fit(args, _config(args), ids, what)
    if getattr(args, "adapters", None):
        _prompt_settings(args, note=" (generate sends the prompt as given: render it with these settings to "
                                    "match)")  # fmt: skip
    model = _load(args)
    kw = _sample_kw(args)
    t0 = time.perf_counter()
    if args.no_stream:
        with _compile_status(args):
            new = generate(model, ids, **kw)[0]
        print(" ".join(map(str, new)) if raw else tokenizer.decode(new), flush=True)
        dt = time.perf_counter() - t0
        _say(args, f"{len(ids)} prompt tokens, {len(new)} new tokens in {dt:.2f} s "
                   f"({len(new) / dt:.1f} tokens/s over the whole call)")  # fmt: skip
        return 0
    out: list[int] = []
    stamps: list[float] = []
    shown = ""

    def on_token(step):
        nonlocal shown
        status.done()
        stamps.append(time.perf_counter())
        out.append(step[0])
        if raw:
            print(step[0], end=" ", flush=True)
        else:  # print what the new token adds to the decoded text (a multi-byte character may span tokens)
            text = tokenizer.decode(out)
            if not text.endswith("\ufffd"):
                print(text[len(shown) :], end="", flush=True)
                shown = text

    with _compile_status(args) as status:
        generate(model, ids, callback=on_token, **kw)
    if not raw and len(shown) < len(text := tokenizer.decode(out)):
        print(text[len(shown) :], end="")
    print(flush=True)
    # the steady rate counts from the second token: the first decode step compiles too
    rate = f", then {(len(out) - 2) / (stamps[-1] - stamps[1]):.1f} tokens/s" if len(out) > 2 else ""
    _say(args, f"{len(ids)} prompt tokens, {len(out)} new tokens in {stamps[-1] - t0:.2f} s: first after "
               f"{stamps[0] - t0:.2f} s{rate}")  # fmt: skip
    return 0


# the parser's part types (harmony/parser.py) -> label and terminal style
_LABELS = {"reasoning": ("[analysis] ", "\033[2m"), "content": ("[final] ", "\033[1m"),
           "preamble": ("[commentary] ", "\033[36m"), "tool_call": ("[call {name}] ", "\033[35m"),
           "tool_result": ("[result {name}] ", "\033[33m")}  # fmt: skip
CHAT_HELP = "type a message and press Enter; /reset starts a new conversation; /exit or Ctrl-D leaves"


def _chat_lines(args, interactive: bool):
    """User messages: -m values, else stdin lines (an empty line or EOF ends; /exit too)."""
    if args.message is not None:
        yield from args.message
        return
    if interactive:
        import readline  # noqa: F401 - input() gains line editing and history

        print(CHAT_HELP, file=sys.stderr, flush=True)
    while True:
        if interactive:
            try:
                line = input("user> ")
            except EOFError:
                print(flush=True)
                return
            if not line.strip():
                continue
        else:
            line = sys.stdin.readline()
            if not line or not line.strip():
                return
        yield line.rstrip("\n")


def _prompt_settings(args, note: str = ""):
    """The prompts' settings (`harmony.PromptSettings`): --date and --reasoning-effort where the command has
    them and they are given, else those the --adapters were trained with, else none and medium. Says where
    they came from, and warns of each flag that overrides the adapters' setting."""
    from .harmony import resolve_prompt_settings

    resolved = resolve_prompt_settings(getattr(args, "adapters", None), date=getattr(args, "date", None),
                                       reasoning_effort=getattr(args, "reasoning_effort", None))  # fmt: skip
    for line in resolved.notes:
        _say(args, f"{PROG}: {line}{note}")
    for line in resolved.warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)
    return resolved.settings


def cmd_chat(args) -> int:
    """Each turn is parsed once, as it streams, by the server's parser (`harmony.OutputParser`: one harmony
    parser per turn, non-strict, what does not parse shown as final text); its parts go into the history
    (`harmony.ChatSession`), which renders the next prompt as `serve` renders the same conversation.

    With --tools, the tools are declared in the system message; a reply that calls one (`to=python`, ended by
    <|call|>) is run, its result shown and added as the tool's message, and the model goes on, as in the
    server's tool loop (api/toolloop.py). The tools' conversation is the chat session (/reset starts a new
    one)."""
    import uuid

    from . import harmony, tokenizer
    from .api.cli import builtin_tool_names, make_tools

    _check_args(args)
    if args.max_tool_calls < 0:
        raise UsageError(f"--max-tool-calls must be at least 0, got {args.max_tool_calls}")
    names = builtin_tool_names(args.tools, "--tools") if args.tools is not None else []
    cfg = _config(args)
    _check_fit(args, cfg)
    if cfg.vocab_size != tokenizer.N_VOCAB:
        raise UsageError(f"{args.path}: chat needs the o200k_harmony vocabulary ({tokenizer.N_VOCAB} "
                         f"tokens), this model has {cfg.vocab_size}")  # fmt: skip
    settings = _prompt_settings(args)
    tools = make_tools(args, names, "--tools")  # before loading: a missing sandbox stops the command now

    def new_session():
        session = harmony.ChatSession(reasoning_effort=settings.reasoning_effort,
                                      developer_instructions=args.developer,
                                      conversation_start_date=settings.date)  # fmt: skip
        session.chat.system_tools = [t.config() for t in tools.values()]
        session.conversation = f"chat-{uuid.uuid4().hex[:12]}"  # the tools' state (python's kernel)
        return session

    try:
        model = _load(args)
        session = new_session()
        turn = 0
        for text in _chat_lines(args, interactive=args.message is None and sys.stdin.isatty()):
            command = text.strip().lower()
            if command == "/exit":
                break
            if command == "/reset":
                for t in tools.values():
                    t.close(session.conversation)
                session = new_session()
                _say(args, "(new conversation)")
                continue
            turn += 1
            _chat_turn(args, model, session, session.prompt_tokens(text), turn, tools)
    finally:
        for t in tools.values():
            t.shutdown()
    return 0


def _chat_turn(args, model, session, prompt: list[int], turn: int, tools: dict) -> None:
    """One user message's answer: generations, and between them the calls of --tools, each shown."""
    import asyncio

    from . import harmony
    from .tools import ToolCall

    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    calls = 0
    while True:
        call = _chat_generate(args, model, session, prompt, turn, color, tools)
        if call is None:
            return
        if calls >= args.max_tool_calls:
            _say(args, f"(the call is not run: --max-tool-calls {args.max_tool_calls} reached)")
            return
        calls += 1
        part, tool = call
        to = harmony.part_recipient(part)
        result = asyncio.run(tool.call(ToolCall(to, part.text, session.conversation)))
        label, style = _LABELS["tool_result"]
        label = label.format(name=to)
        print(f"{style}{label}" if color else label, end="", flush=True)
        print(result.text.rstrip("\n") + ("\033[0m" if color else ""), flush=True)
        session.chat.messages.append(harmony.run_result_message(part, result.text))
        prompt = session.prompt_tokens()


def _chat_generate(args, model, session, prompt: list[int], turn: int, color: bool, tools: dict):
    """One generation, shown as it streams and added to the history -> (part, tool) of a call of --tools
    to run (the reply's last message, ended by <|call|>), else None."""
    from . import harmony, tokenizer
    from .api.toolloop import tool_of
    from .generate import generate

    stop = tokenizer.stop_tokens_for_assistant_actions()
    if args.show_prompt:
        print(f"[prompt {turn}] {' '.join(map(str, prompt))}", flush=True)
    parser = harmony.OutputParser(namespaces=list(tools))
    out: list[int] = []
    shown = [None]  # the part being printed

    def show(events):
        for kind, part, piece in events:
            if args.hide_analysis and part.type == "reasoning":
                continue
            if kind == "start" or part is not shown[0]:
                label, style = _LABELS[part.type]
                if shown[0] is not None:
                    print("\033[0m" if color else "", flush=True)  # end the previous part's line and style
                name = part.name if part.namespace in (harmony.FUNCTIONS, None) else harmony.part_recipient(part)
                label = label.format(name=name)
                print(f"{style}{label}" if color else label, end="", flush=True)
                shown[0] = part
            print(piece, end="", flush=True)

    def on_token(step):
        status.done()
        out.append(step[0])
        show(parser.feed(step[0]))

    with _compile_status(args) as status:
        generate(model, prompt, stop_tokens=stop, callback=on_token, **_sample_kw(args))
    show(parser.finish())
    if color and shown[0] is not None:
        print("\033[0m", end="")
    if shown[0] is not None:
        print(flush=True)
    if out and out[-1] not in stop:
        _say(args, f"(stopped after --max-new-tokens {args.max_new_tokens})")
    if parser.warned:  # keep the history valid harmony
        _say(args, "(the reply is not valid harmony, as expected from random weights; it is left out of the "
                   "history)")  # fmt: skip
        return None
    last = parser.parts[-1] if parser.parts else None
    tool = tool_of(last, tools) if last is not None and out and out[-1] == tokenizer.CALL else None
    # the call as the model wrote it (its channel kept), the rest as the server stores it
    for p in parser.parts:
        if tool is not None and p is last:
            session.chat.messages.append(harmony.run_call_message(p))
        else:
            session.add_parts([p])
    return (last, tool) if tool is not None else None


def cmd_bench(args) -> int:
    import statistics

    import numpy as np

    from .cache import cache_bytes
    from .generate import generate
    from .kernels import resolve_impl
    from .weights import param_bytes

    _check_args(args)
    for name in ("prompt_len", "new", "batch", "reps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cfg = _config(args)
    if args.prompt_len + args.new + 1 > cfg.context_length:
        raise UsageError(f"--prompt-len {args.prompt_len} + --new {args.new} + 1 exceed the model's context "
                         f"length {cfg.context_length}")  # fmt: skip
    named = _named_adapters(args.adapters)
    if named:
        args.adapters = None  # served from the pool, not merged
        return _bench_adapters(args, _load(args), named)
    model = _load(args)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)

    def run(n):
        t0 = time.perf_counter()
        generate(model, prompt, max_new_tokens=n, stop_tokens=())
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with _compile_status(args):
        run(1), run(args.new + 1)
    compile_s = time.perf_counter() - t0
    t1 = statistics.median(run(1) for _ in range(args.reps))
    tn = statistics.median(run(args.new + 1) for _ in range(args.reps))
    B = args.batch
    rows = [
        ("prefill", f"{B * args.prompt_len / t1:,.0f} tok/s", (f"{B}x{args.prompt_len} tokens in {t1 * 1e3:.1f} ms "
                                                              "(incl. first token)")),
        ("decode", f"{B * args.new / max(tn - t1, 1e-9):,.1f} tok/s",
         f"{B}x{args.new} tokens in {(tn - t1) * 1e3:.1f} ms ({(tn - t1) / args.new * 1e3:.2f} ms/step)"),
        ("compile", f"{compile_s:.1f} s", "first calls (prefill + decode loop)"),
        ("weights", _gib(param_bytes(cfg)), (f"experts {_gib(param_bytes(cfg, experts_only=True))} "
                                            f"({cfg.expert_format})")),
        ("kv cache", _gib(cache_bytes(cfg, B, args.prompt_len + args.new + 1)),
         f"batch {B}, {args.prompt_len + args.new + 1} positions, {cfg.dtype}"),
    ]  # fmt: skip
    peak = _device_peak()
    if peak is not None:
        rows.append(("device peak", _gib(peak), "memory_stats()['peak_bytes_in_use'] of device 0"))
    try:
        import psutil

        rows.append(("host RSS", _gib(psutil.Process().memory_info().rss), "this process"))
    except ImportError:
        pass

    def impl(choice: str) -> str:
        return f"{resolve_impl(choice)} ({choice})" if choice == "auto" else choice

    print(f"{args.path}  ({jax_devices()}, {cfg.dtype}, attention {impl(args.attention_impl)}, "
          f"moe {impl(args.moe_impl)})")  # fmt: skip
    for name, value, note in rows:
        print(f"  {name:<12} {value:>14}   {note}")
    return 0


def _named_adapters(value: str | None) -> dict[str, str]:
    """ "NAME=DIR,NAME=DIR" -> {NAME: DIR}; a plain DIR (merged into the base) -> {}."""
    if not value or "=" not in value or os.path.exists(value):
        return {}
    out = {}
    for item in value.split(","):
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--adapters: {item!r} is not NAME=DIR")
        if name in out:
            raise UsageError(f"--adapters: the name {name!r} is given twice")
        out[name] = os.path.expanduser(folder)
    return out


def _bench_adapters(args, model, named: dict[str, str]) -> int:
    """The serving engine with `named` in its pool: one batch of --batch sequences (each --prompt-len
    tokens, --new generated, no prefix reuse) timed three ways on the same engine: every row on the base,
    every row on the first adapter, and rows cycling through the adapters (a mixed batch)."""
    import statistics

    import numpy as np

    from .engine import Engine

    cfg = model.cfg
    B, names = args.batch, list(named)
    chunk = min(cfg.prefill_chunk, args.prompt_len)  # one prefill chunk per prompt, few shapes to compile
    engine = Engine(model, max_seqs=B, max_context=args.prompt_len + args.new + 1, adapters=named,
                    detokenize=False, chunk=chunk, seq_buckets=(B,), token_buckets=(chunk,))  # fmt: skip
    t0 = time.perf_counter()
    with _compile_status(args):
        engine.warmup()
    compile_s = time.perf_counter() - t0
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()

    def run(adapters) -> tuple[float, int]:
        steps0 = engine.metrics().steps
        t = time.perf_counter()
        handles = [engine.submit(p, max_tokens=args.new, stop_token_ids=(), reuse=False, adapter=a)
                   for p, a in zip(prompts, adapters)]  # fmt: skip
        while not all(h.done for h in handles):
            engine.step()
        return time.perf_counter() - t, engine.metrics().steps - steps0

    cases = {"base only": [None] * B, f"one adapter ({names[0]})": [names[0]] * B,
             f"mixed ({len(names)} adapters)": [names[i % len(names)] for i in range(B)]}  # fmt: skip
    print(f"{args.path}  ({jax_devices()}, {cfg.dtype}), serving engine, batch {B} x {args.prompt_len} "
          f"prompt + {args.new} new tokens, adapter pool {engine.pool.max_adapters} x rank {engine.pool.rank} "
          f"({_gib(engine.pool.bytes_per_adapter)} per adapter)")  # fmt: skip
    for label, adapters in cases.items():
        run(adapters)  # once untimed: every path warm
        times = [run(adapters) for _ in range(args.reps)]
        sec = statistics.median(t for t, _ in times)
        steps = times[0][1]
        print(f"  {label:<28} {B * args.new / sec:>10,.1f} tok/s   {sec * 1e3:.1f} ms for {steps} steps "
              f"({sec / max(steps, 1) * 1e3:.2f} ms/step)")  # fmt: skip
    print(f"  {'compile':<28} {compile_s:>10.1f} s")
    engine.close()
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def jax_devices() -> str:
    import jax

    d = jax.devices()
    return f"{len(d)} x {d[0].device_kind}"


def _device_peak():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None
    return (stats or {}).get("peak_bytes_in_use")


def cmd_finetune(args) -> int:
    from .sharding import maybe_initialize_distributed
    from .training.command import run_finetune

    maybe_initialize_distributed()  # several hosts: join the job before touching a device
    return run_finetune(args, dtype=resolve_dtype(args.dtype), mesh=_mesh(args.mesh))


def cmd_merge(args) -> int:
    from .training.command import run_merge

    return run_merge(args)


def cmd_info(args) -> int:
    if args.train:
        from .training.command import run_train_plan

        return run_train_plan(args)
    from .memory import run_info

    return run_info(args)


def cmd_serve(args) -> int:
    from .api.cli import run_serve

    return run_serve(args)


def cmd_verify(args) -> int:
    from .checkpoint import integrity

    report = integrity.verify_checkpoint(os.path.expanduser(args.path), quiet=args.quiet)
    if not report.ok:
        return _fail(f"verification failed: {report.problem_line()}", 1)
    print(report.summary(), file=sys.stderr)
    return 0


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "info": cmd_info,
            "finetune": cmd_finetune, "merge": cmd_merge, "serve": cmd_serve, "verify": cmd_verify}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    try:
        with exit_on_interrupt(f"{PROG}: interrupted"):
            args = build_parser().parse_args(argv)
            if args.command is None:
                build_parser().print_help()
                return 2
            if hasattr(args, "compile_cache"):  # commands that compile
                setup_compile_cache(args.compile_cache)
            return COMMANDS[args.command](args)
    except (UsageError, CheckpointError, ValueError) as e:
        return _fail(e, 2)
    except FileNotFoundError as e:
        return _fail(f"{e.filename}: {e.strerror}", 2)
    except KeyboardInterrupt:
        exit_now(f"{PROG}: interrupted")  # not a return: the interpreter's shutdown is what crashes here
    except BrokenPipeError:  # `gptoss-jax ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())

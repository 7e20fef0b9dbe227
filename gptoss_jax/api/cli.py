"""`gptoss-jax serve PATH`: load a checkpoint and serve it over HTTP with uvicorn.

`add_serve_arguments(parser)` declares the options on the `serve` subparser of `gptoss-jax`, `run_serve(args)`
runs it (bad input: a ValueError with one line naming the option, which the CLI turns into exit code 2).
`python -m gptoss_jax.api.cli PATH ...` runs the same command on its own.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish, then exits 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path

BUILTIN_TOOLS = ("python", "browser")  # --builtin-tools choices
TEST_HOOKS_ENV = "GPTOSS_JAX_SERVE_TEST_HOOKS"  # "1": the test-only script endpoint (see run.py)
API_KEY_ENV = "GPTOSS_JAX_API_KEY"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        help="checkpoint folder: released safetensors (HF or original/ layout) or an Orbax "
        "checkpoint from gptoss-convert",
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)",
    )
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else no key)",
    )
    g.add_argument(
        "--served-model-name",
        help="the model name clients send and /v1/models lists (default: the checkpoint folder's name)",
    )
    g.add_argument("--max-seqs", type=int, default=16, help="sequences the engine runs at once (default 16)")
    g.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences waiting for a slot; past max-seqs + max-queue a request gets a 429 (default 256)",
    )
    g.add_argument(
        "--max-context",
        type=int,
        help="longest sequence (prompt + output) a request may reach (default: the model's context length)",
    )
    g.add_argument(
        "--kv-memory",
        type=float,
        metavar="GIB",
        help="KV pool per device in GiB, shared by all sequences and the prefix cache (default: "
        "--memory-fraction on GPU/TPU, 2 GiB on CPU)",
    )
    g.add_argument(
        "--memory-fraction",
        type=float,
        metavar="F",
        help="KV pool = F of the device memory left after the weights and the largest step's working "
        "memory (default 0.9 on GPU/TPU)",
    )
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="compile the engine's call shapes when first used, "
        "not before serving (faster start; early requests of each size wait for a compile)",
    )
    g.add_argument("--date", metavar="today|none|YYYY-MM-DD",
                   help="conversation start date in harmony's system message: today's, none, or a fixed date "
                   "(default: the one --adapters were trained with, else today's, as the HF chat template and "
                   "vLLM render it)")  # fmt: skip
    g.add_argument("--reasoning-effort", choices=("low", "medium", "high"),
                   help="for requests that set none (default: the one --adapters were trained with, else "
                   "medium)")  # fmt: skip
    g.add_argument("--request-timeout", type=float, metavar="SECONDS",
                   help="a request's deadline from its arrival: past it the engine drops it (its memory is freed) "
                   "and the client gets a 504, or an error event mid-stream (default: none)")  # fmt: skip
    g.add_argument("--allowed-origins", metavar="ORIGIN[,ORIGIN...]",
                   help="enable CORS for these browser origins ('*' for any; default: CORS off)")  # fmt: skip
    g.add_argument("--strict-tools", action="store_true",
                   help="refuse (400 naming tools[i].type) hosted tools this server cannot run, such as "
                   "web_search or code_interpreter; by default they are left out of what the model sees")  # fmt: skip
    g.add_argument("--reasoning-key", metavar="KEY",
                   help="key sealing reasoning's encrypted_content (include=[\"reasoning.encrypted_content\"]); "
                   "default: $GPTOSS_JAX_REASONING_KEY, else one made at start (then blobs do not survive a "
                   "restart)")  # fmt: skip
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    t = p.add_argument_group("tools the server runs itself (docs/tools.md)")
    t.add_argument("--builtin-tools", metavar="TOOL[,TOOL...]",
                   help=f"gpt-oss's built-in tools to declare on every request and run within it: "
                   f"{', '.join(BUILTIN_TOOLS)} (Responses requests may also name them as the hosted tools "
                   "code_interpreter and web_search); default: none")  # fmt: skip
    t.add_argument("--python-sandbox", choices=("auto", "bwrap", "none"), default="auto",
                   help="how python's kernels are isolated: bwrap (bubblewrap: no network, no view of the "
                   "server's files or environment, limits), auto (bwrap, else refuse to start), or none (plain "
                   "processes with limits only; prints a warning)")  # fmt: skip
    t.add_argument("--python-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="wall-clock limit of one python call (default 120); past it the kernel restarts")  # fmt: skip
    t.add_argument("--python-memory", type=float, default=2.0, metavar="GIB",
                   help="address space of each process in a python kernel (default 2 GiB)")  # fmt: skip
    t.add_argument("--python-idle-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a conversation's kernel idle this long ends, and its state with it (default 600)")  # fmt: skip
    add_browser_arguments(t)
    t.add_argument("--browser-mcp", metavar="SPEC",
                   help="the browser's backend: an MCP server's search and fetch tools (a command line or an "
                   "http(s) URL, as for --tool-server)")  # fmt: skip
    t.add_argument("--tool-server", metavar="[LABEL=]SPEC", action="append",
                   help="an MCP server whose tools are declared on every request (a harmony namespace, LABEL or "
                   "the server's name) and run by the server: a command line (stdio) or an http(s) URL "
                   "(streamable HTTP); repeatable")  # fmt: skip
    t.add_argument("--allow-mcp-url", metavar="PREFIX", action="append",
                   help="Responses requests may connect `mcp` tools whose server_url is under PREFIX "
                   "(scheme, host and port equal, path a parent); repeatable; default: none (mcp tools are "
                   "left out, or refused with --strict-tools)")  # fmt: skip
    t.add_argument("--max-tool-calls", type=int, default=16, metavar="N",
                   help="calls of these tools per request (default 16; a Responses request's max_tool_calls "
                   "may lower it)")  # fmt: skip
    m = p.add_argument_group("model")
    m.add_argument("--mesh", help="device mesh, e.g. data=1,expert=4,model=2 (default: one device)")
    m.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU",
    )
    m.add_argument("--attention-impl", choices=("auto", "xla", "pallas"), default="auto")
    m.add_argument("--moe-impl", choices=("auto", "xla", "pallas"), default="auto")
    m.add_argument("--expert-format", choices=("mxfp4", "dequantized"), default="mxfp4")
    m.add_argument("--adapters", metavar="DIR|NAME=DIR", action="append",
                   help="LoRA adapters from a PEFT folder (e.g. written by `gptoss-jax finetune`); the "
                   "experts stay packed. DIR: merged into the base, served under its name. NAME=DIR (repeatable): "
                   "served beside the base as model NAME, all in one batch")  # fmt: skip
    m.add_argument("--max-adapters", type=int, metavar="N",
                   help="adapter slots (NAME=DIR ones and runtime loads; default: the NAME=DIR count, or 4 "
                   "with --allow-runtime-adapters)")  # fmt: skip
    m.add_argument(
        "--max-lora-rank",
        type=int,
        metavar="R",
        help="the adapter pool's rank (default: the largest NAME=DIR rank, else 16)",
    )
    m.add_argument(
        "--lora-targets",
        metavar="T[,T...]",
        help="the adapter pool's targets (default: the NAME=DIR ones', else all)",
    )
    m.add_argument(
        "--allow-runtime-adapters",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key)",
    )
    m.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="persistent XLA compilation cache ('off' disables it; see `gptoss-jax generate -h`)",
    )


def add_browser_arguments(p) -> None:
    """The browser's backend flags (serve and chat): a local index, or a search service and its fetcher."""
    p.add_argument("--browser-index", metavar="DIR",
                   help="the browser's backend: the .txt, .md and .html files under DIR, searched with SQLite "
                   "FTS5's BM25 (offline)")  # fmt: skip
    p.add_argument("--browser-search-url", metavar="URL",
                   help="the browser's backend: a SearXNG instance's JSON API (pages fetched by a fetcher that "
                   "refuses private networks)")  # fmt: skip
    p.add_argument("--browser-allow", metavar="HOST[:PORT]", action="append",
                   help="a host the browser's fetcher may reach although its address is private (loopback, "
                   "link-local, ...); repeatable")  # fmt: skip


def _check(args) -> None:
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_seqs", "max_context"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.kv_memory is not None and not args.kv_memory > 0:
        raise ValueError(f"--kv-memory must be a positive number of GiB, got {args.kv_memory}")
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be at least 0, got {args.max_queue}")
    timeout = getattr(args, "request_timeout", None)
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--request-timeout must be a positive number of seconds, got {timeout}")
    if getattr(args, "allowed_origins", None) is not None and not _origins(args.allowed_origins):
        raise ValueError("--allowed-origins: no origin given")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key: empty key")
    if not Path(args.path).exists():
        raise FileNotFoundError(2, "No such file or directory", args.path)
    split_adapters(args)
    if args.adapters is not None:  # its config is read before minutes of loading the base
        from ..adapters import read_adapter_config

        read_adapter_config(Path(args.adapters).expanduser())
    for name, folder in args.named_adapters.items():
        from ..adapters import read_adapter_config
        from ..lora import LoraError

        try:
            read_adapter_config(folder)
        except LoraError as e:
            raise ValueError(f"--adapters {name}: {e}") from None
    if getattr(args, "lora_targets", None) is not None:
        from ..lora import parse_targets

        try:
            parse_targets(args.lora_targets)
        except ValueError as e:
            raise ValueError(f"--lora-targets: {e}") from None
    for flag, least in (("max_adapters", 0), ("max_lora_rank", 1)):
        v = getattr(args, flag, None)
        if v is not None and v < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {least}, got {v}")
    args.resolved_prompt = prompt_settings(args)
    args.tool_names = builtin_tool_names(args.builtin_tools, "--builtin-tools")
    browser_flags = [f for f in ("browser_index", "browser_search_url", "browser_mcp", "browser_allow")
                     if getattr(args, f, None)]  # fmt: skip
    if browser_flags and "browser" not in args.tool_names:
        raise ValueError(f"--{browser_flags[0].replace('_', '-')}: needs --builtin-tools browser")
    from ..tools import parse_tool_server, url_allowed

    for spec in getattr(args, "tool_server", None) or []:
        if not parse_tool_server(spec)[1]:
            raise ValueError(f"--tool-server {spec!r}: empty (a command line, or an http(s) URL)")
    for prefix in getattr(args, "allow_mcp_url", None) or []:
        if not url_allowed(prefix, [prefix]):
            raise ValueError(f"--allow-mcp-url {prefix!r}: an http(s) URL prefix such as https://host/mcp")
    if getattr(args, "max_tool_calls", 16) < 0:
        raise ValueError(f"--max-tool-calls must be at least 0, got {args.max_tool_calls}")
    for flag in ("python_timeout", "python_memory", "python_idle_timeout"):
        v = getattr(args, flag, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number, got {v}")


def builtin_tool_names(value: str | None, flag: str = "--builtin-tools") -> list[str]:
    """A TOOL[,TOOL...] flag as a list of tool names (a ValueError naming an unknown one)."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    for n in names:
        if n not in BUILTIN_TOOLS:
            raise ValueError(f"{flag}: unknown tool {n!r} (available: {', '.join(BUILTIN_TOOLS)})")
    if value is not None and not names:
        raise ValueError(f"{flag}: no tool given")
    return list(dict.fromkeys(names))


def browser_backend(args, flag: str = "--builtin-tools"):
    """The browser's backend from --browser-index or --browser-search-url (with --browser-allow); None for
    --browser-mcp (connected once the server's event loop runs). A ValueError when none or two are given."""
    from ..tools import LocalIndex, SafeFetcher, SearxngBackend

    index, url, mcp = (getattr(args, k, None) for k in ("browser_index", "browser_search_url", "browser_mcp"))
    given = [
        f for f, v in (("--browser-index", index), ("--browser-search-url", url), ("--browser-mcp", mcp)) if v
    ]
    if len(given) != 1:
        raise ValueError(f"{flag} browser: give one backend, --browser-index DIR, --browser-search-url URL"
                         + (" or --browser-mcp SPEC" if hasattr(args, "browser_mcp") else "")
                         + (f" (got {' and '.join(given)})" if given else ""))  # fmt: skip
    fetcher = SafeFetcher(allow=getattr(args, "browser_allow", None) or ())
    if index:
        return LocalIndex(index, fetcher=fetcher)
    if url:
        return SearxngBackend(url, fetcher)
    return None


def make_tools(args, names: list[str] | None = None, flag: str = "--builtin-tools") -> dict:
    """The tools to run (name -> `tools.base.Tool`): `names`, else the command's --builtin-tools, with
    its --python-* settings (defaults where the command has none). Called before the model loads, so that
    a sandbox that cannot be set up stops the command at once (a ValueError: exit code 2)."""
    tools = {}
    if names is None:
        names = getattr(args, "tool_names", None)
    if names is None:
        names = builtin_tool_names(getattr(args, "builtin_tools", None), flag)
    if "python" in names:
        from ..tools import PythonTool, SandboxUnavailable

        try:
            tools["python"] = PythonTool(
                sandbox=getattr(args, "python_sandbox", "auto"),
                timeout_s=getattr(args, "python_timeout", 120.0),
                memory_bytes=int(getattr(args, "python_memory", 2.0) * 2**30),
                idle_timeout_s=getattr(args, "python_idle_timeout", 600.0),
            )
        except SandboxUnavailable as e:
            raise ValueError(f"{flag} python: {e}") from None
    if "browser" in names:
        from ..tools import BrowserTool

        backend = browser_backend(args, flag)
        if backend is not None:
            tools["browser"] = BrowserTool(backend)
    return tools


def split_adapters(args) -> None:
    """--adapters values -> args.adapters (the one DIR merged into the base, or None) and
    args.named_adapters ({NAME: DIR} served beside it). Idempotent."""
    if isinstance(args.adapters, str) or args.adapters is None:
        args.named_adapters = getattr(args, "named_adapters", {})
        return
    plain, named = [], {}
    for v in args.adapters:
        name, sep, folder = v.partition("=")
        if sep and name and "/" not in name and not Path(v).expanduser().exists():
            if name in named:
                raise ValueError(f"--adapters: the name {name!r} is given twice")
            if not folder:
                raise ValueError(f"--adapters {v}: no folder after '='")
            named[name] = Path(folder).expanduser()
        else:
            plain.append(v)
    if len(plain) > 1:
        raise ValueError("--adapters: one DIR is merged into the base at most; name the others (NAME=DIR)")
    if plain and named:
        raise ValueError("--adapters: give either one DIR (merged into the base) or NAME=DIR adapters "
                         "(served beside the base), not both")  # fmt: skip
    args.adapters = plain[0] if plain else None
    args.named_adapters = named


def _origins(value: str | None) -> list[str] | None:
    return None if value is None else [o.strip() for o in value.split(",") if o.strip()]


def prompt_settings(args):
    """The prompts' settings (`harmony.settings.Resolved`): --date and --reasoning-effort where given, else
    those the adapters were trained with, else today's date and medium."""
    from ..harmony import resolve_prompt_settings

    split_adapters(args)
    return resolve_prompt_settings(args.adapters, date=args.date, reasoning_effort=args.reasoning_effort,
                                   default_date="today")  # fmt: skip


def make_engine(args, model):
    """The serving engine with the command's options; it compiles its call shapes first unless
    --no-warmup (every process of a multi-host job compiles the same shapes)."""
    from ..engine import Engine

    kv = None if args.kv_memory is None else int(args.kv_memory * 2**30)
    split_adapters(args)
    named = getattr(args, "named_adapters", {})
    slots = getattr(args, "max_adapters", None)
    if slots is None and getattr(args, "allow_runtime_adapters", False):
        slots = max(4, len(named))
    engine = Engine(model, max_seqs=args.max_seqs, max_context=args.max_context, kv_memory=kv,
                    memory_fraction=args.memory_fraction, detokenize=False, adapters=named,
                    max_adapters=slots, max_lora_rank=getattr(args, "max_lora_rank", None),
                    lora_targets=getattr(args, "lora_targets", None))  # fmt: skip
    log = logging.getLogger("gptoss_jax.api")
    p = engine.plan
    log.info(
        "KV pool: %d pages of %d tokens per data shard, %.2f GiB per device; context %d",
        p["pages_per_lane"],
        p["page_size"],
        p["bytes_per_device"] / 2**30,
        engine.scheduler.max_context,
    )
    if not args.no_warmup:
        log.info("compiling the engine's call shapes (--no-warmup skips this) ...")
        log.info("compiled in %.1f s", engine.warmup())
    return engine


def build_app(args, engine, model, tools: dict | None = None):
    """The ASGI app serving `engine` with the command's options (`tools`: `make_tools(args)`)."""
    from .app import create_app
    from .backend import EngineBackend
    from .constraints import ll_tokenizer

    ll_tokenizer()  # built now (~2 s), not in the first constrained request
    name = args.served_model_name or Path(args.path).resolve().name
    prompt = (getattr(args, "resolved_prompt", None) or prompt_settings(args)).settings
    return create_app(EngineBackend(engine, model), model_name=name, api_key=args.api_key,
                      max_pending=args.max_seqs + args.max_queue,
                      test_hooks=os.environ.get(TEST_HOOKS_ENV) == "1",
                      start_date=prompt.date, reasoning_effort=prompt.reasoning_effort,
                      request_timeout=getattr(args, "request_timeout", None),
                      allowed_origins=_origins(getattr(args, "allowed_origins", None)),
                      strict_tools=args.strict_tools, reasoning_key=args.reasoning_key,
                      allow_runtime_adapters=getattr(args, "allow_runtime_adapters", False),
                      tools=tools, max_tool_calls=getattr(args, "max_tool_calls", 16),
                      tool_servers=getattr(args, "tool_server", None) or [],
                      browser_mcp=getattr(args, "browser_mcp", None),
                      allow_mcp_urls=getattr(args, "allow_mcp_url", None) or [])  # fmt: skip


def run_serve(args) -> int:
    """Process 0 serves HTTP; in a multi-host job the other processes run the engine's plans (`follow`)."""
    import jax
    import uvicorn

    from ..loading import load
    from ..sharding import make_mesh, maybe_initialize_distributed

    _check(args)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    log = logging.getLogger("gptoss_jax.api")
    for line in args.resolved_prompt.notes:
        log.info("%s", line)
    for line in args.resolved_prompt.warnings:
        log.warning("%s", line)
    maybe_initialize_distributed()  # before anything touches a device
    tools = make_tools(args) if jax.process_index() == 0 else {}  # before minutes of loading
    mesh = make_mesh(args.mesh) if args.mesh else None
    dtype = (
        args.dtype if args.dtype != "auto" else "float32" if jax.default_backend() == "cpu" else "bfloat16"
    )
    model = load(args.path, dtype=dtype, mesh=mesh, quiet=True, attention_impl=args.attention_impl,
                 moe_impl=args.moe_impl, expert_format=args.expert_format)  # fmt: skip
    if args.adapters is not None:
        from ..adapters import apply_adapters

        apply_adapters(model, Path(args.adapters).expanduser())
    engine = make_engine(args, model)
    if jax.process_index() != 0:
        engine.follow()  # until process 0 closes its engine
        return 0
    app = build_app(args, engine, model, tools)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=None, lifespan="on")  # fmt: skip
    log.info("serving %s on http://%s:%d (max %d sequences + %d queued)", args.path, args.host, args.port,
             args.max_seqs, args.max_queue)  # fmt: skip
    # uvicorn stops gracefully on SIGTERM, then raises the signal again with the handler it found: with this
    # one in place, that ends `run()` normally and the command exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = getattr(app, "startup_error", None)
    if not server.started and failed is not None:  # an MCP server that did not connect, named
        raise ValueError(str(failed))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptoss-jax serve", description="OpenAI-compatible server for gpt-oss")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_serve(args)
    except ValueError as e:  # CheckpointError included
        print(f"gptoss-jax serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"gptoss-jax serve: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

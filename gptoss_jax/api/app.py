"""The HTTP server: FastAPI routes, SSE, errors in OpenAI's shape, the edge (body limit, API key, one log
line per request, request counts), and client disconnects.

    POST /v1/chat/completions   POST /v1/responses   GET /v1/responses/{id}   POST /v1/completions
    GET /v1/models   GET /v1/models/{id}   GET /health   GET /metrics (Prometheus text)
    POST /v1/load_lora_adapter   POST /v1/unload_lora_adapter   (only with allow_runtime_adapters)

LoRA adapters (`Engine(adapters=...)`): each is a model of its own name (`parent`: the base) in
/v1/models, and a request's `model` picks it. With allow_runtime_adapters (`--allow-runtime-adapters`),
vLLM's endpoints load {"lora_name", "lora_path"} (a PEFT folder on the server's disk) and unload
{"lora_name"} adapters while serving, behind the API key; without it they do not exist (404). Unloading an
adapter that requests are using is a 409 (nothing is cut short: retry when they finish); a bad folder is
a 400 naming the problem, a full pool a 409 naming --max-adapters.

Errors: {"error": {"message", "type", "param", "code"}} with 400 (bad request, context overflow), 401 (missing
or wrong key when an API key is set), 404 (unknown model, route or stored response), 413 (body over the
limit), 429 (the engine's queue is full), 503 (the engine thread died: every request, and /health), 504 (the
request ran past --request-timeout). No bad input gives a 5xx, and no error is wrapped in a 200. An error
after a stream's 200 went out ends the stream with an error event in the endpoint's shape (`failed`).

Work per request, in order: the API key; a 429 at once when the queue is full; the body read and parsed
(JSON, its depth, its strings) and the job built (validation, harmony rendering, tokenization, grammar
compilation) in worker threads, at most `WORKERS` at once, off the event loop; the 429 again with the
request's own sequence count; then generation (under --request-timeout, when set).

A client that disconnects cancels its request (streamed or not): the engine drops the sequence and frees
its memory. Each request logs one line (client, method, path, status, seconds, tokens), never the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time
from collections import Counter

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .chat import ChatJob
from .completions import CompletionJob
from .protocol import MAX_N, APIError
from .responses import ResponseJob, ResponseStore
from .run import Server
from .sealed import ReasoningSealer
from .toolloop import close_later

log = logging.getLogger("gptoss_jax.api")

MAX_BODY = 32 * 2**20  # bytes; a larger body gets a 413
MAX_DEPTH = 64  # nesting of arrays and objects in a request body; deeper is a 400
WORKERS = 4  # threads that parse, validate, render, tokenize and compile grammars for requests, at once
DRAIN_MAX = 256 * 2**20  # a too-large body is read (and dropped) up to this, so the client sees the 413
ROUTES = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/v1/test/scripts",
    "/v1/test/engine_fault",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(
            f"the request body is larger than the limit of {limit // 2**20} MiB",
            413,
            code="request_too_large",
        )


def route_of(path: str) -> str:
    """The route a path counts under in /metrics (few label values, whatever clients send)."""
    if path in ROUTES:
        return path
    for prefix in ("/v1/responses/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Edge:
    """ASGI middleware: body size limit, one log line per request (at the end of a stream), counts."""

    def __init__(self, app, *, max_body: int, counts: Counter):
        self.app, self.max_body, self.counts = app, max_body, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        seen = [0]
        path = scope["path"]
        route = route_of(path)

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return msg

        async def watched_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await error_response(BodyTooLarge(self.max_body))(scope, receive, watched_send)
                await _drain(receive, int(length))
            else:
                await self.app(scope, limited_receive, watched_send)
                if status[0] == 413:
                    await _drain(receive, DRAIN_MAX)
        finally:
            state = scope.get("state", {})
            if state.get("disconnected"):
                status[0] = 499  # nginx's "client closed request": nothing was answered
            self.counts[(route, status[0])] += 1
            summary = state.get("summary")
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s:%s %s %s %d %.3fs%s",
                client[0],
                client[1],
                scope["method"],
                path,
                status[0],
                time.perf_counter() - t0,
                f" {summary()}" if summary else "",
            )


async def _drain(receive, limit: int) -> None:
    got = 0
    with contextlib.suppress(Exception):
        while got < min(limit, DRAIN_MAX):
            msg = await receive()
            got += len(msg.get("body", b""))
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break


async def _until_disconnect(receive, coro):
    """Runs `coro` unless the client disconnects first -> (finished, its result); when the client goes,
    `coro` is cancelled (and with it the engine request)."""
    task = asyncio.create_task(coro)

    async def gone():
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """A request body -> its JSON object, or a 400: not JSON (NaN and Infinity included), integers longer
    than Python converts (4300 digits), nesting deeper than MAX_DEPTH, or a string that is not Unicode (a lone
    UTF-16 surrogate such as "\\ud800", which harmony's renderer cannot encode). Runs in a worker thread."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, the int digit limit, NaN
        why = " ".join(str(e).split())[:200]
        if "integer string conversion" in why:
            why = f"an integer has more than {sys.get_int_max_str_digits()} digits"
        raise APIError(f"the request body is not valid JSON: {why}") from None
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}")
    check_json(data)
    return data


def check_json(data) -> None:
    """400 naming the place of the first value nested deeper than MAX_DEPTH or string that is not Unicode."""
    stack = [(data, "", 1)]
    while stack:
        x, where, depth = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                at = where or "the request body"
                raise APIError(f"{at}: the string holds a lone UTF-16 surrogate, which is not Unicode text",
                               param=where or None) from None  # fmt: skip
        elif isinstance(x, (dict, list)):
            if depth > MAX_DEPTH:
                raise APIError(f"{where}: the request body is nested deeper than {MAX_DEPTH} levels",
                               param=where or None)  # fmt: skip
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in items:
                if isinstance(k, str):
                    stack.append((k, where, depth))  # a key: checked as a string where its object is
                    sub = f"{where}.{k}" if where else k
                else:
                    sub = f"{where}[{k}]"
                stack.append((v, sub, depth + 1))


def estimate(data: dict) -> int:
    """The sequences a request will run, from its unvalidated body (for the 429 before the expensive work;
    the exact count is admitted once the request is built)."""
    n = data.get("n", 1)
    n = n if isinstance(n, int) and 1 <= n <= MAX_N else 1
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        n *= len(prompt)
    return n


class EventStream(StreamingResponse):
    """SSE whose generator is cancelled as soon as the client disconnects (not only at its next write), and
    always closed, so that the engine request ends with it."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            finished, _ = await _until_disconnect(receive, self.stream_response(send))
        except OSError:  # the client went away while we wrote
            finished = False
        finally:
            await self.body_iterator.aclose()
        if not finished:
            scope.setdefault("state", {})["disconnected"] = True


def create_app(
    backend,
    *,
    model_name: str,
    api_key: str | None = None,
    max_pending: int = 256,
    test_hooks: bool = False,
    max_body: int = MAX_BODY,
    store_capacity: int = 1024,
    start_date: str | None = "today",
    reasoning_effort: str = "medium",
    request_timeout: float | None = None,
    allowed_origins: list[str] | None = None,
    strict_tools: bool = False,
    reasoning_key: str | None = None,
    allow_runtime_adapters: bool = False,
    tools: dict | None = None,
    max_tool_calls: int = 16,
    tool_servers: list[str] | None = None,
    browser_mcp: str | None = None,
    allow_mcp_urls: list[str] | None = None,
):
    """The server's ASGI app over `backend` (see `backend.py` for the interface). max_pending: sequences
    admitted at once (running and queued); past it a request gets a 429. start_date: the conversation start
    date of harmony's system message ("today", YYYY-MM-DD, or None for none); reasoning_effort: that of
    requests that set none. request_timeout: seconds a request may take from its arrival (None: no limit); past
    it the engine drops it and the client gets a 504 (an error event in a stream). allowed_origins: the
    origins CORS admits (Starlette's CORSMiddleware; None: no CORS headers). strict_tools: hosted tools no
    backend runs are a 400 (`hosted.py`); reasoning_key: the key of reasoning's encrypted_content
    (`sealed.py`; None: $GPTOSS_JAX_REASONING_KEY or a new one). allow_runtime_adapters: serve the LoRA
    load/unload endpoints (the backend's `load_adapter` / `unload_adapter`). tools: the tools the server
    runs itself (name -> `tools.base.Tool`, declared on every request; `toolloop.py`), at most
    max_tool_calls calls per request; they are shut down with the app. tool_servers: MCP servers
    (`[LABEL=]SPEC`) connected at startup, each a namespace of tools run likewise; browser_mcp: an MCP server
    whose search and fetch tools back the `browser` tool; allow_mcp_urls: URL prefixes a Responses `mcp` tool
    may connect to. A server that does not connect stops the startup (`startup_error` on the app says why)."""
    tools = dict(tools or {})
    server = Server(backend, model_name, test_hooks, max_pending, start_date=start_date,
                    reasoning_effort=reasoning_effort, strict_tools=strict_tools,
                    sealer=ReasoningSealer(reasoning_key), tools=tools, max_tool_calls=max_tool_calls,
                    allow_mcp_urls=list(allow_mcp_urls or []))  # fmt: skip
    if server.sealer.ephemeral:
        log.info("reasoning's encrypted_content is sealed with a key made at start: clients' blobs will not "
                 "open after a restart (--reasoning-key or $GPTOSS_JAX_REASONING_KEY to keep one)")  # fmt: skip

    # a conversation whose stored responses are all evicted: its tools' state is closed
    store = ResponseStore(store_capacity, on_close=lambda key: close_later(tools, key))
    counts: Counter = Counter()
    started = int(time.time())

    async def connect_tools(stack: contextlib.AsyncExitStack) -> None:
        """MCP connections belong to the event loop that makes them: the server's, here."""
        if tool_servers:
            from ..tools import MCPServers

            servers = await stack.enter_async_context(MCPServers(tool_servers))
            for t in servers.tools:
                tools[t.name] = t
        if browser_mcp:
            from ..tools import BrowserTool, MCPBrowserBackend, connect, parse_tool_server

            label, spec = parse_tool_server(browser_mcp)
            t = await connect(spec, name=label)
            stack.push_async_callback(t.aclose)
            tools["browser"] = BrowserTool(MCPBrowserBackend(t))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        backend.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await connect_tools(stack)
                except Exception as e:
                    edge.startup_error = e
                    raise
                yield
        finally:
            backend.stop()
            for tool in tools.values():
                try:
                    tool.shutdown()
                except Exception:
                    log.exception("shutting down the %s tool", tool.name)

    app = FastAPI(title="gptoss-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip
    workers = anyio.CapacityLimiter(WORKERS)

    def failure() -> str | None:
        return getattr(backend, "failure", None)

    def check_alive() -> None:
        if failure():
            raise APIError(f"{failure()}; restart the server", 503, code="engine_failed")

    def timed_out() -> APIError:
        return APIError(f"the request did not finish within the server's --request-timeout of "
                        f"{request_timeout:g} s", 504, code="request_timeout")  # fmt: skip

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = {
            404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(e.status_code, str(e.detail))
        return error_response(APIError(msg, e.status_code))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", 500).body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        given = got[7:].strip().encode() if got.lower().startswith("bearer ") else b""
        if not hmac.compare_digest(given, api_key.encode()):
            why = "a wrong API key was given" if got else "no API key was given (Authorization: Bearer KEY)"
            raise APIError(f"unauthorized: {why}", 401, code="invalid_api_key")

    async def body(request: Request) -> dict:
        authorize(request)
        raw = await request.body()
        return await anyio.to_thread.run_sync(parse_body, raw, limiter=workers)

    async def generate(request: Request, make_job):
        """A generation request: admitted (the 429 first), built off the event loop, answered."""
        t0 = asyncio.get_running_loop().time()
        authorize(request)
        check_alive()
        server.admit(1)()  # a full queue is a 429 before anything is read or parsed
        data = await body(request)
        release = server.admit(estimate(data))
        try:
            job = await anyio.to_thread.run_sync(make_job, data, limiter=workers)
            release()  # no await between: the exact count takes the estimate's place
            release = server.admit(len(job.choices))
        except BaseException:
            release()
            raise
        deadline = None if request_timeout is None else t0 + request_timeout
        return await answer(request, job, job.req.stream, release, deadline)

    async def before(aw, deadline: float | None):
        """`aw` awaited until the deadline (an event-loop time; None: no limit), else a 504."""
        if deadline is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, max(deadline - asyncio.get_running_loop().time(), 0))
        except TimeoutError:
            raise timed_out() from None

    async def answer(request: Request, job, stream: bool, release, deadline: float | None):
        request.state.summary = job.summary
        if stream:

            async def events():
                try:
                    async with contextlib.aclosing(job.stream()) as it:
                        while True:
                            try:
                                s = await before(it.__anext__(), deadline)
                            except StopAsyncIteration:
                                break
                            yield s
                except APIError as e:  # after the 200 went out: the stream ends with an error event
                    log.warning("stream on %s ended with %d: %s", request.url.path, e.status, e)
                    for s in job.failed(e):
                        yield s
                except Exception as e:
                    log.exception("stream failed on %s", request.url.path)
                    for s in job.failed(APIError(f"internal error: {type(e).__name__}: {e}", 500)):
                        yield s
                finally:
                    release()

            return EventStream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finished, result = await _until_disconnect(request.receive, before(job.response(), deadline))
        finally:
            release()
        if not finished:
            request.scope.setdefault("state", {})["disconnected"] = True
            return Response(status_code=499)
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, lambda data: ChatJob(server, data))

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await generate(request, lambda data: ResponseJob(server, store, data))

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str, request: Request):
        authorize(request)
        return store.get(rid, "response_id")[1]

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, lambda data: CompletionJob(server, data))

    def model_card(name: str = model_name) -> dict:
        """The base model's card, or an adapter's (vLLM's fields: `parent` the base, `root` its folder)."""
        adapter = server.adapters_info().get(name) if name != model_name else None
        return {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": "gptoss-jax",
            "root": model_name if adapter is None else (adapter.source or name),
            "parent": None if adapter is None else model_name,
            "max_model_len": backend.context_length,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(n) for n in [model_name, *server.adapters()]]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        server.check_model(name)
        return model_card(name)

    if allow_runtime_adapters:

        def lora_name(data: dict) -> str:
            name = data.get("lora_name")
            if not isinstance(name, str) or not name.strip():
                raise APIError(
                    "lora_name: the adapter's name (a non-empty string) is required", param="lora_name"
                )
            if name == model_name:
                raise APIError(f"lora_name: {name!r} is the base model's name", param="lora_name")
            return name

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request):
            check_alive()
            data = await body(request)
            name, path = lora_name(data), data.get("lora_path")
            if not isinstance(path, str) or not path.strip():
                raise APIError("lora_path: the adapter's folder on the server (a string) is required",
                               param="lora_path")  # fmt: skip
            r = await backend.load_adapter(name, path)
            return {"object": "lora_adapter", "id": name, "parent": model_name, "root": path,
                    "rank": r.lcfg.rank, "targets": list(r.lcfg.targets), "loaded": True}  # fmt: skip

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request):
            data = await body(request)
            name = lora_name(data)
            await backend.unload_adapter(name)
            return {"object": "lora_adapter", "id": name, "loaded": False}

    @app.get("/health")
    async def health():
        if failure():  # the engine thread died: nothing will be generated any more
            return error_response(APIError(f"{failure()}; restart the server", 503, code="engine_failed"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        lines = [
            "# HELP gptoss_http_requests_total HTTP requests by route and status.",
            "# TYPE gptoss_http_requests_total counter",
        ]
        for (route, status), n in sorted(counts.items()):
            lines.append(f'gptoss_http_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP gptoss_server_pending_sequences Sequences admitted (generating or queued).",
            "# TYPE gptoss_server_pending_sequences gauge",
            f"gptoss_server_pending_sequences {server.pending}",
        ]
        for name, value in sorted((await backend.metrics()).items()):
            metric = f"gptoss_engine_{name}"
            lines += [
                f"# TYPE {metric} {'counter' if name.endswith('_total') else 'gauge'}",
                f"{metric} {value}",
            ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    if test_hooks:

        @app.post("/v1/test/scripts")
        async def test_scripts(request: Request):
            data = await body(request)
            scripts = data.get("scripts")
            if not isinstance(scripts, list) or not all(isinstance(s, (str, list)) for s in scripts):
                raise APIError("scripts: a list of harmony strings or token id lists", param="scripts")
            return {"queued": server.queue_scripts(scripts)}

        @app.post("/v1/test/engine_fault")
        async def engine_fault(request: Request):
            """The engine's next step raises RuntimeError(message), and its thread dies (fault tests)."""
            data = await body(request)
            backend.inject_fault(str(data.get("message", "injected fault")))
            return {"injected": True}

    edge = Edge(app, max_body=max_body, counts=counts)
    edge.startup_error = None
    return edge

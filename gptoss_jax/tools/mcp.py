"""MCP servers' tools, run by the server: each connected MCP server is one harmony tool namespace.

Any server speaking the Model Context Protocol, reached with the official `mcp` SDK over stdio (a command the
server starts) or streamable HTTP (a URL), lends its tools to the model: they are listed once at connect time,
declared in the system message as a harmony namespace, and run when the model addresses `<namespace>.<tool>`.

    async with MCPServers(["python -m my_server", "https://tools.example/mcp"]) as servers:
        servers.tools                       # [MCPTool, ...], one per server (serve --tool-server SPEC)
    async with open_mcp("https://tools.example/mcp", server_label="docs") as tool:   # a Responses `mcp` tool
        tool.config()                       # openai_harmony.ToolNamespaceConfig: the namespace `docs`
        tool.list_tools_item()              # the Responses `mcp_list_tools` item (minus id)
        await tool.call(ToolCall("docs.search", '{"query": "harmony"}', "conv-1"))   # -> ToolResult
    MCPBrowserBackend(tool)                 # the browser's backend: the server's `search` and `fetch` tools

Specs (`connect`, `MCPServers`, `parse_tool_server`)
----------------------------------------------------
* `http://...` or `https://...`: streamable HTTP. `headers` go with every request (`authorization` becomes
  `Authorization: Bearer ...`). The SDK follows a redirect only within the URL's origin, so an allow-listed URL
  cannot be redirected elsewhere.
* anything else: a command line, split with `shlex` and started as a child process that speaks MCP on its stdin
  and stdout (`python -m my_server`, `npx -y @modelcontextprotocol/server-everything`). It inherits only the
  SDK's short list of safe variables (HOME, PATH, USER, ...) plus `env`: not the server's API key. Its stderr
  is the server's stderr.
* `LABEL=SPEC` (`parse_tool_server`, for `serve --tool-server`): names the namespace, when the text before the
  first `=` is an identifier (letters, digits, `_`, `-`; so a URL's query or a command's `--opt=1` is no label).

A bad spec (a command not found, a command that is no MCP server, a refused connection, a URL that does not
answer MCP, a server that does not answer within `connect_timeout_s`) raises `MCPConnectError` (a
`ValueError`) naming the spec, at connect.

Namespace names (`namespace_name`)
----------------------------------
The model addresses a tool as `<namespace>.<tool>` in the harmony header (`to=docs.search`), and the system
message declares it as a TypeScript-like `namespace docs { type search = ... }`. So both parts must be
identifiers: every run of characters outside `[A-Za-z0-9_]` becomes one `_`, leading and trailing `_` are
dropped, a name starting with a digit (or empty) gets a `mcp_` prefix, and names are cut to 64 characters.
Namespaces are lower case, as harmony's own are ("Test Tools" -> `test_tools`), and one that would shadow
them (`functions`, `browser`, `python`, `container`, `multi_tool_use`) gets the `mcp_` prefix too. Tool names
follow the same rule but keep their case (`echo.v2` is declared as `echo_v2`; a call by the MCP name is
understood too); the call reaches the tool under its MCP name, and the Responses items carry the MCP name and
the label as given.
The label is the `name` given, else the server's own name (its `serverInfo.name`); `MCPServers` numbers
duplicates (`docs`, `docs_2`).

Lifetimes
---------
The SDK runs each connection in anyio task groups and cancel scopes, which must be entered and exited by the
same task. So each connection is owned by a task of its own (`_Connection`): it enters the SDK's `Client`,
lists the tools, reports ready, waits for a stop signal, and leaves the `Client` itself. Everyone else only
sends requests through the session, from any task of the same event loop. This makes the lifetimes free of
the caller's task structure: `MCPServers` may be entered in a FastAPI lifespan and closed at shutdown, and
`open_mcp` inside a request handler, even one that is cancelled (the owner task still closes the connection:
the context's exit signals it and waits at most `_CLOSE_WAIT_S`). A connection that dies (the child exits, the
HTTP server goes away) takes only its own task down: every later call on it answers with an error, and the
server's event loop is never cancelled by it. `tool.shutdown()` (the Tool protocol's synchronous close) signals
the stop without waiting; `await tool.aclose()` waits until the child process is gone. A connection belongs to
the event loop that made it: a synchronous caller (the chat CLI) keeps one loop running in a thread and submits
coroutines to it (`asyncio.run_coroutine_threadsafe`), as tests/tools/test_mcp.py does.

Calls (`MCPTool.call`) never raise: the model's bad JSON, a tool not declared (or filtered out by
`allowed_tools`), the tool's own error result (`isError`), a timeout (`timeout_s`, per call) and a dead
connection all become a `ToolResult` with `error` set, a text telling the model what went wrong, and an
`mcp_call` item whose `error` has the Responses API's shapes (openai.types.responses.McpCall):
`{"type": "mcp_tool_execution_error", "content": [...]}` for the tool's own error result,
`{"type": "mcp_protocol_error", "code", "message"}` for everything the protocol reports (JSON-RPC codes:
-32700 bad JSON, -32602 unknown tool, -32001 timeout, -32000 connection closed), `{"type": "http_error",
"code", "message"}` for an HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import shlex
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Self, TextIO
from urllib.parse import urlsplit

import openai_harmony

from .base import Document, SearchHit, ToolCall, ToolError, ToolResult

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # one tool call
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # starting (a command) or reaching (a URL) a server, and listing its tools
DEFAULT_MAX_OUTPUT_CHARS = 20_000  # of a result's text shown to the model (the rest is cut, saying so)
RESERVED_NAMESPACES = frozenset({"functions", "browser", "python", "container", "multi_tool_use"})
_MAX_NAME = 64
_CLOSE_WAIT_S = 10.0  # the SDK gives a child 2 s after its stdin closes, then 2 s after SIGTERM
_LIST_PAGES = 100  # tools/list pages followed (a server whose cursor never ends cannot hang a connect)

# JSON-RPC codes reported in an mcp_call item's error (mcp_types has the same numbers)
PARSE_ERROR, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32602, -32603
CONNECTION_CLOSED, REQUEST_TIMEOUT = -32000, -32001
_HTTP_ERROR = "Server returned an error response"  # the SDK's message for an HTTP error status

_LABEL = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)=(.+)$", re.DOTALL)


class MCPConnectError(ValueError):
    """An MCP server could not be connected (the message names the spec and says why)."""


# ---- names and specs ----------------------------------------------------------------------------------------


def _identifier(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    if not name or name[0].isdigit():
        name = "mcp_" + name
    return name[:_MAX_NAME].rstrip("_")


def namespace_name(label: str) -> str:
    """The harmony namespace for an MCP server labelled `label` (see the module docstring for the rule)."""
    name = _identifier(label).lower()
    if name in RESERVED_NAMESPACES:
        name = "mcp_" + name
    return name


def is_url(spec: str) -> bool:
    return spec.strip().lower().startswith(("http://", "https://"))


def parse_tool_server(text: str) -> tuple[str | None, str]:
    """`serve --tool-server` text -> (label or None, spec): `docs=https://host/mcp` -> ("docs", "https://...")."""
    text = text.strip()
    m = _LABEL.match(text)
    if m and m.group(2).strip():
        return m.group(1), m.group(2).strip()
    return None, text


def url_allowed(url: str, allowed_prefixes: Iterable[str]) -> bool:
    """Whether `url` is one the operator allowed (`serve --allow-mcp-url PREFIX`, repeatable).

    Compared as parsed URLs, not as strings: the scheme (http or https only), host and port (the scheme's
    default when absent) must be equal, and the prefix's path must be the URL's path or one of its parents
    segment by segment (`https://h/mcp` allows `https://h/mcp` and `https://h/mcp/x`, not `https://h/mcpx`,
    `https://h.evil/mcp` or `https://h:8443/mcp`). A URL with credentials in it (`user@host`) is never allowed.
    """

    def parts(u: str):
        s = urlsplit(u.strip())
        scheme = s.scheme.lower()
        if scheme not in ("http", "https") or not s.hostname:
            return None
        try:
            port = s.port or (443 if scheme == "https" else 80)
        except ValueError:  # a port that is not a number
            return None
        return scheme, s.hostname.lower(), port, s.path.rstrip("/"), s.username is not None

    target = parts(url)
    if target is None or target[4]:
        return False
    for prefix in allowed_prefixes:
        allowed = parts(prefix)
        if allowed is None or allowed[:3] != target[:3]:
            continue
        if allowed[3] == "" or target[3] == allowed[3] or target[3].startswith(allowed[3] + "/"):
            return True
    return False


# ---- a JSON schema as harmony declares it ---------------------------------------------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def _clean_schema(schema: Any) -> Any:
    """The schema without `title`s: pydantic-made servers title every property with its own name (`a` -> "A"),
    which harmony renders as a comment line per property and tells the model nothing. Descriptions stay."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {k: _clean_schema(v) for k, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [_clean_schema(v) for v in value]
        elif key in _SCHEMA_ONE:
            value = _clean_schema(value)
        out[key] = value
    return out


# ---- a tool result as text -----------------------------------------------------------------------------------


def _dump(obj: Any) -> Any:
    return (
        obj.model_dump(mode="json", by_alias=True, exclude_none=True) if hasattr(obj, "model_dump") else obj
    )


def _size(data: str | None) -> str:
    try:
        return f"{len(base64.b64decode(data or '', validate=False)):,} bytes"
    except ValueError:
        return "unknown size"


def _part_text(part: Any) -> str:
    """One content part as text: text as is; other kinds described in a line (the model cannot see images)."""
    kind = getattr(part, "type", None)
    if kind == "text":
        return part.text
    if kind in ("image", "audio"):
        return f"[{kind}: {part.mime_type}, {_size(part.data)}]"
    if kind == "resource_link":
        about = f": {part.description}" if part.description else ""
        return f"[resource link: {part.title or part.name} <{part.uri}>{about}]"
    if kind == "resource":
        res = part.resource
        if getattr(res, "text", None) is not None:
            return res.text
        return f"[resource <{res.uri}>: {res.mime_type or 'binary'}, {_size(getattr(res, 'blob', None))}]"
    return f"[{kind or type(part).__name__} content]"


def result_text(result: Any) -> str:
    """A CallToolResult's content as the text of a harmony tool message: text parts joined by newlines, other
    parts described in a line each; with no content, the structured content as JSON."""
    parts = [_part_text(p) for p in result.content or []]
    if not parts and getattr(result, "structured_content", None) is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(parts)


def _error_text(message: str) -> str:
    return message if message.lower().startswith("error") else f"Error: {message}"


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit:,} more characters cut]"


class _CallFailed(ToolError):
    """A call that failed before or outside the tool (not the tool's own error result)."""

    def __init__(self, message: str, item_error: dict):
        super().__init__(message)
        self.item_error = item_error


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, which the SDK's task groups wrap errors in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _failure(exc: BaseException, what: str, http_status: tuple[int, str] | None = None) -> _CallFailed:
    """An error from the SDK or its transport as a _CallFailed with the Responses error shape. The SDK turns an
    HTTP error status into a generic JSON-RPC error (INTERNAL_ERROR, "Server returned an error response"):
    `http_status` is the status the connection saw last, reported in its place."""
    from mcp import MCPError

    exc = _leaf(exc)
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        http_status = (response.status_code, response.reason_phrase)
    elif not (isinstance(exc, MCPError) and exc.code == INTERNAL_ERROR and exc.message == _HTTP_ERROR):
        http_status = None
    if http_status is not None:
        message = f"HTTP {http_status[0]} {http_status[1]}".strip()
        return _CallFailed(
            f"{what}: {message}", {"type": "http_error", "code": http_status[0], "message": message}
        )
    if isinstance(exc, MCPError):
        message = str(exc) or "MCP error"
        if exc.code == CONNECTION_CLOSED:
            message = "the MCP server closed the connection"
        return _CallFailed(
            f"{what}: {message}", {"type": "mcp_protocol_error", "code": exc.code, "message": message}
        )
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _CallFailed(
        f"{what}: {message}", {"type": "mcp_protocol_error", "code": CONNECTION_CLOSED, "message": message}
    )


# ---- one connection, owned by a task of its own ---------------------------------------------------------------


@dataclasses.dataclass
class _Listing:
    tools: list[Any]  # mcp_types.Tool, all the server lists
    instructions: str | None
    server_name: str | None


class _Connection:
    """An SDK `Client` entered and left by one task of its own (see "Lifetimes" in the module docstring)."""

    def __init__(
        self,
        spec: str,
        *,
        headers: Mapping[str, str] | None,
        env: Mapping[str, str] | None,
        connect_timeout_s: float,
        errlog: TextIO | None,
    ):
        self.spec = spec
        self._headers = dict(headers or {})
        self._env = dict(env or {})
        self._connect_timeout_s = connect_timeout_s
        self._errlog = errlog
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.client: Any = None
        self.error: str | None = None  # why the connection ended, once it has
        self.http_status: tuple[int, str] | None = None  # the last HTTP error status (the SDK keeps no code)

    def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        """The SDK transport for the spec (an async context manager yielding the message streams)."""
        if is_url(self.spec):
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            async def status(response) -> None:
                if response.status_code >= 400:
                    self.http_status = (response.status_code, response.reason_phrase)

            http = httpx2.AsyncClient(
                headers=self._headers,
                timeout=httpx2.Timeout(self._connect_timeout_s, read=300.0),
                event_hooks={"response": [status]},
            )
            stack.push_async_callback(http.aclose)
            return streamable_http_client(self.spec.strip(), http_client=http)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        if self._headers:
            raise MCPConnectError(f"MCP server {self.spec!r}: headers are for a URL, not a command")
        argv = shlex.split(self.spec)
        params = StdioServerParameters(command=argv[0], args=argv[1:], env=self._env or None)
        return stdio_client(params, errlog=self._errlog or sys.stderr)

    async def start(self) -> _Listing:
        """Start the owner task; return the server's listing once it is connected, or raise MCPConnectError."""
        ready: asyncio.Future[_Listing] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._own(ready), name=f"mcp {self.spec}")
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await asyncio.shield(ready)
        except TimeoutError:
            await self._abandon()
            raise MCPConnectError(
                f"MCP server {self.spec!r}: no answer within {self._connect_timeout_s:g} s"
                " (is it an MCP server, speaking MCP on stdout or at this URL?)"
            ) from None
        except MCPConnectError:
            raise
        except BaseException:  # the caller was cancelled: the owner task must not live on
            await asyncio.shield(self._abandon())
            raise

    async def _abandon(self) -> None:
        """End an owner task still connecting: cancelled, it leaves the SDK's scopes (which kill a child)."""
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=_CLOSE_WAIT_S)

    async def _own(self, ready: asyncio.Future) -> None:
        from mcp import Client

        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client(self._transport(stack), cache=None))
                tools, cursor = [], None
                for _ in range(_LIST_PAGES):
                    page = await client.list_tools(cursor=cursor)
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                info = client.server_info
                self.client = client
                if not ready.done():
                    ready.set_result(_Listing(tools, client.instructions, info.name if info else None))
                await self._stop.wait()
        except BaseException as e:  # told to start() or to later calls; only a cancel goes on
            leaf = _leaf(e)
            if not ready.done():
                if isinstance(leaf, asyncio.CancelledError):
                    ready.cancel()
                else:
                    ready.set_exception(self._connect_error(leaf))
            elif not isinstance(leaf, asyncio.CancelledError):
                log.warning("MCP server %r: the connection ended: %r", self.spec, leaf)
            self.error = f"the connection ended ({type(leaf).__name__}: {leaf})"
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self.error = self.error or "the connection is closed"
            self.client = None

    def _connect_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, MCPConnectError):
            return exc
        if isinstance(exc, FileNotFoundError) and not is_url(self.spec):
            return MCPConnectError(
                f"MCP server {self.spec!r}: command {shlex.split(self.spec)[0]!r} not found"
            )
        if isinstance(exc, PermissionError) and not is_url(self.spec):
            return MCPConnectError(
                f"MCP server {self.spec!r}: command {shlex.split(self.spec)[0]!r} not runnable"
            )
        why = str(_failure(exc, "x")).removeprefix("x: ")
        if not is_url(self.spec):
            if getattr(exc, "code", None) == CONNECTION_CLOSED:
                why = "the process exited or closed its stdout before answering (is it an MCP server?)"
        elif self.http_status is not None:
            status, reason = self.http_status
            hint = (
                "needs headers or an authorization token?"
                if status in (401, 403)
                else "is it an MCP endpoint?"
            )
            why = f"HTTP {status} {reason} ({hint})"
        elif getattr(exc, "code", None) is not None:
            why = f"{why} (is it an MCP endpoint?)"
        return MCPConnectError(f"MCP server {self.spec!r}: {why}")

    @property
    def alive(self) -> bool:
        return (
            self.client is not None
            and not self._stop.is_set()
            and self._task is not None
            and not self._task.done()
        )

    async def request(self, fn, timeout_s: float, what: str):
        """await fn(client), from any task; raises _CallFailed (about `what`) for the SDK's errors, a connection
        that is gone, or a call past timeout_s."""
        if not self.alive:
            raise _CallFailed(
                f"the MCP server is not connected: {self.error or 'closed'}",
                {"type": "mcp_protocol_error", "code": CONNECTION_CLOSED, "message": self.error or "closed"},
            )
        work = asyncio.ensure_future(fn(self.client))
        try:
            done, _ = await asyncio.wait(
                {work, self._task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        if work in done:
            try:
                return work.result()
            except Exception as e:  # the SDK's own errors: its timeout, a protocol error, a closed connection
                failure = _failure(e, what, self.http_status)
                if failure.item_error.get("code") == CONNECTION_CLOSED:
                    self.error = "the MCP server closed the connection"
                    self._stop.set()  # the owner task leaves the SDK's scopes; later calls fail at once
                raise failure from e
        if self._task.done():
            raise _CallFailed(
                f"the MCP server's connection ended during the call: {self.error}",
                {"type": "mcp_protocol_error", "code": CONNECTION_CLOSED, "message": self.error or "closed"},
            )
        raise _CallFailed(
            f"the MCP server did not answer within {timeout_s:g} s",
            {
                "type": "mcp_protocol_error",
                "code": REQUEST_TIMEOUT,
                "message": f"timed out after {timeout_s:g} s",
            },
        )

    @property
    def closed(self) -> bool:
        return self._task is not None and self._task.done()

    def stop(self) -> None:
        self._stop.set()

    async def aclose(self) -> None:
        """Signal the owner task and wait for it (bounded). A caller cancelled here leaves the owner closing."""
        self._stop.set()
        if self._task is None or self._task.done():
            return
        await asyncio.wait({self._task}, timeout=_CLOSE_WAIT_S)
        if not self._task.done():
            log.warning("MCP server %r: not closed within %g s; cancelling", self.spec, _CLOSE_WAIT_S)
            self._task.cancel()


# ---- the tool ----------------------------------------------------------------------------------------------


def _allowed(tool: Any, allowed_tools: Any) -> bool:
    """Responses' `allowed_tools`: None (all), a list of names, or {"tool_names": [...], "read_only": bool}."""
    if allowed_tools is None:
        return True
    if isinstance(allowed_tools, Mapping):
        names = allowed_tools.get("tool_names")
        if names is not None and tool.name not in names:
            return False
        read_only = allowed_tools.get("read_only")
        if read_only is not None:
            hint = getattr(tool.annotations, "read_only_hint", None) if tool.annotations else None
            return bool(hint) == bool(read_only)
        return True
    return tool.name in set(allowed_tools)


class MCPTool:
    """One connected MCP server as a harmony tool namespace (base.Tool). Made by `connect`, `MCPServers` or
    `open_mcp`; closed by `await aclose()` (or `shutdown()`, which does not wait)."""

    def __init__(
        self,
        conn: _Connection,
        listing: _Listing,
        *,
        label: str | None,
        allowed_tools: Any,
        description: str | None,
        timeout_s: float,
        max_output_chars: int,
    ):
        self._conn = conn
        self.server_label = label or listing.server_name or "mcp"
        self.name = namespace_name(self.server_label)
        self.instructions = listing.instructions
        self.description = (
            description or listing.instructions or f"Tools of the MCP server {self.server_label}."
        )
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.mcp_tools = {t.name: t for t in listing.tools}  # everything the server lists, by MCP name
        self._declared: dict[str, Any] = {}  # harmony name -> mcp Tool, for the allowed ones
        for t in listing.tools:
            if not _allowed(t, allowed_tools):
                continue
            hname, n = _identifier(t.name), 2
            while hname in self._declared:
                hname, n = f"{_identifier(t.name)}_{n}", n + 1
            self._declared[hname] = t

    @property
    def spec(self) -> str:
        return self._conn.spec

    @property
    def alive(self) -> bool:
        """Connected and not closing: calls go to the server."""
        return self._conn.alive

    @property
    def closed(self) -> bool:
        """The connection's owner task has ended: the child process is gone, the HTTP session ended."""
        return self._conn.closed

    def tool_names(self) -> dict[str, str]:
        """{harmony name: MCP name} for the declared (allowed) tools."""
        return {h: t.name for h, t in self._declared.items()}

    # -- base.Tool -------------------------------------------------------------------------------------------

    def config(self) -> openai_harmony.ToolNamespaceConfig:
        tools = [
            openai_harmony.ToolDescription.new(
                h, t.description or t.title or "", parameters=_clean_schema(t.input_schema) or None
            )
            for h, t in self._declared.items()
        ]
        return openai_harmony.ToolNamespaceConfig(name=self.name, description=self.description, tools=tools)

    def list_tools_item(self) -> dict:
        """The Responses `mcp_list_tools` output item, minus `id`: what the model was offered (allowed tools)."""
        return {
            "type": "mcp_list_tools",
            "server_label": self.server_label,
            "tools": [
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema,
                    "annotations": _dump(t.annotations) if t.annotations else None,
                }
                for t in self._declared.values()
            ],
            "error": None,
        }

    async def call(self, call: ToolCall) -> ToolResult:
        fn = call.function or ""
        tool = self._declared.get(fn) or next((t for t in self._declared.values() if t.name == fn), None)
        item = {
            "type": "mcp_call",
            "server_label": self.server_label,
            "name": tool.name if tool else fn,
            "arguments": call.arguments if call.arguments.strip() else "{}",
            "output": None,
            "error": None,
        }
        try:
            if tool is None:
                offered = ", ".join(f"{self.name}.{h}" for h in self._declared) or "none"
                raise _CallFailed(
                    f"{self.name} has no tool {fn!r} (its tools: {offered})",
                    {"type": "mcp_protocol_error", "code": INVALID_PARAMS, "message": f"unknown tool {fn!r}"},
                )
            arguments = self._arguments(call.arguments)
            result = await self.call_tool(tool.name, arguments)
        except _CallFailed as e:
            item["error"] = e.item_error
            return ToolResult(text=_error_text(str(e)), item=item, error=str(e))
        text = _cut(result_text(result), self.max_output_chars)
        if result.is_error:
            item["error"] = {
                "type": "mcp_tool_execution_error",
                "content": [_dump(p) for p in result.content],
            }
            message = text or "the tool reported an error"
            return ToolResult(text=_error_text(message), item=item, error=message)
        item["output"] = text
        return ToolResult(text=text, item=item)

    def annotate(self, conversation: str, text: str) -> list[dict]:
        return []

    def close(self, conversation: str) -> None:
        pass  # no per-conversation state: the server's tools see each call alone

    def shutdown(self) -> None:
        self._conn.stop()

    # -- for the server and the browser backend --------------------------------------------------------------

    @staticmethod
    def _arguments(text: str) -> dict:
        if not text.strip():
            return {}
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as e:
            raise _CallFailed(
                f"the arguments are not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                {"type": "mcp_protocol_error", "code": PARSE_ERROR, "message": f"invalid JSON: {e.msg}"},
            ) from None
        if not isinstance(arguments, dict):
            raise _CallFailed(
                f"the arguments must be a JSON object, not {type(arguments).__name__}",
                {"type": "mcp_protocol_error", "code": INVALID_PARAMS, "message": "arguments: not an object"},
            )
        return arguments

    async def call_tool(self, name: str, arguments: dict) -> Any:
        """Call the server's tool `name` (its MCP name, allowed or not) -> the SDK's CallToolResult, which may be
        the tool's own error (`is_error`). Raises ToolError for a timeout, a dead connection or a protocol error."""
        slack = 5.0  # the SDK's own timeout comes first; this one if the transport itself is stuck
        return await self._conn.request(
            lambda client: client.call_tool(name, arguments, read_timeout_seconds=self.timeout_s),
            self.timeout_s + slack,
            f"{self.server_label}.{name}",
        )

    async def aclose(self) -> None:
        await self._conn.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"MCPTool({self.name!r}, spec={self.spec!r}, tools={list(self._declared)})"


async def connect(
    spec: str,
    *,
    name: str | None = None,
    allowed_tools: Any = None,
    headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    description: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    errlog: TextIO | None = None,
) -> MCPTool:
    """Connect one MCP server (a URL or a command line), list its tools, and return it as an MCPTool; the caller
    closes it (`await tool.aclose()`, or `async with await connect(...) as tool`). Raises MCPConnectError.

    name: the server's label (the namespace is `namespace_name(name)`); default the server's own name.
    allowed_tools: None, a list of tool names, or {"tool_names": [...], "read_only": bool} (Responses' shapes).
    headers: HTTP headers (a URL only). env: extra environment variables for a command.
    description: the namespace's description; default the server's instructions.
    errlog: where a command's stderr goes (default: the server's stderr).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise MCPConnectError("MCP server spec: empty (a URL, http:// or https://, or a command line)")
    if not is_url(spec):
        if "://" in spec.split()[0]:
            raise MCPConnectError(f"MCP server {spec!r}: only http:// and https:// URLs (streamable HTTP)")
        try:
            shlex.split(spec)
        except ValueError as e:  # unbalanced quotes
            raise MCPConnectError(f"MCP server {spec!r}: not a command line ({e})") from None
    if allowed_tools is not None and isinstance(allowed_tools, str):
        raise ValueError("allowed_tools: a list of tool names, not a string")
    conn = _Connection(spec, headers=headers, env=env, connect_timeout_s=connect_timeout_s, errlog=errlog)
    listing = await conn.start()
    tool = MCPTool(
        conn,
        listing,
        label=name,
        allowed_tools=allowed_tools,
        description=description,
        timeout_s=timeout_s,
        max_output_chars=max_output_chars,
    )
    log.info("MCP server %r connected as namespace %r: %s", spec, tool.name, ", ".join(tool.tool_names()))
    return tool


class MCPServers:
    """The `serve --tool-server SPEC` servers (each SPEC possibly `LABEL=SPEC`), connected together at entry and
    closed at exit; `.tools` is one MCPTool per server, namespaces made unique (`docs`, `docs_2`). If one fails
    to connect, those already connected are closed and MCPConnectError names the failing spec."""

    def __init__(self, specs: Sequence[str], **options: Any):
        self.specs = list(specs)
        self.options = options
        self.tools: list[MCPTool] = []

    async def __aenter__(self) -> Self:
        parsed = [parse_tool_server(s) for s in self.specs]
        results = await asyncio.gather(
            *(connect(spec, name=label, **self.options) for label, spec in parsed), return_exceptions=True
        )
        tools = [r for r in results if isinstance(r, MCPTool)]
        failed = [r for r in results if not isinstance(r, MCPTool)]
        if failed:
            await asyncio.gather(*(t.aclose() for t in tools))
            if len(failed) == 1 or not all(isinstance(f, MCPConnectError) for f in failed):
                raise failed[0]
            raise MCPConnectError("; ".join(str(f) for f in failed))
        used = set(RESERVED_NAMESPACES)
        for tool in tools:
            base, n = tool.name, 2
            while tool.name in used:
                tool.name = f"{base}_{n}"
                n += 1
            used.add(tool.name)
        self.tools = tools
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(t.aclose() for t in self.tools))
        self.tools = []

    def __iter__(self):
        return iter(self.tools)

    def __len__(self) -> int:
        return len(self.tools)


@contextlib.asynccontextmanager
async def open_mcp(
    server_url: str,
    *,
    server_label: str,
    allowed_tools: Any = None,
    headers: Mapping[str, str] | None = None,
    authorization: str | None = None,
    server_description: str | None = None,
    **options: Any,
) -> AsyncIterator[MCPTool]:
    """A Responses `mcp` tool (`{"type": "mcp", "server_label", "server_url", "allowed_tools", "headers",
    "authorization", "server_description"}`) for the length of one request: URLs only (a request never starts a
    command). The caller checks `url_allowed(server_url, ...)` first. Raises MCPConnectError."""
    if not is_url(server_url):
        raise MCPConnectError(f"server_url {server_url!r}: an http:// or https:// URL is required")
    headers = dict(headers or {})
    if authorization:
        headers["Authorization"] = f"Bearer {authorization}"
    tool = await connect(
        server_url,
        name=server_label,
        allowed_tools=allowed_tools,
        headers=headers,
        description=server_description,
        **options,
    )
    try:
        yield tool
    finally:
        await tool.aclose()


def list_tools_error_item(server_label: str, error: str) -> dict:
    """The `mcp_list_tools` item (minus id) for a server that could not be listed."""
    return {"type": "mcp_list_tools", "server_label": server_label, "tools": [], "error": error}


# ---- the browser's backend ----------------------------------------------------------------------------------

_URL_KEYS = ("url", "link", "uri", "href", "id")
_TITLE_KEYS = ("title", "name")
_SNIPPET_KEYS = ("snippet", "text", "content", "description", "summary")
_TEXT_KEYS = ("text", "content", "body", "markdown")
_LIST_KEYS = ("results", "hits", "items", "documents", "data")
_TOPN_KEYS = ("topn", "top_n", "limit", "max_results", "num_results", "count", "k", "n")
_URL_IN_TEXT = re.compile(r"https?://[^\s<>\"')\]]+")


def _first(d: Mapping, keys: Sequence[str]) -> str:
    for k in keys:
        v = d.get(k)
        if v not in (None, ""):
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return ""


def _payloads(result: Any) -> list[Any]:
    """What a result holds as data: its structured content, and each text part that parses as JSON."""
    out = []
    sc = getattr(result, "structured_content", None)
    if isinstance(sc, dict) and set(sc) == {"result"}:  # a pydantic-made server wraps a returned value so
        sc = sc["result"]
    if isinstance(sc, str):
        with contextlib.suppress(ValueError):
            sc = json.loads(sc)
    if isinstance(sc, (dict, list)):
        out.append(sc)
    for part in result.content or []:
        if getattr(part, "type", None) == "text":
            with contextlib.suppress(ValueError):
                value = json.loads(part.text)
                if isinstance(value, (dict, list)):
                    out.append(value)
    return out


class MCPBrowserBackend:
    """The browser's backend (base.BrowserBackend) from any MCP server with a search tool and a fetch tool.

    Calls: `search` with the query under its schema's `query`, `q`, `search` or `text` property, or its first
    required one (and the result count, when its schema has a property named topn,
    limit, max_results, num_results, count, k or n); `fetch` with the URL under its schema's `url`, `id` or
    `uri` property, or its only required property. OpenAI's convention for connectors (hits {"id", "title",
    "url"}, `fetch(id)`) works too: a hit is shown by its url, and fetching that url sends the hit's id.

    Accepted search results, in order: structured content or a JSON text part that is a list of hits, or an
    object holding one under results/hits/items/documents/data; each hit an object with the URL under
    url/link/uri/href/id, a title under title/name and a snippet under snippet/text/content/description/summary.
    Else resource_link parts (uri, title or name, description). Else plain text: one hit per line holding an
    http(s) URL (the line's other words as the title).

    Accepted fetch results: structured content or a JSON text part that is an object with the text under
    text/content/body/markdown (title, url optional); an embedded text resource (its uri and text); else the
    text parts as the page's text (taken as plain text or markdown; HTML is not converted here).

    The tool's error result, a timeout or a dead connection raise ToolError with the reason, for the model.
    """

    def __init__(self, tool: MCPTool, search: str = "search", fetch: str = "fetch"):
        for role, wanted in (("search", search), ("fetch", fetch)):
            if wanted not in tool.mcp_tools:
                raise ValueError(
                    f"MCP server {tool.server_label!r} has no {role} tool {wanted!r} "
                    f"(its tools: {', '.join(tool.mcp_tools) or 'none'})"
                )
        self.tool = tool
        self.name = f"mcp:{tool.server_label}"
        self._search, self._fetch = tool.mcp_tools[search], tool.mcp_tools[fetch]
        props = (self._search.input_schema or {}).get("properties") or {}
        required = (self._search.input_schema or {}).get("required") or []
        self._query_key = next((k for k in ("query", "q", "search", "text") if k in props), None)
        self._query_key = self._query_key or (required[0] if required else "query")
        self._topn_key = next((k for k in _TOPN_KEYS if k in props), None)
        props = (self._fetch.input_schema or {}).get("properties") or {}
        required = (self._fetch.input_schema or {}).get("required") or []
        self._url_key = next((k for k in ("url", "id", "uri") if k in props), None)
        if self._url_key is None:
            self._url_key = required[0] if len(required) == 1 else "url"
        self._ids: dict[str, str] = {}  # url -> id, for hits that carry both and a fetch that takes the id

    async def _call(self, tool: Any, arguments: dict) -> Any:
        result = await self.tool.call_tool(tool.name, arguments)
        if result.is_error:
            raise ToolError(result_text(result) or f"{tool.name} failed")
        return result

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        arguments: dict[str, Any] = {self._query_key: query}
        if self._topn_key:
            arguments[self._topn_key] = topn
        result = await self._call(self._search, arguments)
        for payload in _payloads(result):
            hits = payload
            if isinstance(payload, dict):
                hits = next((payload[k] for k in _LIST_KEYS if isinstance(payload.get(k), list)), None)
            if isinstance(hits, list):
                hits = [h for h in hits if isinstance(h, dict) and _first(h, _URL_KEYS)][:topn]
                for h in hits:
                    if (
                        self._url_key == "id"
                        and isinstance(h.get("id"), str)
                        and _first(h, _URL_KEYS) != h["id"]
                    ):
                        self._ids[_first(h, _URL_KEYS)] = h["id"]
                return [
                    SearchHit(
                        url=_first(h, _URL_KEYS),
                        title=_first(h, _TITLE_KEYS) or _first(h, _URL_KEYS),
                        snippet=_first(h, _SNIPPET_KEYS),
                    )
                    for h in hits
                ]
        links = [p for p in result.content or [] if getattr(p, "type", None) == "resource_link"]
        if links:
            return [
                SearchHit(url=str(p.uri), title=p.title or p.name, snippet=p.description or "") for p in links
            ][:topn]
        hits = []
        for line in result_text(result).splitlines():
            m = _URL_IN_TEXT.search(line)
            if m:
                title = (line[: m.start()] + line[m.end() :]).strip(" \t-–—:|*[]()") or m.group(0)
                hits.append(SearchHit(url=m.group(0), title=title))
        return hits[:topn]

    async def fetch(self, url: str) -> Document:
        result = await self._call(self._fetch, {self._url_key: self._ids.get(url, url)})
        for payload in _payloads(result):
            if isinstance(payload, dict) and _first(payload, _TEXT_KEYS):
                return Document(
                    url=_first(payload, ("url", "uri", "link")) or url,
                    title=_first(payload, _TITLE_KEYS) or url,
                    text=_first(payload, _TEXT_KEYS),
                )
        for part in result.content or []:
            res = getattr(part, "resource", None)
            if getattr(part, "type", None) == "resource" and getattr(res, "text", None) is not None:
                return Document(url=str(res.uri) or url, title=str(res.uri) or url, text=res.text)
        text = result_text(result)
        if not text.strip():
            raise ToolError(f"{url}: the page is empty")
        return Document(url=url, title=url, text=text)

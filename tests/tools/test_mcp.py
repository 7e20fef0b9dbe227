"""MCP servers' tools (gptoss_jax/tools/mcp.py) against a real MCP server written with the official SDK
(tests/tools/mcp_server.py), over stdio (a child process) and over streamable HTTP (uvicorn on 127.0.0.1, an
ephemeral port), both started once for the module.

The connections live in one event loop on a thread of its own, as they do in the server: each `run(...)` is
a new task of that loop, so connections are entered, used and closed from different tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

import openai_harmony as oh
import psutil
import pytest
from conftest import assert_one_line
from mcp_server import DOCUMENTS, INSTRUCTIONS, build_server, http_in_thread
from openai.types.responses.response_output_item import McpCall, McpListTools

from gptoss_jax.tokenizer import get_harmony_encoding
from gptoss_jax.tools import (
    MCPBrowserBackend,
    MCPConnectError,
    MCPServers,
    MCPTool,
    ToolCall,
    ToolError,
    connect,
    namespace_name,
    open_mcp,
    parse_tool_server,
    url_allowed,
)

SERVER = Path(__file__).with_name("mcp_server.py")
STDIO_SPEC = f"{sys.executable} {SERVER}"
TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_app():
    """The test server's streamable HTTP app at /mcp, and at /private/mcp behind a bearer token."""
    app = build_server("Test Tools").streamable_http_app()

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/private/"):
            if dict(scope["headers"]).get(b"authorization") != f"Bearer {TOKEN}".encode():
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
            scope = dict(scope, path=scope["path"].removeprefix("/private"), raw_path=None)
        await app(scope, receive, send)

    return guarded


class Loop:
    """An event loop on its own thread; run(coro) runs the coroutine there as a new task."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def http_url():
    with http_in_thread(_http_app()) as url:
        yield url


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def servers(loop, http_url):
    """`serve --tool-server SPEC --tool-server SPEC`: the stdio server and the HTTP server, both named
    "Test Tools" by themselves (so the second namespace is numbered)."""
    group = MCPServers([STDIO_SPEC, f"{http_url}/mcp"], timeout_s=10, connect_timeout_s=20)
    loop.run(group.__aenter__())
    tools = {"stdio": group.tools[0], "http": group.tools[1]}
    assert children("mcp_server.py")
    yield tools
    loop.run(group.__aexit__(None, None, None))
    assert not group.tools and all(t.closed for t in tools.values())
    assert not children("mcp_server.py")


def children(needle: str) -> list[psutil.Process]:
    """This process's running children whose command line holds `needle`."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and needle in " ".join(p.cmdline()):
                found.append(p)
    return found


def call(loop, tool: MCPTool, recipient: str, arguments) -> object:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return loop.run(tool.call(ToolCall(recipient=recipient, arguments=text, conversation="c1")))


def valid_mcp_call(item: dict) -> McpCall:
    """The item is a Responses `mcp_call` once the loop adds id and status (the openai client's own type)."""
    assert set(item) == {"type", "server_label", "name", "arguments", "output", "error"}
    return McpCall.model_validate(
        item | {"id": "mcp_1", "status": "failed" if item["error"] else "completed"}
    )


# ---- names, specs, allow-list -----------------------------------------------------------------------------


def test_namespace_names_are_harmony_identifiers():
    assert namespace_name("Test Tools") == "test_tools"
    assert namespace_name("docs") == "docs"
    assert namespace_name("my-server.v2") == "my_server_v2"
    assert namespace_name("3d printer") == "mcp_3d_printer"
    assert namespace_name("???") == "mcp"
    assert namespace_name("browser") == "mcp_browser"
    assert namespace_name("functions") == "mcp_functions"
    assert len(namespace_name("x" * 300)) == 64


def test_parse_tool_server():
    assert parse_tool_server("docs=https://h/mcp?x=1") == ("docs", "https://h/mcp?x=1")
    assert parse_tool_server("https://h/mcp?x=1") == (None, "https://h/mcp?x=1")
    assert parse_tool_server("python -m srv --opt=1") == (None, "python -m srv --opt=1")
    assert parse_tool_server("my-tools=python -m srv --opt=1") == ("my-tools", "python -m srv --opt=1")


def test_url_allowed():
    allowed = ["https://tools.example/mcp", "http://127.0.0.1:8931"]
    assert url_allowed("https://tools.example/mcp", allowed)
    assert url_allowed("https://TOOLS.example:443/mcp/", allowed)
    assert url_allowed("https://tools.example/mcp/sub?x=1", allowed)
    assert url_allowed("http://127.0.0.1:8931/anything", allowed)
    for refused in [
        "https://tools.example/mcpx",  # a path that only starts with the prefix's characters
        "https://tools.example/other",
        "https://tools.example.evil/mcp",  # a host that only starts with the allowed one
        "https://tools.example:8443/mcp",
        "http://tools.example/mcp",  # another scheme
        "https://tools.example@evil.example/mcp",  # credentials: the host is evil.example
        "https://user@tools.example/mcp",
        "http://127.0.0.1:89310/",
        "http://127.0.0.1/",
        "file:///etc/passwd",
        "python -m srv",
        "http://127.0.0.1:notaport/",
    ]:
        assert not url_allowed(refused, allowed), refused
    assert not url_allowed("https://tools.example/mcp", [])


# ---- listing and declaring ---------------------------------------------------------------------------------


def test_tools_become_a_harmony_namespace(servers):
    stdio, http = servers["stdio"], servers["http"]
    assert (stdio.name, http.name) == ("test_tools", "test_tools_2")
    assert stdio.server_label == http.server_label == "Test Tools"
    cfg = stdio.config()
    assert isinstance(cfg, oh.ToolNamespaceConfig)
    assert cfg.name == "test_tools" and cfg.description == INSTRUCTIONS
    by_name = {t.name: t for t in cfg.tools}
    assert set(by_name) == {"add", "echo_v2", "fail", "sleep", "crash", "search", "fetch", "search_by_id",
                            "fetch_by_id"}  # fmt: skip
    assert by_name["add"].description == "Add two integers."
    assert by_name["add"].parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    assert stdio.tool_names()["echo_v2"] == "echo.v2"

    # harmony renders it as a namespace of the system message: the declaration is one the model can read
    system = oh.SystemContent.new().with_tools(cfg).with_tools(http.config())
    conv = oh.Conversation.from_messages(
        [oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
         oh.Message.from_role_and_content(oh.Role.USER, "What is 2 + 3?")]
    )  # fmt: skip
    enc = get_harmony_encoding()
    text = enc.decode(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))
    assert "## test_tools\n\n// " + INSTRUCTIONS + "\nnamespace test_tools {" in text
    assert "namespace test_tools_2 {" in text
    assert "// Add two integers.\ntype add = (_: {\na: number,\nb: number,\n}) => any;" in text
    assert "type echo_v2 = (_: {" in text and "times?: number, // default: 1" in text

    # the model's call, parsed back by harmony, names the namespace and the tool
    call_tokens = enc.render(
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"a": 2, "b": 3}')
        .with_channel("commentary")
        .with_recipient("test_tools.add")
        .with_content_type("<|constrain|>json")
    )
    parsed = enc.parse_messages_from_completion_tokens(call_tokens, None)
    assert parsed[0].recipient == "test_tools.add"


def test_list_tools_item(servers):
    item = servers["http"].list_tools_item()
    McpListTools.model_validate(item | {"id": "mcpl_1"})
    assert item["server_label"] == "Test Tools" and item["error"] is None
    tools = {t["name"]: t for t in item["tools"]}
    assert "echo.v2" in tools  # the MCP name, as the server lists it
    assert tools["add"]["input_schema"]["properties"]["a"]["type"] == "integer"
    assert tools["add"]["annotations"] == {"readOnlyHint": True}
    assert tools["sleep"]["annotations"] is None


# ---- calls -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_calls(loop, servers, transport):
    tool = servers[transport]
    result = call(loop, tool, f"{tool.name}.add", {"a": 2, "b": 3})
    assert (result.text, result.error) == ("5", None)
    mc = valid_mcp_call(result.item)
    assert (mc.name, mc.server_label, mc.output, mc.error) == ("add", "Test Tools", "5", None)
    assert json.loads(mc.arguments) == {"a": 2, "b": 3}

    result = call(loop, tool, f"{tool.name}.echo_v2", {"text": "hi", "times": 3})
    assert result.text == "hi hi hi" and result.item["name"] == "echo.v2"
    result = call(loop, tool, f"{tool.name}.echo.v2", {"text": "hi"})  # the MCP name is understood too
    assert result.text == "hi" and result.item["name"] == "echo.v2"


def test_concurrent_calls(loop, servers):
    tool = servers["http"]

    async def many():
        calls = [ToolCall(f"{tool.name}.add", json.dumps({"a": i, "b": 1}), f"c{i}") for i in range(8)]
        return await asyncio.gather(*(tool.call(c) for c in calls))

    assert [r.text for r in loop.run(many())] == [str(i + 1) for i in range(8)]


def test_errors_become_results(loop, servers):
    """The model's mistakes and the tool's failures come back as tool messages, never as exceptions."""
    tool = servers["stdio"]
    ns = tool.name

    bad_json = call(loop, tool, f"{ns}.add", '{"a": 2, "b": ')
    assert "not valid JSON" in bad_json.error and bad_json.text.startswith("Error: ")
    assert valid_mcp_call(bad_json.item).error.code == -32700

    not_object = call(loop, tool, f"{ns}.add", "[2, 3]")
    assert "JSON object" in not_object.error and not_object.item["error"]["code"] == -32602

    unknown = call(loop, tool, f"{ns}.multiply", {"a": 2})
    assert "no tool 'multiply'" in unknown.error and f"{ns}.add" in unknown.text  # it lists what there is
    assert valid_mcp_call(unknown.item).error.type == "mcp_protocol_error"

    bare = call(loop, tool, ns, {"a": 2})  # the namespace alone
    assert bare.error and "no tool ''" in bare.error

    wrong_args = call(loop, tool, f"{ns}.add", {"a": "two"})  # the server validates and answers isError
    assert (
        wrong_args.error
        and "a" in wrong_args.text
        and wrong_args.item["error"]["type"] == ("mcp_tool_execution_error")
    )

    failed = call(loop, tool, f"{ns}.fail", {"reason": "the disk is full"})
    assert failed.error == failed.text == "Error executing tool fail: failed on purpose: the disk is full"
    mc = valid_mcp_call(failed.item)
    assert mc.error.type == "mcp_tool_execution_error" and mc.output is None
    assert mc.error.content == [{"type": "text", "text": failed.error}]

    # past timeout_s, the call ends with an error, and the connection serves the next call
    tool.timeout_s = 0.5
    try:
        t0 = time.monotonic()
        slow = call(loop, tool, f"{ns}.sleep", {"seconds": 20})
        assert time.monotonic() - t0 < 5
    finally:
        tool.timeout_s = 10
    assert "timed out" in slow.error and valid_mcp_call(slow.item).error.code == -32001
    assert call(loop, tool, f"{ns}.add", {"a": 1, "b": 1}).text == "2"


def test_allowed_tools_and_headers(loop, http_url):
    """A Responses `mcp` tool: a URL behind a bearer token (authorization), allowed_tools as names and as a
    filter; what is not allowed is neither declared nor callable."""

    async def scenario():
        url = f"{http_url}/private/mcp"
        async with open_mcp(
            url, server_label="docs", authorization=TOKEN, allowed_tools=["add", "fetch"]
        ) as t:
            names = [d.name for d in t.config().tools]
            item = t.list_tools_item()
            ok = await t.call(ToolCall("docs.add", '{"a": 40, "b": 2}', "c"))
            refused = await t.call(ToolCall("docs.echo_v2", '{"text": "x"}', "c"))
        async with open_mcp(
            url, server_label="Docs Server", headers={"Authorization": f"Bearer {TOKEN}"},
            allowed_tools={"read_only": True}, server_description="Three documents.",
        ) as r:  # fmt: skip
            read_only = sorted(d.name for d in r.config().tools)
            described = (r.name, r.config().description)
        return names, item, ok, refused, read_only, described

    names, item, ok, refused, read_only, described = loop.run(scenario())
    assert names == ["add", "fetch"] and [t["name"] for t in item["tools"]] == ["add", "fetch"]
    assert ok.text == "42" and ok.item["server_label"] == "docs"
    assert refused.error and "no tool 'echo_v2'" in refused.error and "docs.add, docs.fetch" in refused.text
    assert read_only == ["add", "echo_v2", "fetch", "fetch_by_id", "search", "search_by_id"]
    assert described == ("docs_server", "Three documents.")

    with pytest.raises(MCPConnectError) as e:  # no token: the server's 401, at connect
        loop.run(open_mcp(f"{http_url}/private/mcp", server_label="docs").__aenter__())
    assert_one_line(e, f"{http_url}/private/mcp", "HTTP 401 Unauthorized", "authorization")
    with pytest.raises(MCPConnectError) as e:  # a request never starts a command
        loop.run(open_mcp(STDIO_SPEC, server_label="docs").__aenter__())
    assert_one_line(e, "server_url", "http")


def test_browser_backend(loop, servers):
    backend = MCPBrowserBackend(servers["http"])
    assert backend.name == "mcp:Test Tools"
    hits = loop.run(backend.search("python kernel state", 2))
    assert hits[0].url == "https://docs.example/python" and hits[0].title == "The python tool"
    assert hits[0].snippet == DOCUMENTS["https://docs.example/python"][1].split("\n")[0]
    assert len(hits) <= 2
    doc = loop.run(backend.fetch("https://docs.example/harmony"))
    assert (doc.url, doc.title, doc.text) == ("https://docs.example/harmony", *DOCUMENTS[doc.url])
    with pytest.raises(ToolError, match="no such document: https://nowhere.example"):
        loop.run(backend.fetch("https://nowhere.example"))
    assert loop.run(backend.search("zebra", 5)) == []
    with pytest.raises(ValueError, match="no fetch tool 'open'.*its tools: add, echo.v2"):
        MCPBrowserBackend(servers["http"], fetch="open")

    # OpenAI's connector convention: hits carry ids, fetch takes the id; the browser still sees urls
    by_id = MCPBrowserBackend(servers["stdio"], search="search_by_id", fetch="fetch_by_id")
    hits = loop.run(by_id.search("harmony format", 1))
    assert [(h.url, h.title) for h in hits] == [("https://docs.example/harmony", "Harmony format")]
    doc = loop.run(by_id.fetch("https://docs.example/harmony"))
    assert (doc.url, doc.title, doc.text) == ("https://docs.example/harmony", *DOCUMENTS[doc.url])


def test_browser_backend_plain_text_results(loop, tmp_path):
    """A server whose search answers plain text (a URL per line) and whose fetch answers an embedded resource."""
    script = tmp_path / "plain_server.py"
    script.write_text(
        "from mcp.server.mcpserver import MCPServer\n"
        "from mcp.types import EmbeddedResource, TextResourceContents\n"
        "s = MCPServer('plain')\n"
        "@s.tool()\n"
        "def find(q: str, max_results: int = 5) -> str:\n"
        "    return '\\n'.join(f'{i}. Page {i} - https://p.example/{i}' for i in range(max_results)) + '\\nno url'\n"
        "@s.tool()\n"
        "def get(id: str) -> EmbeddedResource:\n"
        "    return EmbeddedResource(type='resource', resource=TextResourceContents(uri=id, text='body of ' + id))\n"
        "s.run('stdio')\n"
    )

    async def scenario():
        async with await connect(f"{sys.executable} {script}", connect_timeout_s=20) as tool:
            backend = MCPBrowserBackend(tool, search="find", fetch="get")
            return await backend.search("pages", 3), await backend.fetch("https://p.example/1")

    hits, doc = loop.run(scenario())
    assert [(h.url, h.title) for h in hits] == [
        (f"https://p.example/{i}", f"{i}. Page {i}") for i in range(3)
    ]
    assert (doc.url, doc.text) == ("https://p.example/1", "body of https://p.example/1")


# ---- lifetimes and failures --------------------------------------------------------------------------------


def test_a_server_that_dies(loop):
    """The child exits mid-call: that call and every later one answer with an error; nothing else is hurt."""

    async def scenario():
        tool = await connect(STDIO_SPEC, name="fragile", timeout_s=10, connect_timeout_s=20)
        try:
            first = await tool.call(ToolCall("fragile.add", '{"a": 1, "b": 2}', "c"))
            died = await tool.call(ToolCall("fragile.crash", "", "c"))
            after = await tool.call(ToolCall("fragile.add", '{"a": 1, "b": 2}', "c"))
            return first, died, after, tool.alive
        finally:
            await tool.aclose()
            assert tool.closed

    first, died, after, alive = loop.run(scenario())
    assert first.text == "3"
    assert "closed the connection" in died.error and valid_mcp_call(died.item).error.code == -32000
    assert died.item["arguments"] == "{}"  # no arguments: an empty object
    assert after.error and "not connected" in after.error
    assert not alive


def test_a_cancelled_request_closes_its_connection(loop, http_url):
    """A request cancelled inside `async with open_mcp(...)` (the client went away): its connection ends."""

    async def scenario():
        holder = {}

        async def request():
            async with open_mcp(f"{http_url}/mcp", server_label="t", timeout_s=30) as tool:
                holder["tool"] = tool
                await tool.call(ToolCall("t.sleep", '{"seconds": 30}', "c"))

        task = asyncio.create_task(request())
        while "tool" not in holder:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return holder["tool"].alive, holder["tool"].closed  # closed: the context's exit waited for it

    assert loop.run(scenario()) == (False, True)


def test_bad_specs_are_clear_errors(loop, http_url):
    closed_port = _free_port()
    cases = [
        ("no-such-mcp-server-command --stdio", ["no-such-mcp-server-command", "not found"]),
        (f"{sys.executable} -c \"print('not MCP')\"", ["not MCP", "is it an MCP server"]),
        (f"http://127.0.0.1:{closed_port}/mcp", [f"127.0.0.1:{closed_port}"]),
        (f"{http_url}/not-mcp", [f"{http_url}/not-mcp", "HTTP 404", "MCP endpoint"]),
        ("ws://127.0.0.1:1/mcp", ["ws://127.0.0.1:1/mcp", "http"]),
        ("python -c 'unbalanced", ["unbalanced", "not a command line"]),
        ("   ", ["empty"]),
    ]
    for spec, needles in cases:
        with pytest.raises(MCPConnectError) as e:
            loop.run(connect(spec, connect_timeout_s=20))
        assert_one_line(e, *needles)
    with pytest.raises(MCPConnectError) as e:
        loop.run(connect("cat", headers={"X": "1"}))
    assert_one_line(e, "'cat'", "headers are for a URL")

    # a command that never answers: refused after connect_timeout_s, and its process is gone
    t0 = time.monotonic()
    with pytest.raises(MCPConnectError) as e:
        loop.run(connect("sleep 600", connect_timeout_s=0.5))
    assert_one_line(e, "'sleep 600'", "no answer within 0.5 s")
    assert time.monotonic() - t0 < 8
    assert not children("sleep 600")


def test_one_bad_spec_fails_the_group(loop, http_url):
    group = MCPServers([f"{http_url}/mcp", "no-such-mcp-server-command"], connect_timeout_s=20)
    with pytest.raises(MCPConnectError) as e:
        loop.run(group.__aenter__())
    assert_one_line(e, "no-such-mcp-server-command")
    assert not group.tools

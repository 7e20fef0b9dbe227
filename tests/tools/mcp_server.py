"""A small MCP server for the tests, written with the official SDK (`mcp.server.mcpserver.MCPServer`, the SDK's
FastMCP): arithmetic, an echo, a tool that fails, a slow tool, a tool that kills its own process, and a
search/fetch pair over a few in-memory documents (the browser's MCP backend).

    python tests/tools/mcp_server.py            # serve over stdio (what `connect("python .../mcp_server.py")` runs)
    build_server().streamable_http_app()        # the same tools over streamable HTTP (the tests run it in a thread)
    with http_in_thread(app) as url: ...        # an ASGI app served on a free port of 127.0.0.1, in a thread
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

INSTRUCTIONS = "Test tools: arithmetic, an echo, and a search over three documents about harmony."

DOCUMENTS = {
    "https://docs.example/harmony": (
        "Harmony format",
        "Harmony is the chat format gpt-oss was trained on.\nMessages carry a role, a channel and a recipient.\n"
        + "Tool calls end with the call token.",
    ),
    "https://docs.example/browser": (
        "The browser tool",
        "The browser tool searches, opens pages and finds text in them.\nCitations point at line ranges.",
    ),
    "https://docs.example/python": (
        "The python tool",
        "The python tool runs code in a stateful Jupyter kernel.\nIts state persists within a conversation.",
    ),
}


def build_server(name: str = "Test Tools") -> MCPServer:
    server = MCPServer(name, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool(name="echo.v2", annotations=ToolAnnotations(read_only_hint=True))
    def echo(text: str, times: int = 1) -> str:
        """Repeat a text."""
        return " ".join([text] * times)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    def fail(reason: str) -> str:
        """Always fails, saying why."""
        raise ToolError(f"failed on purpose: {reason}")

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Wait, then answer."""
        await asyncio.sleep(seconds)
        return "awake"

    @server.tool()
    def crash() -> str:
        """End the server's process mid-call."""
        os._exit(3)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def search(query: str, limit: int = 10) -> str:
        """Search the documents; JSON {"results": [{"url", "title", "snippet"}]}."""
        words = set(query.lower().split())
        scored = []
        for url, (title, text) in DOCUMENTS.items():
            score = sum(w in (title + " " + text).lower() for w in words)
            if score:
                scored.append((-score, url, title, text.split("\n")[0]))
        hits = [{"url": u, "title": t, "snippet": s} for _, u, t, s in sorted(scored)[:limit]]
        return json.dumps({"results": hits})

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def fetch(url: str) -> str:
        """Fetch a document; JSON {"url", "title", "text"}."""
        if url not in DOCUMENTS:
            raise ToolError(f"no such document: {url}")
        title, text = DOCUMENTS[url]
        return json.dumps({"url": url, "title": title, "text": text})

    # OpenAI's convention for connectors: hits carry an id (and a url), and fetch takes the id
    ids = {url.rsplit("/", 1)[1]: url for url in DOCUMENTS}

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def search_by_id(query: str) -> str:
        """Search; JSON {"results": [{"id", "title", "url"}]}."""
        hits = json.loads(search(query))["results"]
        by_url = {u: i for i, u in ids.items()}
        return json.dumps(
            {"results": [{"id": by_url[h["url"]], "title": h["title"], "url": h["url"]} for h in hits]}
        )

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def fetch_by_id(id: str) -> str:
        """Fetch by id; JSON {"id", "title", "text", "url", "metadata"}."""
        if id not in ids:
            raise ToolError(f"no such id: {id}")
        title, text = DOCUMENTS[ids[id]]
        return json.dumps({"id": id, "title": title, "text": text, "url": ids[id], "metadata": None})

    return server


@contextlib.contextmanager
def http_in_thread(app, start_timeout_s: float = 20.0):
    """Serves the ASGI `app` with uvicorn on a free port of 127.0.0.1, in a thread -> its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test MCP server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    build_server(sys.argv[1] if len(sys.argv) > 1 else "Test Tools").run("stdio")

"""gpt-oss's own tools, run by the server and the chat CLI: `python` (a sandboxed, stateful Jupyter kernel
per conversation), `browser` (search, open and find over a local index or a search service, through a safe
fetcher) and MCP servers' tools (one harmony namespace per server, over stdio or streamable HTTP)."""

from .base import BrowserBackend, Document, SearchHit, Tool, ToolCall, ToolError, ToolResult
from .browser import BrowserTool, LocalIndex, SearxngBackend
from .fetch import SafeFetcher
from .mcp import (
    MCPBrowserBackend,
    MCPConnectError,
    MCPServers,
    MCPTool,
    connect,
    list_tools_error_item,
    namespace_name,
    open_mcp,
    parse_tool_server,
    url_allowed,
)
from .python import PythonTool, SandboxUnavailable, python_tool_config

__all__ = [
    "BrowserBackend",
    "BrowserTool",
    "Document",
    "LocalIndex",
    "MCPBrowserBackend",
    "MCPConnectError",
    "MCPServers",
    "MCPTool",
    "PythonTool",
    "SafeFetcher",
    "SandboxUnavailable",
    "SearchHit",
    "SearxngBackend",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolResult",
    "connect",
    "list_tools_error_item",
    "namespace_name",
    "open_mcp",
    "parse_tool_server",
    "python_tool_config",
    "url_allowed",
]

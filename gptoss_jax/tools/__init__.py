"""gpt-oss's own tools, run by the server: `python` (a sandboxed, stateful Jupyter kernel per conversation) and
MCP servers' tools (one harmony namespace per server, over stdio or streamable HTTP)."""

from .base import BrowserBackend, Document, SearchHit, Tool, ToolCall, ToolError, ToolResult
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
    "Document",
    "MCPBrowserBackend",
    "MCPConnectError",
    "MCPServers",
    "MCPTool",
    "PythonTool",
    "SandboxUnavailable",
    "SearchHit",
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

"""gpt-oss's own tools, run by the server and the chat CLI: the interface every tool implements (`base.py`:
`Tool`, `ToolCall`, `ToolResult`) and `python` (a sandboxed, stateful Jupyter kernel per conversation)."""

from .base import Tool, ToolCall, ToolError, ToolResult
from .python import PythonTool, SandboxUnavailable, python_tool_config

__all__ = [
    "PythonTool",
    "SandboxUnavailable",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolResult",
    "python_tool_config",
]

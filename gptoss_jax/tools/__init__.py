"""gpt-oss's own tools, run by the server: `python` (a sandboxed, stateful Jupyter kernel per conversation)
and `browser` (search, open and find over a local index or a search service, through a safe fetcher)."""

from .browser import BrowserTool, LocalIndex, SearxngBackend
from .fetch import SafeFetcher
from .python import PythonTool, SandboxUnavailable, python_tool_config

__all__ = [
    "BrowserTool",
    "LocalIndex",
    "PythonTool",
    "SafeFetcher",
    "SandboxUnavailable",
    "SearxngBackend",
    "python_tool_config",
]

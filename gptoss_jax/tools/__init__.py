"""gpt-oss's own tools, run by the server: `python` (a sandboxed, stateful Jupyter kernel per conversation)."""

from .python import PythonTool, SandboxUnavailable, python_tool_config

__all__ = ["PythonTool", "SandboxUnavailable", "python_tool_config"]

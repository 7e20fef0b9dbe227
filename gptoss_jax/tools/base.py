"""What every tool the server runs itself looks like: gpt-oss's built-in `browser` and `python`, and each MCP
server's tools (one harmony namespace per tool provider).

    tool.name                          # its harmony namespace: "browser", "python", or an MCP server's name
    tool.config()                      # the harmony declaration (openai_harmony.ToolNamespaceConfig)
    await tool.call(ToolCall(...))     # -> ToolResult; never raises for the model's own mistakes
    tool.annotate(conversation, text)  # url_citation annotations for a final answer's text (browser only)
    tool.close(conversation)           # forget a conversation's state (kernel, open pages)
    tool.shutdown()                    # end everything (server shutdown)

The server's tool loop (gptoss_jax/api) owns the conversation: when the model calls `<name>` or
`<name>.<function>`, it builds a `ToolCall`, awaits the result, renders `ToolResult.text` as the tool's
harmony message (author `<recipient>`, to assistant, on the call's channel), and lets generation continue. A
`ToolResult.item` is the Responses output item the call becomes (`web_search_call`, `code_interpreter_call`,
`mcp_call`), minus `id` and `status`, which the loop fills in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class ToolCall:
    recipient: str  # what the model addressed: "python", "browser.search", "<server>.<tool>"
    arguments: str  # the message's text: JSON arguments (browser, MCP) or the code itself (python)
    conversation: str  # the key of a conversation's state (a kernel, a browser's page stack)

    @property
    def function(self) -> str | None:
        """The part after the namespace ("search" for browser.search), None for a bare `python`."""
        _, dot, fn = self.recipient.partition(".")
        return fn if dot else None


@dataclasses.dataclass
class ToolResult:
    text: str  # the tool message's content, as the model reads it (an error is text too)
    item: dict[str, Any] = dataclasses.field(default_factory=dict)  # the Responses output item, no id/status
    error: str | None = None  # set when the call failed (the text then says why, for the model)


@runtime_checkable
class Tool(Protocol):
    name: str

    def config(self) -> Any: ...

    async def call(self, call: ToolCall) -> ToolResult: ...

    def annotate(self, conversation: str, text: str) -> list[dict]: ...

    def close(self, conversation: str) -> None: ...

    def shutdown(self) -> None: ...


# ---- the browser's backends (gptoss_jax/tools/browser.py: a local index, an HTTP search service; and an
# MCP server's search and fetch tools, gptoss_jax/tools/mcp.py) --------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchHit:
    url: str
    title: str
    snippet: str = ""


@dataclasses.dataclass(frozen=True)
class Document:
    url: str
    title: str
    text: str  # plain text (HTML already turned into text), split into numbered lines by the browser


@runtime_checkable
class BrowserBackend(Protocol):
    """Where the browser searches and what it opens. Errors the model should see (no such page, a refused
    address, a timeout) are raised as `ToolError`, with a message meant for the model."""

    name: str

    async def search(self, query: str, topn: int) -> list[SearchHit]: ...

    async def fetch(self, url: str) -> Document: ...


class ToolError(Exception):
    """A failure the model is told about in the tool's message (not a server error)."""

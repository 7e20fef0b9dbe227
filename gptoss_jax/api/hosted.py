"""Hosted tools of the Responses API (`web_search`, `code_interpreter`, `file_search`, `mcp`, ...): tools that
OpenAI's servers run themselves, which a client offers by type alone.

This server runs none of them yet: `hosted_tool` is the one place a backend plugs in (for a type it serves,
it would return what the model is shown, a harmony `ToolNamespaceConfig` such as
`ToolNamespaceConfig.browser()` for the system message, and run the calls). Until then the tool is left out
of what the model sees, and the first request of each type logs it once per process. With
`serve --strict-tools` such a tool is refused instead: a 400 naming `tools[i].type`.
"""

from __future__ import annotations

import logging

from .protocol import APIError

log = logging.getLogger("gptoss_jax.api")

# The hosted tool types OpenAI's Responses API defines (those not listed are refused as unknown types).
HOSTED_TYPES = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "code_interpreter",
        "file_search",
        "mcp",
        "image_generation",
        "computer_use_preview",
        "computer",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
    }
)

_logged: set[str] = set()


def hosted_tool(i: int, tool: dict, strict: bool) -> None:
    """Hosted tool `tools[i]`, which no backend serves: None (left out, logged once per type) or, with
    `strict`, a 400. A backend for a type is dispatched here, before the refusal."""
    kind = tool["type"]
    if kind not in HOSTED_TYPES:
        raise APIError(
            f"tools[{i}].type: unknown tool type {kind!r} (supported: function, custom, namespace; hosted "
            "types are accepted and left out)",
            param=f"tools[{i}].type",
        )
    if strict:
        raise APIError(
            f"tools[{i}].type: the hosted tool {kind!r} is not available on this server (it runs with "
            "--strict-tools; without it such tools are left out)",
            param=f"tools[{i}].type",
        )
    if kind not in _logged:
        _logged.add(kind)
        log.warning(
            "hosted tool type %r is not available on this server: it is left out of what the model sees "
            "(logged once; serve --strict-tools refuses it instead)",
            kind,
        )

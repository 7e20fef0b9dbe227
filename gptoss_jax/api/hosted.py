"""Hosted tools of the Responses API (`web_search`, `code_interpreter`, `file_search`, `mcp`, ...): tools that
OpenAI's servers run themselves, which a client offers by type alone.

`hosted_tool` is the one place where a type meets the tools this server runs itself (`serve --builtin-tools`,
api/toolloop.py): `code_interpreter` is the `python` tool, `web_search` (and `web_search_preview` and their
dated names) the `browser` tool. A type whose tool the server runs is accepted (the tool is declared in the
system message of every request anyway); any other is left out of what the model sees, and the first request
of each type logs it once per process. With `serve --strict-tools` such a tool is refused instead: a 400
naming `tools[i].type`.
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

# hosted type -> the built-in tool that serves it
SERVED_BY = {
    "code_interpreter": "python",
    "web_search": "browser",
    "web_search_preview": "browser",
    "web_search_2025_08_26": "browser",
    "web_search_preview_2025_03_11": "browser",
}

_logged: set[str] = set()


def hosted_tool(i: int, tool: dict, strict: bool, available=()) -> str | None:
    """Hosted tool `tools[i]`: the name of the tool this server runs for it (among `available`), else None
    (left out, logged once per type) or, with `strict`, a 400."""
    kind = tool["type"]
    if kind not in HOSTED_TYPES:
        raise APIError(
            f"tools[{i}].type: unknown tool type {kind!r} (supported: function, custom, namespace; hosted "
            "types are accepted and left out)",
            param=f"tools[{i}].type",
        )
    served = SERVED_BY.get(kind)
    if served is not None and served in available:
        return served
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
    return None

"""Hosted tools of the Responses API (`web_search`, `code_interpreter`, `file_search`, `mcp`, ...): tools that
OpenAI's servers run themselves, which a client offers by type alone.

`hosted_tool` is the one place where a type meets the tools this server runs itself (`serve --builtin-tools`,
api/toolloop.py): `code_interpreter` is the `python` tool, `web_search` (and `web_search_preview` and their
dated names) the `browser` tool. A type whose tool the server runs is accepted (the tool is declared in the
system message of every request anyway); any other is left out of what the model sees, and the first request
of each type logs it once per process. With `serve --strict-tools` such a tool is refused instead: a 400
naming `tools[i].type`.

`mcp` (`{"type": "mcp", "server_label", "server_url", "allowed_tools", "require_approval": "never",
"headers", "authorization", "server_description"}`): an MCP server the request connects for its own length,
only where the operator allowed its URL (`serve --allow-mcp-url PREFIX`); a URL outside those prefixes is a
400 naming `tools[i].server_url`. Calls run without approval, so `require_approval` must be "never".
Without any allowed prefix, `mcp` is a type the server cannot run (left out, or refused as above).
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


def mcp_tool(i: int, tool: dict, allow_mcp_urls) -> dict:
    """A Responses `mcp` tool checked: its fields, and its URL among the allowed prefixes (400s naming them)."""
    from ..tools import url_allowed

    w = f"tools[{i}]"
    label, url = tool.get("server_label"), tool.get("server_url")
    if not isinstance(label, str) or not label.strip():
        raise APIError(f"{w}.server_label: field required (a non-empty string)", param=f"{w}.server_label")
    if not isinstance(url, str) or not url.strip():
        why = "connectors (connector_id) are not supported; " if tool.get("connector_id") else ""
        raise APIError(f"{w}.server_url: field required ({why}an http(s) URL)", param=f"{w}.server_url")
    if not url_allowed(url, allow_mcp_urls):
        raise APIError(f"{w}.server_url: {url!r} is not among the MCP server URLs this server allows "
                       "(serve --allow-mcp-url)", param=f"{w}.server_url")  # fmt: skip
    if tool.get("require_approval") != "never":
        raise APIError(f"{w}.require_approval: this server runs MCP calls without approval requests; set "
                       f"\"never\" (got {tool.get('require_approval')!r})", param=f"{w}.require_approval")  # fmt: skip
    allowed = tool.get("allowed_tools")
    if allowed is not None and not isinstance(allowed, (list, dict)):
        raise APIError(f"{w}.allowed_tools: a list of tool names or {{\"tool_names\": [...]}}",
                       param=f"{w}.allowed_tools")  # fmt: skip
    headers = tool.get("headers")
    if headers is not None and not (isinstance(headers, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):  # fmt: skip
        raise APIError(f"{w}.headers: an object of strings", param=f"{w}.headers")
    for field in ("authorization", "server_description"):
        if tool.get(field) is not None and not isinstance(tool[field], str):
            raise APIError(f"{w}.{field}: a string", param=f"{w}.{field}")
    return {"index": i, "server_label": label, "server_url": url, "allowed_tools": allowed,
            "headers": headers, "authorization": tool.get("authorization"),
            "server_description": tool.get("server_description")}  # fmt: skip


def hosted_tool(i: int, tool: dict, strict: bool, available=(), allow_mcp_urls=()) -> str | dict | None:
    """Hosted tool `tools[i]`: the name of the tool this server runs for it (among `available`), or for an
    `mcp` tool whose URL is allowed the checked tool (a dict, connected when the request runs); else None (left
    out, logged once per type) or, with `strict`, a 400."""
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
    if kind == "mcp" and allow_mcp_urls:
        return mcp_tool(i, tool, allow_mcp_urls)
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

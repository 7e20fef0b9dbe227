"""OpenAI requests -> the conversation the model is asked to continue (`Turn`), through `gptoss_jax.harmony`'s
one mapping (`Chat.from_messages`, `Chat.from_responses_input`): the server renders a history exactly as
fine-tuning and the chat CLI do.

What is the API's own here: the tools a request offers and how it lets the model call them (`tool_choice`;
with "none" the instructions stay and no tool is rendered), the check that each function's parameters are a
JSON Schema for an object, the request's reasoning effort (else the server's default), and every problem
answered as a 400 naming the field (`APIError`).

Responses tools: function and custom tools go in `functions`; a namespace tool's functions and custom tools
in a harmony namespace of its name; hosted tools (web_search, ...) are those the server runs (`hosted.py`), or
left out or refused.

Tools the server runs itself (`serve --builtin-tools`, `toolloop.py`): declared in harmony's system message
(`Chat.system_tools`) of every request, unless its `tool_choice` is "none"; `Turn.run_tools` names them.
Reasoning input items that carry `encrypted_content` are opened (`sealed.py`) and their analysis restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

from ..harmony import FUNCTIONS, Chat, ConversationError, Namespace, function_tools, is_custom
from .hosted import hosted_tool
from .protocol import (
    APIError,
    ChatRequest,
    FunctionDef,
    ReasoningText,
    ResponsesRequest,
    parse_input_item,
    parse_response_tool,
)


@dataclasses.dataclass
class Turn(Chat):
    """What the model is asked for: the conversation (`Chat`: its messages, instructions, the tools rendered
    in the prompt, the reasoning effort, the function of each call id) and how it may call the tools."""

    tool_choice: str = "auto"  # auto | none | required | the name of the function that must be called
    where: dict[str, str] = dataclasses.field(default_factory=dict)  # tool recipient -> its request field
    run_tools: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> a tool the server runs
    mcp: list[dict] = dataclasses.field(default_factory=list)  # Responses `mcp` tools to connect (hosted.py)

    def tool(self, namespace: str | None, name: str | None) -> Any:
        """The definition of the tool a call addresses (None: not offered, e.g. a built-in tool)."""
        if namespace in (None, FUNCTIONS):
            return self.tools.get(name)
        ns = self.namespaces.get(namespace)
        return ns.tools.get(name) if ns else None

    def prompt_tokens(self, date: Any = "today") -> list[int]:
        """The prompt, with today's date unless the server is configured otherwise (`serve --date`)."""
        return super().prompt_tokens(date)


# ------------------------------------------------------------------------------------------ tools
def check_tool(fn: FunctionDef, where: str) -> None:
    """A function's parameters must be a JSON Schema for an object."""
    import jsonschema

    params = fn.parameters
    if params is None:
        return
    if params.get("type", "object") != "object":
        raise APIError(
            f"{where}.parameters: must be a JSON Schema of type 'object', got type {params.get('type')!r}",
            param=f"{where}.parameters",
        )
    try:
        jsonschema.validators.validator_for(params, default=jsonschema.Draft202012Validator).check_schema(
            params
        )
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p!r}]" for p in e.path)
        raise APIError(
            f"{where}.parameters{path}: invalid JSON Schema: {e.message}", param=f"{where}.parameters"
        ) from None


def _tools(tools: list[Any], where: list[str], choice: Any) -> tuple[dict[str, FunctionDef], str]:
    """The tools rendered in the prompt (none with tool_choice "none") and the tool choice's name."""
    with _as_api_error():
        named = function_tools(tools)
    for fn, w in zip(named.values(), where, strict=True):
        if not is_custom(fn):
            check_tool(fn, w)
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        name = choice.function.name if hasattr(choice, "function") else choice.name
        if name not in named:
            raise APIError(
                f"tool_choice: names the function {name!r}, which is not among the tools "
                f"({', '.join(named) or 'none given'})",
                param="tool_choice",
            )
        choice = name
    if choice != "auto" and choice != "none" and not named:
        raise APIError(f"tool_choice: {choice!r} needs tools, and none are given", param="tool_choice")
    return ({} if choice == "none" else named), choice


@contextlib.contextmanager
def _as_api_error():
    """A conversation the harmony mapping refuses -> the API's 400 naming the same field."""
    try:
        yield
    except ConversationError as e:
        raise APIError(str(e), param=e.param) from None


# ------------------------------------------------------------------------------------------ requests
def _turn(
    chat: Chat, tools: dict[str, FunctionDef], choice: str, where: dict | None = None, run_tools=None
) -> Turn:
    run_tools = {} if choice == "none" else dict(run_tools or {})
    fields = {f.name: getattr(chat, f.name) for f in dataclasses.fields(Chat)}
    fields |= {"tools": tools, "system_tools": [t.config() for t in run_tools.values()]}
    return Turn(**fields, tool_choice=choice, where=where or {}, run_tools=run_tools)


def chat_turn(req: ChatRequest, reasoning_effort: str = "medium", run_tools=None) -> Turn:
    """A chat-completions request; `reasoning_effort`: the server's default when the request sets none;
    run_tools: the tools the server runs (name -> `tools.base.Tool`), declared in the system message."""
    offered = req.tools or []
    tools, choice = _tools(offered, [f"tools[{i}].function" for i in range(len(offered))], req.tool_choice)
    with _as_api_error():
        chat = Chat.from_messages(
            req.messages, tools, reasoning_effort=req.reasoning_effort or reasoning_effort
        )
    return _turn(chat, tools, choice, run_tools=run_tools)


def response_tools(
    raw: list[Any], strict: bool, available=(), allow_mcp_urls=(), mcp: list | None = None
) -> tuple[list[Any], list[str], dict[str, Namespace], dict]:
    """A Responses request's tools -> the `functions` namespace's tools and their fields, the other
    namespaces, and each tool's field by recipient (`functions.NAME`, `NS.NAME`). Hosted tools: those of
    the tools the server runs (`available`) are accepted, `mcp` tools of allowed URLs appended to `mcp`, the
    others left out or refused (`hosted.py`)."""
    top, where, namespaces, fields = [], [], {}, {}
    for i, t in enumerate(raw):
        tool = parse_response_tool(i, t)
        if tool is None:
            served = hosted_tool(i, t, strict, available, allow_mcp_urls)
            if isinstance(served, dict) and mcp is not None:
                mcp.append(served)
        elif tool.type == "namespace":
            w = f"tools[{i}]"
            if tool.name in namespaces or tool.name == FUNCTIONS:
                raise APIError(f"{w}.name: duplicate namespace {tool.name!r}", param=f"{w}.name")
            inner = [parse_response_tool(j, x, f"{w}.tools") for j, x in enumerate(tool.tools)]
            for j, x in enumerate(inner):
                if x is None:
                    raise APIError(
                        f"{w}.tools[{j}].type: a namespace holds function and custom tools, got "
                        f"{tool.tools[j].get('type')!r}",
                        param=f"{w}.tools[{j}].type",
                    )
            with _as_api_error():
                named = function_tools(inner, f"{w}.tools")
            for j, fn in enumerate(named.values()):
                fields[f"{tool.name}.{fn.name}"] = f"{w}.tools[{j}]"
                if not is_custom(fn):
                    check_tool(fn, f"{w}.tools[{j}]")
            namespaces[tool.name] = Namespace(tool.description, named)
        else:
            top.append(tool)
            where.append(f"tools[{i}]")
            fields[f"{FUNCTIONS}.{tool.name}"] = f"tools[{i}]"
    return top, where, namespaces, fields


def open_reasoning(items: list[Any], sealer: Any) -> None:
    """Reasoning items that carry `encrypted_content`: the sealed analysis becomes their content (a blob that
    does not open is a 400 naming it)."""
    for i, it in enumerate(items):
        blob = getattr(it, "encrypted_content", None) if getattr(it, "type", None) == "reasoning" else None
        if blob is None:
            continue
        where = f"input[{i}].encrypted_content"
        if sealer is None:
            raise APIError(f"{where}: this server does not open encrypted reasoning", param=where)
        it.content = [ReasoningText(type="reasoning_text", text=sealer.open(blob, where))]


def responses_turn(
    req: ResponsesRequest,
    previous: Chat | None,
    reasoning_effort: str = "medium",
    *,
    strict_tools: bool = False,
    sealer: Any = None,
    run_tools=None,
    allow_mcp_urls=(),
) -> Turn:
    """The conversation of a Responses request: the stored one of `previous_response_id` (its messages and
    call ids; its instructions and tools are not inherited, as in OpenAI's API), then this request's input.
    strict_tools: a hosted tool is a 400 rather than left out; sealer: opens encrypted reasoning; run_tools:
    the tools the server runs (name -> `tools.base.Tool`), declared in the system message."""
    run_tools = dict(run_tools or {})
    mcp: list[dict] = []
    top, where, namespaces, fields = response_tools(
        req.tools or [], strict_tools, run_tools, allow_mcp_urls, mcp
    )
    tools, choice = _tools(top, where, req.tool_choice)
    if choice == "none":
        namespaces = {}
    raw = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = [parse_input_item(i, x) for i, x in enumerate(raw)]
    open_reasoning(items, sealer)
    for it in items:  # an MCP call addresses the namespace and the tool by their harmony names
        if getattr(it, "type", None) == "mcp_call":
            from ..tools.mcp import namespace_name

            it.server_label = namespace_name(it.server_label)
            it.name = re.sub(r"[^A-Za-z0-9_]+", "_", it.name).strip("_") or it.name
    effort = (req.reasoning.effort if req.reasoning else None) or reasoning_effort
    with _as_api_error():
        chat = Chat.from_responses_input(
            items,
            instructions=req.instructions,
            tools=tools,
            previous=previous,
            reasoning_effort=effort,
            namespaces=namespaces,
        )
    turn = _turn(chat, tools, choice, fields, run_tools)
    turn.mcp = [] if choice == "none" else mcp
    return turn

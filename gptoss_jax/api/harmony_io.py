"""OpenAI requests -> the conversation the model is asked to continue (`Turn`), through `gptoss_jax.harmony`'s
one mapping (`Chat.from_messages`, `Chat.from_responses_input`): the server renders a history exactly as
fine-tuning and the chat CLI do.

What is the API's own here: the tools a request offers and how it lets the model call them (`tool_choice`;
with "none" the instructions stay and no tool is rendered), the check that each function's parameters are a
JSON Schema for an object, the request's reasoning effort (else the server's default), and every problem
answered as a 400 naming the field (`APIError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from ..harmony import Chat, ConversationError, function_tools
from .protocol import (
    APIError,
    ChatRequest,
    FunctionDef,
    ResponsesRequest,
    parse_input_item,
    parse_response_tool,
)


@dataclasses.dataclass
class Turn(Chat):
    """What the model is asked for: the conversation (`Chat`: its messages, instructions, the tools rendered
    in the prompt, the reasoning effort, the function of each call id) and how it may call the tools."""

    tool_choice: str = "auto"  # auto | none | required | the name of the function that must be called

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
def _turn(chat: Chat, tools: dict[str, FunctionDef], choice: str) -> Turn:
    fields = {f.name: getattr(chat, f.name) for f in dataclasses.fields(Chat)}
    return Turn(**(fields | {"tools": tools}), tool_choice=choice)


def chat_turn(req: ChatRequest, reasoning_effort: str = "medium") -> Turn:
    """A chat-completions request; `reasoning_effort`: the server's default when the request sets none."""
    offered = req.tools or []
    tools, choice = _tools(offered, [f"tools[{i}].function" for i in range(len(offered))], req.tool_choice)
    with _as_api_error():
        chat = Chat.from_messages(
            req.messages, tools, reasoning_effort=req.reasoning_effort or reasoning_effort
        )
    return _turn(chat, tools, choice)


def responses_turn(req: ResponsesRequest, previous: Chat | None, reasoning_effort: str = "medium") -> Turn:
    """The conversation of a Responses request: the stored one of `previous_response_id` (its messages and
    call ids; its instructions and tools are not inherited, as in OpenAI's API), then this request's input."""
    raw_tools = req.tools or []
    tools, choice = _tools(
        [parse_response_tool(i, t) for i, t in enumerate(raw_tools)],
        [f"tools[{i}]" for i in range(len(raw_tools))],
        req.tool_choice,
    )
    raw = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = [parse_input_item(i, x) for i, x in enumerate(raw)]
    effort = (req.reasoning.effort if req.reasoning else None) or reasoning_effort
    with _as_api_error():
        chat = Chat.from_responses_input(
            items, instructions=req.instructions, tools=tools, previous=previous, reasoning_effort=effort
        )
    return _turn(chat, tools, choice)

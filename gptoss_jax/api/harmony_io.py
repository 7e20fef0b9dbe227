"""OpenAI requests -> harmony conversations -> prompt tokens, with openai-harmony only (no harmony string is
assembled by hand), and a generated turn -> harmony messages (for stored responses).

- system and developer messages (chat) and `instructions` (responses) become the developer message's
  instructions, in order, joined by blank lines; harmony's system message carries the reasoning effort and
  today's date;
- tools are rendered in the developer message's `functions` namespace; with tool_choice "none" the
  instructions stay and no tool is rendered;
- an assistant turn is rendered as its reasoning (analysis), its text (a commentary preamble when the turn
  also calls tools, else the final answer) and its tool calls (commentary to=functions.NAME
  <|constrain|>json); a tool's answer is a message from functions.NAME, found by its tool_call_id;
- chain of thought: the analysis messages before the last final answer are dropped, those after it (a tool
  loop in progress) are kept, as harmony's format.md specifies. harmony's own `auto_drop_analysis` only
  looks at the first final answer of the whole conversation, so we apply the rule and render without it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from ..tokenizer import get_harmony_encoding
from .parsing import Part
from .protocol import (
    APIError,
    ChatRequest,
    FunctionDef,
    InputMessage,
    ResponsesRequest,
    parse_input_item,
    parse_response_tool,
)

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
CONSTRAIN_JSON = "<|constrain|>json"


@dataclasses.dataclass
class Turn:
    """What the model is asked for: the conversation (harmony messages after the system and developer ones),
    the developer instructions, the tools it may call and how."""

    messages: list[Message]
    instructions: str | None
    tools: dict[str, FunctionDef]  # tools rendered in the prompt (none when tool_choice is "none")
    tool_choice: str  # auto | none | required | the name of the function that must be called
    effort: str = "medium"
    call_names: dict[str, str] = dataclasses.field(default_factory=dict)  # tool call id -> function name

    def conversation(self, start_date: str | None = "today") -> list[Message]:
        content = SystemContent.new().with_reasoning_effort(EFFORTS[self.effort])
        if start_date is not None:
            date = dt.date.today().isoformat() if start_date == "today" else start_date
            content = content.with_conversation_start_date(date)
        head = [Message.from_role_and_content(Role.SYSTEM, content)]
        if self.instructions or self.tools:
            dev = DeveloperContent.new()
            if self.instructions:
                dev = dev.with_instructions(self.instructions)
            if self.tools:
                dev = dev.with_function_tools(
                    [
                        ToolDescription.new(f.name, f.description or "", f.parameters)
                        for f in self.tools.values()
                    ]
                )
            head.append(Message.from_role_and_content(Role.DEVELOPER, dev))
        return head + drop_finished_reasoning(self.messages)

    def prompt_tokens(self, start_date: str | None = "today") -> list[int]:
        conv = Conversation.from_messages(self.conversation(start_date))
        enc = get_harmony_encoding()
        return list(
            enc.render_conversation_for_completion(
                conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
            )
        )


def drop_finished_reasoning(messages: list[Message]) -> list[Message]:
    """Analysis messages before the last final answer are dropped; later ones (a tool loop) are kept."""
    last = max(
        (i for i, m in enumerate(messages) if m.author.role == Role.ASSISTANT and m.channel == "final"),
        default=-1,
    )
    return [m for i, m in enumerate(messages) if not (i < last and m.channel == "analysis")]


# ------------------------------------------------------------------------------------------ messages
def _assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def tool_call_message(name: str, arguments: str, content_type: str | None = CONSTRAIN_JSON) -> Message:
    m = _assistant(arguments, "commentary").with_recipient(f"functions.{name}")
    return m.with_content_type(content_type) if content_type else m


def tool_result_message(name: str, output: str) -> Message:
    author = Author.new(Role.TOOL, f"functions.{name}")
    return (
        Message.from_author_and_content(author, output).with_channel("commentary").with_recipient("assistant")
    )


def assistant_turn(reasoning: str | None, text: str | None, calls: list[tuple[str, str]]) -> list[Message]:
    """An earlier assistant turn: reasoning, text (a preamble when tools are called, else final), calls."""
    out = [_assistant(reasoning, "analysis")] if reasoning else []
    if text:
        out.append(_assistant(text, "commentary" if calls else "final"))
    return out + [tool_call_message(name, args) for name, args in calls]


def parts_to_messages(parts: list[Part]) -> list[Message]:
    """A generated turn as harmony messages, as it will be rendered in the next request's prompt."""
    out = []
    for p in parts:
        if p.type == "tool_call":
            out.append(tool_call_message(p.name, p.text, p.content_type))
        elif p.text:
            out.append(
                _assistant(p.text, {"reasoning": "analysis", "preamble": "commentary"}.get(p.type, "final"))
            )
    return out


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


def _tools(fns: list[FunctionDef], where: list[str], choice: Any) -> tuple[dict[str, FunctionDef], str]:
    tools: dict[str, FunctionDef] = {}
    for fn, w in zip(fns, where, strict=True):
        if fn.name in tools:
            raise APIError(f"{w}.name: duplicate tool name {fn.name!r}", param=f"{w}.name")
        check_tool(fn, w)
        tools[fn.name] = fn
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        name = choice.function.name if hasattr(choice, "function") else choice.name
        if name not in tools:
            raise APIError(
                f"tool_choice: names the function {name!r}, which is not among the tools "
                f"({', '.join(tools) or 'none given'})",
                param="tool_choice",
            )
        choice = name
    if choice != "auto" and choice != "none" and not tools:
        raise APIError(f"tool_choice: {choice!r} needs tools, and none are given", param="tool_choice")
    return ({} if choice == "none" else tools), choice


def _text(content: Any, where: str, required: bool = True) -> str | None:
    if content is None:
        if required:
            raise APIError(f"{where}: field required", param=where)
        return None
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


# ------------------------------------------------------------------------------------------ requests
def chat_turn(req: ChatRequest) -> Turn:
    tools, choice = _tools(
        [t.function for t in req.tools or []],
        [f"tools[{i}].function" for i in range(len(req.tools or []))],
        req.tool_choice,
    )
    instructions, msgs, names = [], [], {}
    for i, m in enumerate(req.messages):
        w = f"messages[{i}]"
        if m.role in ("system", "developer"):
            instructions.append(_text(m.content, f"{w}.content"))
        elif m.role == "user":
            msgs.append(Message.from_role_and_content(Role.USER, _text(m.content, f"{w}.content")))
        elif m.role == "assistant":
            calls = []
            for c in m.tool_calls or []:
                names[c.id] = c.function.name
                calls.append((c.function.name, c.function.arguments))
            text = _text(m.content, f"{w}.content", required=False)
            msgs += assistant_turn(m.reasoning or m.reasoning_content, text, calls)
        else:  # tool
            if not m.tool_call_id:
                raise APIError(
                    f"{w}.tool_call_id: field required for tool messages", param=f"{w}.tool_call_id"
                )
            if m.tool_call_id not in names:
                raise APIError(
                    f"{w}.tool_call_id: {m.tool_call_id!r} matches no tool call of an earlier "
                    "assistant message",
                    param=f"{w}.tool_call_id",
                )
            msgs.append(tool_result_message(names[m.tool_call_id], _text(m.content, f"{w}.content")))
    return Turn(
        msgs, "\n\n".join(instructions) or None, tools, choice, req.reasoning_effort or "medium", names
    )


def responses_turn(req: ResponsesRequest, previous: Turn | None) -> Turn:
    """The conversation of a Responses request: the stored one of `previous_response_id` (its messages and
    call ids; its instructions are not inherited, as in OpenAI's API), then this request's input."""
    raw_tools = req.tools or []
    tools, choice = _tools(
        [parse_response_tool(i, t) for i, t in enumerate(raw_tools)],
        [f"tools[{i}]" for i in range(len(raw_tools))],
        req.tool_choice,
    )
    msgs = list(previous.messages) if previous else []
    names = dict(previous.call_names) if previous else {}
    instructions = [req.instructions] if req.instructions else []
    raw = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = [parse_input_item(i, x) for i, x in enumerate(raw)]
    for i, it in enumerate(items):
        w = f"input[{i}]"
        if isinstance(it, InputMessage):
            text = _text(it.content, f"{w}.content")
            if it.role in ("system", "developer"):
                instructions.append(text)
            elif it.role == "user":
                msgs.append(Message.from_role_and_content(Role.USER, text))
            else:  # phase "commentary" (or, without a phase, followed by a call of the same turn): a preamble
                later = next(
                    (
                        x
                        for x in items[i + 1 :]
                        if x.type != "reasoning" and not (x.type == "message" and x.role == "assistant")
                    ),
                    None,
                )
                calls = later is not None and later.type == "function_call"
                preamble = it.phase == "commentary" or (it.phase is None and calls)
                msgs.append(_assistant(text, "commentary" if preamble else "final"))
        elif it.type == "function_call":
            names[it.call_id] = it.name
            msgs.append(tool_call_message(it.name, it.arguments))
        elif it.type == "function_call_output":
            if it.call_id not in names:
                raise APIError(
                    f"{w}.call_id: {it.call_id!r} matches no function_call of this input or of the "
                    "previous response",
                    param=f"{w}.call_id",
                )
            out = it.output if isinstance(it.output, str) else "".join(p.text for p in it.output)
            msgs.append(tool_result_message(names[it.call_id], out))
        else:  # reasoning
            text = "".join(p.text for p in (it.content or it.summary))
            if text:
                msgs.append(_assistant(text, "analysis"))
    effort = (req.reasoning.effort if req.reasoning else None) or "medium"
    return Turn(msgs, "\n\n".join(instructions) or None, tools, choice, effort, names)

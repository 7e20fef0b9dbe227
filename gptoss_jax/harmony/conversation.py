"""Conversations -> harmony messages -> prompt tokens: the one mapping that the server, fine-tuning and the chat
CLI render with, so that a history gives the same tokens in all three (openai-harmony renders every string;
none is assembled by hand).

Inputs, each mapped by one function:

- OpenAI chat messages, `Chat.from_messages`: the chat-completions API's `messages` and a fine-tuning JSONL
  line's (the same shape, plus `thinking` and `weight`), as dicts or as objects with the same attributes.
  `(role, text)` pairs (the chat CLI) and harmony `Message`s are accepted among them;
- Responses input items, `Chat.from_responses_input`, after a stored conversation.

Rules:

- system and developer messages become the developer message's instructions, in order, joined by blank lines;
  harmony's system message (`system_message`) carries the reasoning effort and the conversation start date,
  or no date;
- tools are rendered in one place: function tools in the developer message's `functions` namespace
  (`developer_message`); other namespaces of developer tools (`namespaces`: the Responses API's namespace
  tools) beside it, each under its own name; a custom tool (free-form text input) as a function of one
  string argument, its grammar, if any, quoted in its description; harmony's built-in tools (browser,
  python) belong in `system_message`;
- an assistant message is rendered as its reasoning (analysis; `thinking`, `reasoning` or
  `reasoning_content`), its text (a commentary preamble when the message also calls tools, else the final
  answer) and its tool calls (`commentary to=functions.NAME <|constrain|>json`; `to=NAMESPACE.NAME` in
  another namespace; a custom tool's call has no content type); a tool's answer is a message from
  `functions.NAME` (or its namespace) to the assistant, NAME being the function of the call its
  `tool_call_id` names (or, without one, its `name`);
- chain of thought (`drop_finished_reasoning`): analysis messages before the last final answer are dropped,
  those after it (a tool loop in progress) are kept. This is the gpt-oss chat template's rule. harmony's own
  `auto_drop_analysis` looks only at the conversation's first final answer, so the rule is applied here and
  the conversation rendered with it off (`render_prompt`). Applied first, it leaves harmony's rule nothing to
  drop, so a conversation from `build_conversation` renders the same either way.

Structural problems raise `ConversationError` (a ValueError): its message starts with the field it names
(`messages[3].tool_call_id: ...`) and `param` is that field. The server answers it as a 400 naming `param`;
fine-tuning as an error naming the file and the line. The shape of each field (types, roles) is checked
before, at the edge: by the API's request models, by fine-tuning's line check.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from openai_harmony import (  # ToolNamespaceConfig is not in harmony's __all__, but public
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
)

from ..tokenizer import get_harmony_encoding

EFFORTS = ("low", "medium", "high")
CONSTRAIN_JSON = "<|constrain|>json"
FUNCTIONS = "functions"  # the namespace of the function tools a request or a training line declares
THINKING = ("thinking", "reasoning", "reasoning_content")  # an assistant message's analysis, first given wins


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message starts with the field, `param` names it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------------------ settings
def reasoning_effort(value: Any) -> str:
    """A reasoning effort as "low", "medium" or "high", from any capitalisation or a harmony
    `ReasoningEffort`; ValueError otherwise."""
    if isinstance(value, ReasoningEffort):
        return value.value.lower()
    v = str(value).strip().lower()
    if v not in EFFORTS:
        raise ValueError(f"reasoning_effort must be low, medium or high, got {value!r}")
    return v


def date_setting(value: Any) -> str | None:
    """A conversation-start-date setting: None (or "none") for no date, "today", or a date as YYYY-MM-DD
    (a `datetime.date` too); ValueError else."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    v = str(value).strip()
    if v.lower() in ("none", "today"):
        return None if v.lower() == "none" else "today"
    try:
        return dt.date.fromisoformat(v).isoformat()
    except ValueError:
        raise ValueError(f"must be today, none or YYYY-MM-DD, got {value!r}") from None


def resolve_date(value: Any) -> str | None:
    """The date a setting renders: "today" becomes today's date, None stays None."""
    d = date_setting(value)
    return dt.date.today().isoformat() if d == "today" else d


# ------------------------------------------------------------------------------------------ head
def system_message(effort: Any = "medium", date: Any = None, tools: Sequence[Any] = ()) -> Message:
    """harmony's system message: its default text, the reasoning effort and the conversation start date
    (`date`: see `date_setting`; None renders no date), and the built-in tools the model may call (`tools`:
    `ToolNamespaceConfig`s such as `ToolNamespaceConfig.python()`, under `# Tools`, as harmony defines
    them)."""
    content = SystemContent.new().with_reasoning_effort(
        ReasoningEffort(reasoning_effort(effort).capitalize())
    )
    day = resolve_date(date)
    if day is not None:
        content = content.with_conversation_start_date(day)
    for config in tools:
        content = content.with_tools(config)
    return Message.from_role_and_content(Role.SYSTEM, content)


def _field(obj: Any, name: str, default: Any = None) -> Any:
    """`obj[name]` for a mapping, `obj.name` for any other object (the API's request models)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def tool_function(tool: Any) -> Any:
    """A function tool's definition (name, description, parameters): chat's `{"type": "function",
    "function": {...}}` gives its `function`, the Responses API's flat shape is the definition itself."""
    fn = _field(tool, "function")
    return tool if fn is None else fn


def function_tools(tools: Iterable[Any] | None, where: str = "tools") -> dict[str, Any]:
    """name -> definition, in order; ConversationError for a duplicate name."""
    out: dict[str, Any] = {}
    for i, tool in enumerate(tools or ()):
        fn = tool_function(tool)
        w = f"{where}[{i}].function" if fn is not tool else f"{where}[{i}]"
        name = _field(fn, "name")
        if name in out:
            raise ConversationError(f"{w}.name: duplicate tool name {name!r}", f"{w}.name")
        out[name] = fn
    return out


@dataclasses.dataclass
class Namespace:
    """A namespace of developer tools beside `functions`: its description and its tools (name -> definition,
    as for `functions`)."""

    description: str | None
    tools: dict[str, Any]


def is_custom(fn: Any) -> bool:
    """A custom tool: its input is free-form text, not JSON arguments."""
    return _field(fn, "type") == "custom"


def tool_description(name: str, fn: Any) -> ToolDescription:
    """A tool as harmony renders it. A custom tool is a function of one string (`(_: string) => any`); its
    grammar, when it has one, is quoted after its description."""
    desc = _field(fn, "description") or ""
    if not is_custom(fn):
        return ToolDescription.new(name, desc, _field(fn, "parameters"))
    fmt = _field(fn, "format")
    if fmt is not None and _field(fmt, "type") == "grammar":
        syntax, definition = _field(fmt, "syntax") or "lark", _field(fmt, "definition") or ""
        rule = f"The input is free-form text (not JSON) that must match this {syntax} grammar:\n{definition}"
    else:
        rule = "The input is free-form text (not JSON)."
    return ToolDescription.new(name, f"{desc}\n{rule}" if desc else rule, {"type": "string"})


def developer_message(
    instructions: str | None,
    tools: Mapping[str, Any] | None = None,
    namespaces: Mapping[str, Namespace] | None = None,
) -> Message | None:
    """harmony's developer message: `# Instructions`, then the tools, each namespace in its own section
    (`functions` for the function tools, then `namespaces`; harmony orders the sections by name); None when
    there is nothing to say."""
    namespaces = {k: v for k, v in (namespaces or {}).items() if v.tools}
    if not instructions and not tools and not namespaces:
        return None
    dev = DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions(instructions)
    if tools:
        dev = dev.with_function_tools([tool_description(name, fn) for name, fn in tools.items()])
    for ns_name, ns in namespaces.items():
        dev = dev.with_tools(
            ToolNamespaceConfig(
                name=ns_name,
                description=ns.description or None,
                tools=[tool_description(name, fn) for name, fn in ns.tools.items()],
            )
        )
    return Message.from_role_and_content(Role.DEVELOPER, dev)


# ------------------------------------------------------------------------------------------ messages
def assistant_message(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def user_message(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def recipient(namespace: str | None, name: str) -> str:
    """A tool's address: `NAMESPACE.NAME` (`functions.NAME` for function tools), or NAME without one."""
    return f"{namespace}.{name}" if namespace else name


def tool_call_message(
    name: str,
    arguments: str,
    content_type: str | None = CONSTRAIN_JSON,
    namespace: str | None = FUNCTIONS,
) -> Message:
    """A call of function NAME: `commentary to=functions.NAME <|constrain|>json`, the arguments as text
    (a custom tool's input: no content type; NAMESPACE.NAME for another namespace)."""
    m = assistant_message(arguments, "commentary").with_recipient(recipient(namespace, name))
    return m.with_content_type(content_type) if content_type else m


def tool_result_message(name: str, output: str, namespace: str | None = FUNCTIONS) -> Message:
    """Function NAME's answer: a commentary message from `functions.NAME` to the assistant."""
    author = Author.new(Role.TOOL, recipient(namespace, name))
    return (
        Message.from_author_and_content(author, output).with_channel("commentary").with_recipient("assistant")
    )


def assistant_turn(
    reasoning: str | None, text: str | None, calls: Sequence[tuple[str, str]]
) -> list[Message]:
    """An assistant message of the history: its reasoning, its text (a preamble when it calls tools, else the
    final answer), its calls (name, arguments)."""
    out = [assistant_message(reasoning, "analysis")] if reasoning else []
    if text:
        out.append(assistant_message(text, "commentary" if calls else "final"))
    return out + [tool_call_message(name, args) for name, args in calls]


PART_CHANNELS = {"reasoning": "analysis", "preamble": "commentary", "content": "final"}


def parts_to_messages(parts: Iterable[Any]) -> list[Message]:
    """A generated turn (the parser's parts: type, text, name, content_type) as harmony messages, as the next
    prompt renders it. Parts without text are left out."""
    out = []
    for p in parts:
        if p.type == "tool_call":
            ns = getattr(p, "namespace", FUNCTIONS)
            out.append(tool_call_message(p.name, p.text, p.content_type, ns))  # on commentary, never dropped
        elif p.text:
            out.append(assistant_message(p.text, PART_CHANNELS.get(p.type, "final")))
    return out


def drop_finished_reasoning(messages: Sequence[Message]) -> list[Message]:
    """Analysis messages before the last final answer are dropped; later ones (a tool loop) are kept."""
    last = max(
        (i for i, m in enumerate(messages) if m.author.role == Role.ASSISTANT and m.channel == "final"),
        default=-1,
    )
    return [m for i, m in enumerate(messages) if not (i < last and m.channel == "analysis")]


def render_prompt(messages: Sequence[Message]) -> list[int]:
    """Prompt tokens of harmony messages (system message first, the drop rule already applied), ending
    with `<|start|>assistant`. harmony's own `auto_drop_analysis` is off: the rule is ours."""
    enc = get_harmony_encoding()
    conv = Conversation.from_messages(list(messages))
    return list(
        enc.render_conversation_for_completion(
            conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
        )
    )


# ------------------------------------------------------------------------------------------ text fields
def text_of(content: Any, where: str, required: bool = True) -> str | None:
    """A message's content: a string, or parts with `text` (dicts or objects), joined."""
    if content is None:
        if required:
            raise ConversationError(f"{where}: field required", where)
        return None
    if isinstance(content, str):
        return content
    return "".join(_field(p, "text") or "" for p in content)


def arguments_text(arguments: Any) -> str:
    """A tool call's arguments as rendered: a string as given, a JSON object serialised, missing -> {}."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _reasoning(m: Any) -> str | None:
    return next((v for f in THINKING if (v := _field(m, f)) is not None), None)


# ------------------------------------------------------------------------------------------ the conversation
@dataclasses.dataclass
class Chat:
    """A conversation ready to render: harmony messages after the system and developer ones, the developer
    instructions, the function tools (name -> definition with name, description, parameters), the reasoning
    effort, and the function of each tool call id (so a later tool result can name it).

    `sources[k]`: the index of the input message (or item) that `messages[k]` came from (-1: carried over
    from a stored conversation), set by the `from_*` constructors.
    """

    messages: list[Message] = dataclasses.field(default_factory=list)
    instructions: str | None = None
    tools: dict[str, Any] = dataclasses.field(default_factory=dict)
    reasoning_effort: str = "medium"
    call_names: dict[str, str] = dataclasses.field(default_factory=dict)
    sources: list[int] = dataclasses.field(default_factory=list)
    namespaces: dict[str, Namespace] = dataclasses.field(default_factory=dict)
    # call id -> its namespace, where that is not `functions` ("" for a recipient without one: `python`)
    call_namespaces: dict[str, str] = dataclasses.field(default_factory=dict)
    # the built-in tools declared in the system message (harmony `ToolNamespaceConfig`s: python, browser, an
    # MCP server's tools), which the server or the chat CLI runs itself
    system_tools: list[Any] = dataclasses.field(default_factory=list)

    def head(self, date: Any = None) -> list[Message]:
        """The system message, then the developer message when there are instructions or tools."""
        dev = developer_message(self.instructions, self.tools, self.namespaces)
        system = system_message(self.reasoning_effort, date, self.system_tools)
        return [system] + ([dev] if dev is not None else [])

    def harmony_messages(self, date: Any = None) -> list[Message]:
        """Everything the prompt renders: the head, then the messages with finished reasoning dropped."""
        return self.head(date) + drop_finished_reasoning(self.messages)

    def prompt_tokens(self, date: Any = None) -> list[int]:
        """The prompt for the assistant's next message (`date`: the conversation start date setting)."""
        return render_prompt(self.harmony_messages(date))

    @classmethod
    def from_messages(
        cls,
        messages: Iterable[Any],
        tools: Iterable[Any] | Mapping[str, Any] | None = None,
        *,
        reasoning_effort: Any = "medium",
        instructions: str | None = None,
        where: str = "messages",
    ) -> Chat:
        """OpenAI chat messages (dicts or objects; `(role, text)` pairs and harmony Messages among them)."""
        tools = dict(tools) if isinstance(tools, Mapping) else function_tools(tools)
        chat = cls(tools=tools, reasoning_effort=reasoning_effort_or_default(reasoning_effort))
        texts = [instructions] if instructions else []
        for i, m in enumerate(messages):
            w = f"{where}[{i}]"
            if isinstance(m, Message):
                if m.author.role in (Role.SYSTEM, Role.DEVELOPER):
                    raise ConversationError(
                        f"{w}: a harmony {m.author.role.value} message is built from the settings; give "
                        "instructions as a developer message",
                        w,
                    )
                chat._add(i, [m])
                continue
            if isinstance(m, tuple):
                m = _pair(m, w)
            role = _field(m, "role")
            if role in ("system", "developer"):
                texts.append(text_of(_field(m, "content"), f"{w}.content"))
            elif role == "user":
                chat._add(i, [user_message(text_of(_field(m, "content"), f"{w}.content"))])
            elif role == "assistant":
                calls = []
                for c in _field(m, "tool_calls") or []:
                    fn = _field(c, "function")
                    name = _field(fn, "name")
                    if _field(c, "id") is not None:
                        chat.call_names[_field(c, "id")] = name
                    calls.append((name, arguments_text(_field(fn, "arguments"))))
                text = text_of(_field(m, "content"), f"{w}.content", required=False)
                chat._add(i, assistant_turn(_reasoning(m), text, calls))
            elif role == "tool":
                name = chat._called(_field(m, "tool_call_id"), _field(m, "name"), f"{w}.tool_call_id")
                chat._add(i, [tool_result_message(name, text_of(_field(m, "content"), f"{w}.content"))])
            else:
                raise ConversationError(
                    f"{w}.role must be one of system, developer, user, assistant, tool, got {role!r}",
                    f"{w}.role",
                )
        chat.instructions = "\n\n".join(texts) or None
        return chat

    @classmethod
    def from_responses_input(
        cls,
        items: str | Iterable[Any],
        *,
        instructions: str | None = None,
        tools: Iterable[Any] | Mapping[str, Any] | None = None,
        previous: Chat | None = None,
        reasoning_effort: Any = "medium",
        where: str = "input",
        namespaces: Mapping[str, Namespace] | None = None,
    ) -> Chat:
        """Responses input items (dicts or objects; a string is one user message), after `previous`'s
        messages and call ids (its instructions and tools are not inherited, as in OpenAI's API).

        An assistant message is a preamble when its `phase` is "commentary", or, without a phase, when the
        next item other than reasoning and assistant text is a function call of the same turn. Custom tool
        calls (`custom_tool_call`, `custom_tool_call_output`) are rendered as function calls whose text is
        the input; a call's `namespace` addresses it there instead of `functions`."""
        tools = dict(tools) if isinstance(tools, Mapping) else function_tools(tools)
        chat = cls(tools=tools, reasoning_effort=reasoning_effort_or_default(reasoning_effort))
        chat.namespaces = dict(namespaces or {})
        if previous is not None:
            chat.messages = list(previous.messages)
            chat.sources = [-1] * len(chat.messages)
            chat.call_names = dict(previous.call_names)
            chat.call_namespaces = dict(previous.call_namespaces)
        texts = [instructions] if instructions else []
        items = [{"role": "user", "content": items}] if isinstance(items, str) else list(items)
        for i, it in enumerate(items):
            w = f"{where}[{i}]"
            kind = _field(it, "type") or "message"
            if kind == "message":
                role, text = _field(it, "role"), text_of(_field(it, "content"), f"{w}.content")
                if role in ("system", "developer"):
                    texts.append(text)
                elif role == "user":
                    chat._add(i, [user_message(text)])
                else:
                    phase = _field(it, "phase")
                    preamble = phase == "commentary" or (phase is None and _calls_next(items[i + 1 :]))
                    chat._add(i, [assistant_message(text, "commentary" if preamble else "final")])
            elif kind in ("function_call", "custom_tool_call"):
                call_id, name, ns = _field(it, "call_id"), _field(it, "name"), _field(it, "namespace")
                ns = FUNCTIONS if ns is None else ns
                chat.call_names[call_id] = name
                if ns != FUNCTIONS:
                    chat.call_namespaces[call_id] = ns
                if kind == "function_call":
                    m = tool_call_message(name, arguments_text(_field(it, "arguments")), namespace=ns)
                else:
                    m = tool_call_message(name, _field(it, "input") or "", None, namespace=ns)
                chat._add(i, [m])
            elif kind in ("function_call_output", "custom_tool_call_output"):
                call_id = _field(it, "call_id")
                if call_id not in chat.call_names:
                    raise ConversationError(
                        f"{w}.call_id: {call_id!r} matches no function_call of this input or of the previous "
                        "response",
                        f"{w}.call_id",
                    )
                out = text_of(_field(it, "output"), f"{w}.output")
                ns = chat.call_namespaces.get(call_id, FUNCTIONS)
                chat._add(i, [tool_result_message(chat.call_names[call_id], out, ns)])
            elif kind == "reasoning":
                text = text_of(_field(it, "content") or _field(it, "summary") or [], f"{w}.content")
                if text:
                    chat._add(i, [assistant_message(text, "analysis")])
            elif kind in BUILTIN_ITEMS:
                chat._add(i, builtin_call_messages(it))
            elif kind == "mcp_list_tools":
                pass  # a record of what an MCP server offered: the system message declares it
            else:
                raise ConversationError(f"{w}.type: unsupported input item type {kind!r}", f"{w}.type")
        chat.instructions = "\n\n".join(texts) or None
        return chat

    def _add(self, source: int, messages: list[Message]) -> None:
        self.messages += messages
        self.sources += [source] * len(messages)

    def _called(self, call_id: Any, name: Any, where: str) -> str:
        """The function a tool message answers: that of the call `call_id` names (which must be an earlier
        one), or without a call id, `name`."""
        if call_id is None:
            if name:
                return name
            raise ConversationError(f"{where}: field required for tool messages", where)
        if call_id not in self.call_names:
            raise ConversationError(
                f"{where}: {call_id!r} matches no tool call of an earlier assistant message", where
            )
        return self.call_names[call_id]


BUILTIN_ITEMS = ("code_interpreter_call", "web_search_call", "mcp_call")  # Responses items of run tools


def builtin_call(recipient_: str, arguments: str, channel: str = "analysis", content_type: str | None = None):
    """A call of a tool the server runs (`python`, `browser.search`, `SERVER.TOOL`), on the channel the model
    wrote it on (analysis, where gpt-oss calls its built-in tools, unless it chose commentary)."""
    m = assistant_message(arguments, channel).with_recipient(recipient_)
    return m.with_content_type(content_type) if content_type else m


def builtin_result(recipient_: str, text: str, channel: str = "analysis") -> Message:
    """That tool's answer, as harmony renders tool results: from the tool, to the assistant, on the call's
    channel."""
    author = Author.new(Role.TOOL, recipient_)
    return Message.from_author_and_content(author, text).with_channel(channel).with_recipient("assistant")


def part_recipient(part: Any) -> str:
    """Whom a parsed tool-call part addresses: `NAMESPACE.NAME`, or NAME alone (`python`)."""
    return recipient(part.namespace or None, part.name)


def run_call_message(part: Any) -> Message:
    """A parsed call of a tool the server (or the chat CLI) runs, as the model wrote it: its channel
    (analysis, usually; commentary when it had none) and content type kept."""
    return builtin_call(part_recipient(part), part.text, part.channel or "commentary", part.content_type)


def run_result_message(part: Any, text: str) -> Message:
    """The answer of the tool that `part` called, on the call's channel."""
    return builtin_result(part_recipient(part), text, part.channel or "commentary")


def builtin_call_messages(item: Any) -> list[Message]:
    """A Responses item of a tool the server ran, sent back by a client: the call and the tool's answer.
    `code_interpreter_call`: the code to `python`, its logs as the answer; `mcp_call`: the arguments to
    `SERVER_LABEL.NAME`, its output (or error) as the answer; `web_search_call`: the call its action
    describes (search: query; open_page: url; find_in_page: pattern), and no answer, which OpenAI's item does
    not carry (`previous_response_id` keeps the exact conversation)."""
    kind = _field(item, "type")
    if kind == "code_interpreter_call":
        logs = [_field(o, "logs") or "" for o in _field(item, "outputs") or [] if _field(o, "type") == "logs"]
        out = [builtin_call("python", _field(item, "code") or "")]
        return out + (
            [builtin_result("python", "".join(logs))] if _field(item, "outputs") is not None else []
        )
    if kind == "mcp_call":
        to = recipient(_field(item, "server_label"), _field(item, "name"))
        out = [builtin_call(to, arguments_text(_field(item, "arguments")))]
        error, output = _field(item, "error"), _field(item, "output")
        if error is not None:
            text = error if isinstance(error, str) else _field(error, "message") or json.dumps(error)
            return out + [builtin_result(to, f"error: {text}")]
        return out + ([builtin_result(to, output)] if output is not None else [])
    action = _field(item, "action") or {}
    act = _field(action, "type")
    if act == "search":
        args, fn = {"query": _field(action, "query") or " ".join(_field(action, "queries") or [])}, "search"
    elif act == "open_page":
        args, fn = {"id": _field(action, "url") or ""}, "open"
    elif act == "find_in_page":
        args, fn = {"pattern": _field(action, "pattern") or ""}, "find"
    else:
        return []
    return [builtin_call(f"browser.{fn}", json.dumps(args, ensure_ascii=False))]


def reasoning_effort_or_default(value: Any) -> str:
    return "medium" if value is None else reasoning_effort(value)


def _pair(item: tuple, where: str) -> dict:
    """A `(role, text)` pair: user, assistant (its final answer) or developer."""
    try:
        role, text = item
    except ValueError:
        raise ConversationError(f"{where}: a pair must be (role, text), got {item!r:.80}", where) from None
    role = getattr(role, "value", role)
    role = str(role).lower()
    if role not in ("user", "assistant", "developer"):
        raise ConversationError(
            f"{where}: ({role!r}, text) pairs are not supported: the system message is built from the "
            "reasoning effort and the date; a tool's answer needs the call it answers (give OpenAI chat messages)",
            where,
        )
    return {"role": role, "content": text}


def _calls_next(later: Sequence[Any]) -> bool:
    """Whether the next item other than reasoning and assistant text is a function call."""
    for x in later:
        kind = _field(x, "type") or "message"
        if kind == "reasoning" or (kind == "message" and _field(x, "role") == "assistant"):
            continue
        return kind == "function_call"
    return False


# ------------------------------------------------------------------------------------------ shortcuts
def build_conversation(
    messages: Iterable[Any],
    *,
    tools: Iterable[Any] | Mapping[str, Any] | None = None,
    reasoning_effort: Any = "medium",
    developer_instructions: str | None = None,
    conversation_start_date: Any = None,
) -> Conversation:
    """An `openai_harmony.Conversation`: system message, developer message (instructions and tools), then
    `messages` (see `Chat.from_messages`) with finished reasoning dropped."""
    chat = Chat.from_messages(
        messages, tools, reasoning_effort=reasoning_effort, instructions=developer_instructions
    )
    return Conversation.from_messages(chat.harmony_messages(conversation_start_date))


def render_chat_prompt(
    messages: Iterable[Any],
    *,
    tools: Iterable[Any] | Mapping[str, Any] | None = None,
    reasoning_effort: Any = "medium",
    developer_instructions: str | None = None,
    conversation_start_date: Any = None,
) -> list[int]:
    """Prompt token ids for the assistant's next message, ending with `<|start|>assistant`: what the server
    renders for these chat messages, and what fine-tuning trains that message on."""
    chat = Chat.from_messages(
        messages, tools, reasoning_effort=reasoning_effort, instructions=developer_instructions
    )
    return chat.prompt_tokens(conversation_start_date)

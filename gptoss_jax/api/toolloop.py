"""The tool loop: tools the server runs itself (gpt-oss's built-in `python` and `browser`, MCP servers' tools),
within one request, for /v1/responses and /v1/chat/completions alike.

The tools a request may call are declared in harmony's system message (`Chat.system_tools`: each tool's
`config()`, a `ToolNamespaceConfig`). One request is a loop of generations:

1. the model generates; its parts stream to the client as usual (`("events", [...])`);
2. when the generation ends with `<|call|>` on a message to an enabled tool (`to=python`,
   `to=browser.search`, `to=SERVER.TOOL`), the server awaits `tool.call(ToolCall(recipient, text,
   conversation))` (`("generated", run or None)` when a generation ends, `("call", run)` before the call,
   `("result", run)` after);
3. the call's message and the tool's answer (author the recipient, to assistant, on the call's channel) join
   the conversation, and the next generation's prompt is the previous prompt, the generated tokens and the
   tool's message, token for token, then `<|start|>assistant`: every token the engine computed before is a
   prefix of it, which the prefix cache reuses (`cached_tokens`).

The loop ends at any other end of a generation: a final answer, a call to a function the client offered
(which goes back to the client as before), the output budget spent (`max_tokens` covers all generations),
or the call limit: past `max_calls`, one more call is answered with an error that says so, and the next
ends the loop (`limited`). Cancelling the loop (a client that disconnects, --request-timeout) cancels the
generation or the tool call in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..harmony import FUNCTIONS, Part, part_recipient, parts_to_messages, run_call_message, run_result_message
from ..tokenizer import CALL, START, encode, get_harmony_encoding
from ..tools.base import Tool, ToolCall, ToolResult
from .run import Choice, run_choice

log = logging.getLogger("gptoss_jax.api")

MAX_TOOL_CALLS = 16  # per request, unless `serve --max-tool-calls` says otherwise
# the Responses output item each tool's calls become, by tool name (an MCP server's: mcp_call)
ITEM_TYPES = {"python": "code_interpreter_call", "browser": "web_search_call"}


def item_type(tool: Tool) -> str:
    return getattr(tool, "item_type", None) or ITEM_TYPES.get(tool.name, "mcp_call")


def tool_of(part: Part, tools: dict[str, Tool]) -> Tool | None:
    """The enabled tool a tool-call part addresses (`python`: namespace "", name "python"), or None."""
    if part.type != "tool_call" or part.namespace == FUNCTIONS:
        return None
    return tools.get(part.namespace or part.name)


@dataclasses.dataclass
class ToolRun:
    """One call of a tool the server runs: the part the model wrote, the tool, and what came of it."""

    part: Part
    tool: Tool
    result: ToolResult | None = None
    refused: bool = False  # past the request's call limit: not run, the model is told so

    @property
    def recipient(self) -> str:
        return part_recipient(self.part)


class ToolLoop:
    """One choice's generations and tool calls.

    make_choice(max_tokens): the next generation's `Choice` (its sampling settings, a fresh parser).
    budget: output tokens for all generations together; context: the longest sequence the backend holds.
    """

    def __init__(
        self,
        backend: Any,
        prompt: list[int],
        first: Choice,
        make_choice: Callable[[int], Choice],
        *,
        tools: dict[str, Tool],
        conversation: str,
        budget: int,
        context: int,
        max_calls: int = MAX_TOOL_CALLS,
    ):
        self.backend, self.tools, self.conversation = backend, tools, conversation
        self.make_choice, self.budget, self.context, self.max_calls = make_choice, budget, context, max_calls
        self.prompts: list[list[int]] = [prompt]
        self.choices: list[Choice] = [first]
        self.messages: list = []  # the harmony messages of the turn: the model's, and the tools' answers
        self.runs: list[ToolRun] = []
        self.limited = False  # ended by the call limit
        self.out_of_budget = False  # a call ran (or was due) with no budget left to go on

    @property
    def choice(self) -> Choice:
        return self.choices[-1]

    @property
    def output_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    @property
    def input_tokens(self) -> int:
        """Prompt tokens over the generations (each prompt counted in full, as each is a model call)."""
        return sum(len(p) for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        return sum(c.info.get("cached_tokens", 0) for c in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(c.parser.reasoning_tokens for c in self.choices)

    @property
    def finish_reason(self) -> str:
        if self.out_of_budget or self.limited:
            return "length"
        return self.choice.finish_reason

    def pending_call(self) -> ToolRun | None:
        """The call to run after this generation: its last part, a message to an enabled tool ended by
        <|call|>."""
        c = self.choice
        parts = c.parser.parts
        if not parts or c.hit_length or not c.tokens or c.tokens[-1] != CALL:
            return None
        tool = tool_of(parts[-1], self.tools)
        return None if tool is None or not parts[-1].done else ToolRun(parts[-1], tool)

    async def run(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            c = self.choice
            async for events in run_choice(self.backend, self.prompts[-1], c):
                yield "events", events
            call = self.pending_call()
            for p in c.parser.parts:
                is_call = call is not None and p is call.part
                self.messages += [run_call_message(p)] if is_call else parts_to_messages([p])
            spent = self.output_tokens
            if call is not None and spent >= self.budget:  # nothing left to go on with: not run (nor kept)
                self.out_of_budget = True
                self.messages.pop()
                call = None
            elif call is not None and sum(not r.refused for r in self.runs) >= self.max_calls:
                if any(r.refused for r in self.runs):
                    self.limited = True  # told once already: the loop ends here
                    self.messages.pop()
                    call = None
                else:
                    call.refused = True
            yield "generated", call
            if call is None:
                return
            self.runs.append(call)
            yield "call", call
            if call.refused:
                text = (f"[error: the limit of {self.max_calls} tool calls for this request is reached; "
                        "answer with what you have]")  # fmt: skip
                call.result = ToolResult(text, error="max_tool_calls")
            else:
                call.result = await call.tool.call(
                    ToolCall(call.recipient, call.part.text, self.conversation)
                )
            yield "result", call
            answer = run_result_message(call.part, call.result.text)
            self.messages.append(answer)
            prompt = self.prompts[-1] + c.tokens + continuation(answer)
            left = min(self.budget - spent, self.context - len(prompt))
            if left <= 0:  # the tool's answer fills the context
                self.out_of_budget = True
                return
            self.prompts.append(prompt)
            self.choices.append(self.make_choice(left))


def close_later(tools: dict[str, Tool], conversation: str) -> None:
    """Closes the tools' state of a conversation in a thread of its own (ending a kernel waits for its
    processes; the caller may be the event loop, or a request being cancelled)."""

    def close():
        for tool in tools.values():
            try:
                tool.close(conversation)
            except Exception:
                log.exception("closing %s's state of conversation %s", tool.name, conversation)

    if tools:
        threading.Thread(target=close, name="tools-close", daemon=True).start()


_ASSISTANT = None


def continuation(message) -> list[int]:
    """A tool's message rendered, then `<|start|>assistant`: what follows the call's <|call|> in the next
    prompt (what `render_conversation_for_completion` renders for the same messages)."""
    global _ASSISTANT
    if _ASSISTANT is None:
        _ASSISTANT = [START, *encode("assistant")]
    return list(get_harmony_encoding().render(message)) + _ASSISTANT

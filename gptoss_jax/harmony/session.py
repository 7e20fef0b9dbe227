"""A multi-turn chat held as harmony messages: the chat CLI's history.

Each user message is appended, the prompt rendered by `Chat` (as the server renders the same history), and the
model's reply, parsed once by `OutputParser` as it streams, is appended as the messages its parts make. The
next prompt drops the reply's analysis once a final answer has followed it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from openai_harmony import Message

from .conversation import Chat, parts_to_messages, resolve_date, user_message
from .parser import parse_completion_messages


class ChatSession:
    """`prompt_tokens(user_text)` appends the user message and renders the prompt; `add_parts(parser.parts)`
    (or `add_assistant_tokens(tokens)`) appends the reply. `conversation_start_date` "today" is the date the
    session starts."""

    def __init__(
        self,
        *,
        reasoning_effort: Any = "medium",
        developer_instructions: str | None = None,
        conversation_start_date: Any = None,
        tools: Iterable[Any] | None = None,
    ):
        self.chat = Chat.from_messages(
            [], tools, reasoning_effort=reasoning_effort, instructions=developer_instructions
        )
        self.date = resolve_date(conversation_start_date)

    @property
    def messages(self) -> list[Message]:
        """The conversation after the system and developer messages."""
        return self.chat.messages

    def add_user(self, text: str) -> None:
        self.chat.messages.append(user_message(text))

    def add_messages(self, messages: Iterable[Any]) -> None:
        """Chat messages, (role, text) pairs or harmony messages (see `Chat.from_messages`)."""
        self.chat.messages += Chat.from_messages(messages).messages

    def prompt_tokens(self, user_text: str | None = None) -> list[int]:
        """Optionally append a user message, then render the prompt for the assistant's turn."""
        if user_text is not None:
            self.add_user(user_text)
        return self.chat.prompt_tokens(self.date)

    def add_parts(self, parts: Iterable[Any]) -> list[Message]:
        """A parsed reply (`OutputParser.parts`) appended as harmony messages; returns them."""
        messages = parts_to_messages(parts)
        self.chat.messages += messages
        return messages

    def add_assistant_tokens(self, tokens: Iterable[int] | Any) -> list[Message]:
        """A sampled reply (its stop token optional), parsed, appended; returns its messages."""
        messages = parse_completion_messages(tokens)
        self.chat.messages += messages
        return messages

"""harmony, the chat format of gpt-oss, in one place: what the server, fine-tuning and the chat CLI render
and parse, built on openai-harmony (no harmony string is assembled by hand).

- `conversation.py`: conversations -> harmony messages -> prompt tokens. One mapping (`Chat.from_messages`
  for OpenAI chat messages, the API's and fine-tuning's; `Chat.from_responses_input` for Responses items),
  one system-message builder (`system_message`: reasoning effort, conversation start date or none), one
  reasoning-effort parser, tool rendering (`developer_message`, `tool_call_message`, `tool_result_message`),
  and one rule for dropping chain of thought (`drop_finished_reasoning`, the gpt-oss chat template's);
- `parser.py`: generated tokens -> reasoning / preamble / content / tool-call parts, as streaming events
  (`OutputParser`, recovering from malformed output), and `parts_to_messages` back to harmony messages;
- `stops.py`: stop strings held back on a text stream (`StopStrings`), for the engine and the server;
- `session.py`: the chat CLI's multi-turn history (`ChatSession`);
- `settings.py`: the prompt settings recorded beside fine-tuned adapters (`PromptSettings`,
  `resolve_prompt_settings`).

The tokenizer (`gptoss_jax.tokenizer`) below holds the vocabulary, encode/decode and the special ids.
"""

from .conversation import (
    CONSTRAIN_JSON,
    EFFORTS,
    FUNCTIONS,
    Chat,
    ConversationError,
    Namespace,
    assistant_message,
    assistant_turn,
    build_conversation,
    builtin_call,
    builtin_result,
    date_setting,
    developer_message,
    drop_finished_reasoning,
    function_tools,
    is_custom,
    part_recipient,
    parts_to_messages,
    reasoning_effort,
    recipient,
    render_chat_prompt,
    render_prompt,
    resolve_date,
    run_call_message,
    run_result_message,
    system_message,
    tool_call_message,
    tool_result_message,
    user_message,
)
from .parser import (
    BUILTIN_NAMESPACES,
    Event,
    OutputParser,
    Part,
    message_text,
    new_id,
    parse_completion,
    parse_completion_messages,
    part_type,
    split_recipient,
    strip_markers,
)
from .session import ChatSession
from .settings import (
    RENDERING_VERSION,
    SETTINGS_FILE,
    PromptSettings,
    read_prompt_settings,
    resolve_prompt_settings,
    write_prompt_settings,
)
from .stops import StopStrings

__all__ = [
    "BUILTIN_NAMESPACES",
    "CONSTRAIN_JSON",
    "EFFORTS",
    "FUNCTIONS",
    "RENDERING_VERSION",
    "SETTINGS_FILE",
    "Chat",
    "ChatSession",
    "ConversationError",
    "Event",
    "Namespace",
    "OutputParser",
    "Part",
    "PromptSettings",
    "StopStrings",
    "assistant_message",
    "assistant_turn",
    "build_conversation",
    "builtin_call",
    "builtin_result",
    "date_setting",
    "developer_message",
    "drop_finished_reasoning",
    "function_tools",
    "is_custom",
    "message_text",
    "new_id",
    "parse_completion",
    "parse_completion_messages",
    "part_recipient",
    "part_type",
    "parts_to_messages",
    "read_prompt_settings",
    "reasoning_effort",
    "recipient",
    "render_chat_prompt",
    "render_prompt",
    "resolve_date",
    "resolve_prompt_settings",
    "run_call_message",
    "run_result_message",
    "split_recipient",
    "strip_markers",
    "system_message",
    "tool_call_message",
    "tool_result_message",
    "user_message",
    "write_prompt_settings",
]

"""gptoss_jax.harmony: prompts checked against openai-harmony's own rendering, the chain-of-thought rule, the
chat history, whole-turn parsing, and the prompt settings recorded beside adapters.

The streaming parser's own tests are in test_harmony_parser.py; that training, the server and the chat CLI
render the same prompts, in test_harmony_skew.py.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
)

from gptoss_jax import harmony as hm
from gptoss_jax import tokenizer as tk

# ---------------------------------------------------------------------------------- prompts


def _harmony_conv(messages, effort=ReasoningEffort.MEDIUM, date=None, dev=None):
    sys = SystemContent.new().with_reasoning_effort(effort)
    if date is not None:
        sys = sys.with_conversation_start_date(date)
    head = [Message.from_role_and_content(Role.SYSTEM, sys)]
    if dev is not None:
        head.append(
            Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(dev))
        )
    return Conversation.from_messages(head + messages)


def test_render_chat_prompt_matches_harmony():
    henc = tk.get_harmony_encoding()
    ids = hm.render_chat_prompt([("user", "What is 2+2?")])
    expected = henc.render_conversation_for_completion(
        _harmony_conv([Message.from_role_and_content(Role.USER, "What is 2+2?")]), Role.ASSISTANT
    )
    assert ids == expected

    ids = hm.render_chat_prompt(
        [("user", "Hi"), ("assistant", "Hello!"), Message.from_role_and_content(Role.USER, "Bye")],
        reasoning_effort="high",
        developer_instructions="Answer in French.",
        conversation_start_date="2025-08-05",
    )
    expected = henc.render_conversation_for_completion(
        _harmony_conv(
            [
                Message.from_role_and_content(Role.USER, "Hi"),
                Message.from_role_and_content(Role.ASSISTANT, "Hello!").with_channel("final"),
                Message.from_role_and_content(Role.USER, "Bye"),
            ],
            effort=ReasoningEffort.HIGH,
            date="2025-08-05",
            dev="Answer in French.",
        ),
        Role.ASSISTANT,
    )
    assert ids == expected

    text = tk.get_encoding().decode(ids)
    assert text.startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI."
    )
    assert "Reasoning: high" in text and "Current date: 2025-08-05" in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French." in text
    assert "<|start|>user<|message|>Hi<|end|>" in text
    assert "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Bye<|end|><|start|>assistant")
    assert ids[:1] == [tk.START] and ids[-1] != tk.END


def test_render_chat_prompt_default_effort_and_errors():
    text = tk.decode(hm.render_chat_prompt([("user", "x")]))
    assert "Reasoning: medium" in text and "Current date" not in text
    with pytest.raises(ValueError):
        hm.render_chat_prompt([("user", "x")], reasoning_effort="extreme")
    with pytest.raises(ValueError):
        hm.render_chat_prompt([("system", "x")])


def _assistant_output(analysis, final, stop=tk.RETURN):
    """Hand-render an assistant turn with harmony and strip the leading <|start|>assistant."""
    henc = tk.get_harmony_encoding()
    toks = henc.render(Message.from_role_and_content(Role.ASSISTANT, analysis).with_channel("analysis"))
    toks += henc.render(Message.from_role_and_content(Role.ASSISTANT, final).with_channel("final"))
    assert toks[:2] == tk.encode("<|start|>assistant", allowed_special="all")
    toks = toks[2:]  # the prompt already ends with <|start|>assistant
    assert toks[-1] == tk.END
    return toks[:-1] + [stop]  # sampling stops on <|return|>


def test_parse_completion():
    analysis = "The user asks 2+2. Simple: 4. 🤔"
    final = "2 + 2 = **4** — 四."
    toks = _assistant_output(analysis, final)
    assert hm.parse_completion(toks) == [("analysis", analysis), ("final", final)]
    assert hm.parse_completion(toks[:-1]) == [("analysis", analysis), ("final", final)]
    msgs = hm.parse_completion_messages(np.asarray(toks))
    assert [m.author.role for m in msgs] == [Role.ASSISTANT, Role.ASSISTANT]
    # the same parser as the server's: what is not harmony is content, or an error when strict
    garbage = tk.encode("no header here")
    assert hm.parse_completion(garbage) == [("final", "no header here")]
    with pytest.raises(ValueError, match="not valid harmony"):
        hm.parse_completion_messages(garbage, strict=True)


def test_output_parser_deltas_per_channel():
    """What `ChatStream` did, with the one streaming parser: deltas per part, in order, and the turn's
    messages from its parts."""
    analysis = "Let me think… 日本語 and emoji 👨‍👩‍👧 split across tokens."
    final = "Final answer: 42 ✅"
    toks = _assistant_output(analysis, final)
    parser = hm.OutputParser()
    deltas = [(part.type, d) for t in toks for kind, part, d in parser.feed(t) if kind == "delta"]
    deltas += [(part.type, d) for kind, part, d in parser.finish() if kind == "delta"]
    per_type: dict = {}
    for kind, delta in deltas:
        assert delta
        per_type[kind] = per_type.get(kind, "") + delta
    assert per_type == {"reasoning": analysis, "content": final}
    # all reasoning deltas before any content delta
    kinds = [k for k, _ in deltas]
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)
    msgs = hm.parts_to_messages(parser.parts)
    assert [(m.channel, hm.message_text(m)) for m in msgs] == [("analysis", analysis), ("final", final)]


def test_chat_session_drops_previous_analysis():
    s = hm.ChatSession(reasoning_effort="low")
    p1 = s.prompt_tokens("First question?")
    assert tk.decode(p1).endswith("<|start|>user<|message|>First question?<|end|><|start|>assistant")
    s.add_assistant_tokens(_assistant_output("SECRET-THOUGHTS about q1", "Answer one."))
    assert [m.channel for m in s.messages[-2:]] == ["analysis", "final"]
    p2 = s.prompt_tokens("Second question?")
    text = tk.decode(p2)
    assert "SECRET-THOUGHTS" not in text
    assert "<|start|>assistant<|channel|>final<|message|>Answer one.<|end|>" in text
    assert "Reasoning: low" in text
    assert text.endswith("<|start|>user<|message|>Second question?<|end|><|start|>assistant")
    assert p2[: len(p1)] == p1  # the earlier turns' tokens are unchanged


# ---------------------------------------------------------------------------------- the drop rule


def test_every_finished_turns_analysis_is_dropped_from_the_third_turn_on():
    """harmony's default keeps the second turn's analysis in the third turn's prompt (it only drops before
    the first final answer); the chat template's rule, which the server, training and the chat CLI share,
    drops it."""
    s = hm.ChatSession()
    s.prompt_tokens("q1")
    s.add_assistant_tokens(_assistant_output("THOUGHT-ONE", "a1"))
    s.prompt_tokens("q2")
    s.add_assistant_tokens(_assistant_output("THOUGHT-TWO", "a2"))
    text = tk.decode(s.prompt_tokens("q3"))
    assert "THOUGHT-ONE" not in text and "THOUGHT-TWO" not in text and "a1" in text and "a2" in text
    harmony_default = tk.get_harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages([hm.system_message()] + s.messages), Role.ASSISTANT
    )
    assert "THOUGHT-TWO" in tk.decode(harmony_default)


def test_the_rule_keeps_a_tool_loop_and_leaves_harmonys_rule_nothing_to_drop():
    a = hm.assistant_message
    msgs = [hm.user_message("q1"), a("r1", "analysis"), a("f1", "final"), hm.user_message("q2"),
            a("r2", "analysis"), hm.tool_call_message("f", "{}"), hm.tool_result_message("f", "x")]  # fmt: skip
    kept = hm.drop_finished_reasoning(msgs)
    assert [hm.message_text(m) for m in kept] == ["q1", "f1", "q2", "r2", "{}", "x"]
    conv = hm.build_conversation(msgs)
    enc = tk.get_harmony_encoding()
    assert list(enc.render_conversation_for_completion(conv, Role.ASSISTANT)) == list(
        enc.render_conversation_for_completion(conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False))
    )  # fmt: skip


# ---------------------------------------------------------------------------------- system message


def test_system_message_and_reasoning_effort():
    assert [hm.reasoning_effort(v) for v in ("LOW", " medium", ReasoningEffort.HIGH)] == [
        "low",
        "medium",
        "high",
    ]
    with pytest.raises(ValueError, match="low, medium or high"):
        hm.reasoning_effort("max")

    def text(m):
        return tk.decode(tk.get_harmony_encoding().render(m))

    assert "Current date" not in text(hm.system_message("high")) and "Reasoning: high" in text(
        hm.system_message("high")
    )
    assert "Current date: 2025-08-05" in text(hm.system_message(date=dt.date(2025, 8, 5)))
    assert f"Current date: {dt.date.today().isoformat()}" in text(hm.system_message(date="today"))
    assert "Current date" not in text(hm.system_message(date="none"))
    for bad in ("yesterday", "2025-13-01"):
        with pytest.raises(ValueError, match="must be today, none or YYYY-MM-DD"):
            hm.system_message(date=bad)


def test_conversation_errors_name_the_field():
    with pytest.raises(hm.ConversationError) as e:
        hm.Chat.from_messages(
            [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "z", "content": "y"}]
        )
    assert e.value.param == "messages[1].tool_call_id" and "'z' matches no tool call" in str(e.value)
    # without a call id, a tool message may name its function (fine-tuning data does)
    chat = hm.Chat.from_messages(
        [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "y"}]
    )
    assert chat.messages[1] == hm.tool_result_message("f", "y") and chat.sources == [0, 1]
    with pytest.raises(hm.ConversationError) as e:
        hm.Chat.from_messages([], [{"type": "function", "function": {"name": "f"}}] * 2)
    assert e.value.param == "tools[1].function.name"


# ---------------------------------------------------------------------------------- prompt settings


def test_prompt_settings_round_trip_atomically(tmp_path):
    s = hm.PromptSettings(reasoning_effort="High", date="2025-08-05")
    path = hm.write_prompt_settings(tmp_path, s)
    assert [p.name for p in tmp_path.iterdir()] == [hm.SETTINGS_FILE]  # no temporary file left
    assert json.loads(path.read_text())["conversation_start_date"] == "2025-08-05"
    assert hm.read_prompt_settings(tmp_path) == s and s.reasoning_effort == "high"
    assert hm.read_prompt_settings(tmp_path / "elsewhere") is None
    path.write_text("{oops")
    with pytest.raises(ValueError, match="prompt_settings.json: not valid JSON"):
        hm.read_prompt_settings(tmp_path)
    path.write_text(json.dumps(s.to_json() | {"conversation_start_date": "soon"}))
    with pytest.raises(ValueError, match="must be today, none or YYYY-MM-DD, got 'soon'"):
        hm.read_prompt_settings(tmp_path)


def test_resolve_prompt_settings(tmp_path):
    hm.write_prompt_settings(tmp_path, hm.PromptSettings(reasoning_effort="low", date=None))
    r = hm.resolve_prompt_settings(tmp_path, default_date="today")
    assert r.settings == hm.PromptSettings(reasoning_effort="low", date=None) and not r.warnings
    where = tmp_path / hm.SETTINGS_FILE
    assert r.notes == [
        f"prompt settings of the adapters ({where}): reasoning effort low, no conversation date"
    ]
    r = hm.resolve_prompt_settings(tmp_path, date="none", reasoning_effort="low")  # the same: no warning
    assert not r.warnings
    r = hm.resolve_prompt_settings(tmp_path, date="2025-08-05", reasoning_effort="high")
    assert r.settings == hm.PromptSettings(reasoning_effort="high", date="2025-08-05")
    assert [w.split(" overrides")[0] for w in r.warnings] == ["--date 2025-08-05", "--reasoning-effort high"]
    # adapters without the file, or none: the command's defaults, nothing said
    for folder in (tmp_path / "plain", None):
        r = hm.resolve_prompt_settings(folder, default_date="today")
        assert r.settings == hm.PromptSettings(date="today") and not r.notes and not r.warnings
    with pytest.raises(ValueError, match="--date must be today, none or YYYY-MM-DD, got 'soon'"):
        hm.resolve_prompt_settings(None, date="soon")
    hm.write_prompt_settings(tmp_path, hm.PromptSettings(rendering_version=0))
    (w,) = hm.resolve_prompt_settings(tmp_path).warnings
    assert "rendering version 0" in w

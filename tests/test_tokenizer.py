"""Tests for gptoss_jax.tokenizer (offline o200k_harmony + harmony chat helpers)."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)

from gptoss_jax import tokenizer as tk

MULTILINGUAL = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock!",
    "chinese": "我们今天去公园散步，天气很好。机器学习是人工智能的一个分支。",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟ التعلم الآلي مثير للاهتمام.",
    "hindi": "नमस्ते दुनिया, आज आप कैसे हैं? मशीन लर्निंग दिलचस्प है।",
    "emoji": "🚀🔥 hello 👋🏽 family: 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 ✨",
    "code": "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn {'a': [1, 2]}\r\n\n\n  \t\n",
    "japanese": "今日は良い天気ですね。カタカナとひらがなと漢字を混ぜます。",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "mixed": "Résumé naïve café — ½ ≠ 0.5; “quotes” and ‘apostrophes’ Ünïcödé ß ẞ",
    "specials_as_text": "literal <|start|> and <|endoftext|> stay text",
}


# ---------------------------------------------------------------------------------- vocabulary


def test_n_vocab_and_name():
    enc = tk.get_encoding()
    assert enc.name == "o200k_harmony"
    assert enc.n_vocab == tk.N_VOCAB == 201088
    assert tk.get_encoding() is enc  # cached


@pytest.mark.parametrize(
    "name,tid",
    [
        ("<|startoftext|>", 199998),
        ("<|endoftext|>", 199999),
        ("<|reserved_200000|>", 200000),
        ("<|reserved_200001|>", 200001),
        ("<|return|>", 200002),
        ("<|constrain|>", 200003),
        ("<|reserved_200004|>", 200004),
        ("<|channel|>", 200005),
        ("<|start|>", 200006),
        ("<|end|>", 200007),
        ("<|message|>", 200008),
        ("<|reserved_200009|>", 200009),
        ("<|reserved_200010|>", 200010),
        ("<|reserved_200011|>", 200011),
        ("<|call|>", 200012),
        ("<|reserved_200013|>", 200013),
        ("<|endofprompt|>", 200018),
        ("<|reserved_200018|>", 200018),
        ("<|reserved_201087|>", 201087),
    ],
)
def test_special_token_ids(name, tid):
    assert tk.encode(name, allowed_special="all") == [tid]
    assert tk.get_encoding().encode_single_token(name) == tid


def test_special_constants():
    assert (tk.STARTOFTEXT, tk.ENDOFTEXT) == (199998, 199999)
    assert (tk.RETURN, tk.CONSTRAIN, tk.CHANNEL) == (200002, 200003, 200005)
    assert (tk.START, tk.END, tk.MESSAGE, tk.CALL) == (200006, 200007, 200008, 200012)
    assert tk.ENDOFPROMPT == 200018
    for name, tid in tk.SPECIAL_TOKENS.items():
        assert tk.encode(name, allowed_special="all") == [tid]
    # 201088 is out of range: "<|reserved_201088|>" is not a special token (harmony's Rust table has it).
    assert 201088 not in tk.encode("<|reserved_201088|>", allowed_special="all")
    enc = tk.get_encoding()
    assert max(enc.encode_single_token(s) for s in enc.special_tokens_set) == 201087


def test_text_ranks_below_specials():
    ranks = tk.load_o200k_ranks()
    assert len(ranks) == 199998
    assert max(ranks.values()) == 199997 and min(ranks.values()) == 0


def test_encode_defaults_treat_specials_as_text():
    ids = tk.encode("<|start|>user<|message|>")
    assert not set(ids) & {tk.START, tk.MESSAGE}
    assert tk.decode(ids) == "<|start|>user<|message|>"
    assert tk.encode("<|start|>user", allowed_special={"<|start|>"})[0] == tk.START


@pytest.mark.parametrize("key", sorted(MULTILINGUAL))
def test_roundtrip(key):
    text = MULTILINGUAL[key]
    ids = tk.encode(text)
    assert all(0 <= i < 199998 for i in ids)
    assert tk.decode(ids) == text
    assert tk.decode(np.asarray(ids, dtype=np.int32)) == text  # array inputs


@pytest.mark.parametrize("key", sorted(MULTILINGUAL))
def test_matches_harmony_encoding(key):
    text = MULTILINGUAL[key]
    henc = tk.get_harmony_encoding()
    ours = tk.get_encoding().encode(text, allowed_special="all")
    assert ours == henc.encode(text, allowed_special="all")
    assert henc.decode(ours) == tk.decode(ours)


def test_stop_tokens():
    assert tk.stop_tokens_for_assistant_actions() == [200002, 200012]
    assert tk.stop_tokens() == [200002, 200007, 200012]


# ---------------------------------------------------------------------------------- sha check


def test_sha_mismatch_raises(tmp_path):
    good = tk._read_vocab_bytes()
    bad = bytearray(good)
    bad[100] ^= 0x01
    gz = tmp_path / "o200k_base.tiktoken.gz"
    gz.write_bytes(gzip.compress(bytes(bad), compresslevel=1))
    with pytest.raises(ValueError, match="SHA-256") as ei:
        tk.load_o200k_ranks(gz)
    assert "\n" not in str(ei.value)
    plain = tmp_path / "o200k_base.tiktoken"
    plain.write_bytes(bytes(bad[:1000]))
    with pytest.raises(ValueError, match="expected 446a9538"):
        tk.load_o200k_ranks(plain)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gz.read_bytes()[:5000])
    with pytest.raises(ValueError):
        tk.load_o200k_ranks(broken_gz)


def test_materialize_vocab_atomic(tmp_path):
    d = tk.materialize_vocab(tmp_path / "cache")
    f = d / "o200k_base.tiktoken"
    assert hashlib.sha256(f.read_bytes()).hexdigest() == tk.O200K_BASE_SHA256
    assert [p.name for p in d.iterdir()] == ["o200k_base.tiktoken"]  # no temp leftovers
    f.write_bytes(b"corrupt")  # a bad cached file is replaced
    tk.materialize_vocab(d)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == tk.O200K_BASE_SHA256


# ---------------------------------------------------------------------------------- prompts


def _harmony_conv(messages, effort=ReasoningEffort.MEDIUM, date=None, dev=None):
    sys = SystemContent.new().with_reasoning_effort(effort)
    if date is not None:
        sys = sys.with_conversation_start_date(date)
    head = [Message.from_role_and_content(Role.SYSTEM, sys)]
    if dev is not None:
        head.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(dev)))
    return Conversation.from_messages(head + messages)


def test_render_chat_prompt_matches_harmony():
    henc = tk.get_harmony_encoding()
    ids = tk.render_chat_prompt([("user", "What is 2+2?")])
    expected = henc.render_conversation_for_completion(
        _harmony_conv([Message.from_role_and_content(Role.USER, "What is 2+2?")]), Role.ASSISTANT
    )
    assert ids == expected

    ids = tk.render_chat_prompt(
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
    assert text.startswith("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.")
    assert "Reasoning: high" in text and "Current date: 2025-08-05" in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French." in text
    assert "<|start|>user<|message|>Hi<|end|>" in text
    assert "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Bye<|end|><|start|>assistant")
    assert ids[:1] == [tk.START] and ids[-1] != tk.END


def test_render_chat_prompt_default_effort_and_errors():
    text = tk.decode(tk.render_chat_prompt([("user", "x")]))
    assert "Reasoning: medium" in text and "Current date" not in text
    with pytest.raises(ValueError):
        tk.render_chat_prompt([("user", "x")], reasoning_effort="extreme")
    with pytest.raises(ValueError):
        tk.render_chat_prompt([("system", "x")])


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
    assert tk.parse_completion(toks) == [("analysis", analysis), ("final", final)]
    assert tk.parse_completion(toks[:-1]) == [("analysis", analysis), ("final", final)]
    msgs = tk.parse_completion_messages(np.asarray(toks))
    assert [m.author.role for m in msgs] == [Role.ASSISTANT, Role.ASSISTANT]


def test_chat_stream_deltas():
    analysis = "Let me think… 日本語 and emoji 👨‍👩‍👧 split across tokens."
    final = "Final answer: 42 ✅"
    toks = _assistant_output(analysis, final)
    stream = tk.ChatStream()
    deltas = list(stream.feed(toks))
    per_channel: dict = {}
    for channel, delta in deltas:
        assert delta
        per_channel[channel] = per_channel.get(channel, "") + delta
    assert per_channel == {"analysis": analysis, "final": final}
    # channels arrive in order: all analysis deltas before any final delta
    chans = [c for c, _ in deltas]
    assert chans == sorted(chans)
    msgs = stream.finish()
    assert [(m.channel, tk.message_text(m)) for m in msgs] == [("analysis", analysis), ("final", final)]


def test_chat_session_drops_previous_analysis():
    s = tk.ChatSession(reasoning_effort="low")
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

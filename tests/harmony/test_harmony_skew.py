"""What the model is trained on is what it is served: for a corpus of conversations in the fine-tuning format,
the prompt that training builds for each assistant message equals, token for token,

- what `gptoss-jax serve` renders for the same history, driven through the server's own request path (the
  ASGI app with a backend that records the prompt it is asked to continue): as a chat-completions body, and
  as Responses input items where the history can be written as items (every tool result has a call id);
- what `gptoss-jax chat` renders for it where the chat CLI applies (no tools): the real command, its model
  replaced by one that writes the training targets, so that each reply goes through the CLI's parser into its
  history.

Before this, training rendered with openai-harmony's default `auto_drop_analysis`, which keeps the analysis of
every finished turn but the first. `test_the_issues_tool_loop` pins issue 19's example (239 vs 226 tokens,
first difference at token 115) and checks the prompt against openai-harmony's own classes; the corpus test
counts the prompts where that old rule differs, so it would fail on it.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from apitools import serve_ckpt_fixture  # noqa: F401 - the session's checkpoint fixture (real vocabulary)
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
from starlette.testclient import TestClient

from gptoss_jax import cli, harmony
from gptoss_jax.api.app import create_app
from gptoss_jax.tokenizer import N_VOCAB, encode, get_harmony_encoding
from gptoss_jax.training.data import render

REPLY = encode("<|channel|>final<|message|>ok<|return|>", allowed_special="all")


# ------------------------------------------------------------------------------------------- the corpus
def fn(name, description, properties=None):
    params = {"type": "object", "properties": properties or {}}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


WEATHER = fn("get_weather", "Current weather", {"city": {"type": "string"}})
WEATHER["function"]["parameters"]["required"] = ["city"]
TIME = fn("get_time", "Local time in a timezone", {"timezone": {"type": "string"}})
NOW = fn("now", "The current UTC time")  # no parameters


def S(text):
    return {"role": "system", "content": text}


def D(text):
    return {"role": "developer", "content": text}


def U(text):
    return {"role": "user", "content": text}


def A(content=None, thinking=None, calls=(), **extra):
    m = {"role": "assistant"}
    if thinking is not None:
        m["thinking"] = thinking
    if content is not None:
        m["content"] = content
    if calls:
        m["tool_calls"] = list(calls)
    return m | extra


def C(call_id, name, **args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def T(call_id, content, **extra):
    return {"role": "tool", "tool_call_id": call_id, "content": content} | extra


ISSUE = [
    S("Be brief."),
    U("Weather in Paris?"),
    A(thinking="I should call the weather tool.", calls=[C("call_1", "get_weather", city="Paris")]),
    T("call_1", '{"temp_c": 18}'),
    A("It is 18 C in Paris."),
    U("And Oslo?"),
    A(thinking="Now Oslo.", calls=[C("call_2", "get_weather", city="Oslo")]),
    T("call_2", '{"temp_c": 3}'),
    A("It is 3 C in Oslo."),
]

# name -> (messages, tools, reasoning effort, conversation start date)
CORPUS = {
    "the issue's two-turn tool loop": (ISSUE, [WEATHER], "medium", None),
    "one turn": ([U("Hi"), A("Hello!", thinking="A greeting.")], [], "low", None),
    "three finals": (
        [U("2+2?"), A("4", thinking="Add."), U("times 3?"), A("12", thinking="4*3."), U("minus 2?"),
         A("10", thinking="12-2.")], [], "high", "2025-08-05"),
    "four finals, some without thinking": (
        [S("Answer in one word."), U("Capital of France?"), A("Paris", thinking="Easy."), U("Of Japan?"),
         A("Tokyo"), U("Of Peru?"), A("Lima", thinking="Peru: Lima."), U("Of Norway?"), A("Oslo")],
        [], "medium", "today"),
    "system and developer instructions": (
        [S("You are terse."), D("Reply in French."), U("Thanks!"), A("De rien.", thinking="French.")],
        [], "low", None),
    "a preamble before the call": (
        [U("Weather in Lima?"),
         A("Let me check.", thinking="Use the tool.", calls=[C("c1", "get_weather", city="Lima")]),
         T("c1", '{"temp_c": 15}'), A("15 C.", thinking="Got it.")], [WEATHER], "medium", None),
    "two calls in one message": (
        [U("Paris and Oslo?"),
         A(thinking="Both cities.", calls=[C("c1", "get_weather", city="Paris"), C("c2", "get_weather", city="Oslo")]),
         T("c1", "18"), T("c2", "3"), A("Paris 18 C, Oslo 3 C.", thinking="Both known.")],
        [WEATHER], "high", "2025-08-05"),
    "a tool loop in the second of three turns": (
        [U("Hi"), A("Hello.", thinking="Greet."), U("Time in Tokyo?"),
         A(thinking="Need the time.", calls=[C("t1", "get_time", timezone="Asia/Tokyo")]),
         T("t1", "09:00"), A("09:00 in Tokyo.", thinking="Say it."), U("Bye"), A("Bye!", thinking="End.")],
        [WEATHER, TIME], "low", None),
    "a tool result that names its function": (
        [U("Weather in Rome?"), A(thinking="Call.", calls=[C("x", "get_weather", city="Rome")]),
         {"role": "tool", "name": "get_weather", "content": "21"}, A("21 C.")], [WEATHER], "medium", None),
    "two calls in a row": (
        [U("Weather where it is noon?"), A(thinking="First the time.", calls=[C("a", "get_time", timezone="UTC")]),
         T("a", "12:00"), A(thinking="Then the weather.", calls=[C("b", "get_weather", city="London")]),
         T("b", "14"), A("Noon in London, 14 C.", thinking="Done.")], [WEATHER, TIME], "high", None),
    "a message kept as context (weight 0)": (
        [U("q1"), A("a1", thinking="t1", weight=0), U("q2"), A("a2", thinking="t2")], [], "medium", None),
    "content as text parts": (
        [{"role": "user", "content": [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "part two."}]},
         A([{"type": "text", "text": "Both parts read."}], thinking="Two parts.")], [], "low", None),
    "finals, then a tool loop, then a final": (
        [S("Be helpful."), U("Hi"), A("Hi!", thinking="g"), U("How are you?"), A("Fine.", thinking="h"),
         U("Weather in Oslo?"), A(thinking="tool", calls=[C("w", "get_weather", city="Oslo")]), T("w", "3"),
         A("3 C.", thinking="answer")], [WEATHER], "medium", "2025-01-01"),
    "a tool without parameters": (
        [U("What time is it?"), A(thinking="Ask the clock.", calls=[C("n", "now")]), T("n", "10:42Z"),
         A("10:42 UTC.")], [NOW], "high", None),
    "two tools, each called": (
        [D("Use the tools."), U("Time and weather in Paris?"),
         A("Checking both.", calls=[C("t", "get_time", timezone="Europe/Paris"), C("w", "get_weather", city="Paris")]),
         T("t", "15:00"), T("w", "18"), A("15:00, 18 C.", thinking="Both in.")], [WEATHER, TIME], "low", "today"),
    "developer instructions, several turns": (
        [D("Count the words of each message."), U("one two"), A("2", thinking="Two words."), U("a b c"),
         A("3", thinking="Three.")], [], "high", None),
    "system, developer and tools": (
        [S("You are a weather bot."), D("Always use Celsius."), U("Weather in NYC?"),
         A(thinking="Call it.", calls=[C("n1", "get_weather", city="New York")]), T("n1", '{"temp_f": 50}'),
         A("10 C.", thinking="Convert 50 F.")], [WEATHER], "medium", None),
    "unicode and long thinking": (
        [U("翻译：你好"), A("Hello", thinking="用户要我翻译「你好」。 It means hello. 👋 " * 5), U("Merci ?"),
         A("Thank you?", thinking="Français → English. " * 4)], [], "low", "2025-08-05"),
    "thinking, a preamble and two calls": (
        [U("Compare Lima and Oslo."),
         A("Looking both up.", thinking="Two calls.",
           calls=[C("l", "get_weather", city="Lima"), C("o", "get_weather", city="Oslo")]),
         T("l", "15"), T("o", "3"), A("Lima is 12 C warmer.", thinking="15-3.")], [WEATHER], "medium", None),
    "a user after a tool loop, then an answer without thinking": (
        [U("Weather in Kyiv?"), A(thinking="tool", calls=[C("k", "get_weather", city="Kyiv")]), T("k", "7"),
         A("7 C.", thinking="Report."), U("Thanks."), A("You're welcome.")], [WEATHER], "high", None),
    "three turns of reasoning (the chat CLI's case)": (
        [U("Name a color."), A("Blue.", thinking="Pick one: blue."), U("Another?"),
         A("Green.", thinking="Not blue: green."), U("One more?"), A("Red.", thinking="Neither: red.")],
        [], "medium", None),
    "a tool loop still in progress at a second call": (
        [U("Weather in Paris, then in Rome?"), A(thinking="Paris first.", calls=[C("p", "get_weather", city="Paris")]),
         T("p", "18"), A("Paris: 18 C. Now Rome.", thinking="Next Rome.", calls=[C("r", "get_weather", city="Rome")]),
         T("r", "21"), A("Rome: 21 C.", thinking="Both done.")], [WEATHER], "low", "2025-08-05"),
}  # fmt: skip


# ------------------------------------------------------------------------------------------- training
def training_targets(messages, tools, effort, date) -> list[tuple[list[int], list[int]]]:
    """(prompt, target) of every trained turn, in order, from the sequences training builds: a target starts
    where the loss weights turn on, and the tokens before it in its sequence are its prompt."""
    out = []
    for seq in render({"messages": messages, "tools": tools}, reasoning_effort=effort, date=date):
        w = seq.weights
        for p in range(len(w)):
            if w[p] and (p == 0 or not w[p - 1]):
                end = next((q for q in range(p, len(w)) if not w[q]), len(w))
                out.append((seq.tokens[:p], seq.tokens[p:end]))
    return out


def histories(messages) -> list[list[dict]]:
    """The history before every trained turn, as a client would send it: the messages before a trained
    assistant message, and for each call after its first, that message with the calls before it."""
    out = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        out.append(messages[:k])
        calls = m.get("tool_calls", [])
        out += [messages[:k] + [m | {"tool_calls": calls[:c]}] for c in range(1, len(calls))]
    return out


# ------------------------------------------------------------------------------------------- the server
@dataclasses.dataclass
class Generated:
    token: int
    logprob: float | None = None
    top: list | None = None


class RecordingBackend:
    """The server's backend interface; it records each prompt and answers a short final message."""

    vocab_size = N_VOCAB
    context_length = 1 << 15

    def __init__(self):
        self.prompts: list[list[int]] = []

    def start(self):
        pass

    def stop(self):
        pass

    async def metrics(self):
        return {}

    async def generate(self, prompt, params, info=None):
        self.prompts.append(list(prompt))
        for t in REPLY:
            yield Generated(t)


def api_messages(history) -> list[dict]:
    """Fine-tuning messages as a chat-completions client sends them: no `weight`, the analysis under the
    API's names (`reasoning_content` and `reasoning` in turn)."""
    out = []
    for i, m in enumerate(history):
        m = {k: v for k, v in m.items() if k != "weight"}
        if "thinking" in m:
            m[("reasoning_content", "reasoning")[i % 2]] = m.pop("thinking")
        out.append(m)
    return out


def text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def responses_items(history) -> list[dict] | None:
    """The history as Responses input items, or None when it cannot be written so (a tool result without
    a call id)."""
    items = []
    for m in history:
        content = None if m.get("content") is None else text(m["content"])
        if m["role"] in ("system", "developer", "user"):
            items.append({"type": "message", "role": m["role"], "content": content})
        elif m["role"] == "tool":
            if "tool_call_id" not in m:
                return None
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": content})
        else:
            if m.get("thinking"):
                items.append({"type": "reasoning", "summary": [],
                              "content": [{"type": "reasoning_text", "text": m["thinking"]}]})  # fmt: skip
            calls = m.get("tool_calls", [])
            if content:
                items.append({"type": "message", "role": "assistant", "phase": "commentary" if calls else
                              "final_answer", "content": [{"type": "output_text", "text": content}]})  # fmt: skip
            items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": c["function"]["arguments"]} for c in calls]  # fmt: skip
    return items


def server_prompts(hists, tools, effort, date) -> tuple[list[list[int]], list[list[int] | None]]:
    """What `serve` renders for each history: through chat completions, and through Responses."""
    backend = RecordingBackend()
    chat, resp = [], []
    with TestClient(create_app(backend, model_name="m", start_date=date)) as client:
        for h in hists:
            body = {"model": "m", "messages": api_messages(h), "reasoning_effort": effort, "max_tokens": 8}
            r = client.post("/v1/chat/completions", json=body | ({"tools": tools} if tools else {}))
            assert r.status_code == 200, r.text
            chat.append(backend.prompts[-1])
            assert r.json()["usage"]["prompt_tokens"] == len(chat[-1])
            items = responses_items(h)
            if items is None:
                resp.append(None)
                continue
            flat = [{"type": "function", **t["function"]} for t in tools]
            body = {"model": "m", "input": items, "reasoning": {"effort": effort}, "max_output_tokens": 8,
                    "store": False} | ({"tools": flat} if tools else {})  # fmt: skip
            r = client.post("/v1/responses", json=body)
            assert r.status_code == 200, r.text
            resp.append(backend.prompts[-1])
    return chat, resp


# ------------------------------------------------------------------------------------------- the chat CLI
def chat_cli_prompts(ckpt, messages, effort, date, replies, monkeypatch, capsys) -> list[list[int]]:
    """`gptoss-jax chat` on the conversation's user messages (its instructions as --developer), the model
    writing `replies` (one per turn), each prompt printed by --show-prompt."""
    replies = iter(replies)

    def scripted(model, prompt, *, callback, stop_tokens, max_new_tokens, **kw):
        out = next(replies)
        for t in out:
            callback([t])
        return [out]

    monkeypatch.setattr(sys.modules["gptoss_jax.generate"], "generate", scripted)
    monkeypatch.setattr(cli, "_load", lambda args: None)
    dev = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    users = [text(m["content"]) for m in messages if m["role"] == "user"]
    argv = ["chat", str(ckpt), "--show-prompt", "--reasoning-effort", effort, "--date", date or "none",
            "--max-new-tokens", "4000", *(["--developer", dev] if dev else [])]  # fmt: skip
    for u in users:
        argv += ["-m", u]
    capsys.readouterr()
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return [[int(t) for t in line.split("] ", 1)[1].split()] for line in out.splitlines()
            if line.startswith("[prompt ")]  # fmt: skip


# ------------------------------------------------------------------------------------------- the old rule
def old_training_prompt(history, tools, effort, date) -> list[int]:
    """The rule training used before: harmony's default auto_drop_analysis on the whole history."""
    chat = harmony.Chat.from_messages(history, tools, reasoning_effort=effort)
    conv = Conversation.from_messages(chat.head(date) + chat.messages)
    return list(get_harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT))


# ------------------------------------------------------------------------------------------- the tests
def test_the_corpus_covers_what_it_must():
    assert len(CORPUS) >= 20
    efforts = {e for _, _, e, _ in CORPUS.values()}
    assert efforts == {"low", "medium", "high"}
    assert {d for _, _, _, d in CORPUS.values()} >= {None, "today", "2025-08-05"}
    flat = [m for msgs, *_ in CORPUS.values() for m in msgs]
    assert any(m["role"] == "developer" for m in flat) and any(m["role"] == "tool" for m in flat)
    assert any(m.get("content") and m.get("tool_calls") for m in flat)  # preambles
    assert any(len(m.get("tool_calls", [])) > 1 for m in flat)  # parallel calls
    finals = [
        sum(m["role"] == "assistant" and not m.get("tool_calls") for m in msgs)
        for msgs, *_ in CORPUS.values()
    ]
    assert max(finals) >= 3  # several finals in one conversation
    cli_cases = [n for n, (msgs, tools, *_) in CORPUS.items() if not tools]
    assert {CORPUS[n][2] for n in cli_cases} == {"low", "medium", "high"}


@pytest.mark.parametrize("name", list(CORPUS))
def test_training_prompts_are_what_serve_and_chat_render(name, serve_ckpt, monkeypatch, capsys):
    messages, tools, effort, date = CORPUS[name]
    targets = training_targets(messages, tools, effort, date)
    hists = histories(messages)
    assert len(targets) == len(hists)
    chat, resp = server_prompts(hists, tools, effort, date)
    for k, ((prompt, _), via_chat, via_responses) in enumerate(zip(targets, chat, resp, strict=True)):
        assert via_chat == prompt, f"turn {k}: chat completions renders another prompt than training"
        assert via_responses in (None, prompt), f"turn {k}: Responses renders another prompt than training"
    assert any(r is not None for r in resp) or any(
        m["role"] == "tool" and "tool_call_id" not in m for m in messages
    )
    if not tools and all(m.get("weight", 1) for m in messages):
        # the chat CLI: the model writes the training targets, which its parser puts into its history
        got = chat_cli_prompts(
            serve_ckpt, messages, effort, date, [t for _, t in targets], monkeypatch, capsys
        )
        assert got == [p for p, _ in targets]


def test_the_old_training_rule_renders_other_prompts():
    """harmony's default drop rule (what training used) differs from the server's on this corpus: the test
    above would fail on it."""
    differ = []
    for name, (messages, tools, effort, date) in CORPUS.items():
        for (prompt, _), h in zip(
            training_targets(messages, tools, effort, date), histories(messages), strict=True
        ):
            if old_training_prompt(h, tools, effort, date) != prompt:
                differ.append(name)
    assert {"the issue's two-turn tool loop", "three finals", "three turns of reasoning (the chat CLI's case)",
            "a tool loop in the second of three turns"} <= set(differ)  # fmt: skip


def test_the_issues_tool_loop():
    """Issue 19's example, prompt of the last assistant message: 226 tokens as served, as now trained, and
    as openai-harmony renders the conversation built here by hand; 239 under the old rule, which keeps R1,
    first differing at token 115."""
    messages, tools, effort, date = CORPUS["the issue's two-turn tool loop"]
    prompt = training_targets(messages, tools, effort, date)[-1][0]
    assert len(prompt) == 226
    old = old_training_prompt(messages[:-1], tools, effort, date)
    assert len(old) == 239
    assert next(i for i, (a, b) in enumerate(zip(old, prompt, strict=False)) if a != b) == 115

    def asst(text, channel):
        return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)

    def call(city):
        return (asst(json.dumps({"city": city}), "commentary").with_recipient("functions.get_weather")
                .with_content_type("<|constrain|>json"))  # fmt: skip

    def result(text):
        author = Author.new(Role.TOOL, "functions.get_weather")
        return (
            Message.from_author_and_content(author, text)
            .with_channel("commentary")
            .with_recipient("assistant")
        )

    tool = ToolDescription.new("get_weather", "Current weather", WEATHER["function"]["parameters"])
    by_hand = [
        Message.from_role_and_content(
            Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)
        ),
        Message.from_role_and_content(
            Role.DEVELOPER, DeveloperContent.new().with_instructions("Be brief.").with_function_tools([tool])
        ),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        call("Paris"),  # R1 dropped: a final answer follows it
        result('{"temp_c": 18}'),
        asst("It is 18 C in Paris.", "final"),
        Message.from_role_and_content(Role.USER, "And Oslo?"),
        asst("Now Oslo.", "analysis"),  # R2 kept: the tool loop is in progress
        call("Oslo"),
        result('{"temp_c": 3}'),
    ]
    expected = get_harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(by_hand),
        Role.ASSISTANT,
        RenderConversationConfig(auto_drop_analysis=False),
    )
    assert prompt == list(expected)

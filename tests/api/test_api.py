"""The server end to end: `gptoss-jax serve` in a subprocess on 127.0.0.1, a random tiny checkpoint with the
real vocabulary, driven by the official `openai` client (sync, async, streaming), the `openai-agents` SDK,
and raw HTTP where a client would refuse to send the bad input.

Scripted outputs: the server runs with its test hook (GPTOSS_JAX_SERVE_TEST_HOOKS=1), which forces the
engine to emit a queued harmony token sequence (through the real sampling path, as a one-token mask), so
every parsing path is checked on both APIs, streamed and not, and the two are compared. Constrained
decoding runs unscripted on the random model: its outputs are what the grammar makes of noise.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import httpx
import jsonschema
import openai
import pytest
from apitools import (
    KEY,
    MODEL,
    metric,
    script,
    serve_ckpt_fixture,  # noqa: F401 - the session's checkpoint fixture
    start_server,
    stop_server,
)

from gptoss_jax.tokenizer import encode

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
    },
}
TOOLS = [WEATHER, TIME]
RTOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's flat tool shape


# ------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc, url = start_server(
        serve_ckpt, log, "--max-seqs", "16", "--max-queue", "64", "--max-context", "2048"
    )
    yield url, log
    assert stop_server(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    """A factory: an AsyncOpenAI client belongs to the event loop it first runs in (one per asyncio.run)."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


# ------------------------------------------------------------------------------------ scripted outputs
# name -> (the model's output, chat-completions expectation, responses expectation, max_tokens)
#   chat: (content, reasoning, [(tool, arguments)], finish_reason)
#   responses: ([(item type, phase or name, text or arguments)], status)
CUT = (
    "<|channel|>analysis<|message|>Thinking it over.<|end|><|start|>assistant<|channel|>final<|message|>"
    "Here is a long answer that will not fit in the budget.<|return|>"
)
CUT_AT = encode(CUT, allowed_special="all").index(encode(" will")[0])  # max_tokens: cut before " will"
SCENARIOS = {
    "reasoning then final": (
        (
            "<|channel|>analysis<|message|>The user asks for 2+2.<|end|><|start|>assistant"
            "<|channel|>final<|message|>"
            "2 + 2 = 4.<|return|>"
        ),
        ("2 + 2 = 4.", "The user asks for 2+2.", [], "stop"),
        (
            [("reasoning", None, "The user asks for 2+2."), ("message", "final_answer", "2 + 2 = 4.")],
            "completed",
        ),
        200,
    ),
    "reasoning then tool call": (
        (
            "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant"
            "<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
        ),
        (None, "Need the weather tool.", [("get_weather", '{"city": "Paris"}')], "tool_calls"),
        (
            [
                ("reasoning", None, "Need the weather tool."),
                ("function_call", "get_weather", '{"city": "Paris"}'),
            ],
            "completed",
        ),
        200,
    ),
    "two tool calls": (
        (
            "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            '{"city":"Paris"}<|end|>'
            "<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>"
            '{"timezone":"Europe/Paris"}<|call|>'
        ),
        (
            None,
            None,
            [("get_weather", '{"city":"Paris"}'), ("get_time", '{"timezone":"Europe/Paris"}')],
            "tool_calls",
        ),
        (
            [
                ("function_call", "get_weather", '{"city":"Paris"}'),
                ("function_call", "get_time", '{"timezone":"Europe/Paris"}'),
            ],
            "completed",
        ),
        200,
    ),
    "commentary preamble": (
        (
            "<|channel|>analysis<|message|>Call the tool.<|end|><|start|>assistant"
            "<|channel|>commentary<|message|>"
            "Let me look that up.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
            '<|constrain|>json<|message|>{"city":"Oslo"}<|call|>'
        ),
        (None, "Call the tool.\n\nLet me look that up.", [("get_weather", '{"city":"Oslo"}')], "tool_calls"),
        (
            [
                ("reasoning", None, "Call the tool."),
                ("message", "commentary", "Let me look that up."),
                ("function_call", "get_weather", '{"city":"Oslo"}'),
            ],
            "completed",
        ),
        200,
    ),
    "cut off by max_tokens": (
        CUT,
        ("Here is a long answer that", "Thinking it over.", [], "length"),
        (
            [
                ("reasoning", None, "Thinking it over."),
                ("message", "final_answer", "Here is a long answer that"),
            ],
            "incomplete",
        ),
        CUT_AT,
    ),
    "malformed harmony": (
        (
            "<|channel|>final<|message|>Hello<|end|> stray text<|channel|><|channel|>final<|message|>"
            " world<|return|>"
        ),
        ("Hello stray text world", None, [], "stop"),
        (
            [
                ("message", "final_answer", "Hello"),
                ("message", "final_answer", " stray text"),
                ("message", "final_answer", " world"),
            ],
            "completed",
        ),
        200,
    ),
    "refusal without channel tokens": (
        "I'm sorry, but I can't help with that.<|return|>",
        ("I'm sorry, but I can't help with that.", None, [], "stop"),
        ([("message", "final_answer", "I'm sorry, but I can't help with that.")], "completed"),
        200,
    ),
}


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def chat_of_message(resp):
    c = resp.choices[0]
    m = c.message
    calls = [(t.function.name, t.function.arguments) for t in m.tool_calls or []]
    assert extra(m, "reasoning") == extra(m, "reasoning_content")
    return (m.content, extra(m, "reasoning"), calls, c.finish_reason), [t.id for t in m.tool_calls or []]


def chat_of_stream(chunks):
    content, reasoning, calls, finish, ids = [], [], {}, None, []
    for ch in chunks:
        assert ch.object == "chat.completion.chunk"
        for c in ch.choices:
            d = c.delta
            if d.content:
                assert "<|" not in d.content
                content.append(d.content)
            if extra(d, "reasoning"):
                reasoning.append(extra(d, "reasoning"))
            for t in d.tool_calls or []:
                if t.index not in calls:  # the first delta of a call: id, name and empty arguments
                    assert t.id and t.function.name and t.function.arguments == ""
                    calls[t.index] = [t.function.name, ""]
                    ids.append(t.id)
                else:
                    assert t.id is None and t.function.name is None
                    calls[t.index][1] += t.function.arguments
            finish = c.finish_reason or finish
    tool_calls = [tuple(calls[i]) for i in sorted(calls)]
    return (
        "".join(content) if content or not tool_calls else None,
        "".join(reasoning) or None,
        tool_calls,
        finish,
    ), ids


@pytest.mark.parametrize("name", SCENARIOS)
def test_chat_completions_scripted(name, server, client):
    text, want, _, max_tokens = SCENARIOS[name]
    url, log = server
    body = {
        "model": MODEL,
        "messages": [SYSTEM, {"role": "user", "content": "Hi"}],
        "tools": TOOLS,
        "max_tokens": max_tokens,
        "temperature": 0,
    }  # greedy: the scripted token is the only one allowed either way, and it is cheaper
    script(url, text, text)
    resp = client.chat.completions.create(**body)
    got, ids = chat_of_message(resp)
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    streamed, sids = chat_of_stream(chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    assert got == want
    assert streamed == got  # arguments byte-identical, reasoning and content as the message's
    assert len(set(ids + sids)) == 2 * len(ids) and all(i.startswith("call_") for i in ids)
    u = resp.usage
    n = len(encode(text, allowed_special="all"))
    assert (
        u.completion_tokens == min(n, max_tokens) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    )
    if want[1]:
        assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens
    if name == "malformed harmony":
        assert "not valid harmony" in log.read_text()


def responses_of_response(r):
    items = []
    for it in r.output:
        if it.type == "reasoning":
            items.append(("reasoning", None, "".join(c.text for c in it.content)))
        elif it.type == "message":
            items.append(("message", it.phase, "".join(c.text for c in it.content)))
        else:
            items.append(("function_call", it.name, it.arguments))
    return items, r.status


def responses_of_events(events):
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    items, text = {}, {}
    for e in events:
        if e.type == "response.output_item.added":
            assert e.output_index == len(items) and e.item.status == "in_progress"
            items[e.output_index] = e.item
            text[e.output_index] = ""
        elif e.type in (
            "response.reasoning_text.delta",
            "response.output_text.delta",
            "response.function_call_arguments.delta",
        ):
            assert e.item_id == items[e.output_index].id
            text[e.output_index] += e.delta
        elif e.type in ("response.reasoning_text.done", "response.output_text.done"):
            assert e.text == text[e.output_index]
        elif e.type == "response.function_call_arguments.done":
            assert e.arguments == text[e.output_index]
        elif e.type == "response.output_item.done":
            assert e.item.id == items[e.output_index].id
    final = events[-1].response
    assert final.usage.output_tokens > 0
    got = responses_of_response(final)
    kinds = [
        (i.type, i.phase if i.type == "message" else i.name if i.type == "function_call" else None)
        for i in items.values()
    ]
    assert [(k, p, text[i]) for i, (k, p) in enumerate(kinds)] == got[0]
    return got


@pytest.mark.parametrize("name", SCENARIOS)
def test_responses_scripted(name, server, aclient):
    text, _, want, max_tokens = SCENARIOS[name]
    url, _ = server
    body = {
        "model": MODEL,
        "instructions": "Be helpful.",
        "input": "Hi",
        "tools": RTOOLS,
        "max_output_tokens": max_tokens,
        "temperature": 0,
    }

    async def both():
        script(url, text, text)
        c = aclient()
        r = await c.responses.create(**body)
        events = [e async for e in await c.responses.create(**body, stream=True)]
        return r, events

    r, events = asyncio.run(both())
    assert responses_of_response(r) == want
    assert responses_of_events(events) == want
    if want[1] == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
        assert events[-1].type == "response.incomplete"
    else:
        assert events[-1].type == "response.completed"
    assert r.usage.output_tokens == min(len(encode(text, allowed_special="all")), max_tokens)


def test_tool_loop_keeps_the_reasoning_until_the_final_answer(server, client):
    """Turn 1 calls the tool; turn 2 sends the call (with its reasoning) and the result: the prompt holds
    the reasoning (tool loop), then turn 3 after the final answer drops it (prompt sizes checked against
    harmony renderings built here)."""
    from openai_harmony import (
        Author,
        Conversation,
        DeveloperContent,
        Message,
        RenderConversationConfig,
        Role,
        SystemContent,
        ToolDescription,
    )

    from gptoss_jax.tokenizer import get_harmony_encoding

    url, _ = server
    call_text, (_, reasoning, calls, _), _, _ = SCENARIOS["reasoning then tool call"]
    script(url, call_text, "<|channel|>final<|message|>It is sunny in Paris.<|return|>")
    msgs = [SYSTEM, {"role": "user", "content": "Weather in Paris?"}]
    r1 = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=100, temperature=0
    )
    m = r1.choices[0].message
    assert r1.choices[0].finish_reason == "tool_calls" and m.tool_calls[0].function.name == "get_weather"
    msgs += [
        {
            "role": "assistant",
            "content": None,
            "reasoning": extra(m, "reasoning"),
            "tool_calls": [t.model_dump() for t in m.tool_calls],
        },
        {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": '{"sky": "sunny"}'},
    ]
    r2 = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=100, temperature=0
    )
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"

    def rendered(history):
        sys_ = SystemContent.new().with_conversation_start_date(dt.date.today().isoformat())
        dev = (
            DeveloperContent.new()
            .with_instructions(SYSTEM["content"])
            .with_function_tools(
                [
                    ToolDescription.new(
                        t["function"]["name"], t["function"]["description"], t["function"]["parameters"]
                    )
                    for t in TOOLS
                ]
            )
        )
        conv = Conversation.from_messages(
            [
                Message.from_role_and_content(Role.SYSTEM, sys_),
                Message.from_role_and_content(Role.DEVELOPER, dev),
                *history,
            ]
        )
        return get_harmony_encoding().render_conversation_for_completion(
            conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
        )

    A = lambda t, ch: Message.from_role_and_content(Role.ASSISTANT, t).with_channel(ch)
    user = Message.from_role_and_content(Role.USER, "Weather in Paris?")
    call = (
        A(calls[0][1], "commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json")
    )
    result = (
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"sky": "sunny"}')
        .with_channel("commentary")
        .with_recipient("assistant")
    )
    loop = [user, A(reasoning, "analysis"), call, result]
    assert r2.usage.prompt_tokens == len(rendered(loop))
    script(url, "<|channel|>final<|message|>Bye.<|return|>")
    msgs += [{"role": "assistant", "content": "It is sunny in Paris."}, {"role": "user", "content": "Thanks"}]
    r3 = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=100, temperature=0
    )
    done = [
        user,
        call,
        result,
        A("It is sunny in Paris.", "final"),
        Message.from_role_and_content(Role.USER, "Thanks"),
    ]
    assert r3.usage.prompt_tokens == len(rendered(done))


def test_responses_previous_response_id_and_stream_helper(server, client):
    url, _ = server
    script(url, SCENARIOS["reasoning then tool call"][0], "<|channel|>final<|message|>Sunny.<|return|>")
    with client.responses.stream(
        model=MODEL, input="Weather in Paris?", tools=RTOOLS, max_output_tokens=100
    ) as s:
        r1 = s.get_final_response()
    fc = next(i for i in r1.output if i.type == "function_call")
    assert fc.name == "get_weather" and fc.arguments == '{"city": "Paris"}' and r1.store
    assert client.responses.retrieve(r1.id).id == r1.id
    r2 = client.responses.create(
        model=MODEL,
        previous_response_id=r1.id,
        tools=RTOOLS,
        max_output_tokens=100,
        input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}],
    )
    assert r2.output_text == "Sunny." and r2.previous_response_id == r1.id
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens - 5
    with pytest.raises(openai.NotFoundError, match="no stored response 'resp_nope'"):
        client.responses.create(model=MODEL, previous_response_id="resp_nope", input="x")


def test_openai_agents_runs_a_function_tool(server):
    """The Agents SDK's loop over our Responses API (and over chat completions): the model calls the tool,
    the SDK runs it and sends the result back, the model answers."""
    import agents

    url, _ = server
    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    call = (
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
    )
    final = "<|channel|>final<|message|>It is sunny in Paris.<|return|>"
    for kind in (agents.OpenAIResponsesModel, agents.OpenAIChatCompletionsModel):
        model = kind(MODEL, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0))
        script(url, call, final)
        agent = agents.Agent(
            name="weather",
            instructions="Answer with the tool.",
            tools=[get_weather],
            model=model,
            model_settings=agents.ModelSettings(max_tokens=100, temperature=0),
        )
        result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?"))
        assert result.final_output == "It is sunny in Paris."
        assert seen.pop() == "Paris" and not seen


def test_completions_echo_logprobs_and_stream(server, client):
    from gptoss_jax.tokenizer import decode

    prompt = "The capital of France is"
    ids = encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and lp.tokens == [decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
    # scoring = the log-probs the model gives while generating the same tokens
    script(server[0], [ids[-1]])
    g = client.completions.create(model=MODEL, prompt=ids[:-1], max_tokens=1, logprobs=2)
    assert g.choices[0].text == decode([ids[-1]])
    assert g.choices[0].logprobs.token_logprobs[0] == pytest.approx(lp.token_logprobs[-1], abs=2e-3)
    # streamed text equals the non-streamed text
    a = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    s = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == a.choices[0].text
    assert chunks[-1].choices[0].finish_reason == a.choices[0].finish_reason == "length"


def test_chat_logprobs_n_and_stop(server, client):
    url, _ = server
    text = "<|channel|>final<|message|>one two three four<|return|>"
    script(url, text, text)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count"}],
        n=2,
        max_tokens=50,
        logprobs=True,
        top_logprobs=3,
        stop=[" three"],
        temperature=0,
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.content == "one two" and c.finish_reason == "stop"
        toks = [x.token for x in c.logprobs.content]
        assert "".join(toks).startswith("one two") and all(
            len(x.top_logprobs) == 3 for x in c.logprobs.content
        )
    # two choices streamed at once: each index gets its own text and finish reason
    script(
        url, "<|channel|>final<|message|>left<|return|>", "<|channel|>final<|message|>right side<|return|>"
    )
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        n=2,
        max_tokens=20,
        temperature=0,
        stream=True,
    )
    text, finish = {0: "", 1: ""}, {}
    for ch in chunks:
        for c in ch.choices:
            text[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert sorted(text.values()) == ["left", "right side"] and finish == {0: "stop", 1: "stop"}


def test_models_health_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    r = httpx.get(f"{url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nothing"
    # without --allow-runtime-adapters the LoRA endpoints do not exist
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route POST /v1/load_lora_adapter"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    chats = 'gptoss_http_requests_total{route="/v1/chat/completions",status="200"}'

    def count() -> float:  # this test's own request counted, whatever other tests sent before it
        try:
            return metric(url, chats)
        except KeyError:
            return 0.0

    before = count()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert count() == before + 1
    assert "# TYPE gptoss_http_requests_total counter" in httpx.get(f"{url}/metrics").text


# ------------------------------------------------------------------------------------ constrained decoding
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
FORECAST = {
    "type": "function",
    "function": {"name": "forecast", "description": "Weather forecast", "parameters": SCHEMA, "strict": True},
}
NOW_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
NOW = {
    "type": "function",
    "function": {"name": "now", "description": "Weather now", "parameters": NOW_SCHEMA, "strict": True},
}


def count_valid(outputs, schema=SCHEMA) -> int:
    ok = 0
    for o in outputs:
        try:
            jsonschema.validate(json.loads(o), schema)
            ok += 1
        except (ValueError, TypeError, jsonschema.ValidationError):
            pass
    return ok


def test_constrained_decoding_on_a_random_model(server, aclient):
    """tool_choice required + strict tools, and response_format json_schema: 50 of 50 valid each. The same
    requests without constraints are counted too (a random model never writes valid JSON). Greedy decoding
    (sampling sorts the whole vocabulary per row, slow on CPU); each request asks about another city, so
    the 50 outputs differ."""

    async def run():
        c, gate = aclient(), asyncio.Semaphore(16)

        async def one(i, **kw):
            async with gate:
                msgs = [{"role": "user", "content": f"Forecast for city number {i}?"}]
                return await c.chat.completions.create(model=MODEL, messages=msgs, temperature=0, **kw)

        fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
        tools = [one(i, tools=[FORECAST, NOW], tool_choice="required", max_tokens=64) for i in range(50)]
        jsons = [one(i, response_format=fmt, max_tokens=64) for i in range(50)]
        free = [one(i, max_tokens=24) for i in range(50)]
        done = await asyncio.gather(*tools, *jsons, *free)  # one mixed batch: fewer engine shapes to compile
        return done[:50], done[50:100], done[100:]

    tools, jsons, free = asyncio.run(run())
    calls = [r.choices[0].message.tool_calls for r in tools]
    assert all(c and r.choices[0].finish_reason == "tool_calls" for c, r in zip(calls, tools, strict=True))
    args = {
        n: [c[0].function.arguments for c in calls if c[0].function.name == n] for n in ("forecast", "now")
    }
    assert len(args["forecast"]) + len(args["now"]) == 50
    assert count_valid(args["forecast"]) + count_valid(args["now"], NOW_SCHEMA) == 50
    contents = [r.choices[0].message.content for r in jsons]
    assert count_valid(contents) == 50 and len(set(contents)) > 1
    unconstrained = count_valid([r.choices[0].message.content for r in free])
    print(
        f"\nconstrained: tool arguments 50/50 valid ({len(args['forecast'])} forecast, "
        f"{len(args['now'])} now), "
        f"json_schema 50/50; unconstrained: {unconstrained}/50 valid"
    )
    assert unconstrained < 50


def test_named_tool_choice_forces_that_call(server, client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=96,
        tools=[FORECAST, WEATHER],
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "forecast"}},
    )
    (c,) = r.choices[0].message.tool_calls
    assert c.function.name == "forecast" and count_valid([c.function.arguments]) == 1


# ------------------------------------------------------------------------------------------- bad input
BAD = {
    "malformed JSON": (b'{"model": "x", "messages": [', 400, "not valid JSON"),
    "missing messages": ({"model": MODEL}, 400, "messages: field required"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    "tool message matching no call": (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "call_x", "content": "y"},
            ]
        },
        400,
        "'call_x' matches no tool call",
    ),
    "tool with an invalid schema": (
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}},
                    },
                }
            ],
        },
        400,
        "invalid JSON Schema",
    ),
    "tool_choice naming an unknown tool": (
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        400,
        "'nope', which is not among the tools",
    ),
    "n < 1": ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n: Input should be greater"),
    "negative max_tokens": (
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
        400,
        "max_tokens",
    ),
    "temperature above 2": (
        {"messages": [{"role": "user", "content": "x"}], "temperature": 2.5},
        400,
        "temperature",
    ),
    "max_tokens past the context": (
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000},
        400,
        "plus max_tokens (5000) exceed the context length of 2048",
    ),
    "prompt past the context": (
        {"messages": [{"role": "user", "content": "hello " * 2100}]},
        400,
        "the context length is 2048",
    ),
    "unknown model": (
        {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]},
        404,
        "'gpt-5' does not exist",
    ),
    "unsupported field": (
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}},
        400,
        "logit_bias: not supported",
    ),
    "image content": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
    ),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(name, server):
    url, _ = server
    body, status, needle = BAD[name]
    kw = {"content": body} if isinstance(body, bytes) else {"json": {"model": MODEL, **body}}
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "\n" not in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/health").status_code == 200


def test_auth_and_body_limit(server):
    url, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (50 * 2**20) + b'"}]}'
    r = httpx.post(
        f"{url}/v1/chat/completions", content=big, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 200
    log = server[1].read_text()
    assert "POST /v1/chat/completions 413" in log and "a" * 100 not in log  # one line per request, no body
